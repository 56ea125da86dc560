"""Hugging Face Trainer adapter: a real tiny run on CPU (model built from a config)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.events import scalars

transformers = pytest.importorskip("transformers", reason="pip install gradwatch[transformers]")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate")

from gradwatch.integrations.transformers import GradwatchCallback  # noqa: E402

STEPS = 3
CLIP = 1e-3  # far below the gradient norm: every step is clipped


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, 40, (n, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_hf_trainer_run(tmp_path, monkeypatch):
    tb = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tb))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1,
                                  n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_grad_norm=CLIP, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=["tensorboard"], use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    cb = GradwatchCallback(every=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(16),
                                   callbacks=[cb])
    trainer.train()
    w = cb.watcher
    assert w is not None and w._closed
    assert w.latest is not None and w.latest.step == STEPS == trainer.state.global_step
    assert "transformer.h.0.attn.c_attn" in w.layers  # the model's own names
    sc = scalars(tb)
    assert "train/loss" in sc  # the Trainer's own TensorBoard callback, same directory
    # every optimizer step: the layers' gradient norms together are the clipped total norm
    # (lm_head is tied to wte: counted once), so the stats are post-clip, once per step
    norms = {t: v for t, v in sc.items() if t.startswith("gradwatch/grad_norm/")}
    assert len(norms) >= 5
    for step in range(1, STEPS + 1):
        total = math.sqrt(sum(v[step] ** 2 for v in norms.values()))
        assert total == pytest.approx(CLIP, rel=1e-3), step
