// The sessions list: newest first, a page at a time (the API's cursor),
// filtered by status and agent, refreshed live; "New session" creates one
// with the agent chosen from GET /v1/agents.

import { api, ApiError, policies } from './api.js';
import { h, replace, ago } from './dom.js';

const PAGE_SIZE = 25;
const REFRESH_MS = 2000;

export async function listPage(root) {
  document.title = 'Sessions · Baton';
  const agents = await api('GET', '/v1/agents').then((r) => r.data.agents || []);
  const policyNames = await policies();

  const statusFilter = h('select', { id: 'filter-status' },
    h('option', { value: '' }, 'any'), h('option', { value: 'running' }, 'running'), h('option', { value: 'idle' }, 'idle'));
  const agentFilter = h('select', { id: 'filter-agent' },
    h('option', { value: '' }, 'any'), agents.map((a) => h('option', { value: a.name }, a.name)));
  const newButton = h('button', { type: 'button' }, 'New session');
  const tbody = h('tbody');
  const pageInfo = h('span', { class: 'page-info' });
  const prev = h('button', { type: 'button', class: 'secondary' }, 'Newer');
  const next = h('button', { type: 'button', class: 'secondary' }, 'Older');
  const problem = h('p', { class: 'problem', role: 'alert' });
  const updated = h('span', { class: 'muted updated' });

  // The create form, shown by "New session".
  const agentChoice = h('select', { id: 'new-agent' }, agents.map((a) => h('option', { value: a.name }, a.name)));
  const policyChoice = h('select', { id: 'new-policy' }, policyNames.map((p) => h('option', { value: p }, p)));
  const first = h('input', { id: 'new-message', type: 'text', placeholder: 'optional' });
  const createError = h('p', { class: 'problem', role: 'alert' });
  const cancelCreate = h('button', { type: 'button', class: 'secondary' }, 'Close');
  const create = h('form', { class: 'create', hidden: true, 'aria-label': 'New session' },
    h('div', { class: 'field' }, h('label', { for: 'new-agent' }, 'Agent'), agentChoice),
    h('div', { class: 'field' }, h('label', { for: 'new-policy' }, 'Default policy'), policyChoice),
    h('div', { class: 'field grow' }, h('label', { for: 'new-message' }, 'First message'), first),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Create'), cancelCreate),
    createError);
  newButton.addEventListener('click', () => {
    create.hidden = false;
    agentChoice.focus();
  });
  cancelCreate.addEventListener('click', () => {
    create.hidden = true;
  });
  create.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    createError.textContent = '';
    const body = { agent: agentChoice.value, policy: policyChoice.value };
    if (first.value.trim()) body.message = first.value;
    try {
      const { data } = await api('POST', '/v1/sessions', { body });
      window.location.assign(`/sessions/${encodeURIComponent(data.id)}`);
    } catch (e) {
      createError.textContent = e instanceof ApiError ? e.describe() : String(e);
    }
  });

  replace(root,
    h('section', { class: 'list-head' },
      h('h1', {}, 'Sessions'),
      h('div', { class: 'filters', role: 'group', 'aria-label': 'Filter' },
        h('label', { for: 'filter-status' }, 'Filter by status'), statusFilter,
        h('label', { for: 'filter-agent' }, 'Filter by agent'), agentFilter),
      newButton),
    create,
    problem,
    h('table', { class: 'sessions' },
      h('thead', {}, h('tr', {},
        ['Session', 'Agent', 'Status', 'Policy', 'Queued', 'Last activity'].map((c) => h('th', { scope: 'col' }, c)))),
      tbody),
    h('nav', { class: 'pager', 'aria-label': 'Pages' }, prev, pageInfo, next, updated));

  // Cursors of the pages before this one; null is the first page.
  const stack = [];
  let cursor = null;
  let nextCursor = null;
  let timer = null;
  let loading = false;
  let stopped = false;

  async function load() {
    if (loading) return;
    loading = true;
    clearTimeout(timer);
    try {
      const q = new URLSearchParams({ limit: String(PAGE_SIZE) });
      if (cursor) q.set('cursor', cursor);
      if (statusFilter.value) q.set('status', statusFilter.value);
      if (agentFilter.value) q.set('agent', agentFilter.value);
      const { data } = await api('GET', `/v1/sessions?${q}`);
      nextCursor = data.next_cursor;
      render(data.sessions);
      problem.textContent = '';
      updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        stopped = true;
        throw e;
      }
      problem.textContent = e instanceof ApiError ? e.describe() : String(e);
    } finally {
      loading = false;
      // Live: the page is read again while it is shown.
      if (!stopped) timer = setTimeout(() => load().catch(() => {}), REFRESH_MS);
    }
  }

  function render(sessions) {
    const now = Date.now();
    if (sessions.length === 0) {
      replace(tbody, h('tr', {}, h('td', { colspan: 6, class: 'muted' }, statusFilter.value || agentFilter.value ? 'No sessions match the filter.' : stack.length ? 'No older sessions.' : 'No sessions yet.')));
    } else {
      replace(tbody, sessions.map((s) => h('tr', { 'data-session-id': s.id },
        h('td', {}, h('a', { href: `/sessions/${encodeURIComponent(s.id)}` }, h('code', {}, s.id))),
        h('td', {}, s.agent),
        h('td', {}, h('span', { class: `badge status ${s.status}` }, s.status)),
        h('td', {}, s.policy),
        h('td', { class: 'num' }, String(s.queued)),
        h('td', {}, h('time', { datetime: s.last_activity_at, title: s.last_activity_at }, ago(s.last_activity_at, now))))));
    }
    prev.disabled = stack.length === 0;
    next.disabled = !nextCursor;
    pageInfo.textContent = `page ${stack.length + 1}`;
  }

  next.addEventListener('click', () => {
    if (!nextCursor) return;
    stack.push(cursor);
    cursor = nextCursor;
    load();
  });
  prev.addEventListener('click', () => {
    if (!stack.length) return;
    cursor = stack.pop();
    load();
  });
  for (const f of [statusFilter, agentFilter]) {
    f.addEventListener('change', () => {
      stack.length = 0;
      cursor = null;
      load();
    });
  }
  window.addEventListener('pagehide', () => {
    stopped = true;
    clearTimeout(timer);
  });
  await load();
}
