"""Hugging Face ``Trainer``: ``GradwatchCallback`` watches the model during ``train()``.

    from gradwatch.integrations.transformers import GradwatchCallback
    trainer = Trainer(model, args, callbacks=[GradwatchCallback(every=50)], ...)

At train start it calls ``gradwatch.watch`` on the model with the Trainer's optimizer (the
plain torch optimizer inside accelerate's wrapper) and its GradScaler when fp16 mixed
precision uses one. The Trainer clips before ``optimizer.step()`` and steps once per
accumulation cycle, so the stats are those of the accumulated, clipped gradients.
TensorBoard goes where the Trainer's own ``TensorBoardCallback`` writes: the
``TENSORBOARD_LOGGING_DIR`` environment variable, else ``args.logging_dir`` (older
versions), else ``<output_dir>/runs/gradwatch``. Only the main process writes and warns.
"""

from __future__ import annotations

import os
from typing import Any

import torch

import gradwatch
from gradwatch.watcher import Watcher

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover
    raise ImportError(
        "gradwatch.integrations.transformers needs transformers: "
        "pip install gradwatch[transformers]"
    ) from e


def _plain_optimizer(opt: Any) -> Any:
    """accelerate's AcceleratedOptimizer -> the torch optimizer that really steps."""
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def log_dir(args: Any) -> str:
    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    if env:
        return os.path.expanduser(env)
    old = getattr(args, "logging_dir", None)
    if old:
        return str(old)
    return os.path.join(args.output_dir, "runs", "gradwatch")


class GradwatchCallback(TrainerCallback):  # type: ignore[misc]
    """Attach gradwatch during ``Trainer.train``; keyword arguments go to ``gradwatch.watch``.

    ``watcher`` is the live ``gradwatch.Watcher`` during training (the closed one after).
    """

    def __init__(self, **watch_kwargs: Any) -> None:
        bad = sorted(set(watch_kwargs) & {"optimizer", "scaler"})
        if bad:
            raise ValueError(
                f"GradwatchCallback sets {bad} from the Trainer itself; got them as arguments"
            )
        self.watch_kwargs = watch_kwargs
        self.watcher: Watcher | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        optimizer = kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError("GradwatchCallback: the Trainer passed no model or optimizer")
        kw = dict(self.watch_kwargs)
        if "writer" not in kw and "logdir" not in kw and kw.get("tensorboard", True):
            kw["logdir"] = log_dir(args)
        kw["optimizer"] = _plain_optimizer(optimizer)
        kw["scaler"] = getattr(optimizer, "scaler", None)
        self.watcher = gradwatch.watch(model, **kw)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watcher is not None:
            self.watcher.close()
