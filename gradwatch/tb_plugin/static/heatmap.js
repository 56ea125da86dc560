// The DOM of one run: its heatmap (grouped rows of cells, step axis, hover tooltip) and its
// alert list (every alert; the hint once per kind and cause, folded). Names are data: they
// reach the page through textContent and attribute values only, never innerHTML.

import { fmt, num } from './colour.js';
import { fitLabel } from './rows.js';

const LABEL_CHARS = 44; // longer labels are cut at the front; the full name is the title
const CHAR_PX = 6.7; // monospace 11px
const TICK_CHAR_PX = 6.2; // the axis' 10px digits
const OPEN_ALERTS = 12; // a longer alert list starts folded (its count is in the summary)

// Which columns get a step label: every k-th, k the smallest of 1, 2, 5, 10, 20, 50, ...
// whose labels do not overlap (a label per column when they fit), and the last column.
export function tickColumns(steps, width) {
  const n = steps.length;
  if (!n) return { every: 1, cols: [] };
  const labelPx = Math.max(...steps.map((s) => String(s).length)) * TICK_CHAR_PX + 8;
  let every = 1;
  for (let m = 1; every * width < labelPx; m *= 10) {
    every = [1, 2, 5].map((f) => f * m).find((k) => k * width >= labelPx) || 10 * m;
  }
  const cols = [];
  for (let j = 0; j < n; j += every) cols.push(j);
  const last = n - 1;
  if (cols[cols.length - 1] !== last) {
    if ((last - cols[cols.length - 1]) * width < labelPx) cols.pop();
    cols.push(last);
  }
  return { every, cols };
}

export function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = String(text);
  return e;
}

// the column of an alert: the first window ending at or after its step
export function columnOf(steps, step) {
  const j = steps.findIndex((s) => s >= step);
  return j < 0 ? steps.length - 1 : j;
}

// run: one entry of the data route; groups: rows.groupRows(...); sc: colour.makeScale(...)
export function heatmap(run, stat, sc, groups, tip) {
  const wrap = el('div', 'gw-heatmap');
  wrap.setAttribute('role', 'grid');
  const shown = groups.reduce((n, g) => n + g.rows.length, 0);
  const longest = groups.reduce(
    (n, g) => g.rows.reduce((m, r) => Math.max(m, Math.min(LABEL_CHARS, r.label.length)), n), 4);
  const labelW = Math.max(40, Math.ceil(longest * CHAR_PX) + 14);
  const width = Math.max(3, Math.min(56, Math.floor((window.innerWidth - labelW - 48) /
                                                     Math.max(1, run.steps.length))));
  wrap.style.setProperty('--gw-w', `${width}px`);
  wrap.style.setProperty('--gw-label', `${labelW}px`);
  wrap.style.setProperty('--gw-h', shown > 40 ? '12px' : '18px');
  const marked = new Map();
  const alerted = new Set();
  for (const a of run.alerts) {
    alerted.add(a.layer);
    if (a.stat === stat) marked.set(`${a.layer}\u0000${columnOf(run.steps, a.step)}`, a.kind);
  }
  for (const g of groups) {
    if (g.title !== null) {
      const head = el('div', 'gw-group', g.title);
      head.dataset.group = g.key === null ? '' : g.key;
      wrap.append(head);
    }
    for (const r of g.rows) {
      const row = el('div', 'gw-row');
      row.setAttribute('role', 'row');
      row.dataset.layer = r.layer;
      row.dataset.index = String(r.index);
      const label = el('div', 'gw-label', fitLabel(r.label, LABEL_CHARS));
      const type = run.types[r.index];
      label.title = type ? `${r.layer} (${type})` : r.layer;
      if (alerted.has(r.layer)) label.classList.add('gw-has-alert');
      const cells = el('div', 'gw-cells');
      run.values[r.index].forEach((raw, j) => {
        const cell = el('div', 'gw-cell');
        cell.setAttribute('role', 'gridcell');
        cell.style.background = sc.colour(num(raw));
        cell.dataset.step = String(run.steps[j]);
        cell.dataset.col = String(j);
        if (marked.has(`${r.layer}\u0000${j}`)) cell.classList.add('gw-alerted');
        cells.append(cell);
      });
      row.append(label, cells);
      wrap.append(row);
    }
  }
  const axis = el('div', 'gw-axis');
  const { every, cols } = tickColumns(run.steps, width);
  for (const j of cols) {
    const t = el('span', null, run.steps[j]);
    t.style.left = `${(j + 0.5) * width}px`;
    axis.append(t);
  }
  axis.title = every === 1 ? 'the step of every column (a window ends there)'
    : `the step of every ${every}th column (and the last); hover a cell for its own`;
  wrap.append(axis);
  // one listener for every cell: a 100-layer x 500-step grid has 50,000 of them
  wrap.addEventListener('mouseover', (ev) => {
    const cell = ev.target.closest('.gw-cell');
    if (!cell) {
      tip.hidden = true;
      return;
    }
    const row = cell.closest('.gw-row');
    const i = Number(row.dataset.index);
    const j = Number(cell.dataset.col);
    const lines = [run.layers[i], `step ${run.steps[j]}`, `${stat} = ${fmt(num(run.values[i][j]))}`];
    if (run.types[i]) lines.push(run.types[i]);
    const kind = marked.get(`${run.layers[i]}\u0000${j}`);
    if (kind) lines.push(`alert: ${kind}`);
    tip.textContent = lines.join('\n');
    tip.hidden = false;
    tip.style.left = `${Math.min(ev.clientX + 12, window.innerWidth - 260)}px`;
    tip.style.top = `${ev.clientY + 12}px`;
  });
  wrap.addEventListener('mouseleave', () => { tip.hidden = true; });
  return wrap;
}

// the first sentence of a hint (its summary when folded)
function firstSentence(text) {
  const m = /^(.*?[.:;])\s/.exec(text);
  return m && m[1].length < text.length ? `${m[1]} …` : text;
}

// one entry per kind and cause: its alerts, layers and the hint of its worst alert
export function causes(alerts) {
  const by = new Map();
  for (const a of alerts) {
    const key = `${a.kind}\u0000${a.cause || 'unknown'}`;
    if (!by.has(key)) by.set(key, { kind: a.kind, cause: a.cause || 'unknown', alerts: [] });
    by.get(key).alerts.push(a);
  }
  return [...by.values()].map((g) => ({
    ...g,
    layers: [...new Set(g.alerts.map((a) => a.layer))],
    hint: (g.alerts.find((a) => a.hint) || {}).hint || '',
  }));
}

// onPick(alert): an alert row was clicked (or chosen with Enter)
export function alertList(run, onPick) {
  if (!run.alerts.length && !run.missing) return el('p', 'gw-note gw-none', 'no alerts');
  const box = el('details', 'gw-alert-list');
  box.open = run.alerts.length <= OPEN_ALERTS;
  const head = el('summary', null, `alerts (${run.alerts.length})`);
  box.append(head);
  if (run.missing) {
    box.open = true;
    box.append(el('p', 'gw-note gw-missing',
      `showing ${run.alerts.length} of ${run.alert_total} alerts: ${run.missing} cannot be ` +
      `shown because ${run.missing_why}`));
  }
  if (!run.alerts.length) {
    box.append(el('p', 'gw-note gw-none', 'no alerts'));
    return box;
  }
  // why, and what to try: once per kind and cause, the full hint a click away
  for (const g of causes(run.alerts)) {
    const why = el('details', 'gw-why');
    const n = g.alerts.length;
    const where = g.layers.length === 1 ? g.layers[0] : `${g.layers.length} layers`;
    const sum = el('summary');
    sum.append(el('span', 'gw-kind', g.kind), el('span', null, ` · cause ${g.cause} · `),
      el('span', null, `${n} alert${n === 1 ? '' : 's'} (${where})`));
    if (g.hint) sum.append(el('span', 'gw-dim', ` — ${firstSentence(g.hint)}`));
    why.append(sum);
    if (g.hint) why.append(el('p', 'gw-hint', g.hint));
    why.dataset.kind = g.kind;
    why.dataset.cause = g.cause;
    box.append(why);
  }
  const table = el('table', 'gw-alerts');
  const headRow = el('tr');
  for (const h of ['step', 'layer', 'kind', 'stat', 'value', 'threshold', 'cause']) {
    headRow.append(el('th', null, h));
  }
  const thead = el('thead');
  thead.append(headRow);
  table.append(thead);
  const body = el('tbody');
  for (const a of run.alerts) {
    const tr = el('tr', 'gw-alert');
    tr.tabIndex = 0;
    tr.title = a.message ? `${a.message}\n(click: show this alert in the heatmap)`
      : 'show this alert in the heatmap';
    tr.dataset.layer = a.layer;
    tr.dataset.step = String(a.step);
    tr.append(
      el('td', 'gw-num', a.step), el('td', 'gw-layer', a.layer), el('td', 'gw-kind', a.kind),
      el('td', null, a.stat), el('td', 'gw-num', fmt(num(a.value))),
      el('td', 'gw-num', fmt(num(a.threshold))),
      el('td', a.cause === 'unknown' ? 'gw-cause gw-dim' : 'gw-cause', a.cause || 'unknown'),
    );
    tr.addEventListener('click', () => onPick(a, tr));
    tr.addEventListener('keydown', (ev) => { if (ev.key === 'Enter') onPick(a, tr); });
    body.append(tr);
  }
  table.append(body);
  box.append(table);
  return box;
}
