"""Thin adapters that attach gradwatch from inside a training framework.

Each submodule imports its framework lazily: ``gradwatch.integrations.lightning`` needs
``pip install gradwatch[lightning]``, ``gradwatch.integrations.transformers`` needs
``pip install gradwatch[transformers]``.
"""
