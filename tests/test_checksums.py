"""TensorBoard's event records checksummed in C (``gradwatch.checksums``): the same
checksums as TensorBoard's own Python CRC32C, and event files TensorBoard reads back."""

from __future__ import annotations

import random

from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as stub
from tensorboard.summary.writer import record_writer

from gradwatch import checksums


def test_same_checksums_as_tensorboards_own() -> None:
    assert checksums.install()  # google-crc32c's C implementation is installed here
    fast = record_writer.masked_crc32c
    assert stub.masked_crc32c is fast  # the reader's too
    own = checksums._masked(lambda d: stub.crc32c(d))  # TensorBoard's table, byte by byte
    rng = random.Random(0)
    for n in [0, 1, 3, 4, 7, 8, 15, 16, 17, 255, 256, 1000, 4097]:
        data = bytes(rng.randrange(256) for _ in range(n))
        assert fast(data) == own(data) == stub.u32(own(data)), n
    assert checksums.install()  # once per process; asking again is harmless


def test_event_files_read_back_with_checked_checksums(tmp_path, monkeypatch) -> None:
    """A watched run's event file, written with the checksums the sink installs, read by
    TensorBoard's own reader (it recomputes every record's checksum and refuses a
    mismatch)."""
    import torch

    import gradwatch

    # as in a fresh process: TensorBoard's own functions, nothing installed yet
    own = stub.masked_crc32c
    monkeypatch.setattr(checksums, "_installed", [])
    monkeypatch.setattr(record_writer, "masked_crc32c", own)
    monkeypatch.setattr(stub, "masked_crc32c", own)

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, optimizer=opt, logdir=str(tmp_path), every=2)
    for _ in range(6):
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    w.close()
    # installed by the TensorBoard sink
    assert record_writer.masked_crc32c.__module__ == "gradwatch.checksums"
    assert stub.masked_crc32c is record_writer.masked_crc32c
    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("gradwatch/grad_norm/0")]
    assert steps == [2, 4, 6]
