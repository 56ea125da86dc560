"""Lightning adapter: a real tiny fit on CPU, stats equal to the same loop written by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.support.events import event_files, scalars

pl = pytest.importorskip("lightning.pytorch", reason="pip install gradwatch[lightning]")

import gradwatch  # noqa: E402
from gradwatch.integrations.lightning import GradwatchCallback  # noqa: E402

ACCUM = 2
STEPS = 4
CLIP = 0.05
BATCH = 4


def _data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(3)
    n = BATCH * ACCUM * STEPS
    return torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g),
                                          torch.randn(n, 2, generator=g))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self.net(x) - y).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _by_hand() -> dict[str, dict[str, float]]:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    w = gradwatch.watch(net, optimizer=opt, tensorboard=False, every=STEPS)
    loader = torch.utils.data.DataLoader(_data(), batch_size=BATCH, shuffle=False)
    for i, (x, y) in enumerate(loader):
        ((net(x) - y).pow(2).mean() / ACCUM).backward()
        if (i + 1) % ACCUM == 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
            opt.step()
            opt.zero_grad()
    w.close()
    assert w.latest is not None
    return w.latest.stats


def test_lightning_fit_writes_into_the_logger(tmp_path):
    cb = GradwatchCallback(every=STEPS)
    logger = pl.loggers.TensorBoardLogger(save_dir=str(tmp_path), name="run")
    trainer = pl.Trainer(max_steps=STEPS, accumulate_grad_batches=ACCUM, gradient_clip_val=CLIP,
                         accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb])
    loader = torch.utils.data.DataLoader(_data(), batch_size=BATCH, shuffle=False)
    trainer.fit(Tiny(), loader)
    w = cb.watcher
    assert w is not None and w._closed
    snap = w.latest
    assert snap is not None and snap.step == STEPS == trainer.global_step
    ref = _by_hand()
    # the LightningModule's names carry its attribute: "net.0"
    assert set(snap.stats) == {f"net.{k}" for k in ref}
    for k, stats in ref.items():
        for s, v in stats.items():
            assert snap.stats[f"net.{k}"][s] == pytest.approx(v, rel=1e-5), (k, s)
    # gradwatch and Lightning's own metrics: same writer, one event file
    files = event_files(logger.log_dir)
    assert len(files) == 1
    sc = scalars(logger.log_dir)
    assert "train_loss" in sc
    assert sc["gradwatch/grad_norm/net.0"][STEPS] == pytest.approx(
        snap.stats["net.0"]["grad_norm"], rel=1e-6)


def test_lightning_callback_refuses_what_it_sets():
    with pytest.raises(ValueError, match="optimizer"):
        GradwatchCallback(optimizer=None)


def test_lightning_mixed_precision_scaler_skip(tmp_path):
    """Lightning's AMP plugin with a GradScaler: the overflow step is counted, not alerted."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    data = _data()
    x, y = data.tensors
    x = x.clone()
    x[2 * BATCH, 0] = float("inf")  # the third batch overflows
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    cb = GradwatchCallback(every=1000, on_alert="raise", tensorboard=False)
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                         batch_size=BATCH, shuffle=False)
    trainer.fit(Tiny(), loader)
    snap = cb.watcher.latest if cb.watcher is not None else None
    assert snap is not None and snap.amp_skipped == 1
    assert cb.watcher is not None and cb.watcher.alerts == []
    for name, stats in snap.stats.items():
        assert stats["nonfinite"] == 0.0, name
        assert all(v == v for v in stats.values()), name  # no NaN from the skipped step
    assert "step" not in scaler.__dict__  # handed back at fit end


class DeadTiny(Tiny):
    """Its ReLU is dead from the start: the Linear before it has a bias of -50."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.net[0].bias.fill_(-50.0)


def test_lightning_fit_warns_with_the_cause_and_hint():
    cb = GradwatchCallback(every=2, tensorboard=False, thresholds={"patience": 1})
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb])
    loader = torch.utils.data.DataLoader(_data(), batch_size=BATCH, shuffle=False)
    with pytest.warns(gradwatch.DeadActivationWarning) as rec:
        trainer.fit(DeadTiny(), loader)
    msgs = [str(r.message) for r in rec if r.category is gradwatch.DeadActivationWarning]
    assert len(msgs) == 1  # the second window's is held back by the rate limit
    assert cb.watcher is not None
    a = cb.watcher.alerts[0]
    assert (a.layer, a.kind, a.cause) == ("net.1", "dead", "bias_shift")
    assert msgs[0] == f"{a.message}\n  cause bias_shift: {a.hint}"
    assert "its inputs (the outputs of 'net.0') have mean -5" in a.hint
    assert "the bias of 'net.0' had mean -50 at watch()" in a.hint
