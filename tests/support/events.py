"""Read TensorBoard event files back with TensorBoard's own reader (for the tests)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def load(logdir: str | Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(logdir: str | Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} for every scalar in the run."""
    acc = load(logdir)
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def event_files(logdir: str | Path) -> list[Path]:
    return sorted(Path(logdir).rglob("events.out.tfevents.*"))
