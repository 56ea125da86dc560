"""``StepMonitor``: the per-step checks. In: each step's flags and non-finite trace. Out:
``Alert``s put in the inbox (and written to TensorBoard) within the step, or a step or so
later on CUDA, without waiting for the window's flush.

One hop after another: the step engine hands the step's flag tensor here (``send``), with
the trace taken from ``trace.StepTrace``/``modflags.ModuleFlags``; the payload goes to the host
through ``flags.FlagsToHost``; what reached the host (``poll``) is read by
``nonfinite.NonFiniteTracker`` (the origin module of a NaN, ``origin.py``), or, without a
trace, blamed on a layer by ``blame.nonfinite_origin`` (the rule the window uses too); the
rate limit and the message come from ``Rules.nonfinite_now``/``exploding_now``. No torch
read op here: the host sees the flags through numpy views.

On CPU, where device memory is host memory, the common step is checked once, at the first
optimizer's pre-step (``start_take`` before the gradient pass, ``take_trace`` after it): the
trace's rows (read in place, ``Rows.host_sum``) and the gradient norms (their sum from the
C kernel that made them, else copied into a host buffer made once) are summed on the host.
A finite sum means nothing for the origin to read: no payload is built, nothing examined.
When that sum also bounds every layer's gradient RMS under ``extreme_rms``, the step's
flags at its end are neither built nor read (``clean``; a sampled step hands on its update
ratios, ``see_updates``); otherwise they are read and examined as on CUDA, where every
step's flags and trace are pushed to the host without a wait.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from gradwatch.blame import nonfinite_origin
from gradwatch.buffers import FLAG_COLS
from gradwatch.faults import FaultGuard
from gradwatch.flags import FlagsToHost, HostFlags
from gradwatch.inbox import AlertInbox
from gradwatch.nonfinite import NonFiniteTracker, PayloadRecord
from gradwatch.record import Record
from gradwatch.selection import LayerInfo

if TYPE_CHECKING:
    from gradwatch.alerts import Alert
    from gradwatch.hooks import Collector
    from gradwatch.publish import Publisher
    from gradwatch.rules import Rules


def _host_sum(v: np.ndarray) -> float:
    """The sum of a float32/64 array in host memory. A few values are summed as Python
    floats off a memoryview: less code to run than a numpy reduction, which matters in a
    step that has just evicted the caches."""
    return sum(v.data) if v.size <= 256 else float(v.sum())


class HostVector:
    """CPU: a 1-D float32 tensor read on the host through a buffer made once (one copy, no
    read op; its numpy view is made when the buffer grows)."""

    def __init__(self) -> None:
        self._t = torch.zeros(0, dtype=torch.float32)
        self._views: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def read(self, t: torch.Tensor) -> np.ndarray:
        n = t.numel()
        got = self._views.get(n)
        if got is None:
            if n > self._t.numel():
                self._t = torch.zeros(max(n, 2 * self._t.numel()), dtype=torch.float32)
                self._views.clear()
            got = self._views[n] = (self._t[:n], self._t.numpy()[:n])
        got[0].copy_(t)
        return got[1]


class StepMonitor:
    """Per-step flags and trace -> alerts (see the module docstring). ``tracker`` is
    replaced when lazy modules materialize."""

    def __init__(self, collector: Collector, tracker: NonFiniteTracker, n_layers: int,
                 device: torch.device, rules: Rules, infos: Sequence[LayerInfo],
                 extreme_rms: float, guard: FaultGuard, inbox: AlertInbox,
                 publisher: Publisher) -> None:
        self.collector = collector
        self.tracker = tracker
        self.device = device
        self.rules = rules
        self.infos = infos
        self.extreme_rms = extreme_rms
        self.guard = guard
        self.inbox = inbox
        self.publisher = publisher
        # per-step non-finite flags, read on the host without a stall (flags.py)
        self.to_host = FlagsToHost(n_layers, device, cols=FLAG_COLS)
        self.trace_step = -1  # the step whose non-finite trace was taken already
        self.trace_cut = False  # the last trace taken left calls out (trace.MAX_ENTRIES)
        self._clean: Any = None  # CPU: a step's gradients with nothing to report
        self._host_norms = HostVector()
        self._host_updates = HostVector()
        self._least: tuple[Any, float] = (None, 0.0)  # (tracked parameters, sqrt min numel)

    def _failed(self, e: Exception) -> None:
        self.rules.per_step_nonfinite = False  # the window names it from now on
        self.guard.fail("flags", "non-finite flags", "*", e)

    def send(self, flags: torch.Tensor, grads: Any, sampled: bool, step: int,
             before_update: bool = False, rec: Record | None = None) -> None:
        """The step's flags, with its non-finite trace unless taken already, to the host:
        on CUDA device ops and a non-blocking copy (``flags.FlagsToHost``), read a step or
        so later; on CPU, where device memory is host memory, read at once through numpy
        (no torch read op either way). ``rec``: the trace's record, taken already."""
        c = self.collector
        tr = c.trace
        rows: list[torch.Tensor] = []
        mf = c.mflags
        order = None
        if (rec is None and tr is not None and "trace" not in self.guard.off
                and self.trace_step != step):
            rec = tr.take_record()
        if rec is not None:
            self.trace_step = step
            self.trace_cut = rec.cut
            rows = list(tr.views(rec))  # type: ignore[union-attr]
            if mf is not None and mf.ran:  # compiled code ran: its per-module counts
                rows.append(mf.take())
                order = mf.order
        # the weights as the forward used them: read lazily on CPU when the record is taken
        # before the update (the analysis runs at once), else summed with the payload
        cpu = self.device.type == "cpu"
        sums = rec is not None and not (before_update and cpu)
        parts: list[torch.Tensor] = []
        present: tuple[int, ...] = ()
        shadow: tuple[int, ...] = ()
        # without a trace the payload only adds its NaN count to the flags (CUDA), which the
        # push that took this step's trace at the optimizer's pre-step has counted already
        if rec is not None or (not cpu and self.trace_step != step):
            parts, (present, shadow) = self.tracker.payload(rows, grads, param_sums=sums)
        meta = (PayloadRecord(rec, present, shadow, sampled, before_update, sums, order)
                if rec is not None else None)
        if cpu:
            item = self.to_host.read_now(flags, parts, step, meta)
            if rec is not None:
                tr.clear(rec)  # type: ignore[union-attr]
            if meta is not None or not self._quiet(item.layers):
                self._examine(item)
            return
        payload = torch.cat(parts) if parts else flags.new_zeros(0)
        if rec is not None:
            tr.clear(rec)  # type: ignore[union-attr]  # after the copy, in stream order
        nan = torch.isnan(payload).sum(dtype=torch.float32)
        extra = torch.stack([nan] + [torch.zeros_like(nan)] * (FLAG_COLS - 1))
        head = torch.cat([flags, extra.unsqueeze(0)])
        self.to_host.push(head, step, payload if meta is not None else None, meta)

    def start_take(self, step: int) -> tuple[Record, float | None] | None:
        """CPU, before the step's gradients are read: its trace record, taken, and the sum
        of its rows (None: no host view), for ``take_trace``. Done first so that the
        Python code after the gradient pass, which evicts the caches, is short."""
        tr, mf = self.collector.trace, self.collector.mflags
        if ("commit" in self.guard.off or "trace" in self.guard.off or tr is None
                or self.device.type != "cpu" or (mf is not None and mf.ran)
                or self.trace_step == step or tr.empty()):
            return None
        try:
            rec = tr.take_record()
            return rec, tr.host_total(rec)
        except Exception as e:
            self.guard.fail("commit", "step commit", "*", e)
            return None

    def take_trace(self, no_flags: torch.Tensor, grads: Any, sampled: bool, step: int,
                   before_update: bool,
                   taken: tuple[Record, float | None] | None = None) -> None:
        """The step's trace to the host now (at the optimizer's pre-step), and on CPU read
        at once: the weights a NaN may come from are still those the forward used.
        ``taken``: what ``start_take`` took of it."""
        tr, mf = self.collector.trace, self.collector.mflags
        if "commit" in self.guard.off or tr is None:
            return
        if taken is None:
            if tr.empty() and not (mf is not None and mf.ran):
                return  # no forward since the last take (an optimizer stepping after the driver)
            taken = self.start_take(step)
        try:
            rec = None
            if taken is not None:
                rec, total = taken
                if self._finite(total, grads):
                    # nothing non-finite in the forward, the backward or the gradients:
                    # nothing for the origin to read (the common step, checked on the host
                    # at once, no copy)
                    self.trace_step, self.trace_cut = step, rec.cut
                    tr.clear(rec)
                    return
            self.send(no_flags, grads, sampled, step, before_update=before_update, rec=rec)
        except Exception as e:
            self.guard.fail("commit", "step commit", "*", e)
            return
        self.poll()

    def _finite(self, total: float | None, grads: Any) -> bool:
        """CPU: every trace row (``total``: the sum of ``StepTrace.host_total``, None
        without them) and every parameter-gradient norm is finite (their sum is; an
        overflowing sum takes the full read, which tells). Shadow parameters (trainable,
        not watched) have no norm here: with any of them the full read runs."""
        norms = None if grads is None else grads.norms
        if total is None or self.tracker.shadow:
            return False
        if norms is None:
            g = 0.0
        elif grads.norm_sum is not None:  # summed by the kernel that made the norms
            g = grads.norm_sum
        else:
            g = _host_sum(self._host_norms.read(norms))
        if not math.isfinite(total + g):
            return False
        if norms is None or self.tracker.tracker.sharded:
            return True  # FSDP2 shards: a rank's norms are of its own shards only
        grads.finite = True  # its non-finite counts are 0: they need not be made
        # the norms are >= 0: their sum bounds each layer's sqrt(sum of squares), so a sum
        # at most extreme_rms * sqrt(numel of the smallest parameter) puts every layer's
        # gradient RMS under extreme_rms: the step's flags will hold nothing to report
        if g <= self.extreme_rms * self._least_sqrt_numel():
            self._clean = grads
        return True

    def _least_sqrt_numel(self) -> float:
        """sqrt of the element count of the smallest tracked parameter."""
        tracked = self.tracker.tracker.trainable
        if self._least[0] is not tracked:
            self._least = (tracked, math.sqrt(min((p.numel() for p, _ in tracked), default=0)))
        return self._least[1]

    def clean(self, grads: Any, step: int) -> bool:
        """CPU: a step's flags need not be built nor read: its pre-step found its trace
        (outputs and output gradients) and ``grads`` finite and every gradient RMS under
        ``extreme_rms`` (``_finite``). A sampled step then only hands on its update ratios
        (``see_updates``)."""
        ok = grads is not None and grads is self._clean and self.trace_step == step
        self._clean = None
        return ok

    def see_updates(self, updates: torch.Tensor | None, step: int) -> None:
        """CPU, a step ``clean`` found with nothing to flag: its per-layer update ratios
        (NaN where not measured) read on the host at once, as the learning-rate evidence
        the step's flags would have carried."""
        if updates is not None and "flags" not in self.guard.off:
            self.rules.step_lr.see(step, self._host_updates.read(updates))

    def _quiet(self, layers: np.ndarray) -> bool:
        """A step's flags on the host, without a trace: nothing for ``_examine`` to report
        (no non-finite count, no update ratio, no gradient RMS above ``extreme_rms``)."""
        # counts and update ratios are >= 0, RMS too: one max per column says it all (a
        # NaN fails both tests)
        m = layers.max(0).tolist()
        return m[0] == 0 and m[1] == 0 and m[2] <= self.extreme_rms and sum(m[3:]) == 0

    def eval_done(self, no_flags: torch.Tensor, step: int) -> bool:
        """A forward without gradients ended (evaluation): its trace becomes a record of its
        own, so an evaluation loop keeps the trace bounded and is checked as it runs.
        True when it was checked (the caller then delivers)."""
        tr = self.collector.trace
        if tr is None or tr.rec.g_roles or "commit" in self.guard.off:
            return False  # a training step's record: its gradients are still to come
        self.trace_step = -1
        self.send(no_flags, None, True, step, before_update=True)
        self.poll()
        return True

    def poll(self) -> None:
        """Per-step flags that reached the host (this step's on CPU, a step or so later on
        CUDA) -> a non-finite alert at the module where the NaN was born (``nonfinite.py``),
        or an exploding alert for a gradient above ``extreme_rms``. No torch read op."""
        if self.guard.off & {"commit", "flags"}:
            return
        try:
            for f in self.tracker.settle():
                self._nonfinite_alert(f)
            for item in self.to_host.poll():
                self._examine(item)
        except Exception as e:
            self._failed(e)

    def _examine(self, item: HostFlags) -> None:
        """One step's flags on the host: a non-finite origin, or an extreme gradient."""
        if self.guard.off & {"commit", "flags"}:
            return
        try:
            nf = self.tracker
            if item.layers.shape[1] > 3:  # the step's update ratios: learning-rate evidence
                self.rules.step_lr.see(item.step, item.layers[:, 3])
            if self._fault(item):
                for f in nf.read(item):
                    self._nonfinite_alert(f)
                if nf.last_bad == item.step or not nf.armed:
                    return  # named from its trace, or a fault still going on
                if item.meta is None:
                    # nothing named from a trace for this step (none came along, or it
                    # was switched off): name a layer from the flags
                    self._flag_alert(item.step, item.layers)
                    return
            self._extreme(item.step, item.layers)
        except Exception as e:
            self._failed(e)

    def _traced(self) -> bool:
        """The non-finite trace runs and its last record was whole: every module's outputs
        were checked, so a NaN anywhere in the forward shows in the trace itself."""
        return (self.collector.trace is not None and "trace" not in self.guard.off
                and not self.trace_cut)

    def _fault(self, item: HostFlags) -> bool:
        """A step's flags show a non-finite *fault*: a NaN in the forward (the trace), or a
        NaN/Inf in a gradient. Non-finite outputs alone are infinities made on purpose and
        absorbed downstream (a ``-inf`` mask before a softmax) while the trace, which sees
        every NaN of the forward, shows none; without a trace they count as a fault."""
        if item.layers[:, 1].any() or item.trace_nan:
            return True
        if item.trace is not None and not np.isfinite(item.trace).all():
            return True  # the tracker tells an absorbed Inf from a fault (fault_in)
        return bool(item.layers[:, 0].any()) and not self._traced()

    def _nonfinite_alert(self, f: Any) -> None:
        a = self.rules.nonfinite_now(f.step, f.layer, f.count, note=f.message)
        if a is None:
            return
        cause, hint = f.cause, f.hint
        if f.overflow:  # values grew past the float range: were the updates too large?
            lr = self.rules.step_lr.hint(f.step, f"'{f.layer}' went non-finite")
            if lr is not None:
                cause, hint = "learning_rate", lr
        self._put(dataclasses.replace(a, cause=cause, hint=hint), f.step)

    def _extreme(self, step: int, view: np.ndarray) -> None:
        """A finite step: only a gradient above ``extreme_rms`` is reported at once."""
        for i in np.flatnonzero(view[:, 2] > self.extreme_rms):
            self._put(self.rules.exploding_now(step, self.infos[int(i)].name,
                                               float(view[i, 2])), step)

    def _flag_alert(self, step: int, view: np.ndarray) -> None:
        """Without a trace (switched off, or the device ran too far ahead): the layer the
        window rule would blame (``blame.nonfinite_origin``), else the layer with the most
        non-finite gradients."""
        acts, grads = view[:, 0], view[:, 1]
        if self._traced():  # non-finite outputs without a NaN in the trace were absorbed
            acts = np.zeros_like(acts)
        origin = nonfinite_origin(self.collector.order, acts.__getitem__, grads.__getitem__)
        if origin is None:
            origin = int(np.argmax(grads))
        count = float(view[origin, :2].sum())
        self._put(self.rules.nonfinite_now(step, self.infos[origin].name, count), step)

    def _put(self, a: Alert | None, step: int) -> None:
        """A per-step alert: into the inbox (issued at the end of this step), and written
        to TensorBoard."""
        if a is not None:
            self.inbox.put([a])
            self.publisher.write_step_alert(a, step)
