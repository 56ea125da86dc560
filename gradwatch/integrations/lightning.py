"""Lightning: ``GradwatchCallback`` watches the LightningModule for the length of ``fit``.

    from gradwatch.integrations.lightning import GradwatchCallback
    trainer = lightning.Trainer(callbacks=[GradwatchCallback(every=50)], ...)

At ``fit`` start it calls ``gradwatch.watch`` on the LightningModule with the trainer's
(first) optimizer, the precision plugin's GradScaler if there is one, and the
``SummaryWriter`` of the trainer's ``TensorBoardLogger`` (so gradwatch's scalars sit next
to the logged metrics, one event file); without a TensorBoard logger it writes to
``<default_root_dir>/gradwatch``. It closes the watcher when ``fit`` ends. Lightning calls
``optimizer.step(closure)``; gradwatch reads the gradients after the closure has run, so
they are the accumulated, unscaled, clipped ones the optimizer used.
"""

from __future__ import annotations

import os
from typing import Any

import gradwatch
from gradwatch.watcher import Watcher

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning import Callback  # type: ignore[no-redef,assignment]
        from pytorch_lightning.loggers import TensorBoardLogger  # type: ignore[no-redef,assignment]
    except ImportError as e:
        raise ImportError(
            "gradwatch.integrations.lightning needs Lightning: pip install gradwatch[lightning]"
        ) from e

_SET_BY_CALLBACK = ("optimizer", "scaler")


class GradwatchCallback(Callback):  # type: ignore[misc]
    """Attach gradwatch during ``Trainer.fit``; keyword arguments go to ``gradwatch.watch``.

    ``writer``/``logdir`` override the TensorBoard destination. ``watcher`` is the live
    ``gradwatch.Watcher`` during fit (and the closed one after, for ``latest``/``alerts``).
    """

    def __init__(self, **watch_kwargs: Any) -> None:
        bad = sorted(set(watch_kwargs) & set(_SET_BY_CALLBACK))
        if bad:
            raise ValueError(
                f"GradwatchCallback sets {bad} from the Trainer itself; got them as arguments"
            )
        self.watch_kwargs = watch_kwargs
        self.watcher: Watcher | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        kw = dict(self.watch_kwargs)
        if "writer" not in kw and "logdir" not in kw and kw.get("tensorboard", True):
            writer = next((lg.experiment for lg in trainer.loggers
                           if isinstance(lg, TensorBoardLogger)), None)
            if writer is not None:
                kw["writer"] = writer
            else:
                kw["logdir"] = os.path.join(trainer.default_root_dir, "gradwatch")
        optimizers = list(trainer.optimizers)
        kw["optimizer"] = optimizers[0] if optimizers else None
        kw["scaler"] = getattr(trainer.precision_plugin, "scaler", None)
        self.watcher = gradwatch.watch(pl_module, **kw)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.watcher is not None:
            self.watcher.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.watcher is not None:
            self.watcher.on_alert = "log"  # the run is failing: do not add an alert to it
            self.watcher.close()
