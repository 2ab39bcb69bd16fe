// A session's log as the page shows it: one element per entry, in seq
// order, each with data-seq and data-type; turns as bands (status, reason,
// duration, input range); tool calls paired with their results; the running
// turn's tokens live; the messages still waiting for a turn, with their
// positions. Types this page does not know are shown generically, so newer
// servers never break it.

import { h, replace, clock, duration, timeMs } from './dom.js';

/** Fields every entry has, not shown again in the generic view. */
const META = new Set(['seq', 'session_id', 'type', 'created_at', 'turn_id']);

export class LogView {
  /**
   * `onAnswer(requestId, optionId)`, if given, answers a permission request
   * from the buttons shown on it while it waits (resolves to an error
   * message, or null).
   */
  constructor(list, onChange, onAnswer) {
    this.list = list;
    this.onChange = onChange || (() => {});
    this.onAnswer = onAnswer || null;
    this.asking = new Map();
    this.bySeq = new Map();
    this.turns = new Map();
    this.calls = new Map();
    this.users = [];
    this.consumed = 0;
    this.live = new Map();
    this.ended = new Set();
    this.active = null;
    this.lastSeq = 0;
  }

  /** Adds a committed entry (in seq order; repeats are ignored). */
  add(e) {
    if (!e || typeof e.seq !== 'number' || this.bySeq.has(e.seq)) return;
    const el = this.render(e);
    el.id = `entry-${e.seq}`;
    el.dataset.seq = String(e.seq);
    el.dataset.type = String(e.type);
    if (e.turn_id) el.dataset.turn = String(e.turn_id);
    this.bySeq.set(e.seq, el);
    this.lastSeq = Math.max(this.lastSeq, e.seq);
    // Entries stay in seq order ahead of the live previews.
    const firstLive = this.list.querySelector(':scope > .live');
    this.list.insertBefore(el, firstLive);
    if (e.type === 'message' && e.role === 'assistant' && e.turn_id) {
      // The stored message supersedes the tokens that led to it.
      this.dropLive(e.turn_id);
    }
    this.updateWaiting();
    this.onChange();
  }

  /** A token chunk of a running turn. */
  delta(d) {
    if (!d || !d.turn_id || typeof d.text !== 'string' || this.ended.has(d.turn_id)) return;
    let el = this.live.get(d.turn_id);
    if (!el) {
      el = h('li', { class: 'entry live', 'data-live-turn': d.turn_id, 'aria-label': 'streaming reply' },
        h('div', { class: 'meta' }, h('span', { class: 'kind' }, 'assistant'), h('span', { class: 'badge running' }, 'streaming')),
        h('div', { class: 'content' }));
      this.live.set(d.turn_id, el);
      this.list.append(el);
    }
    const content = el.querySelector('.content');
    content.textContent += d.text;
    this.onChange();
  }

  dropLive(turnId) {
    const el = this.live.get(turnId);
    if (el) {
      el.remove();
      this.live.delete(turnId);
    }
  }

  /** The user messages no turn has taken yet, oldest (next to run) first. */
  waiting() {
    return this.users.filter((u) => u.seq > this.consumed);
  }

  updateWaiting() {
    let pos = 0;
    for (const u of this.users) {
      const badge = u.el.querySelector('.waiting');
      if (u.seq > this.consumed) {
        pos += 1;
        badge.hidden = false;
        badge.textContent = pos === 1 ? 'waiting · runs next' : `waiting · position ${pos}`;
      } else {
        badge.hidden = true;
      }
    }
  }

  render(e) {
    switch (e.type) {
      case 'message':
        return this.message(e);
      case 'turn_started':
        return this.turnStarted(e);
      case 'turn_ended':
        return this.turnEnded(e);
      case 'tool_call':
        return this.toolCall(e);
      case 'tool_result':
        return this.toolResult(e);
      case 'thought':
        return h('li', { class: 'entry thought' }, this.meta(e, 'thought'),
          h('div', { class: 'content' }, typeof e.content === 'string' ? e.content : pretty(e.content)));
      case 'permission_request':
      case 'permission_decision':
        if (e.permission && typeof e.permission === 'object') return this.permission(e);
        return this.generic(e);
      default:
        return this.generic(e);
    }
  }

  meta(e, label, ...extra) {
    return h('div', { class: 'meta' },
      h('span', { class: 'seq' }, `#${e.seq}`),
      h('span', { class: 'kind' }, label),
      extra,
      h('time', { datetime: e.created_at }, clock(e.created_at)));
  }

  message(e) {
    const role = typeof e.role === 'string' ? e.role : 'message';
    const content = typeof e.content === 'string' ? e.content : '';
    if (role === 'system' && content.startsWith('plan:')) {
      const steps = content.slice(5).split('\n').map((l) => l.trim()).filter(Boolean);
      return h('li', { class: 'entry plan' }, this.meta(e, 'plan'),
        h('ol', { class: 'steps' }, steps.map((s) => {
          // "- [status] step", as plans are stored.
          const m = s.match(/^-\s*\[([a-z_]+)\]\s*(.*)$/);
          return m ? h('li', {}, h('span', { class: `badge step ${m[1]}` }, m[1].replace(/_/g, ' ')), ' ', m[2]) : h('li', {}, s);
        })));
    }
    const el = h('li', { class: `entry message role-${role}` },
      this.meta(e, role, role === 'user' ? h('span', { class: 'badge waiting', hidden: true }) : null),
      h('div', { class: 'content' }, content));
    if (role === 'user') this.users.push({ seq: e.seq, el, content });
    return el;
  }

  turnStarted(e) {
    const input = e.input && typeof e.input.from === 'number' ? e.input : null;
    if (input) this.consumed = Math.max(this.consumed, input.to);
    const status = h('span', { class: 'badge status running' }, 'running');
    const dur = h('span', { class: 'duration' });
    const reason = h('span', { class: 'reason' });
    const el = h('li', { class: 'entry band band-start' },
      this.meta(e, 'turn started', status, dur),
      h('div', { class: 'band-body' },
        h('span', { class: 'input' }, input ? (input.from === input.to ? `input #${input.from}` : `input #${input.from}–#${input.to}`) : ''),
        h('code', { class: 'turn-id', title: 'turn id' }, e.turn_id || ''),
        reason));
    if (e.turn_id) {
      this.turns.set(e.turn_id, { el, status, dur, reason, started: e.created_at });
      this.active = e.turn_id;
    }
    return el;
  }

  turnEnded(e) {
    const turn = e.turn_id ? this.turns.get(e.turn_id) : null;
    const status = typeof e.status === 'string' ? e.status : 'ended';
    const took = turn ? duration(timeMs(e.created_at) - timeMs(turn.started)) : '';
    if (e.turn_id) {
      this.ended.add(e.turn_id);
      this.dropLive(e.turn_id);
      // A turn's end closes its open requests (the log says how next).
      for (const [rid, ask] of this.asking) {
        if (ask.turn === e.turn_id) this.closeAsk(rid);
      }
      if (this.active === e.turn_id) this.active = null;
    }
    if (turn) {
      turn.status.className = `badge status ${status}`;
      turn.status.textContent = status;
      turn.dur.textContent = took;
      turn.reason.textContent = e.reason || '';
      turn.el.classList.add('ended');
    }
    return h('li', { class: `entry band band-end ${status}` },
      this.meta(e, 'turn ended', h('span', { class: `badge status ${status}` }, status), h('span', { class: 'duration' }, took)),
      e.reason ? h('div', { class: 'band-body reason' }, e.reason) : null);
  }

  toolCall(e) {
    const tool = e.tool || {};
    const result = h('a', { class: 'pair', hidden: true });
    const el = h('li', { class: 'entry tool-call' },
      this.meta(e, 'tool call', h('span', { class: 'tool-name' }, tool.name || '(unnamed)'), result),
      tool.arguments !== undefined ? h('pre', { class: 'content' }, pretty(tool.arguments)) : null,
      h('code', { class: 'call-id' }, tool.id || ''));
    if (tool.id) this.calls.set(String(tool.id), { el, result, seq: e.seq, name: tool.name });
    return el;
  }

  toolResult(e) {
    const id = e.tool && e.tool.id ? String(e.tool.id) : '';
    const call = this.calls.get(id);
    const callLabel = call ? h('a', { class: 'pair', href: `#entry-${call.seq}` }, `result of #${call.seq} ${call.name || ''}`.trim()) : h('span', { class: 'pair' }, id ? `result of call ${id}` : 'result');
    if (call) {
      call.result.hidden = false;
      call.result.href = `#entry-${e.seq}`;
      call.result.textContent = `→ result #${e.seq}`;
      call.el.classList.add('answered');
    }
    return h('li', { class: 'entry tool-result' },
      this.meta(e, 'tool result', callLabel),
      h('pre', { class: 'content' }, typeof e.content === 'string' ? e.content : pretty(e.content)));
  }

  /** A permission request (what was asked, the options) or its decision. */
  permission(e) {
    const p = e.permission;
    const isRequest = e.type === 'permission_request';
    const call = p.tool_call_id ? this.calls.get(String(p.tool_call_id)) : null;
    const about = call ? h('a', { class: 'pair', href: `#entry-${call.seq}` }, `for #${call.seq} ${call.name || ''}`.trim())
      : p.tool_call_id ? h('span', { class: 'pair' }, `for call ${p.tool_call_id}`) : null;
    let body;
    let answer = null;
    if (isRequest) {
      this.permissions = this.permissions || new Map();
      this.permissions.set(String(p.request_id), p);
      const options = Array.isArray(p.options) ? p.options : [];
      body = h('ul', { class: 'options' }, options.map((o) => h('li', {}, `${o.name || o.option_id} (${o.kind || 'option'})`)));
      if (this.onAnswer && options.length && e.turn_id && !this.ended.has(e.turn_id)) {
        const note = h('span', { class: 'note', role: 'status' });
        answer = h('div', { class: 'answer', role: 'group', 'aria-label': 'Answer the permission request' },
          options.map((o) => {
            const b = h('button', { type: 'button', class: String(o.kind || '').startsWith('reject') ? 'danger' : 'secondary' }, o.name || o.option_id);
            b.addEventListener('click', async () => {
              for (const x of answer.querySelectorAll('button')) x.disabled = true;
              note.textContent = 'answering…';
              const problem = await this.onAnswer(String(p.request_id), String(o.option_id));
              note.textContent = problem || 'answered';
              if (problem) for (const x of answer.querySelectorAll('button')) x.disabled = false;
            });
            return b;
          }), note);
        this.asking.set(String(p.request_id), { el: answer, turn: e.turn_id });
      }
    } else {
      this.closeAsk(String(p.request_id));
      const request = this.permissions ? this.permissions.get(String(p.request_id)) : null;
      const chosen = request && Array.isArray(request.options) ? request.options.find((o) => o.option_id === p.option_id) : null;
      const what = p.outcome === 'selected' ? `chose ${chosen ? chosen.name : p.option_id}` : (p.outcome || 'answered');
      body = h('div', { class: 'content' }, p.decided_by ? `${what} · decided by ${p.decided_by}` : what);
    }
    return h('li', { class: `entry permission ${isRequest ? 'request' : 'decision'}` },
      this.meta(e, isRequest ? 'permission request' : 'permission decision', about),
      p.title ? h('div', { class: 'title' }, p.title) : null,
      body, answer);
  }

  /** The request is answered or closed: its buttons go. */
  closeAsk(requestId) {
    const ask = this.asking.get(requestId);
    if (ask) {
      ask.el.remove();
      this.asking.delete(requestId);
    }
  }

  /** Any other type: its fields, as text. */
  generic(e) {
    const rows = Object.entries(e)
      .filter(([k]) => !META.has(k))
      .map(([k, v]) => h('div', { class: 'field' }, h('span', { class: 'key' }, k), h('span', { class: 'value' }, typeof v === 'string' ? v : pretty(v))));
    return h('li', { class: 'entry generic' }, this.meta(e, String(e.type).replace(/_/g, ' ')), h('div', { class: 'fields' }, rows));
  }
}

function pretty(v) {
  if (typeof v === 'string') return v;
  try {
    return JSON.stringify(v, null, 2);
  } catch {
    return String(v);
  }
}

/** Renders the waiting messages into `box`. */
export function renderWaiting(box, waiting) {
  if (waiting.length === 0) {
    replace(box, h('p', { class: 'muted' }, 'Nothing waiting.'));
    return;
  }
  replace(box, h('ol', { class: 'waiting-list' }, waiting.map((u, i) =>
    h('li', { 'data-waiting-seq': u.seq },
      h('span', { class: 'pos' }, i === 0 ? 'next' : `${i + 1}`),
      h('a', { href: `#entry-${u.seq}` }, `#${u.seq}`),
      h('span', { class: 'preview' }, u.content.length > 80 ? `${u.content.slice(0, 80)}…` : u.content)))));
}
