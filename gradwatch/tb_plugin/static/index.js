// gradwatch dashboard for TensorBoard: plain ES modules, no build step.
//
// TensorBoard loads this module in an iframe (data/plugin_entry.html?name=gradwatch) and
// calls render(). It fetches data?stat=<stat> and draws, per run, a layer x step heatmap
// (layers in forward order, as the watcher recorded them), then the run's alerts. Each run
// is a collapsible section with its own colour scale and legend (or one scale shared by
// every run: the "colours" choice).
// The bar holds the stat, a layer filter (substring or glob), a grouping and the colour
// scale choice; clicking an alert scrolls to its cell and outlines it. The view state lives
// in the page only.
//
// Run and layer names are data (a module may be named "<img src=x onerror=alert(1)>"):
// they reach the DOM only through textContent and attribute values, never innerHTML.

import { makeScale } from './colour.js';
import { alertList, columnOf, el, heatmap } from './heatmap.js';
import { GROUPINGS, groupRows, matcher } from './rows.js';

// a <select> of class `cls` with one option per [value, text, title]
function choice(cls, options) {
  const s = el('select', cls);
  for (const [value, text, title] of options) {
    const o = el('option', null, text);
    o.value = value;
    o.title = title;
    s.append(o);
  }
  return s;
}

const REFRESH_MS = 30000;
const FILTER_DELAY_MS = 120;

const CSS = `
:root { font-family: Roboto, Arial, sans-serif; font-size: 13px; color: #212121; }
body { margin: 0; background: #fff; }
.gw-root { padding: 0 16px 12px; }
.gw-bar { display: flex; align-items: center; gap: 8px 18px; flex-wrap: wrap;
  position: sticky; top: 0; z-index: 5; background: #fff; padding: 10px 0 8px;
  border-bottom: 1px solid #eee; }
.gw-bar h1 { font-size: 18px; margin: 0; font-weight: 500; }
.gw-bar input[type=search] { width: 20em; font: inherit; padding: 2px 4px; }
.gw-legend { display: inline-flex; align-items: center; gap: 4px 6px; flex-wrap: wrap;
  font-size: 12px; white-space: nowrap; }
.gw-legend > span { white-space: nowrap; }
.gw-ramp { display: inline-flex; height: 12px; border: 1px solid #bbb; }
.gw-ramp span { width: 14px; height: 12px; }
.gw-swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #bbb;
  vertical-align: middle; margin-right: 3px; }
.gw-status { color: #757575; }
.gw-run { margin: 8px 0 14px; }
.gw-run > summary { cursor: pointer; list-style-position: outside; margin-left: 14px; }
.gw-run > summary h2 { display: inline; font-size: 15px; margin: 4px 0 2px; font-weight: 500; }
.gw-run > summary .gw-count { margin-left: 10px; font-size: 12px; color: #2e7d32; }
.gw-run > summary .gw-count.gw-bad { color: #c62828; font-weight: 500; }
.gw-run .gw-legend { margin: 0 0 6px; }
.gw-alert-list { margin: 8px 0 0; }
.gw-alert-list > summary { cursor: pointer; font-size: 13px; font-weight: 500; margin: 6px 0 4px; }
.gw-why { margin: 2px 0 2px 6px; font-size: 12px; }
.gw-why > summary { cursor: pointer; }
.gw-why p.gw-hint { margin: 2px 0 6px 18px; max-width: 110ch; }
.gw-sub { color: #757575; font-size: 12px; margin: 0 0 6px; }
.gw-row { display: flex; align-items: stretch; height: var(--gw-h, 16px); }
.gw-label { flex: 0 0 var(--gw-label, 200px); box-sizing: border-box; overflow: hidden;
  white-space: nowrap; font-family: monospace; font-size: 11px; padding-right: 8px;
  text-align: right; line-height: var(--gw-h, 16px); border-right: 3px solid transparent; }
.gw-label.gw-has-alert { border-right-color: #e53935; color: #b71c1c; }
.gw-group { margin: 8px 0 2px; padding-left: 4px; font-size: 12px; font-weight: 500;
  font-family: monospace; color: #424242; border-bottom: 1px solid #e0e0e0; }
.gw-cells { display: flex; }
.gw-cell { width: var(--gw-w, 16px); height: 100%; box-sizing: border-box;
  border-right: 1px solid rgba(255,255,255,0.25); }
.gw-cell.gw-alerted { outline: 2px solid #e53935; outline-offset: -2px; }
.gw-cell:hover { outline: 2px solid #fff; outline-offset: -2px; }
.gw-cell.gw-focus { outline: 3px solid #ff6d00; outline-offset: 0; position: relative;
  z-index: 2; box-shadow: 0 0 0 5px rgba(255,109,0,0.35); }
.gw-row.gw-focus-row .gw-label { background: #ffe0b2; font-weight: bold; }
.gw-axis { display: flex; margin-left: var(--gw-label, 200px); font-size: 10px; color: #616161;
  height: 14px; position: relative; }
.gw-axis span { position: absolute; transform: translateX(-50%); white-space: nowrap; }
.gw-alerts { border-collapse: collapse; font-size: 12px; }
.gw-alerts th, .gw-alerts td { padding: 2px 10px 2px 0; text-align: left; vertical-align: top; }
.gw-alerts td.gw-num { text-align: right; font-variant-numeric: tabular-nums; }
.gw-alerts td.gw-layer { font-family: monospace; }
.gw-missing { color: #b71c1c; }
.gw-alerts tr.gw-alert { cursor: pointer; }
.gw-alerts tr.gw-alert:hover, .gw-alerts tr.gw-alert:focus { background: #f5f5f5; outline: none; }
.gw-alerts tr.gw-picked { background: #fff3e0; }
.gw-kind { color: #c62828; font-weight: 500; }
.gw-dim { color: #9e9e9e; }
.gw-note { color: #757575; font-size: 12px; }
.gw-tip { position: fixed; pointer-events: none; background: rgba(33,33,33,0.92); color: #fff;
  padding: 4px 7px; border-radius: 3px; font-size: 12px; white-space: pre; z-index: 10; }
`;

function legend(sc) {
  const box = el('span', 'gw-legend');
  box.append(el('span', null, sc.low));
  const ramp = el('span', 'gw-ramp');
  for (const colour of sc.ramp) {
    const s = el('span');
    s.style.background = colour;
    ramp.append(s);
  }
  box.append(ramp, el('span', null, `${sc.high} ${sc.note}`));
  for (const [colour, label] of sc.swatches) {
    const item = el('span');
    const sw = el('span', 'gw-swatch');
    sw.style.background = colour;
    item.append(sw, document.createTextNode(label));
    box.append(item);
  }
  return box;
}

const SCALES = [
  ['run', 'per run', 'each run coloured over its own range: one exploding run does not ' +
   'wash out the others'],
  ['shared', 'shared', 'one colour scale over every run: colours compare across runs'],
];

function orderNote(run) {
  if (run.order === 'record') return 'forward order';
  return 'names sorted (this log has no layer-order record)';
}

class Dashboard {
  constructor() {
    this.stat = 'grad_rms';
    this.filter = '';
    this.group = 'none';
    this.scale = 'run';
    this.closed = new Set(); // paths of the runs folded by the user
    this.lists = new Map(); // path -> alert list opened (true) or folded (false) by the user
    this.data = null;
    this.focus = null; // {path, layer, step}: the alert cell last picked
    this.seq = 0;
  }

  mount() {
    const style = document.createElement('style');
    style.textContent = CSS;
    document.head.append(style);
    const root = el('div', 'gw-root');
    const bar = el('header', 'gw-bar');
    bar.append(el('h1', null, 'gradwatch'));
    const statLabel = el('label', null, 'stat ');
    this.select = el('select', 'gw-stat');
    statLabel.append(this.select);
    const filterLabel = el('label', null, 'layers ');
    this.input = el('input', 'gw-filter');
    this.input.type = 'search';
    this.input.placeholder = 'filter: c_attn, h.1*.mlp.*';
    this.input.title = 'a substring (any case), or a glob on the whole name (* ? [ ]); ' +
      'several, comma-separated';
    filterLabel.append(this.input);
    const groupLabel = el('label', null, 'rows ');
    this.grouping = choice('gw-group-by', GROUPINGS);
    groupLabel.append(this.grouping);
    const scaleLabel = el('label', null, 'colours ');
    this.scaling = choice('gw-scale', SCALES);
    scaleLabel.append(this.scaling);
    this.legendSlot = el('span', 'gw-legend-slot');
    this.status = el('span', 'gw-status', 'loading…');
    bar.append(statLabel, filterLabel, groupLabel, scaleLabel, this.legendSlot, this.status);
    this.tip = el('div', 'gw-tip');
    this.tip.hidden = true;
    this.runs = el('div', 'gw-runs');
    root.append(bar, this.runs, this.tip);
    document.body.append(root);
    this.root = root;

    this.select.addEventListener('change', () => {
      this.stat = this.select.value;
      this.load();
    });
    let timer = null;
    this.input.addEventListener('input', () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        this.filter = this.input.value;
        this.draw();
      }, FILTER_DELAY_MS);
    });
    this.grouping.addEventListener('change', () => {
      this.group = this.grouping.value;
      this.draw();
    });
    this.scaling.addEventListener('change', () => {
      this.scale = this.scaling.value;
      this.draw();
    });
    setInterval(() => { if (!document.hidden) this.load(); }, REFRESH_MS);
  }

  async load() {
    const seq = ++this.seq;
    try {
      const resp = await fetch(`data?stat=${encodeURIComponent(this.stat)}`);
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const data = await resp.json();
      if (seq !== this.seq) return; // a newer request was made meanwhile
      this.data = data;
      this.draw();
    } catch (err) {
      this.status.textContent = `could not load gradwatch data: ${err.message}`;
    }
  }

  draw() {
    const data = this.data;
    if (!data) return;
    const stats = data.stats.length ? data.stats : [data.stat];
    if ([...this.select.options].map((o) => o.value).join() !== stats.join()) {
      this.select.replaceChildren(...stats.map((s) => {
        const o = el('option', null, s);
        o.value = s;
        return o;
      }));
    }
    this.select.value = data.stat;
    const shared = this.scale === 'shared' ? makeScale(data.stat, data.runs) : null;
    this.legendSlot.replaceChildren(...(shared ? [legend(shared)] : []));
    const keep = matcher(this.filter);
    const sections = data.runs.map((run) => {
      const sec = el('details', 'gw-run');
      sec.open = !this.closed.has(run.path);
      sec.dataset.run = run.run;
      sec.dataset.path = run.path;
      sec.addEventListener('toggle', () => {
        if (sec.open) this.closed.delete(run.path);
        else this.closed.add(run.path);
      });
      const head = el('summary');
      const n = run.alert_total || run.alerts.length;
      head.append(el('h2', null, run.run),
        el('span', n ? 'gw-count gw-bad' : 'gw-count', n ? `${n} alert${n === 1 ? '' : 's'}`
          : 'no alerts'));
      sec.append(head);
      const groups = groupRows(run.layers, run.types, this.group, keep);
      const shown = groups.reduce((n, g) => n + g.rows.length, 0);
      sec.append(el('p', 'gw-sub',
        `${shown} of ${run.layers.length} layers with ${data.stat} · ${orderNote(run)}`));
      const sc = shared || makeScale(data.stat, [run]);
      if (!shared && run.layers.length) sec.append(legend(sc));
      if (!run.layers.length) {
        sec.append(el('p', 'gw-note', `no layer has ${data.stat} in this run`));
      } else if (!shown) {
        sec.append(el('p', 'gw-note', `no layer matches the filter ${JSON.stringify(this.filter)}`));
      } else {
        sec.append(heatmap(run, data.stat, sc, groups, this.tip));
      }
      const list = alertList(run, (a, tr) => this.pick(run, a, tr));
      if (list.tagName === 'DETAILS') {
        if (this.lists.has(run.path)) list.open = this.lists.get(run.path);
        list.addEventListener('toggle', () => this.lists.set(run.path, list.open));
      }
      sec.append(list);
      return sec;
    });
    if (!sections.length) sections.push(el('p', 'gw-note', 'no gradwatch data in this logdir'));
    this.runs.replaceChildren(...sections);
    const total = data.runs.reduce((n, r) => n + r.alerts.length, 0);
    const missing = data.runs.reduce((n, r) => n + (r.missing || 0), 0);
    this.status.textContent = `${data.runs.length} run(s), ${total} alert(s)` +
      (missing ? ` (${missing} more not shown: see the run)` : '');
    if (this.focus && this.showFocus(false)) {
      this.status.textContent += ` · showing ${this.focus.layer} at step ${this.focus.step}`;
    }
    // what is drawn, for scripts driving the page (and the browser tests)
    Object.assign(this.root.dataset, {
      stat: data.stat, filter: this.filter, group: this.group, scale: this.scale,
      ready: 'true',
    });
    performance.mark('gradwatch:drawn');
  }

  // an alert row was picked: show its stat, make its row visible, scroll to its cell
  async pick(run, a, tr) {
    this.focus = { path: run.path, layer: a.layer, step: a.step };
    if (a.stat !== this.stat && this.data.stats.includes(a.stat)) {
      this.stat = a.stat;
      this.select.value = a.stat;
      await this.load();
    }
    if (this.filter && !matcher(this.filter)(a.layer)) {
      this.filter = '';
      this.input.value = '';
      this.draw();
    }
    const picked = this.showFocus(true);
    for (const row of this.runs.querySelectorAll('tr.gw-picked')) row.classList.remove('gw-picked');
    const again = [...this.runs.querySelectorAll('.gw-run')]
      .find((s) => s.dataset.path === run.path);
    const same = again && [...again.querySelectorAll('tr.gw-alert')].find(
      (r) => r.dataset.layer === a.layer && r.dataset.step === String(a.step));
    (same || tr).classList.add('gw-picked');
    const total = this.data.runs.reduce((n, r) => n + r.alerts.length, 0);
    this.status.textContent = `${this.data.runs.length} run(s), ${total} alert(s) · ` + (picked
      ? `showing ${a.layer} at step ${a.step}`
      : `${a.layer} has no row in the ${this.stat} heatmap`);
  }

  showFocus(scroll) {
    const f = this.focus;
    for (const c of this.runs.querySelectorAll('.gw-focus')) c.classList.remove('gw-focus');
    for (const r of this.runs.querySelectorAll('.gw-focus-row')) {
      r.classList.remove('gw-focus-row');
    }
    const sec = [...this.runs.querySelectorAll('.gw-run')]
      .find((s) => s.dataset.path === f.path);
    const row = sec && [...sec.querySelectorAll('.gw-row')].find((r) => r.dataset.layer === f.layer);
    const run = this.data.runs.find((r) => r.path === f.path);
    if (!row || !run) return null;
    sec.open = true;
    const cell = row.querySelectorAll('.gw-cell')[columnOf(run.steps, f.step)];
    if (!cell) return null;
    row.classList.add('gw-focus-row');
    cell.classList.add('gw-focus');
    if (scroll) cell.scrollIntoView({ block: 'center', inline: 'nearest' });
    return cell;
  }
}

export async function render() {
  const dash = new Dashboard();
  dash.mount();
  await dash.load();
}
