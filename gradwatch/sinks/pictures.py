"""Optional TensorBoard pictures: on-device histograms and the gradient-flow image.

* ``histograms=True``: per layer, ``gradwatch/grad_hist/<layer>`` (parameter gradients) and
  ``gradwatch/act_hist/<layer>`` (outputs), written with ``add_histogram_raw`` from the
  bucket counts binned on the device (``gradwatch.histograms``).
* ``images=True``: ``gradwatch/flow``, the ``grad_rms`` heatmap (layers x steps, log
  colour, alerts marked) of ``gradwatch.plot``, every ``IMAGE_EVERY`` flushes and at close.

Everything here runs on the watcher's background thread.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Sequence

from gradwatch.alerts import Alert
from gradwatch.histograms import KINDS, DeviceHistograms, raw_histogram
from gradwatch.snapshot import Snapshot

IMAGE_TAG = "gradwatch/flow"
IMAGE_EVERY = 5  # flushes between two images
IMAGE_STEPS = 200  # newest windows shown in the image
IMAGE_ALERTS = 1000


def hist_tag(kind: str, layer: str) -> str:
    return f"gradwatch/{kind}/{layer}"


class FlowImages:
    """Bounded history of ``grad_rms`` per layer, drawn into an image now and then."""

    def __init__(self, writer: Any, every: int = IMAGE_EVERY) -> None:
        from gradwatch.plot import require_matplotlib

        require_matplotlib()  # fails in watch(), naming the extra to install
        self.writer = writer
        self.every = every
        self._windows: collections.deque[tuple[int, dict[str, float]]] = collections.deque(
            maxlen=IMAGE_STEPS)
        self._alerts: collections.deque[tuple[str, int, str]] = collections.deque(
            maxlen=IMAGE_ALERTS)
        self._layers: dict[str, None] = {}
        self._since = 0

    def add(self, snap: Snapshot, alerts: Sequence[Alert]) -> None:
        rms = {la: s["grad_rms"] for la, s in snap.stats.items() if "grad_rms" in s}
        for la in rms:
            self._layers.setdefault(la, None)
        self._windows.append((snap.step, rms))
        self._alerts.extend((a.layer, a.step, a.kind) for a in alerts)
        self._since += 1
        if self._since >= self.every or len(self._windows) == 1:
            self.draw()

    def draw(self) -> None:
        from gradwatch.plot import Flow, render_rgb

        if not self._windows or not self._since:
            return
        self._since = 0
        steps = [s for s, _ in self._windows]
        layers = list(self._layers)
        values = [[w.get(la, math.nan) for _, w in self._windows] for la in layers]
        flow = Flow(f"grad_rms, step {steps[-1]}", layers, steps, values, list(self._alerts))
        image = render_rgb([flow])
        self.writer.add_image(IMAGE_TAG, image, steps[-1], dataformats="HWC")


class Pictures:
    """The optional pictures of one watcher; ``None`` from ``create`` when none is asked.

    ``hist``: the device histograms the watcher bins on the hot path
    (``histograms.DeviceHistograms``); the step engine hands each window's host copy to
    ``write``. Nothing here runs on the training thread."""

    def __init__(self, writer: Any, hist: DeviceHistograms | None,
                 images: FlowImages | None) -> None:
        self.writer = writer
        self.hist = hist
        self.images = images

    @classmethod
    def create(cls, sink: Any, hist: DeviceHistograms | None, images: bool
               ) -> Pictures | None:
        if sink is None or not (hist is not None or images):
            return None
        return cls(sink.writer, hist, FlowImages(sink.writer) if images else None)

    def write(self, snap: Snapshot, alerts: Sequence[Alert], hist: Any,
              names: Sequence[str]) -> None:
        """``names[slot]``: the layer name of each buffer row."""
        if hist is not None:
            rows = hist.numpy()
            for k, kind in enumerate(KINDS):
                for slot, name in enumerate(names):
                    raw = raw_histogram(rows[k, slot])
                    if raw is not None:
                        self.writer.add_histogram_raw(hist_tag(kind, name),
                                                      global_step=snap.step, **raw)
        if self.images is not None:
            self.images.add(snap, alerts)
        self.writer.flush()

    def close(self) -> None:
        if self.images is not None:
            self.images.draw()
