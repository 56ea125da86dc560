"""Fast CRC32C for TensorBoard's event files.

Without TensorFlow, TensorBoard checksums every record it writes and reads with a CRC32C
written in Python (``tensorboard.compat.tensorflow_stub.pywrap_tensorflow``): a byte at a
time, holding the GIL. A window of a 1,000-layer model is an event of tens of kilobytes;
its checksums cost about 40 ms of CPU per flush (measured here), and the training thread
waits for the GIL meanwhile. ``google-crc32c`` (a dependency) computes the same checksum in
C. ``install()`` points TensorBoard's record writer and reader at it, after checking that
both give the same value; it changes no byte written, only the time taken. Torch-free.
"""

from __future__ import annotations

import logging
from typing import Callable

_MASK_DELTA = 0xA282EAD8
_installed: list[bool] = []


def _masked(value: Callable[[bytes], int]) -> Callable[[bytes], int]:
    def masked_crc32c(data: bytes) -> int:
        x = value(bytes(data))
        return ((((x >> 15) | (x << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF
    return masked_crc32c


def install() -> bool:
    """Make TensorBoard's event records checksummed in C (once per process). True when it
    is (now or before); False where ``google-crc32c`` has no C implementation here or the
    modules are not those this was written against: TensorBoard keeps its own."""
    if _installed:
        return _installed[0]
    ok = False
    try:
        import google_crc32c
        from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as stub
        from tensorboard.summary.writer import record_writer

        own = stub.masked_crc32c
        if google_crc32c.implementation == "c" and own is record_writer.masked_crc32c:
            fast = _masked(google_crc32c.value)
            probe = bytes(range(256)) * 3
            if fast(probe) == own(probe) and fast(b"") == own(b""):
                stub.masked_crc32c = fast  # the reader (event files read back, TensorBoard)
                record_writer.masked_crc32c = fast  # the writer (SummaryWriter)
                ok = True
    except Exception as e:  # never a reason to fail: TensorBoard's own checksum stays
        logging.getLogger("gradwatch").debug("fast CRC32C not installed: %s", e)
    _installed.append(ok)
    return ok
