"""Every place a hook can hide: the sizes of all hook containers gradwatch could touch."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules import module as module_mod
from torch.optim import optimizer as optimizer_mod

_MODULE_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                 "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")
_GLOBAL_MODULE = ("_global_forward_hooks", "_global_forward_pre_hooks",
                  "_global_backward_hooks", "_global_backward_pre_hooks")


def hook_state(model: nn.Module, optimizers: tuple[torch.optim.Optimizer, ...] = (),
               scalers: tuple[Any, ...] = ()) -> dict[str, Any]:
    """Sizes of every module's hook dicts, the optimizers' step hooks, torch's global
    module and optimizer hooks, and whether a GradScaler's ``step`` is replaced."""
    state: dict[str, Any] = {}
    for name, m in model.named_modules():
        for d in _MODULE_DICTS:
            state[f"{name or '(root)'}.{d}"] = len(getattr(m, d, {}))
        state[f"{name or '(root)'}.__dict__"] = sorted(
            k for k in m.__dict__ if k.startswith("_gradwatch"))
    for i, o in enumerate(optimizers):
        state[f"opt{i}.pre"] = len(o._optimizer_step_pre_hooks)
        state[f"opt{i}.post"] = len(o._optimizer_step_post_hooks)
    for i, s in enumerate(scalers):
        state[f"scaler{i}.step"] = "step" in s.__dict__
    state["global.optimizer_pre"] = len(optimizer_mod._global_optimizer_pre_hooks)
    state["global.optimizer_post"] = len(optimizer_mod._global_optimizer_post_hooks)
    for d in _GLOBAL_MODULE:
        state[f"global.{d}"] = len(getattr(module_mod, d))
    return state
