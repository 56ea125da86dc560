"""The parts of one watcher, built and wired together (``Parts``), and attached to the model
(``Parts.attach``: every handle into the one ``handles.HandleRegistry``).

Hot-path side: the collector and its hooks (``hooks.py``), the device buffers, the
non-finite trace (``trace.py``), the device histograms, the parameter reads (``params.py``),
the step engine and the per-step monitor. Background side: the publisher with the rules and
the sinks. Both sides put their alerts into one inbox and report their faults to one guard.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Sequence

import torch
import torch.nn as nn

from gradwatch.amp import ScalerTap
from gradwatch.audit import measure
from gradwatch.buffers import WindowBuffers
from gradwatch.distributed import is_writer_rank
from gradwatch.engine import StepEngine
from gradwatch.faults import FaultGuard
from gradwatch.handles import HandleRegistry
from gradwatch.histograms import DeviceHistograms
from gradwatch.hooks import Collector, ForwardDoneHook, ForwardHook
from gradwatch.inbox import AlertInbox
from gradwatch.lazy import MaterializedHook, any_lazy
from gradwatch.modflags import ModuleFlags
from gradwatch.monitor import StepMonitor
from gradwatch.nonfinite import NonFiniteTracker
from gradwatch.options import WatchConfig, open_writer
from gradwatch.origin import ModelMap
from gradwatch.params import ParamTracker
from gradwatch.publish import Publisher
from gradwatch.rules import Rules
from gradwatch.sampling import Sampler
from gradwatch.selection import (
    ROOT_NAME,
    LayerInfo,
    assign_params,
    describe,
    grad_safe,
    passes_finite,
)
from gradwatch.sinks.pictures import Pictures
from gradwatch.snapshot import applicable
from gradwatch.stepping import Stepping
from gradwatch.structure import start_probe
from gradwatch.trace import StepTrace


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


class Parts:
    """Every part of one watcher of ``root``'s modules ``chosen`` (see the module
    docstring); ``max_alerts`` bounds the alerts kept."""

    def __init__(self, cfg: WatchConfig, root: nn.Module,
                 chosen: list[tuple[str, nn.Module]], has_optimizer: bool, writer: Any,
                 logdir: str | os.PathLike[str] | None, max_alerts: int) -> None:
        self.root, self.chosen = root, chosen
        owners = assign_params(root, chosen)
        infos = self.infos = self.describe(owners)
        self.applies = [applicable(i, has_optimizer) for i in infos]
        device, L = _device_of(root), len(chosen)
        self.guard, self.handles = FaultGuard(), HandleRegistry()
        self.buffers = WindowBuffers(L, device)
        c = self.collector = Collector(self.buffers, infos, cfg.thresholds.saturation_margin,
                                       self.guard)
        self.rules = Rules(cfg.thresholds, infos, measure(root, chosen, c.fault), c.fault)
        # the model's dataflow, learned once at the first training forward (the path audit)
        learned = weakref.WeakMethod(self._learned)  # the probe must not keep the model

        def then(graph: Any) -> None:
            fn = learned()
            if fn is not None:
                fn(graph)

        probe = start_probe(root, self.rules.diagnosis.audit, c.fault, then)
        if probe is not None:
            self.handles.add("probe", probe)
        # lazy modules: parameters are tracked once materialized, at the first forward
        self.lazy = any_lazy(p for p, _ in owners)
        params = ParamTracker([] if self.lazy else owners, L, device)
        # the non-finite trace covers every module of the model, watched or not
        mods = self.mods = [(n or ROOT_NAME, m) for n, m in root.named_modules()]
        hooked = self.hooked = [not grad_safe(m) for _, m in mods]
        self.map = ModelMap.build(mods, hooked)
        c.trace = StepTrace(device, [passes_finite(m) for _, m in mods],
                            [bool(getattr(m, "inplace", False)) for _, m in mods], hooked,
                            self.guard)
        # compiled code keeps the hooks of the start (a change would recompile it)
        c.mflags = ModuleFlags(len(mods), device, list(hooked), self.map.children_first())
        self.inbox = AlertInbox(cfg.on_alert, max_alerts, is_writer_rank)
        self.sink: Any = None
        # distributed: only rank 0 opens a writer, so a run has one event file
        if cfg.tensorboard and is_writer_rank():
            from gradwatch.sinks.tensorboard import TensorBoardSink

            self.sink = (TensorBoardSink(writer, owns=False) if writer is not None
                         else TensorBoardSink(open_writer(logdir), owns=True))
        # histograms are binned on the hot path; the pictures sink writes what it is handed
        hist = (DeviceHistograms(L, device, self.guard)
                if cfg.histograms and self.sink is not None else None)
        c.hist = hist
        self.pictures = Pictures.create(self.sink, hist, cfg.images)
        self.publish = Publisher(infos, self.applies, self.rules, self.sink, self.pictures,
                                 self.guard, self.inbox)
        tracker = NonFiniteTracker(self.map, mods, chosen, params)
        monitor = StepMonitor(c, tracker, L, device, self.rules, infos,
                              cfg.thresholds.extreme_rms, self.guard, self.inbox, self.publish)
        self.engine = StepEngine(cfg.every, Sampler(cfg.every, cfg.sample_every), self.buffers,
                                 c, params, monitor, self.publish, hist, self.guard, self.inbox)

    def attach(self, optimizer: torch.optim.Optimizer | None, scaler: Any) -> Stepping:
        """Register every hook (the handles into ``handles``); the stepping they drive."""
        c, e, handles, root = self.collector, self.engine, self.handles, self.root
        slot_of = {id(m): slot for slot, (_, m) in enumerate(self.chosen)}
        for i, (_, m) in enumerate(self.mods):
            handles.add("module", m.register_forward_hook(
                ForwardHook(c, i, slot_of.get(id(m), -1)), with_kwargs=True))
        handles.add("module", root.register_forward_hook(ForwardDoneHook(c, -1)))
        c.on_eval_done = weakref.WeakMethod(e.eval_done)
        if self.lazy:
            handles.add("lazy", root.register_forward_hook(MaterializedHook(self.materialized)))
        # torch's global optimizer step hooks and a forward counter on the root
        s = self.stepping = Stepping(e, root, root.parameters(), optimizer, self.guard, handles)
        e.optimizer = lambda: s.optimizer
        self.rules.optimizer_source = s  # vanishing is judged for the optimizer in use
        e.ended_by_driver = s.ended_by_driver
        infos, applies = self.infos, self.applies

        def known() -> None:  # update ratios apply from now on (the Publisher's list)
            applies[:] = [applicable(i, True) for i in infos]

        e.on_optimizer_known = known
        if scaler is not None:
            e.amp = ScalerTap(scaler, optimizer, e.amp_unscale, e.amp_skip, s.accepts)
            handles.add("amp", e.amp)
        return s

    def describe(self, owners: Sequence[tuple[nn.Parameter, int]]) -> list[LayerInfo]:
        own: list[list[nn.Parameter]] = [[] for _ in self.chosen]
        for p, slot in owners:
            own[slot].append(p)
        return [describe(n, m, own[i]) for i, (n, m) in enumerate(self.chosen)]

    def _learned(self, graph: Any) -> None:
        """The first training forward's autograd graph (``structure.StructureProbe``): a
        module whose own code made only ops that keep finite gradients finite
        (``structure.own_code_safe``: Hugging Face's ``Conv1D``, most attention and
        activation classes, the blocks around them) needs its gradients hooked no more than
        a torch module does, while its calls take the same path (``trace.path_key``). The
        model's root keeps its hooks: the gradient arriving at its output is where a NaN
        made by the loss is seen. ``hooked`` is the trace's and the model map's list."""
        paths = self.collector.trace.paths
        for m, (name, _) in enumerate(self.mods):
            keys = graph.grad_safe.get(name)
            if m and self.hooked[m] and keys:
                paths[m] = keys  # a call on another path is hooked again
                self.hooked[m] = False

    def materialized(self) -> None:
        """After a forward of a model with lazy modules: once every parameter has its
        shape, track them (the parameter statistics of this very step included)."""
        try:
            owners = assign_params(self.root, self.chosen)
            if any_lazy(p for p, _ in owners):
                return
            params = ParamTracker(owners, len(self.infos), self.buffers.device)
            self.engine.params = params
            self.stepping.forget()  # which parameters each optimizer holds, by index
            self.map = ModelMap.build(self.mods, self.map.hooked)  # LazyLinear -> Linear
            self.engine.monitor.tracker = NonFiniteTracker(self.map, self.mods, self.chosen,
                                                           params)
            self.infos[:] = self.describe(owners)  # LazyLinear -> Linear; shared list
        except Exception as exc:
            self.collector.fault("lazy parameters", "*", exc)
        self.handles.remove("lazy")
