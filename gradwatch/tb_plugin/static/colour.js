// Colour scales of the gradwatch dashboard, one kind per stat:
//   log     magnitudes (grad_rms, act_std, out_grad_rms, grad_max, ...): viridis over
//           log10 |value|, spanning what the runs hold; exact 0 has a colour of its own
//   linear  fractions in [0, 1] (act_zero_frac, act_sat_frac): viridis over a fixed 0..1,
//           so 0.5 looks the same in every run and every refresh
//   signed  act_mean: diverging, blue below 0 and red above, intensity by log10 |value|
//           over the top SIGNED_DECADES decades (smaller magnitudes are white)
//   count   nonfinite: 0 (the healthy value) is near-white, anything above it red by
//           log10 value: a healthy run is a calm grid, a non-finite cell stands out
// A scale spans the runs it is made for: one run (the default: one exploding run does
// not wash out the others) or all of them (the "shared" option).
// Values arrive as numbers, the strings "nan"/"inf"/"-inf", or null (not collected).

const VIRIDIS = [
  [68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37],
];
const REDS = [[247, 247, 247], [253, 219, 199], [244, 165, 130], [214, 96, 77], [178, 24, 43]];
const BLUES = [[247, 247, 247], [209, 229, 240], [146, 197, 222], [67, 147, 195], [33, 102, 172]];
export const MISSING = '#e3e3e3';
export const ZERO = '#1b1b1b';
export const NONFINITE = '#ff2bd6';
const SIGNED_DECADES = 4;

const LINEAR = new Set(['act_zero_frac', 'act_sat_frac']);
const SIGNED = new Set(['act_mean']);
const COUNT = new Set(['nonfinite']);
export const NONE = '#f4f4f4'; // a count of 0

export function scaleKind(stat) {
  if (LINEAR.has(stat)) return 'linear';
  if (SIGNED.has(stat)) return 'signed';
  if (COUNT.has(stat)) return 'count';
  return 'log';
}

// JSON carries non-finite values as the strings "nan", "inf", "-inf"; null: not written.
export function num(v) {
  if (v === null || v === undefined) return null;
  if (typeof v === 'string') return v === 'nan' ? NaN : v === 'inf' ? Infinity : -Infinity;
  return v;
}

// The one number format of gradwatch (Python's schema.fmt, f"{v:.3g}"): 3 significant
// digits, 0.547, 1.23e-05, 2.5e+03.
export function fmt(v) {
  if (v === null) return 'not collected';
  if (Number.isNaN(v)) return 'nan';
  if (!Number.isFinite(v)) return v > 0 ? 'inf' : '-inf';
  if (v === 0) return '0';
  const exp = Number(v.toExponential(2).split('e')[1]); // after rounding to 3 digits
  if (exp < -4 || exp >= 3) {
    const [m, e] = v.toExponential(2).split('e');
    const mant = m.includes('.') ? m.replace(/0+$/, '').replace(/\.$/, '') : m;
    const sign = e[0] === '-' ? '-' : '+';
    const digits = e.replace(/^[-+]/, '');
    return `${mant}e${sign}${digits.padStart(2, '0')}`;
  }
  const fixed = v.toFixed(Math.max(0, 2 - exp));
  return fixed.includes('.') ? fixed.replace(/0+$/, '').replace(/\.$/, '') : fixed;
}

function ramp(stops, t) {
  const x = Math.min(1, Math.max(0, t)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  const c = stops[i].map((a, k) => Math.round(a + (stops[i + 1][k] - a) * f));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

export function viridis(t) {
  return ramp(VIRIDIS, t);
}

// log10 |v| range over the finite non-zero values of every run
function logRange(runs) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const run of runs) {
    for (const row of run.values) {
      for (const raw of row) {
        const v = num(raw);
        if (v !== null && Number.isFinite(v) && v !== 0) {
          const a = Math.log10(Math.abs(v));
          if (a < lo) lo = a;
          if (a > hi) hi = a;
        }
      }
    }
  }
  return lo === Infinity ? [0, 0] : [lo, hi];
}

function hasNonZero(runs) {
  return runs.some((run) => run.values.some((row) => row.some((raw) => {
    const v = num(raw);
    return v !== null && Number.isFinite(v) && v !== 0;
  })));
}

function special(v) {
  if (v === null) return MISSING;
  if (!Number.isFinite(v)) return NONFINITE;
  return null;
}

// A scale: colour(v) for a cell, and what the legend shows (a ramp of colours between two
// labels, a note, and swatches of the special colours).
export function makeScale(stat, runs) {
  const kind = scaleKind(stat);
  const swatches = [[NONFINITE, 'nan/inf'], [MISSING, 'not collected']];
  if (kind === 'linear') {
    return {
      kind,
      colour: (v) => special(v) || viridis(v),
      ramp: Array.from({ length: 10 }, (_, i) => viridis(i / 9)),
      low: '0', high: '1', note: '(linear)', swatches,
    };
  }
  const [lo0, hi] = logRange(runs);
  const empty = !hasNonZero(runs);
  if (kind === 'count') {
    const t = (v) => (hi > lo0 ? (Math.log10(v) - lo0) / (hi - lo0) : 1);
    return {
      kind,
      colour: (v) => special(v) || (v === 0 ? NONE : ramp(REDS, 0.25 + 0.75 * t(v))),
      ramp: empty ? [] : [1, 2, 3, 4].map((k) => ramp(REDS, k / 4)),
      low: empty ? '' : fmt(10 ** lo0), high: empty ? '' : fmt(10 ** hi),
      note: empty ? 'every value is 0 (none)' : '(log)',
      swatches: [[NONE, '0 (none)'], ...swatches],
    };
  }
  if (empty) {
    return {
      kind,
      colour: (v) => special(v) || (v === 0 ? ZERO : viridis(0.5)),
      ramp: [], low: '', high: '', note: 'every value is 0',
      swatches: [[ZERO, '0'], ...swatches],
    };
  }
  if (kind === 'signed') {
    const lo = Math.max(lo0, hi - SIGNED_DECADES);
    const t = (a) => (hi > lo ? (Math.log10(a) - lo) / (hi - lo) : 1);
    const top = fmt(10 ** hi);
    return {
      kind,
      colour: (v) => special(v) || (v === 0 ? ramp(REDS, 0)
        : ramp(v > 0 ? REDS : BLUES, t(Math.abs(v)))),
      ramp: [...[4, 3, 2, 1].map((k) => ramp(BLUES, k / 4)), ramp(REDS, 0),
             ...[1, 2, 3, 4].map((k) => ramp(REDS, k / 4))],
      low: `-${top}`, high: top,
      note: `(signed log; |v| < ${fmt(10 ** lo)} white)`,
      swatches,
    };
  }
  const lo = lo0;
  return {
    kind,
    colour: (v) => special(v) || (v === 0 ? ZERO
      : viridis(hi > lo ? (Math.log10(Math.abs(v)) - lo) / (hi - lo) : 0.5)),
    ramp: Array.from({ length: 10 }, (_, i) => viridis(i / 9)),
    low: fmt(10 ** lo), high: fmt(10 ** hi), note: '(log |value|)',
    swatches: [[ZERO, '0'], ...swatches],
  };
}
