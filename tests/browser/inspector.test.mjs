// Browser tests of Baton's web inspector: Playwright (playwright-core)
// driving the system's Chromium against `baton serve` processes that
// crates/cli/tests/inspector.rs starts. Run through `cargo test`; to run by
// hand, start servers and set BATON_URL, BATON_OWNERS_URL (with the tokens
// of BATON_TOKENS) and BATON_RESTART_URL.
//
// Every scenario gets a fresh browser context and fails on a console error
// or an uncaught exception, except the browser's own log line for an HTTP
// answer the scenario provokes on purpose (a 409 for `reject`, a 404 for
// another owner's session, a refused connection while the server restarts).
// Tests wait for conditions (locators, waitForFunction), never fixed times.

import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import assert from 'node:assert/strict';

const OPEN = mustEnv('BATON_URL');
const OWNERS = mustEnv('BATON_OWNERS_URL');
const RESTART = mustEnv('BATON_RESTART_URL');
const TOKENS = Object.fromEntries(mustEnv('BATON_TOKENS').split(',').map((t) => t.split(':')));
const PATIENCE = 30000;

function mustEnv(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
}

// ---------------------------------------------------------------------------
// The API, for set-up and for checking what the page shows.

async function call(base, method, path, { token, body, headers = {} } = {}) {
  const h = { ...headers };
  if (token) h.Authorization = `Bearer ${token}`;
  if (body !== undefined) h['Content-Type'] = 'application/json';
  const resp = await fetch(base + path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await resp.text();
  return { status: resp.status, data: text ? JSON.parse(text) : null };
}

async function createSession(base, body = {}, token) {
  const r = await call(base, 'POST', '/v1/sessions', { body, token });
  assert.ok(r.status === 201, `create: ${r.status} ${JSON.stringify(r.data)}`);
  return r.data.id;
}

async function entries(base, id, token) {
  const out = [];
  let after = 0;
  for (;;) {
    const r = await call(base, 'GET', `/v1/sessions/${id}/entries?after=${after}&limit=1000`, { token });
    assert.equal(r.status, 200, JSON.stringify(r.data));
    if (!r.data.entries.length) return out;
    out.push(...r.data.entries);
    after = out[out.length - 1].seq;
  }
}

// ---------------------------------------------------------------------------
// The page.

const role = (page, r, name) => page.getByRole(r, { name, exact: true });
const message = (page) => role(page, 'textbox', 'Message');
const policy = (page) => role(page, 'combobox', 'Policy');
const send = (page) => role(page, 'button', 'Send');

/** Sends a message and waits for the API's answer to be shown. */
async function say(page, content, pol) {
  if (pol) await policy(page).selectOption(pol);
  await message(page).fill(content);
  await send(page).click();
  await page.waitForFunction(() => {
    const button = document.querySelector('form.composer button[type="submit"]');
    const answer = document.querySelector('form.composer .outcome').textContent + document.querySelector('form.composer .problem').textContent;
    return !button.disabled && answer !== '';
  });
}

/** The seqs and types the page shows, in document order. */
function shown(page) {
  return page.locator('[data-seq]').evaluateAll((els) => els.map((e) => ({ seq: Number(e.dataset.seq), type: e.dataset.type })));
}

/** Waits until the page shows exactly the API's log, then compares. */
async function showsTheLog(page, base, id, token) {
  const log = await entries(base, id, token);
  const last = log[log.length - 1].seq;
  await page.waitForFunction((n) => document.querySelector(`[data-seq="${n}"]`) !== null, last, { timeout: PATIENCE });
  const seen = await shown(page);
  assert.deepEqual(seen, log.map((e) => ({ seq: e.seq, type: e.type })), 'the page shows the log in seq order, each entry once');
  assert.deepEqual(seen.map((e) => e.seq), Array.from({ length: last }, (_, i) => i + 1), 'no gap, no duplicate');
  return log;
}

async function idle(base, id, token) {
  const deadline = Date.now() + PATIENCE;
  for (;;) {
    const r = await call(base, 'GET', `/v1/sessions/${id}`, { token });
    if (r.data.status === 'idle' && r.data.queued === 0) return r.data;
    assert.ok(Date.now() < deadline, `session never became idle: ${JSON.stringify(r.data)}`);
    await new Promise((res) => setTimeout(res, 25));
  }
}

async function turnEnded(page, n, status) {
  const band = page.locator('[data-type="turn_ended"]').nth(n);
  await band.waitFor({ timeout: PATIENCE });
  if (status) assert.match(await band.textContent(), new RegExp(status));
  return band;
}

// ---------------------------------------------------------------------------
// The restart helper: crates/cli/tests/inspector.rs does the restart.

const stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function restartServer() {
  process.stdout.write('@@restart\n');
  const { value, done } = await stdinLines.next();
  assert.ok(!done && value.trim() === 'restarted', `the harness restarted the server (got ${value})`);
}

// ---------------------------------------------------------------------------
// A TCP proxy in front of a server, whose connections the test can cut (a
// network loss: the server keeps running).

async function proxy(target) {
  const { hostname, port } = new URL(target);
  const sockets = new Set();
  let up = true;
  const server = net.createServer((client) => {
    if (!up) {
      client.destroy();
      return;
    }
    const upstream = net.connect(Number(port), hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => {
        sockets.delete(s);
        client.destroy();
        upstream.destroy();
      });
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((res) => server.listen(0, '127.0.0.1', res));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    cut() {
      up = false;
      for (const s of sockets) s.destroy();
    },
    restore() {
      up = true;
    },
    close() {
      this.cut();
      server.close();
    },
  };
}

/** The Last-Event-ID of every stream request the page makes, in order. */
function streamCursors(page) {
  const cursors = [];
  page.on('request', (r) => {
    if (r.url().endsWith('/stream')) cursors.push(r.headers()['last-event-id']);
  });
  return cursors;
}

/** Records every stream state the page shows, in window.streamStates. */
async function recordStreamStates(page) {
  await page.evaluate(() => {
    window.streamStates = [];
    const el = document.querySelector('.stream-state');
    new MutationObserver(() => window.streamStates.push(el.textContent)).observe(el, { childList: true, characterData: true, subtree: true });
  });
}

// ---------------------------------------------------------------------------
// Scenarios

const scenarios = [];
const scenario = (name, fn, { allow = [] } = {}) => scenarios.push({ name, fn, allow });

scenario('create a session, send, and see tokens before the turn ends', async ({ page }) => {
  const resp = await page.goto(`${OPEN}/`);
  const csp = resp.headers()['content-security-policy'];
  assert.ok(csp && csp.includes("script-src 'self'") && !csp.includes('unsafe-inline'), `CSP: ${csp}`);
  await role(page, 'button', 'New session').click();
  await role(page, 'combobox', 'Agent').selectOption('demo');
  await role(page, 'combobox', 'Default policy').selectOption('merge');
  await role(page, 'button', 'Create').click();
  await page.waitForURL(/\/sessions\/[0-9a-f-]+$/);
  const id = page.url().split('/').pop();
  assert.equal(await policy(page).inputValue(), 'merge', "the session's default policy is preselected");
  await page.locator('.stream-state', { hasText: 'live' }).waitFor();

  await say(page, '/sleep 4000 alpha beta gamma delta epsilon zeta', 'queue');
  // Tokens are on the page while the turn is still running.
  await page.waitForFunction(() => {
    const live = document.querySelector('.entry.live .content');
    return live && live.textContent.includes('beta') && !document.querySelector('[data-type="turn_ended"]');
  }, null, { timeout: PATIENCE });
  await page.locator('[data-type="turn_started"] .badge.status', { hasText: 'running' }).waitFor();
  await turnEnded(page, 0, 'completed');
  await page.locator('[data-type="message"].role-assistant', { hasText: 'echo: alpha beta gamma delta epsilon zeta' }).waitFor();
  assert.equal(await page.locator('.entry.live').count(), 0, 'the stored reply replaced the live tokens');
  const band = page.locator('[data-type="turn_started"]').first();
  assert.match(await band.textContent(), /completed/);
  assert.match(await band.textContent(), /input #1/);
  assert.match(await band.textContent(), /\d(\.\d)? s|\d+ ms/);
  await showsTheLog(page, OPEN, id);

  // The export downloads.
  const [download] = await Promise.all([page.waitForEvent('download'), role(page, 'button', 'Download export').click()]);
  const exported = JSON.parse(await readFile(await download.path(), 'utf8'));
  assert.deepEqual(exported.messages.map((m) => m.role), ['user', 'assistant']);
  await role(page, 'combobox', 'Export format').selectOption('anthropic');
  const [anthropic] = await Promise.all([page.waitForEvent('download'), role(page, 'button', 'Download export').click()]);
  const request = JSON.parse(await readFile(await anthropic.path(), 'utf8'));
  assert.deepEqual(request.messages.map((m) => m.role), ['user', 'assistant']);
  await role(page, 'combobox', 'Export format').selectOption('log');
  const [raw] = await Promise.all([page.waitForEvent('download'), role(page, 'button', 'Download export').click()]);
  const log = JSON.parse(await readFile(await raw.path(), 'utf8'));
  assert.deepEqual(log.entries.map((e) => e.seq), [1, 2, 3, 4]);

  // The copy button puts the id on the clipboard (or selects it).
  await role(page, 'button', 'Copy session id').click();
  await page.locator('.note', { hasText: /copied|selected/ }).waitFor();

  // The list has it, first (newest first), with its facts.
  await page.goto(`${OPEN}/`);
  const row = page.locator('tbody tr').first();
  await row.waitFor();
  assert.equal(await row.getAttribute('data-session-id'), id);
  const cells = await row.locator('td').allTextContents();
  assert.deepEqual(cells.slice(0, 5), [id, 'demo', 'idle', 'merge', '0']);
  assert.match(cells[5], /ago/);
});

scenario('a mid-turn message under each policy', async ({ page }) => {
  const id = await createSession(OPEN);
  await page.goto(`${OPEN}/sessions/${id}`);
  await page.locator('.stream-state', { hasText: 'live' }).waitFor();
  const outcome = page.locator('.outcome');
  const problem = page.locator('.problem[role="alert"]');

  // queue: waits, with its position, then runs in a turn of its own.
  await say(page, '/sleep 1500 first', 'queue');
  await outcome.filter({ hasText: 'started a turn' }).waitFor();
  await say(page, 'queued one', 'queue');
  await outcome.filter({ hasText: '#3 queued · position 1' }).waitFor();
  await page.locator('[data-seq="3"] .badge.waiting', { hasText: 'runs next' }).waitFor();
  await page.locator('.waiting-list [data-waiting-seq="3"]').waitFor();
  await turnEnded(page, 1, 'completed');
  await page.locator('[data-seq="3"] .badge.waiting').waitFor({ state: 'hidden' });
  assert.equal(await page.locator('.waiting-list li').count(), 0);

  // merge: two messages wait and run together in one turn.
  await say(page, '/sleep 1500 second', 'queue');
  await outcome.filter({ hasText: 'started a turn' }).waitFor();
  // Both run in the next turn: both are position 1.
  await say(page, 'merge a', 'merge');
  assert.match(await outcome.textContent(), /^#\d+ merged · position 1$/);
  await say(page, 'merge b', 'merge');
  assert.match(await outcome.textContent(), /^#\d+ merged · position 1$/);
  await page.locator('.waiting-list li').nth(1).waitFor();
  await turnEnded(page, 3, 'completed');
  await page.locator('[data-type="message"].role-assistant', { hasText: 'echo: merge a' }).waitFor();
  let log = await entries(OPEN, id);
  const mergedTurn = log.filter((e) => e.type === 'turn_started').pop();
  const mergeSeqs = log.filter((e) => e.role === 'user' && e.content.startsWith('merge')).map((e) => e.seq);
  assert.deepEqual(mergedTurn.input, { from: mergeSeqs[0], to: mergeSeqs[1] });
  await page.locator(`[data-seq="${mergedTurn.seq}"]`, { hasText: `input #${mergeSeqs[0]}–#${mergeSeqs[1]}` }).waitFor();

  // interrupt: the running turn ends cancelled, the message runs at once.
  await say(page, '/hang', 'queue');
  await outcome.filter({ hasText: 'started a turn' }).waitFor();
  await say(page, 'stop that', 'interrupt');
  await outcome.filter({ hasText: 'interrupting turn' }).waitFor();
  await turnEnded(page, 4, 'cancelled');
  await page.locator('[data-type="message"].role-assistant', { hasText: 'echo: stop that' }).waitFor();

  // reject: 409 shown, nothing stored.
  await idle(OPEN, id);
  await say(page, '/sleep 1500 third', 'queue');
  await outcome.filter({ hasText: 'started a turn' }).waitFor();
  const before = (await entries(OPEN, id)).filter((e) => e.role === 'user').length;
  await say(page, 'not now', 'reject');
  await problem.filter({ hasText: '409 session_busy' }).waitFor();
  assert.equal(await message(page).inputValue(), 'not now', 'a refused message stays in the box');
  await idle(OPEN, id);
  log = await showsTheLog(page, OPEN, id);
  assert.equal(log.filter((e) => e.role === 'user').length, before, 'the rejected message was not stored');
  assert.equal(await page.locator('[data-type="message"]', { hasText: 'not now' }).count(), 0);
}, { allow: [/status of 409/] });

scenario('cancel the running turn', async ({ page }) => {
  const id = await createSession(OPEN, { message: '/hang' });
  await page.goto(`${OPEN}/sessions/${id}`);
  await page.locator('[data-type="turn_started"] .badge.status', { hasText: 'running' }).waitFor();
  await role(page, 'button', 'Cancel turn').click();
  await page.locator('.outcome', { hasText: 'cancelling turn' }).waitFor();
  await turnEnded(page, 0, 'cancelled');
  await page.locator('[data-type="turn_started"] .badge.status', { hasText: 'cancelled' }).waitFor();
  await page.locator('.facts .badge.status', { hasText: 'idle' }).waitFor();
  // Nothing runs now: a second click cancels nothing.
  await role(page, 'button', 'Cancel turn').click();
  await page.locator('.outcome', { hasText: 'no turn to cancel' }).waitFor();
  await showsTheLog(page, OPEN, id);
});

scenario('a reload shows the same log once', async ({ page }) => {
  const id = await createSession(OPEN, { message: 'one' });
  await page.goto(`${OPEN}/sessions/${id}`);
  await say(page, 'two');
  await say(page, 'three');
  await idle(OPEN, id);
  const before = await showsTheLog(page, OPEN, id);
  for (let i = 0; i < 2; i += 1) {
    await page.reload();
    const after = await showsTheLog(page, OPEN, id);
    assert.deepEqual(after, before);
    assert.equal(await page.locator('[data-seq]').count(), before.length);
  }
});

scenario('a server restarted mid-stream: the page resumes with no gap and no duplicate', async ({ page }) => {
  const id = await createSession(RESTART);
  const cursors = streamCursors(page);
  await page.goto(`${RESTART}/sessions/${id}`);
  await page.locator('.stream-state', { hasText: 'live' }).waitFor();
  await recordStreamStates(page);
  await say(page, '/sleep 20000 a slow answer that the restart cuts short');
  await say(page, 'after the restart');
  await page.locator('[data-seq="3"]').waitFor();
  await page.waitForFunction(() => {
    const live = document.querySelector('.entry.live .content');
    return live && live.textContent.includes('echo:');
  }, null, { timeout: PATIENCE });
  const seenBefore = Math.max(...(await shown(page)).map((e) => e.seq));

  await restartServer();

  await page.locator('.stream-state', { hasText: /resumed at seq \d+/ }).waitFor({ timeout: PATIENCE });
  const states = await page.evaluate(() => window.streamStates);
  assert.ok(states.some((s) => s.startsWith('reconnecting')), `the page said it was reconnecting: ${states}`);
  const resumedAt = Number((await page.locator('.stream-state').textContent()).match(/resumed at seq (\d+)/)[1]);
  assert.ok(resumedAt >= seenBefore, `resumed after what it had (${resumedAt} >= ${seenBefore})`);
  assert.equal(cursors[0], '0');
  assert.equal(cursors[cursors.length - 1], String(resumedAt), 'the resume sent Last-Event-ID');
  // The killed turn ends lost; the waiting message runs after the restart.
  await turnEnded(page, 0, 'lost');
  await page.locator('[data-type="message"].role-assistant', { hasText: 'echo: after the restart' }).waitFor({ timeout: PATIENCE });
  await idle(RESTART, id);
  await showsTheLog(page, RESTART, id);
  assert.equal(await page.locator('.entry.live').count(), 0);
}, { allow: [/net::ERR_/] });

scenario('a network loss mid-turn: the page resumes with what it missed, once', async ({ page }) => {
  const link = await proxy(OPEN);
  try {
    const id = await createSession(OPEN);
    const cursors = streamCursors(page);
    await page.goto(`${link.url}/sessions/${id}`);
    await page.locator('.stream-state', { hasText: 'live' }).waitFor();
    await recordStreamStates(page);
    await say(page, '/sleep 1500 cut off in the middle of it');
    await page.waitForFunction(() => {
      const live = document.querySelector('.entry.live .content');
      return live && live.textContent.includes('echo:');
    }, null, { timeout: PATIENCE });
    link.cut();
    await page.locator('.stream-state', { hasText: 'reconnecting' }).waitFor();
    // While the page is cut off, the session moves on.
    const posted = await call(OPEN, 'POST', `/v1/sessions/${id}/messages`, { body: { content: 'sent while the page was offline' } });
    assert.equal(posted.status, 201);
    await idle(OPEN, id);
    const missed = (await entries(OPEN, id)).length;
    link.restore();
    await page.locator('.stream-state', { hasText: /resumed at seq \d+/ }).waitFor({ timeout: PATIENCE });
    const resumedAt = Number((await page.locator('.stream-state').textContent()).match(/resumed at seq (\d+)/)[1]);
    assert.ok(resumedAt < missed, `resumed before what it missed (${resumedAt} < ${missed})`);
    assert.ok(resumedAt > 0);
    assert.equal(cursors[cursors.length - 1], String(resumedAt), 'the resume sent Last-Event-ID');
    await page.locator('[data-type="message"].role-assistant', { hasText: 'echo: sent while the page was offline' }).waitFor();
    await showsTheLog(page, OPEN, id);
    assert.equal(await page.locator('.entry.live').count(), 0);
  } finally {
    link.close();
  }
}, { allow: [/net::ERR_/] });

scenario('answer a permission request from the page', async ({ page }) => {
  const id = await createSession(OPEN, { message: '/ask tidy up' });
  await page.goto(`${OPEN}/sessions/${id}`);
  const request = page.locator('[data-type="permission_request"]');
  await request.waitFor();
  await role(page, 'group', 'Answer the permission request').waitFor();
  await request.getByRole('button', { name: 'allow', exact: true }).click();
  const decision = page.locator('[data-type="permission_decision"]');
  await decision.filter({ hasText: /chose allow · decided by user:local/ }).waitFor();
  await page.locator('[data-type="message"].role-assistant', { hasText: 'echo: tidy up (permission: allow)' }).waitFor();
  assert.equal(await request.getByRole('button').count(), 0, 'an answered request offers no buttons');
  await idle(OPEN, id);
  await showsTheLog(page, OPEN, id);
  // After a reload, an answered request offers nothing either.
  await page.reload();
  await decision.waitFor();
  assert.equal(await page.locator('[data-type="permission_request"] button').count(), 0);
});

scenario('a tool call is shown with its result, and the thought before it', async ({ page }) => {
  const id = await createSession(OPEN, { message: '/tool look it up' });
  await page.goto(`${OPEN}/sessions/${id}`);
  await turnEnded(page, 0, 'completed');
  const log = await showsTheLog(page, OPEN, id);
  const call = log.find((e) => e.type === 'tool_call');
  const result = log.find((e) => e.type === 'tool_result');
  assert.ok(call && result, `the demo's /tool stores a call and its result: ${JSON.stringify(log)}`);
  await page.locator(`[data-seq="${call.seq}"] .pair`, { hasText: `→ result #${result.seq}` }).waitFor();
  await page.locator(`[data-seq="${result.seq}"] .pair`, { hasText: `result of #${call.seq}` }).waitFor();
  const thought = log.find((e) => e.type === 'thought');
  assert.ok(thought && thought.seq < call.seq, 'the demo thinks before it calls');
  await page.locator(`[data-seq="${thought.seq}"].thought .content`, { hasText: thought.content }).waitFor();
});

scenario('two owners: sign in with a token; another owner\'s session is not found', async ({ browser, watch }) => {
  const alice = await browser.newContext();
  const bob = await browser.newContext();
  alice.setDefaultTimeout(PATIENCE);
  bob.setDefaultTimeout(PATIENCE);
  const urls = [];
  try {
    const a = await alice.newPage();
    const b = await bob.newPage();
    watch(a, [/status of 401/]);
    watch(b, [/status of 404/]);
    for (const p of [a, b]) p.on('request', (r) => urls.push(r.url()));

    await a.goto(`${OWNERS}/`);
    await role(a, 'textbox', 'Token').fill('not-a-token');
    await role(a, 'button', 'Sign in').click();
    await a.locator('[role="alert"]', { hasText: 'not accepted' }).waitFor();
    await role(a, 'textbox', 'Token').fill(TOKENS.alice);
    await role(a, 'button', 'Sign in').click();
    await role(a, 'button', 'New session').click();
    await role(a, 'button', 'Create').click();
    await a.waitForURL(/\/sessions\/[0-9a-f-]+$/);
    const id = a.url().split('/').pop();
    await say(a, 'for alice only');
    await a.locator('[data-type="message"].role-assistant', { hasText: 'echo: for alice only' }).waitFor();
    assert.equal(await a.evaluate(() => sessionStorage.getItem('baton.token')), TOKENS.alice);

    await b.goto(`${OWNERS}/`);
    await role(b, 'textbox', 'Token').fill(TOKENS.bob);
    await role(b, 'button', 'Sign in').click();
    await b.locator('table.sessions').waitFor();
    await b.locator('tbody td', { hasText: 'No sessions yet.' }).waitFor();
    await b.goto(`${OWNERS}/sessions/${id}`);
    await b.locator('h1', { hasText: 'Session not found' }).waitFor();
    await b.locator('[role="alert"]', { hasText: '404 not_found' }).waitFor();
    assert.equal(await b.locator('[data-seq]').count(), 0);
    assert.equal(await b.getByText('for alice only').count(), 0);

    // Signing out forgets the token.
    await role(b, 'button', 'Sign out').click();
    await role(b, 'textbox', 'Token').waitFor();
    assert.equal(await b.evaluate(() => sessionStorage.getItem('baton.token')), null);

    for (const secret of Object.values(TOKENS)) {
      assert.ok(!urls.some((u) => u.includes(secret)), 'no token in any URL');
    }
    assert.ok(urls.some((u) => u.includes('/v1/sessions')), 'requests were seen');
  } finally {
    await alice.close();
    await bob.close();
  }
});

scenario('sessions list: newest first, paged, filtered, live', async ({ page }) => {
  const token = TOKENS.carol;
  const ids = [];
  for (let i = 0; i < 27; i += 1) ids.push(await createSession(OWNERS, {}, token));
  await page.goto(`${OWNERS}/`);
  await role(page, 'textbox', 'Token').fill(token);
  await role(page, 'button', 'Sign in').click();
  const rowIds = () => page.locator('tbody tr').evaluateAll((rs) => rs.map((r) => r.dataset.sessionId));
  await page.locator(`tbody tr[data-session-id="${ids[26]}"]`).waitFor();
  const newestFirst = [...ids].reverse();
  assert.deepEqual(await rowIds(), newestFirst.slice(0, 25));
  await role(page, 'button', 'Older').click();
  await page.locator('.page-info', { hasText: 'page 2' }).waitFor();
  await page.locator(`tbody tr[data-session-id="${ids[0]}"]`).waitFor();
  assert.deepEqual(await rowIds(), newestFirst.slice(25));
  assert.ok(await role(page, 'button', 'Older').isDisabled());
  await role(page, 'button', 'Newer').click();
  await page.locator(`tbody tr[data-session-id="${ids[26]}"]`).waitFor();

  // Live: a session created elsewhere appears, and its status follows.
  const busy = await createSession(OWNERS, { message: '/hang' }, token);
  const row = page.locator(`tbody tr[data-session-id="${busy}"]`);
  await row.locator('.badge', { hasText: 'running' }).waitFor({ timeout: PATIENCE });
  assert.equal((await rowIds())[0], busy);
  // Filter: only the running one.
  await role(page, 'combobox', 'Filter by status').selectOption('running');
  await page.waitForFunction((id) => {
    const rows = document.querySelectorAll('tbody tr[data-session-id]');
    return rows.length === 1 && rows[0].dataset.sessionId === id;
  }, busy, { timeout: PATIENCE });
  await call(OWNERS, 'POST', `/v1/sessions/${busy}/cancel`, { token });
  await page.locator('tbody td', { hasText: 'No sessions match the filter.' }).waitFor({ timeout: PATIENCE });
});

scenario('a message with markup stays inert text', async ({ page }) => {
  const evil = '<img src=x onerror=alert(1)>';
  page.on('dialog', (d) => {
    throw new Error(`a dialog opened: ${d.message()}`);
  });
  const id = await createSession(OPEN);
  await page.goto(`${OPEN}/sessions/${id}`);
  await say(page, evil);
  const reply = page.locator('[data-type="message"].role-assistant .content');
  await reply.filter({ hasText: `echo: ${evil}` }).waitFor();
  assert.equal(await page.locator('.entry.role-user .content').textContent(), evil);
  assert.equal(await page.locator('img').count(), 0, 'no img element was created');
  await idle(OPEN, id);
  await page.reload();
  await reply.filter({ hasText: `echo: ${evil}` }).waitFor();
  assert.equal(await page.locator('img').count(), 0);
});

scenario('tool results, plans, thoughts, permissions and entry types this page does not know', async ({ page }) => {
  const id = await createSession(OPEN);
  await page.goto(`${OPEN}/sessions/${id}`);
  await page.locator('.stream-state', { hasText: 'live' }).waitFor();
  const shownTypes = await page.evaluate(async () => {
    const { LogView } = await import('/assets/entries.js');
    const list = document.createElement('ol');
    document.body.append(list);
    const view = new LogView(list);
    const at = '2026-01-01T00:00:00.000000Z';
    const options = [{ option_id: 'ok', name: 'Allow once', kind: 'allow_once' }, { option_id: 'no', name: 'Reject', kind: 'reject_once' }];
    view.add({ seq: 1, type: 'tool_call', turn_id: 't1', tool: { id: 'c1', name: 'write_file' }, created_at: at });
    view.add({ seq: 2, type: 'thought', turn_id: 't1', content: 'thinking <b>hard</b>', created_at: at });
    view.add({ seq: 3, type: 'permission_request', turn_id: 't1', permission: { request_id: 'r1', tool_call_id: 'c1', title: 'Write <i>x</i>', options }, created_at: at });
    view.add({ seq: 4, type: 'permission_decision', turn_id: 't1', permission: { request_id: 'r1', tool_call_id: 'c1', option_id: 'no', outcome: 'selected', decided_by: 'policy' }, created_at: at });
    view.add({ seq: 5, type: 'steer_note', turn_id: 't1', content: '<script>x</script>', extra: { pending: true }, created_at: at });
    view.add({ seq: 6, type: 'message', role: 'user', content: 'x', disposition: { type: 'pending' }, created_at: at });
    view.add({ seq: 7, type: 'tool_result', turn_id: 't1', tool: { id: 'c1' }, content: 'cancelled', created_at: at });
    view.add({ seq: 8, type: 'message', role: 'system', turn_id: 't1', content: 'plan:\n- [completed] read the file\n- [in_progress] write <u>it</u>', created_at: at });
    return Array.from(list.querySelectorAll('[data-seq]'), (e) => [e.dataset.type, e.textContent]);
  });
  assert.deepEqual(shownTypes.map((t) => t[0]), ['tool_call', 'thought', 'permission_request', 'permission_decision', 'steer_note', 'message', 'tool_result', 'message']);
  assert.match(shownTypes[0][1], /→ result #7/, 'the call links its result');
  assert.match(shownTypes[6][1], /result of #1 write_file/, 'the result names its call');
  assert.match(shownTypes[7][1], /plan/);
  assert.deepEqual(await page.locator('[data-seq="8"] .steps li').allTextContents(), ['completed read the file', 'in progress write <u>it</u>']);
  assert.equal(await page.locator('[data-seq="8"] .steps li').count(), 2, 'a plan shows its steps');
  assert.equal(await page.locator('u').count(), 0);
  assert.match(shownTypes[1][1], /thinking <b>hard<\/b>/);
  assert.match(shownTypes[2][1], /for #1 write_file/);
  assert.match(shownTypes[2][1], /Allow once \(allow_once\)/);
  assert.match(shownTypes[3][1], /chose Reject · decided by policy/);
  assert.match(shownTypes[4][1], /<script>x<\/script>/);
  assert.match(shownTypes[4][1], /"pending": true/);
  assert.equal(await page.locator('b, i, li script').count(), 0, 'no markup from content');
});

// ---------------------------------------------------------------------------
// The runner

const browser = await chromium.launch({
  executablePath: process.env.BATON_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
let failed = 0;
const started = Date.now();
// BATON_SCENARIO=text runs only the scenarios whose name has it (by hand).
const only = process.env.BATON_SCENARIO || '';
for (const s of scenarios.filter((x) => x.name.includes(only))) {
  const t0 = Date.now();
  const problems = [];
  const watch = (page, allow) => {
    page.on('console', (m) => {
      if (m.type() === 'error' && !allow.some((re) => re.test(m.text()))) problems.push(`console error: ${m.text()}`);
    });
    page.on('pageerror', (e) => problems.push(`uncaught: ${e.message}`));
  };
  const context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1280, height: 900 } });
  context.setDefaultTimeout(PATIENCE);
  await context.grantPermissions(['clipboard-read', 'clipboard-write']).catch(() => {});
  const page = await context.newPage();
  watch(page, s.allow);
  try {
    await s.fn({ page, browser, watch });
    assert.deepEqual(problems, [], 'no console errors');
    console.log(`ok - ${s.name} (${Date.now() - t0} ms)`);
  } catch (e) {
    failed += 1;
    console.log(`not ok - ${s.name}\n${(e && e.stack) || e}\n${problems.join('\n')}`);
  } finally {
    await context.close();
  }
}
await browser.close();
const ran = scenarios.filter((x) => x.name.includes(only)).length;
console.log(`${ran - failed}/${ran} scenarios passed in ${Date.now() - started} ms`);
process.exit(failed ? 1 : 0);
