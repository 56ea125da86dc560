"""The gradwatch TensorBoard plugin in a real ``tensorboard`` server, and in a real browser."""

import json
import os
import struct

import pytest
from chromium import Chromium
from flowlog import HOSTILE, LAYERS, PARAM_LAYERS, train
from tbserver import declared_entry_point, get, get_json, tensorboard

from gradwatch.tb_plugin import GradwatchLoader, GradwatchPlugin


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tb")
    written = train(str(tmp / "logs"))
    with tensorboard(str(tmp / "logs"), str(tmp)) as url:
        yield url, written


def test_entry_point_names_the_loader():
    module, _, name = declared_entry_point().partition(":")
    import importlib

    assert getattr(importlib.import_module(module), name) is GradwatchLoader
    assert GradwatchPlugin.plugin_name == "gradwatch"


@pytest.mark.slow
def test_server_lists_the_plugin_enabled_and_serves_its_routes(server):
    url, written = server
    listing = get_json(url + "/data/plugins_listing")
    assert listing["gradwatch"]["enabled"] is True
    assert listing["gradwatch"]["loading_mechanism"] == {
        "type": "IFRAME", "module_path": "/data/plugin/gradwatch/index.js"}
    status, ctype, body = get(url + "/data/plugin/gradwatch/index.js")
    assert status == 200 and "javascript" in ctype and b"export async function render" in body
    status, ctype, body = get(url + "/data/plugin/gradwatch/data?stat=act_zero_frac")
    assert status == 200 and ctype.startswith("application/json")
    data = json.loads(body)
    assert data["stat"] == "act_zero_frac" and "grad_rms" in data["stats"]
    (run,) = data["runs"]
    assert run["run"] == written.run and run["layers"] == LAYERS
    assert run["steps"] == list(range(written.every, written.steps + 1, written.every))
    assert run["values"][LAYERS.index(HOSTILE)] == [1.0] * len(run["steps"])
    assert [(a["step"], a["layer"], a["kind"]) for a in run["alerts"]] == [
        (a.step, a.layer, a.kind) for a in written.alerts]
    assert run["alert_total"] == len(written.alerts)
    grad = get_json(url + "/data/plugin/gradwatch/data")  # default stat
    assert grad["stat"] == "grad_rms" and grad["runs"][0]["layers"] == PARAM_LAYERS


FRAME = ("[...document.querySelectorAll('iframe')].find("
         "f => (f.src || '').includes('plugin_entry.html?name=gradwatch'))?.contentDocument")

SNAPSHOT = f"""(() => {{
  const d = {FRAME};
  if (!d || !d.querySelector('.gw-root[data-ready=true]')) return null;
  return {{
    stat: d.querySelector('.gw-stat').value,
    options: [...d.querySelectorAll('.gw-stat option')].map(o => o.value),
    runs: [...d.querySelectorAll('.gw-run')].map(s => ({{
      run: s.querySelector('h2').textContent,
      rows: [...s.querySelectorAll('.gw-row')].map(r => r.querySelector('.gw-label').textContent),
      cells: [...s.querySelectorAll('.gw-row')].map(r => r.querySelectorAll('.gw-cell').length),
      marked: [...s.querySelectorAll('.gw-cell.gw-alerted')].map(
        c => [c.closest('.gw-row').dataset.layer, Number(c.dataset.step)]),
      alerts: [...s.querySelectorAll('tr.gw-alert')].map(
        tr => [...tr.querySelectorAll('td')].map(td => td.textContent)),
    }})),
    imgs: d.querySelectorAll('img').length,
  }};
}})()"""


@pytest.mark.slow
def test_dashboard_in_headless_chromium(server, tmp_path):
    url, written = server
    with Chromium(str(tmp_path / "profile"), width=1400, height=900) as browser:
        browser.navigate(url + "/#gradwatch")
        seen = browser.wait_for(SNAPSHOT, timeout=120)
        # default view: grad_rms, one heatmap row per layer that has parameters
        assert seen["stat"] == "grad_rms" and "act_zero_frac" in seen["options"]
        (run,) = seen["runs"]
        assert run["run"] == written.run
        assert run["rows"] == PARAM_LAYERS
        assert run["cells"] == [written.steps // written.every] * len(PARAM_LAYERS)
        assert len(run["alerts"]) == len(written.alerts) > 0

        # switch the stat selector: now every watched layer is a row, the payload among them
        browser.evaluate(f"""(() => {{ const s = {FRAME}.querySelector('.gw-stat');
            s.value = 'act_zero_frac'; s.dispatchEvent(new Event('change')); }})()""")
        seen = browser.wait_for(
            f"(() => {{ const s = {SNAPSHOT}; return s && s.stat === 'act_zero_frac' && "
            f"s.runs[0].rows.length === {len(LAYERS)} ? s : null; }})()")
        (run,) = seen["runs"]
        assert run["rows"] == LAYERS
        assert [a[:3] for a in run["alerts"]] == [
            [str(a.step), a.layer, a.kind] for a in written.alerts]
        assert [HOSTILE, written.alerts[0].step] in run["marked"]
        # the name was shown as text: no element was made from it, and it is a real payload
        assert seen["imgs"] == 0
        assert browser.evaluate(f"""(() => {{ const t = {FRAME}.createElement('template');
            t.innerHTML = {json.dumps(HOSTILE)}; return t.content.querySelectorAll('img').length;
            }})()""") == 1
        assert not [e for e in browser.events if e["method"] == "Page.javascriptDialogOpening"]

        # hovering a cell shows its layer, step and value
        tip = browser.evaluate(f"""(() => {{ const d = {FRAME};
            const row = [...d.querySelectorAll('.gw-row')].find(
                r => r.dataset.layer === {json.dumps(HOSTILE)});
            const cell = row.querySelectorAll('.gw-cell')[1];
            cell.dispatchEvent(new MouseEvent('mouseenter', {{clientX: 300, clientY: 200}}));
            const tip = d.querySelector('.gw-tip');
            return tip.hidden ? null : tip.textContent; }})()""")
        assert tip == f"{HOSTILE}\nstep {2 * written.every}\nact_zero_frac = 1"

        shot = tmp_path / "dashboard.png"
        browser.screenshot(str(shot))
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1400, 900)
    assert os.path.getsize(shot) > 10_000
