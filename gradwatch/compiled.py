"""torch.compile: make hooks attached after a compiled call take effect.

Dynamo does not guard on module hooks by default, so hooks registered after a compiled
module has run are silently ignored by its cached code. When ``watch()`` is given a
compiled module (``torch.compile(model)`` or ``model.compile()``) it drops dynamo's
caches once, so the next call traces the model again, hooks included. A model compiled
*after* ``watch()`` needs nothing: the hooks are there when it is traced.
"""

from __future__ import annotations

import torch.nn as nn


def is_compiled(model: nn.Module) -> bool:
    """True for a ``torch.compile`` wrapper or a module compiled in place, also inside a
    DDP / DataParallel wrapper (``DDP(torch.compile(m))``, ``torch.compile(DDP(m))``)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            return True
        if getattr(model, "_compiled_call_impl", None) is not None:
            return True
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return False


def forget_compiled_code(model: nn.Module) -> bool:
    """Reset dynamo (all cached compiled code of the process) if ``model`` is compiled.

    Returns whether a reset happened. The cost is one re-trace of each compiled function
    at its next call; it happens once, at ``watch()`` time, never during training.
    """
    if not is_compiled(model):
        return False
    import torch._dynamo

    torch._dynamo.reset()
    return True
