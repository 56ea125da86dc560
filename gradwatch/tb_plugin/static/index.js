// gradwatch dashboard for TensorBoard: a plain ES module, no build step.
//
// TensorBoard loads it in an iframe (data/plugin_entry.html?name=gradwatch) and calls
// render(). It fetches data?stat=<stat> and draws, per run, a layer x step heatmap with a
// log colour scale, then the run's alerts.
//
// Run and layer names are data (a module may be named "<img src=x onerror=alert(1)>"):
// they reach the DOM only through textContent and attribute values, never innerHTML.

const VIRIDIS = [
  [68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37],
];
const MISSING = '#e3e3e3';
const BELOW = '#1b1b1b';
const NONFINITE = '#ff2bd6';
const REFRESH_MS = 30000;

const CSS = `
:root { font-family: Roboto, Arial, sans-serif; font-size: 13px; color: #212121; }
body { margin: 0; background: #fff; }
.gw-root { padding: 12px 16px; }
.gw-bar { display: flex; align-items: center; gap: 18px; flex-wrap: wrap; margin-bottom: 8px; }
.gw-bar h1 { font-size: 18px; margin: 0; font-weight: 500; }
.gw-legend { display: inline-flex; align-items: center; gap: 6px; }
.gw-ramp { display: inline-flex; height: 12px; border: 1px solid #bbb; }
.gw-ramp span { width: 14px; height: 12px; }
.gw-swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #bbb;
  vertical-align: middle; margin-right: 3px; }
.gw-status { color: #757575; }
.gw-run { margin: 10px 0 22px; }
.gw-run h2 { font-size: 15px; margin: 4px 0 6px; font-weight: 500; }
.gw-run h3 { font-size: 13px; margin: 10px 0 4px; font-weight: 500; }
.gw-row { display: flex; align-items: stretch; height: var(--gw-h, 16px); }
.gw-label { flex: 0 0 var(--gw-label, 200px); overflow: hidden; text-overflow: ellipsis;
  white-space: nowrap; font-family: monospace; font-size: 11px; padding-right: 8px;
  text-align: right; line-height: var(--gw-h, 16px); }
.gw-cells { display: flex; }
.gw-cell { width: var(--gw-w, 16px); height: 100%; box-sizing: border-box;
  border-right: 1px solid rgba(255,255,255,0.25); }
.gw-cell.gw-alerted { outline: 2px solid #e53935; outline-offset: -2px; }
.gw-cell:hover { outline: 2px solid #fff; outline-offset: -2px; }
.gw-axis { display: flex; margin-left: var(--gw-label, 200px); font-size: 10px; color: #616161;
  height: 14px; position: relative; }
.gw-axis span { position: absolute; transform: translateX(-50%); white-space: nowrap; }
.gw-alerts { border-collapse: collapse; font-size: 12px; }
.gw-alerts th, .gw-alerts td { padding: 2px 10px 2px 0; text-align: left; }
.gw-alerts td.gw-num { text-align: right; font-variant-numeric: tabular-nums; }
.gw-alerts td.gw-layer { font-family: monospace; }
.gw-kind { color: #c62828; font-weight: 500; }
.gw-note { color: #757575; font-size: 12px; }
.gw-tip { position: fixed; pointer-events: none; background: rgba(33,33,33,0.92); color: #fff;
  padding: 4px 7px; border-radius: 3px; font-size: 12px; white-space: pre; z-index: 10; }
`;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = String(text);
  return e;
}

// JSON carries non-finite values as the strings "nan", "inf", "-inf"; null: not written.
function num(v) {
  if (v === null || v === undefined) return null;
  if (typeof v === 'string') return v === 'nan' ? NaN : v === 'inf' ? Infinity : -Infinity;
  return v;
}

export function fmt(v) {
  if (v === null) return 'not collected';
  if (Number.isNaN(v)) return 'nan';
  if (!Number.isFinite(v)) return v > 0 ? 'inf' : '-inf';
  if (v === 0) return '0';
  const a = Math.abs(v);
  return a >= 1e-3 && a < 1e4 ? String(Number(v.toPrecision(3))) : v.toExponential(2);
}

function viridis(t) {
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const c = VIRIDIS[i].map((a, k) => Math.round(a + (VIRIDIS[i + 1][k] - a) * f));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

// Log colour scale over |value|, shared by every run so they compare at a glance.
export function scale(runs) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const run of runs) {
    for (const row of run.values) {
      for (const raw of row) {
        const v = num(raw);
        if (v !== null && Number.isFinite(v) && v !== 0) {
          const a = Math.log10(Math.abs(v));
          lo = Math.min(lo, a);
          hi = Math.max(hi, a);
        }
      }
    }
  }
  if (lo === Infinity) { lo = 0; hi = 0; }
  return {
    lo, hi,
    colour(v) {
      if (v === null) return MISSING;
      if (!Number.isFinite(v)) return NONFINITE;
      if (v === 0) return BELOW;
      return viridis(hi > lo ? (Math.log10(Math.abs(v)) - lo) / (hi - lo) : 0.5);
    },
  };
}

function legend(sc) {
  const box = el('span', 'gw-legend');
  box.append(el('span', null, fmt(10 ** sc.lo)));
  const ramp = el('span', 'gw-ramp');
  for (let i = 0; i < 10; i++) {
    const s = el('span');
    s.style.background = viridis(i / 9);
    ramp.append(s);
  }
  box.append(ramp, el('span', null, `${fmt(10 ** sc.hi)} (log |value|)`));
  for (const [colour, label] of [[BELOW, '0'], [NONFINITE, 'nan/inf'], [MISSING, 'none']]) {
    const item = el('span');
    const sw = el('span', 'gw-swatch');
    sw.style.background = colour;
    item.append(sw, document.createTextNode(label));
    box.append(item);
  }
  return box;
}

function heatmap(run, stat, sc, tip) {
  const wrap = el('div', 'gw-heatmap');
  wrap.setAttribute('role', 'grid');
  // labels as wide as the longest name (monospace 11px), cells filling the rest
  const longest = run.layers.reduce((n, la) => Math.max(n, la.length), 4);
  const labelW = Math.max(40, Math.min(280, Math.ceil(longest * 6.7) + 12));
  const width = Math.max(3, Math.min(56, Math.floor((window.innerWidth - labelW - 48) /
                                                     Math.max(1, run.steps.length))));
  wrap.style.setProperty('--gw-w', `${width}px`);
  wrap.style.setProperty('--gw-label', `${labelW}px`);
  wrap.style.setProperty('--gw-h', run.layers.length > 40 ? '12px' : '18px');
  const marked = new Set();
  for (const a of run.alerts) {
    if (a.stat !== stat) continue;
    let j = run.steps.findIndex((s) => s >= a.step);
    if (j < 0) j = run.steps.length - 1;
    marked.add(`${a.layer}\u0000${j}`);
  }
  run.layers.forEach((layer, i) => {
    const row = el('div', 'gw-row');
    row.setAttribute('role', 'row');
    row.dataset.layer = layer;
    const label = el('div', 'gw-label', layer);
    label.title = layer;
    const cells = el('div', 'gw-cells');
    run.values[i].forEach((raw, j) => {
      const v = num(raw);
      const cell = el('div', 'gw-cell');
      cell.setAttribute('role', 'gridcell');
      cell.style.background = sc.colour(v);
      cell.dataset.step = String(run.steps[j]);
      if (marked.has(`${layer}\u0000${j}`)) cell.classList.add('gw-alerted');
      cell.addEventListener('mouseenter', (ev) => {
        tip.textContent = `${layer}\nstep ${run.steps[j]}\n${stat} = ${fmt(v)}`;
        tip.hidden = false;
        tip.style.left = `${Math.min(ev.clientX + 12, window.innerWidth - 220)}px`;
        tip.style.top = `${ev.clientY + 12}px`;
      });
      cell.addEventListener('mouseleave', () => { tip.hidden = true; });
      cells.append(cell);
    });
    row.append(label, cells);
    wrap.append(row);
  });
  const axis = el('div', 'gw-axis');
  const n = run.steps.length;
  const ticks = Math.min(n, 8);
  for (let k = 0; k < ticks; k++) {
    const j = ticks === 1 ? 0 : Math.round((k * (n - 1)) / (ticks - 1));
    const t = el('span', null, run.steps[j]);
    t.style.left = `${(j + 0.5) * width}px`;
    axis.append(t);
  }
  wrap.append(axis);
  return wrap;
}

function alertList(run) {
  const frag = document.createDocumentFragment();
  frag.append(el('h3', null, `alerts (${run.alerts.length})`));
  if (!run.alerts.length) {
    frag.append(el('p', 'gw-note gw-none', 'no alerts'));
    return frag;
  }
  const table = el('table', 'gw-alerts');
  const head = el('tr');
  for (const h of ['step', 'layer', 'kind', 'stat', 'value', 'threshold']) head.append(el('th', null, h));
  const thead = el('thead');
  thead.append(head);
  table.append(thead);
  const body = el('tbody');
  for (const a of run.alerts) {
    const tr = el('tr', 'gw-alert');
    tr.append(
      el('td', 'gw-num', a.step), el('td', 'gw-layer', a.layer), el('td', 'gw-kind', a.kind),
      el('td', null, a.stat), el('td', 'gw-num', fmt(num(a.value))),
      el('td', 'gw-num', fmt(num(a.threshold))),
    );
    body.append(tr);
  }
  table.append(body);
  frag.append(table);
  if (run.alert_total > run.alerts.length) {
    frag.append(el('p', 'gw-note',
      `showing ${run.alerts.length} of ${run.alert_total} alerts: TensorBoard keeps a sample ` +
      'of text events; start it with --samples_per_plugin text=0 to keep them all'));
  }
  return frag;
}

function draw(root, data, tip) {
  const sc = scale(data.runs);
  const select = root.querySelector('.gw-stat');
  const stats = data.stats.length ? data.stats : [data.stat];
  if (select.options.length !== stats.length) {
    select.replaceChildren(...stats.map((s) => {
      const o = el('option', null, s);
      o.value = s;
      return o;
    }));
  }
  select.value = data.stat;
  root.querySelector('.gw-legend-slot').replaceChildren(legend(sc));
  const runs = root.querySelector('.gw-runs');
  const sections = data.runs.map((run) => {
    const sec = el('section', 'gw-run');
    sec.dataset.run = run.run;
    sec.append(el('h2', null, run.run));
    if (run.layers.length) {
      sec.append(heatmap(run, data.stat, sc, tip));
    } else {
      sec.append(el('p', 'gw-note', `no layer has ${data.stat} in this run`));
    }
    sec.append(alertList(run));
    return sec;
  });
  if (!sections.length) sections.push(el('p', 'gw-note', 'no gradwatch data in this logdir'));
  runs.replaceChildren(...sections);
  const total = data.runs.reduce((n, r) => n + r.alerts.length, 0);
  root.querySelector('.gw-status').textContent =
    `${data.runs.length} run(s), ${total} alert(s)`;
  root.dataset.ready = 'true';
}

async function load(root, stat, tip) {
  const status = root.querySelector('.gw-status');
  try {
    const resp = await fetch(`data?stat=${encodeURIComponent(stat)}`);
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    draw(root, await resp.json(), tip);
  } catch (err) {
    status.textContent = `could not load gradwatch data: ${err.message}`;
  }
}

export async function render() {
  const style = document.createElement('style');
  style.textContent = CSS;
  document.head.append(style);
  const root = el('div', 'gw-root');
  const bar = el('header', 'gw-bar');
  bar.append(el('h1', null, 'gradwatch'));
  const label = el('label', null, 'stat ');
  const select = el('select', 'gw-stat');
  label.append(select);
  bar.append(label, el('span', 'gw-legend-slot'), el('span', 'gw-status', 'loading…'));
  const tip = el('div', 'gw-tip');
  tip.hidden = true;
  root.append(bar, el('div', 'gw-runs'), tip);
  document.body.append(root);
  let stat = new URLSearchParams(window.location.search).get('stat') || 'grad_rms';
  select.addEventListener('change', () => {
    stat = select.value;
    load(root, stat, tip);
  });
  setInterval(() => { if (!document.hidden) load(root, stat, tip); }, REFRESH_MS);
  await load(root, stat, tip);
}
