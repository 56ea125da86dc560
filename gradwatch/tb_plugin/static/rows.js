// Which heatmap rows are shown, in what groups, under what labels: pure functions of the
// layer names (forward order) and their module types, no DOM.
//
// Filter: comma-separated terms, a layer is kept when any term matches. A term with * ? or
// [ is a glob on the whole qualified name, as in watch(include=...) (fnmatch rules); any
// other term is a case-insensitive substring.
// Grouping:
//   none    depth order
//   module  the name with its block indices replaced by *: a depth profile of every
//           "transformer.h.*.attn.c_attn"; groups in order of their first layer
//   type    the module type (Linear, LayerNorm, ...), as recorded by the watcher
//   block   runs of consecutive layers under the same block ("transformer.h.3")

export const GROUPINGS = [
  ['none', 'in depth order', 'every layer in forward order'],
  ['module', 'by module', 'one group per name without its block numbers: a depth profile ' +
   'of h.*.attn.c_attn, h.*.ln_2, ...'],
  ['type', 'by module type', 'one group per module type: Linear, LayerNorm, ...'],
  ['block', 'by block', 'one group per block (h.0, h.1, ...), in depth order'],
];

const NUMBER = /^\d+$/;

function globToRegExp(glob) {
  let re = '';
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i];
    if (c === '*') {
      re += '.*';
    } else if (c === '?') {
      re += '.';
    } else if (c === '[') {
      let k = i + 1;
      if (glob[k] === '!') k++;
      if (glob[k] === ']') k++; // a ] first in the set is a member
      while (k < glob.length && glob[k] !== ']') k++;
      if (k >= glob.length) {
        re += '\\[';
      } else {
        let set = glob.slice(i + 1, k).replace(/\\/g, '\\\\');
        if (set[0] === '!') set = `^${set.slice(1)}`;
        else if (set[0] === '^') set = `\\${set}`;
        re += `[${set}]`;
        i = k;
      }
    } else {
      re += c.replace(/[\\^$.+?()[\]{}|/-]/g, '\\$&');
    }
  }
  return new RegExp(`^${re}$`, 's');
}

// name -> bool for the filter text (empty: every name)
export function matcher(text) {
  const terms = String(text || '').split(',').map((t) => t.trim()).filter(Boolean);
  if (!terms.length) return () => true;
  const tests = terms.map((term) => {
    if (/[*?[]/.test(term)) {
      const re = globToRegExp(term);
      return (name) => re.test(name);
    }
    const low = term.toLowerCase();
    return (name) => name.toLowerCase().includes(low);
  });
  return (name) => tests.some((t) => t(name));
}

// "transformer.h.3.attn.c_attn" -> "transformer.h.*.attn.c_attn"
export function moduleKey(name) {
  return name.split('.').map((p) => (NUMBER.test(p) ? '*' : p)).join('.');
}

// the part of a name that tells its block: "transformer.h.3.attn.c_attn" -> "h.3",
// "enc.layers.2.convs.1.conv" -> "layers.2.convs.1"; null without an index
export function indexLabel(name) {
  const parts = name.split('.');
  const idx = parts.map((p, i) => (NUMBER.test(p) ? i : -1)).filter((i) => i >= 0);
  if (!idx.length) return null;
  return parts.slice(Math.max(0, idx[0] - 1), idx[idx.length - 1] + 1).join('.');
}

// "transformer.h.3.attn.c_attn" -> ["transformer.h.3", "attn.c_attn"]; a numbered child
// is in its parent's block: "features.3" -> ["features", "features.3"]; a name without an
// index is in none: [null, name]
export function blockSplit(name) {
  const parts = name.split('.');
  const i = parts.findIndex((p) => NUMBER.test(p));
  if (i < 0) return [null, name];
  if (i === parts.length - 1) return [parts.slice(0, i).join('.'), name];
  return [parts.slice(0, i + 1).join('.'), parts.slice(i + 1).join('.')];
}

// [{key, title, rows: [{index, layer, label}]}]; index: the layer's index in ``layers``
export function groupRows(layers, types, mode, keep = () => true) {
  const rows = [];
  layers.forEach((layer, index) => { if (keep(layer)) rows.push({ index, layer }); });
  const type = (r) => (types && types[r.index]) || '';
  if (mode === 'module' || mode === 'type') {
    const groups = new Map();
    for (const r of rows) {
      const key = mode === 'module' ? moduleKey(r.layer) : (type(r) || 'type not recorded');
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(r);
    }
    return [...groups].map(([key, members]) => {
      const kinds = [...new Set(members.map(type).filter(Boolean))].join(', ');
      const title = mode === 'module' && kinds ? `${key} · ${kinds}` : key;
      return {
        key,
        title: `${title} · ${members.length} layer${members.length === 1 ? '' : 's'}`,
        rows: members.map((r) => ({
          ...r,
          label: mode === 'module' ? (indexLabel(r.layer) || r.layer) : r.layer,
        })),
      };
    });
  }
  if (mode === 'block') {
    const groups = [];
    for (const r of rows) {
      const [block, label] = blockSplit(r.layer);
      let g = groups[groups.length - 1];
      if (!g || g.key !== block) {
        g = { key: block, rows: [] };
        groups.push(g);
      }
      g.rows.push({ ...r, label });
    }
    for (const g of groups) {
      const n = `${g.rows.length} layer${g.rows.length === 1 ? '' : 's'}`;
      const name = g.key === null ? 'outside the blocks' : g.key === '' ? 'top level' : g.key;
      g.title = `${name} · ${n}`;
    }
    return groups;
  }
  return [{ key: null, title: null, rows: rows.map((r) => ({ ...r, label: r.layer })) }];
}

// a label of at most ``max`` characters, cut at the front (the end of a name tells most)
export function fitLabel(text, max) {
  return text.length <= max ? text : `…${text.slice(text.length - max + 1)}`;
}
