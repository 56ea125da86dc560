"""The ``gradwatch`` TensorBoard dashboard: a dynamic plugin (``tensorboard_plugins`` entry
point) with a plain ES-module frontend, no build step.

The backend reads gradwatch's scalars, alert texts and layer-order records through
TensorBoard's data provider and serves them as JSON; ``static/index.js`` draws a layer x
step heatmap per stat with a layer filter, grouping, a colour scale suited to the stat and
the alert list. Routes, under ``/data/plugin/gradwatch/``: the modules of ``static/``
(``index.js`` and what it imports) and ``data?stat=<stat>``.

Layers come in forward order from the newest layer-order record of each run; a run logged
before the record existed falls back to a natural sort of the names (the data provider
lists tags in no defined order).

Every alert: the alert texts are one event per step. TensorBoard keeps 10 text events per
tag unless started with ``--samples_per_plugin text=0``; when the run's alert counts (scalars,
all kept) say more alerts were written than TensorBoard kept, the plugin reads the alert
events from the run's event files itself. Where it cannot (no local logdir), the run says
exactly how many alerts it cannot show and why (``missing``, ``missing_why``).

Imports no torch: names and formats come from ``gradwatch.schema``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from tensorboard.plugins import base_plugin  # a core dependency

from gradwatch.reader import build_run, decode_strings, run_name
from gradwatch.schema import (
    ALERT_TEXT_TAGS,
    LAYERS_TAGS,
    PLUGIN_NAME,
    PREFIX,
    STATS,
    is_alert_count,
    json_number,
    split_tag,
)

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MODULES = ("index.js", "colour.js", "rows.js", "heatmap.js")  # the frontend's ES modules
MAX_STEPS = 500  # columns per heatmap: longer runs are downsampled by TensorBoard
MAX_TEXTS = 100_000  # text events read per tag (TensorBoard may keep fewer)
SAMPLED_TEXTS = 10  # TensorBoard's default: text events kept per tag
DEFAULT_STAT = "grad_rms"


def _respond(request: Any, body: bytes | str, mimetype: str, code: int = 200) -> Any:
    from tensorboard.backend import http_util

    return http_util.Respond(request, body, mimetype, code=code)


class GradwatchPlugin(base_plugin.TBPlugin):
    """Serves the dashboard's modules and its data."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._provider = context.data_provider
        self._logdir = getattr(context, "logdir", "") or ""
        # event file path -> ((size, mtime), [(step, alert text)]): read once per change
        self._file_alerts: dict[str, tuple[tuple[int, float], list[tuple[int, str]]]] = {}

    def get_plugin_apps(self) -> dict[str, Callable[..., Any]]:
        from werkzeug import wrappers

        apps: dict[str, Callable[..., Any]] = {
            "/" + name: wrappers.Request.application(self._static(name)) for name in MODULES}
        apps["/data"] = wrappers.Request.application(self._serve_data)
        return apps

    def is_active(self) -> bool:
        """Enabled when some run holds a ``gradwatch/`` scalar."""
        if self._provider is None:
            return False
        from tensorboard import context

        found = self._provider.list_scalars(context.RequestContext(), experiment_id="",
                                            plugin_name="scalars")
        return any(t.startswith(PREFIX) for tags in found.values() for t in tags)

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="gradwatch")

    # -- routes -------------------------------------------------------------------------------
    def _static(self, name: str) -> Callable[[Any], Any]:
        def serve(request: Any) -> Any:
            with open(os.path.join(STATIC, name), "rb") as f:
                return _respond(request, f.read(), "application/javascript")

        return serve

    def _serve_data(self, request: Any) -> Any:
        from tensorboard import plugin_util

        stat = request.args.get("stat", DEFAULT_STAT)
        if stat not in STATS:
            msg = f"stat must be one of {list(STATS)}, got {stat!r}"
            return _respond(request, json.dumps({"error": msg}), "application/json", code=400)
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        return _respond(request, json.dumps(self.data(ctx, eid, stat)), "application/json")

    # -- data ---------------------------------------------------------------------------------
    def data(self, ctx: Any, eid: str, stat: str) -> dict[str, Any]:
        """Every run with gradwatch data: the ``stat`` heatmap, its layers in forward order
        with their module types, and the alerts."""
        from tensorboard.data import provider as P

        listing = self._provider.list_scalars(ctx, experiment_id=eid, plugin_name="scalars")
        stats: set[str] = set()
        wanted: dict[str, list[str]] = {}
        for run, tags in listing.items():
            mine = [t for t in tags if t.startswith(PREFIX)]
            if not mine:
                continue
            wanted[run] = []
            for t in mine:
                st = split_tag(t)
                if st is not None:
                    stats.add(st[0])
                if (st is not None and st[0] == stat) or is_alert_count(t):
                    wanted[run].append(t)
        tags = sorted({t for ts in wanted.values() for t in ts})
        read = self._provider.read_scalars(
            ctx, experiment_id=eid, plugin_name="scalars", downsample=MAX_STEPS,
            run_tag_filter=P.RunTagFilter(runs=list(wanted), tags=tags),
        ) if tags else {}
        runs = list(wanted)
        texts: dict[str, list[tuple[int, str]]] = {}
        records = {run: [x for found in by_tag.values() for x in found] for run, by_tag
                   in self._strings(ctx, eid, PLUGIN_NAME, runs, LAYERS_TAGS).items()}
        # a record filed by add_text (a writer that is not a SummaryWriter) is a text tensor
        for run, by_tag in self._strings(ctx, eid, "text", runs,
                                         ALERT_TEXT_TAGS + LAYERS_TAGS).items():
            for tag, found in by_tag.items():
                into = texts if tag in ALERT_TEXT_TAGS else records
                into.setdefault(run, []).extend(found)
        out = []
        for run in sorted(wanted):
            series = [(t, [(d.step, float(d.value)) for d in read.get(run, {}).get(t, [])])
                      for t in wanted[run]]
            rd = build_run(run, run, series, texts.get(run, []), records.get(run, []),
                           natural=True)
            total = sum(rd.alert_counts.values())
            missing, why = 0, ""
            if total > len(rd.alerts):  # TensorBoard kept a sample of the alert events
                from_files = self._alerts_from_files(run)
                if from_files is not None and len(from_files) >= len(rd.alerts):
                    rd.alerts = from_files
                missing = max(0, total - len(rd.alerts))
                if missing:
                    why = (f"TensorBoard keeps the alerts of {SAMPLED_TEXTS} steps per run "
                           "unless started with --samples_per_plugin text=0, and the event "
                           "files are not readable from this plugin"
                           if from_files is None else
                           "the event files hold fewer alerts than the alert counts")
            have, steps, values = rd.matrix(stat)
            out.append({
                "run": run_name(run, self._logdir),
                "path": run,
                "order": rd.order,
                "layers": have,
                "types": [rd.types.get(la, "") for la in have],
                "steps": steps,
                "values": [[json_number(v) for v in row] for row in values],
                "alerts": [a.to_json() for a in rd.alerts],
                "alert_total": total,
                "missing": missing,
                "missing_why": why,
            })
        return {"stat": stat, "stats": [s for s in STATS if s in stats], "runs": out}

    def _strings(self, ctx: Any, eid: str, plugin: str, runs: list[str],
                 names: tuple[str, ...]) -> dict[str, dict[str, list[tuple[int, str]]]]:
        """run -> tag -> [(step, text)] of the string tensors ``names`` of ``plugin``."""
        from tensorboard.data import provider as P

        listing = self._provider.list_tensors(ctx, experiment_id=eid, plugin_name=plugin)
        tags = sorted({t for r in runs for t in listing.get(r, {}) if t in names})
        if not tags:
            return {}
        read = self._provider.read_tensors(
            ctx, experiment_id=eid, plugin_name=plugin, downsample=MAX_TEXTS,
            run_tag_filter=P.RunTagFilter(runs=runs, tags=tags),
        )
        out: dict[str, dict[str, list[tuple[int, str]]]] = {}
        for run, by_tag in read.items():
            for tag, data in by_tag.items():
                out.setdefault(run, {})[tag] = [(d.step, text) for d in data
                                                for text in decode_strings(d.numpy)]
        return out


    def _alerts_from_files(self, run: str) -> list[Any] | None:
        """Every alert of ``run`` read from its event files (None when they cannot be read:
        no local logdir, a remote one, a run that is not a directory there)."""
        from gradwatch.schema import alerts_of_events

        if not self._logdir or "://" in self._logdir:
            return None
        path = os.path.join(self._logdir, run)
        try:
            names = sorted(n for n in os.listdir(path) if "tfevents" in n)
        except OSError:
            return None
        if not names:
            return None
        events: list[tuple[int, str]] = []
        for name in names:
            found = self._file_texts(os.path.join(path, name))
            if found is None:
                return None
            events += found
        return alerts_of_events(events)

    def _file_texts(self, path: str) -> list[tuple[int, str]] | None:
        from tensorboard.backend.event_processing.event_file_loader import (
            LegacyEventFileLoader,
        )

        try:
            st = os.stat(path)
            key = (st.st_size, st.st_mtime)
            cached = self._file_alerts.get(path)
            if cached is not None and cached[0] == key:
                return cached[1]
            out = []
            for ev in LegacyEventFileLoader(path).Load():
                for v in ev.summary.value:
                    if v.tag in ALERT_TEXT_TAGS:
                        out += [(ev.step, b.decode("utf-8", "replace"))
                                for b in v.tensor.string_val]
        except Exception:  # a file being written or damaged: report what is missing instead
            return None
        self._file_alerts[path] = (key, out)
        return out


class GradwatchLoader(base_plugin.TBLoader):
    """Entry point object: ``tensorboard_plugins = gradwatch = gradwatch.tb_plugin:...``."""

    def load(self, context: base_plugin.TBContext) -> GradwatchPlugin:
        return GradwatchPlugin(context)
