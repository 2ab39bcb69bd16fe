// Small DOM helpers. Every string from the server or the user goes into the
// page through textContent or an attribute, never as markup.

/**
 * Creates an element: h('div', {class: 'x', 'data-seq': 3}, child, 'text').
 * Strings and numbers become text nodes; null and false are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') {
      el.addEventListener(k.slice(2), v);
    } else if (k === 'class') {
      el.className = v;
    } else if (v === true) {
      el.setAttribute(k, '');
    } else {
      el.setAttribute(k, String(v));
    }
  }
  append(el, children);
  return el;
}

/** Appends children (elements, strings, arrays of them). */
export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Replaces an element's children. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** Milliseconds since the epoch of an RFC 3339 time, or NaN. */
export function timeMs(s) {
  return typeof s === 'string' ? Date.parse(s) : NaN;
}

/** "12:03:04.123" of an RFC 3339 time (local time). */
export function clock(s) {
  const ms = timeMs(s);
  if (Number.isNaN(ms)) return '';
  const d = new Date(ms);
  const p = (n, w = 2) => String(n).padStart(w, '0');
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

/** A duration in milliseconds for people: "850 ms", "2.4 s", "3 min 5 s". */
export function duration(ms) {
  if (!Number.isFinite(ms) || ms < 0) return '';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  const m = Math.floor(ms / 60000);
  return `${m} min ${Math.round((ms % 60000) / 1000)} s`;
}

/** "5 s ago", "3 min ago", "2 h ago", or the date. */
export function ago(s, now = Date.now()) {
  const ms = timeMs(s);
  if (Number.isNaN(ms)) return '';
  const d = Math.max(0, now - ms) / 1000;
  if (d < 60) return `${Math.floor(d)} s ago`;
  if (d < 3600) return `${Math.floor(d / 60)} min ago`;
  if (d < 86400) return `${Math.floor(d / 3600)} h ago`;
  return new Date(ms).toISOString().slice(0, 10);
}
