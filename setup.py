"""The one compiled part: gradwatch._kernels, one-pass statistics of CPU tensors.

Optional: where no C compiler is found the package installs without it, and gradwatch uses
PyTorch ops for the same statistics (``gradwatch.cpukernels.AVAILABLE`` says which).
Everything else is in setup.cfg.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("gradwatch._kernels", ["gradwatch/_kernels.c"], optional=True)])
