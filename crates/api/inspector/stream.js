// A session's live stream: Server-Sent Events read with fetch(), because
// EventSource cannot send an Authorization header. The stream resumes with
// Last-Event-ID after a network loss or a server restart; entries already
// seen are dropped here too, so none is shown twice.

import { authHeaders } from './api.js';

const MAX_BACKOFF_MS = 2000;

/**
 * Follows `/v1/sessions/{id}/stream` from `after`.
 * Callbacks: onEntry(entry), onDelta({turn_id, text}),
 * onState({state: 'connecting'|'live'|'reconnecting'|'resumed'|'failed', seq?, message?}).
 */
export class SessionStream {
  constructor(id, after, callbacks) {
    this.id = id;
    this.last = after;
    this.cb = callbacks;
    this.closed = false;
    this.controller = null;
  }

  start() {
    this.run();
    return this;
  }

  close() {
    this.closed = true;
    if (this.controller) this.controller.abort();
  }

  async run() {
    let resumed = false;
    let attempt = 0;
    this.cb.onState({ state: 'connecting' });
    while (!this.closed) {
      const from = this.last;
      let failure = null;
      try {
        this.controller = new AbortController();
        const headers = authHeaders({ Accept: 'text/event-stream', 'Last-Event-ID': String(from) });
        const resp = await fetch(`/v1/sessions/${encodeURIComponent(this.id)}/stream`, {
          headers,
          signal: this.controller.signal,
          cache: 'no-store',
        });
        if (!resp.ok) {
          let message = `${resp.status}`;
          try {
            const body = await resp.json();
            if (body && body.error) message = `${resp.status} ${body.error.code}: ${body.error.message}`;
          } catch {
            // Not JSON: keep the status.
          }
          // A refusal (not found, unauthorized, bad cursor) does not get
          // better by retrying; a 5xx might.
          if (resp.status < 500) {
            this.cb.onState({ state: 'failed', message });
            return;
          }
          throw new Error(message);
        }
        this.cb.onState(resumed ? { state: 'resumed', seq: from } : { state: 'live' });
        attempt = 0;
        await this.read(resp.body);
      } catch (e) {
        failure = e;
      }
      if (this.closed) return;
      // The stream ended (server shutdown) or broke: resume where we are.
      resumed = true;
      this.cb.onState({ state: 'reconnecting', message: failure ? String(failure.message || failure) : 'stream ended' });
      const wait = Math.min(MAX_BACKOFF_MS, 100 * 2 ** attempt);
      attempt += 1;
      await new Promise((r) => setTimeout(r, wait));
    }
  }

  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      // Events end with a blank line (the server ends lines with \n).
      let cut;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        this.dispatch(block);
      }
    }
  }

  dispatch(block) {
    let event = 'message';
    let id = null;
    const data = [];
    for (const raw of block.split('\n')) {
      const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
      if (line === '' || line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
      else if (field === 'id') id = value;
    }
    if (data.length === 0) return;
    let payload;
    try {
      payload = JSON.parse(data.join('\n'));
    } catch {
      return;
    }
    if (event === 'entry') {
      const seq = Number(id !== null ? id : payload.seq);
      if (!Number.isSafeInteger(seq) || seq <= this.last) return;
      this.last = seq;
      this.cb.onEntry(payload);
    } else if (event === 'delta') {
      this.cb.onDelta(payload);
    }
  }
}
