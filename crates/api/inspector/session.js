// One session: its log live, the waiting messages, the composer (Message,
// Policy, Send, Cancel turn), exports and the session id to copy.

import { api, ApiError, idempotencyKey, policies } from './api.js';
import { SessionStream } from './stream.js';
import { LogView, renderWaiting } from './entries.js';
import { h, replace } from './dom.js';

const EXPORTS = [
  ['openai', 'OpenAI chat messages'],
  ['anthropic', 'Anthropic Messages request'],
  ['log', 'Raw log (entries JSON)'],
];

export async function sessionPage(root, id) {
  document.title = `Session ${id} · Baton`;
  let session;
  try {
    session = (await api('GET', `/v1/sessions/${encodeURIComponent(id)}`)).data;
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) throw e;
    const notFound = e instanceof ApiError && e.status === 404;
    replace(root,
      h('nav', { class: 'crumbs' }, h('a', { href: '/' }, '← Sessions')),
      h('section', { class: 'empty', role: 'alert' },
        h('h1', {}, notFound ? 'Session not found' : 'Cannot open this session'),
        h('p', {}, e instanceof ApiError ? e.describe() : String(e))));
    return;
  }

  const streamState = h('span', { class: 'stream-state', role: 'status', 'data-state': 'connecting' }, 'connecting…');
  const statusBadge = h('span', { class: 'badge status' });
  const queuedInfo = h('span', { class: 'queued' });
  const copyNote = h('span', { class: 'note', role: 'status' });
  const idCode = h('code', { class: 'session-id' }, session.id);
  const copy = h('button', { type: 'button', class: 'secondary' }, 'Copy session id');
  copy.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(session.id);
      copyNote.textContent = 'copied';
    } catch {
      // No clipboard access: select the id so it can be copied by hand.
      const range = document.createRange();
      range.selectNodeContents(idCode);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      copyNote.textContent = 'selected: press Ctrl+C';
    }
  });

  const format = h('select', { id: 'export-format', 'aria-label': 'Export format' },
    EXPORTS.map(([v, label]) => h('option', { value: v }, label)));
  const exportNote = h('span', { class: 'note', role: 'status' });
  const download = h('button', { type: 'button', class: 'secondary' }, 'Download export');
  download.addEventListener('click', () => exportSession(session.id, format.value, exportNote));

  const list = h('ol', { class: 'log' });
  const waitingBox = h('div', { class: 'waiting-box' });
  // Follow the log while the reader is at its end; stay put if they scrolled up.
  let following = true;
  window.addEventListener('scroll', () => {
    const el = document.scrollingElement;
    following = el.scrollTop + el.clientHeight >= el.scrollHeight - 120;
  }, { passive: true });
  const answerPermission = async (requestId, optionId) => {
    try {
      await api('POST', `/v1/sessions/${encodeURIComponent(session.id)}/permissions/${encodeURIComponent(requestId)}`, {
        body: { option_id: optionId },
      });
      return null;
    } catch (e) {
      return e instanceof ApiError ? e.describe() : String(e);
    }
  };
  const log = new LogView(list, () => {
    refresh();
    if (following) window.scrollTo(0, document.scrollingElement.scrollHeight);
  }, answerPermission);

  const message = h('textarea', { id: 'message', rows: 3, placeholder: 'Write a message… (Ctrl+Enter sends)' });
  const policy = h('select', { id: 'policy' });
  const send = h('button', { type: 'submit' }, 'Send');
  const cancel = h('button', { type: 'button', class: 'danger' }, 'Cancel turn');
  const outcome = h('p', { class: 'outcome', role: 'status' });
  const problem = h('p', { class: 'problem', role: 'alert' });

  const names = await policies();
  for (const p of names) policy.append(h('option', { value: p }, p));
  policy.value = session.policy;

  const form = h('form', { class: 'composer', 'aria-label': 'Send a message' },
    h('div', { class: 'field grow' }, h('label', { for: 'message' }, 'Message'), message),
    h('div', { class: 'controls' },
      h('div', { class: 'field' }, h('label', { for: 'policy' }, 'Policy'), policy),
      send, cancel),
    outcome, problem);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const content = message.value;
    if (!content.trim()) {
      problem.textContent = 'Write a message first.';
      return;
    }
    send.disabled = true;
    outcome.textContent = '';
    problem.textContent = '';
    try {
      const { data } = await api('POST', `/v1/sessions/${encodeURIComponent(session.id)}/messages`, {
        body: { content, policy: policy.value },
        headers: { 'Idempotency-Key': idempotencyKey() },
      });
      // Typed meanwhile: keep it.
      if (message.value === content) message.value = '';
      outcome.textContent = describeDisposition(data);
    } catch (e) {
      problem.textContent = e instanceof ApiError ? e.describe() : String(e);
    } finally {
      send.disabled = false;
    }
  });
  message.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
  cancel.addEventListener('click', async () => {
    outcome.textContent = '';
    problem.textContent = '';
    // Name the turn seen running, so a late click never stops the next one.
    const body = log.active ? { turn_id: log.active } : undefined;
    try {
      const { data } = await api('POST', `/v1/sessions/${encodeURIComponent(session.id)}/cancel`, { body });
      outcome.textContent = data.cancelled ? `cancelling turn ${data.turn_id}` : 'no turn to cancel';
    } catch (e) {
      problem.textContent = e instanceof ApiError ? e.describe() : String(e);
    }
  });

  replace(root,
    h('nav', { class: 'crumbs' }, h('a', { href: '/' }, '← Sessions')),
    h('section', { class: 'session-head' },
      h('div', { class: 'title' },
        h('h1', {}, 'Session ', idCode), copy, copyNote),
      h('dl', { class: 'facts' },
        h('div', {}, h('dt', {}, 'agent'), h('dd', {}, session.agent)),
        h('div', {}, h('dt', {}, 'policy'), h('dd', {}, session.policy)),
        h('div', {}, h('dt', {}, 'status'), h('dd', {}, statusBadge)),
        h('div', {}, h('dt', {}, 'waiting'), h('dd', {}, queuedInfo)),
        h('div', {}, h('dt', {}, 'stream'), h('dd', {}, streamState))),
      h('div', { class: 'exports' }, h('label', { for: 'export-format' }, 'Export'), format, download, exportNote)),
    h('div', { class: 'session-body' },
      // role=log: screen readers announce new entries politely.
      h('section', { class: 'log-pane', role: 'log', 'aria-label': 'Session log' }, list),
      h('aside', { class: 'side' }, h('h2', {}, 'Waiting'), waitingBox)),
    form);

  function refresh() {
    const running = log.active !== null;
    statusBadge.className = `badge status ${running ? 'running' : 'idle'}`;
    statusBadge.textContent = running ? 'running' : 'idle';
    const waiting = log.waiting();
    queuedInfo.textContent = String(waiting.length);
    renderWaiting(waitingBox, waiting);
  }
  refresh();

  const stream = new SessionStream(session.id, 0, {
    onEntry: (e) => log.add(e),
    onDelta: (d) => log.delta(d),
    onState: (s) => {
      streamState.dataset.state = s.state;
      streamState.textContent = {
        connecting: 'connecting…',
        live: 'live',
        reconnecting: 'reconnecting…',
        resumed: `resumed at seq ${s.seq}`,
        failed: `stopped: ${s.message}`,
      }[s.state] || s.state;
    },
  }).start();
  window.addEventListener('pagehide', () => stream.close());
}

function describeDisposition(posted) {
  const d = posted && posted.disposition ? posted.disposition : {};
  const seq = posted && posted.entry ? `#${posted.entry.seq} ` : '';
  switch (d.type) {
    case 'started':
      return `${seq}started a turn`;
    case 'queued':
      return `${seq}queued · position ${d.position}`;
    case 'merged':
      return `${seq}merged · position ${d.position}`;
    case 'interrupting':
      return `${seq}interrupting turn ${d.turn_id}`;
    case 'steered':
      return `${seq}steered into turn ${d.turn_id}`;
    default: {
      const extra = Object.entries(d).filter(([k]) => k !== 'type').map(([k, v]) => `${k} ${v}`).join(', ');
      return `${seq}${d.type || 'accepted'}${extra ? ` · ${extra}` : ''}`;
    }
  }
}

async function exportSession(id, format, note) {
  note.textContent = 'preparing…';
  try {
    let data;
    if (format === 'log') {
      const entries = [];
      let after = 0;
      for (;;) {
        const page = (await api('GET', `/v1/sessions/${encodeURIComponent(id)}/entries?after=${after}&limit=1000`)).data;
        if (!page.entries.length) break;
        entries.push(...page.entries);
        after = page.entries[page.entries.length - 1].seq;
        if (after >= page.last_seq) break;
      }
      data = { session_id: id, entries };
    } else {
      data = (await api('GET', `/v1/sessions/${encodeURIComponent(id)}/export?format=${encodeURIComponent(format)}`)).data;
    }
    const blob = new Blob([JSON.stringify(data, null, 2)], { type: 'application/json' });
    const url = URL.createObjectURL(blob);
    const a = h('a', { href: url, download: `baton-${id}-${format}.json`, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    note.textContent = 'downloaded';
  } catch (e) {
    note.textContent = e instanceof ApiError ? e.describe() : String(e);
  }
}
