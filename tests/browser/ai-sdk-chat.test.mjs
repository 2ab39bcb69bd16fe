// Browser tests of the AI SDK example app (examples/ai-sdk-chat, built to
// its dist/): Playwright (playwright-core) driving the system's Chromium
// against `baton serve` processes that crates/cli/tests/ai_sdk_browser.rs
// starts. The app is served the simplest honest way: its built files from
// a tiny HTTP server in this script, which forwards /v1 to one Baton server
// (one origin, as the app's Vite preview server does).
//
// Every scenario gets a fresh browser context and fails on a console error
// or an uncaught exception, except the browser's own log line for an HTTP
// answer the scenario provokes on purpose. Tests wait for conditions, never
// fixed times.

import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';

const OPEN = mustEnv('BATON_URL');
const OWNERS = mustEnv('BATON_OWNERS_URL');
const RESTART = mustEnv('BATON_RESTART_URL');
const TOKENS = Object.fromEntries(mustEnv('BATON_TOKENS').split(',').map((t) => t.split(':')));
const PATIENCE = 30000;
const DIST = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../examples/ai-sdk-chat/dist');

function mustEnv(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
}

// ---------------------------------------------------------------------------
// The app's server: dist/ as static files, /v1 forwarded to Baton.

const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css', '.svg': 'image/svg+xml' };

async function appServer(target) {
  const base = new URL(target);
  const server = http.createServer(async (req, res) => {
    if (req.url.startsWith('/v1/')) {
      const up = http.request({ host: base.hostname, port: base.port, path: req.url, method: req.method, headers: req.headers }, (r) => {
        res.writeHead(r.statusCode, r.headers);
        r.pipe(res);
      });
      up.on('error', () => {
        if (res.headersSent) return res.destroy();
        res.writeHead(502, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ error: { code: 'unavailable', message: 'Baton is not reachable' } }));
      });
      res.on('close', () => up.destroy());
      req.pipe(up);
      return;
    }
    const rel = req.url.split('?')[0] === '/' ? 'index.html' : req.url.split('?')[0].slice(1);
    const file = path.resolve(DIST, rel);
    if (!file.startsWith(DIST)) {
      res.writeHead(404).end();
      return;
    }
    try {
      const body = await readFile(file);
      res.writeHead(200, { 'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream' });
      res.end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
  return `http://127.0.0.1:${server.address().port}`;
}

// ---------------------------------------------------------------------------
// The API, for checking what the page shows.

async function call(base, method, p, token) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const resp = await fetch(base + p, { method, headers });
  const text = await resp.text();
  return { status: resp.status, data: text ? JSON.parse(text) : null };
}

async function transcript(base, chat, token) {
  const r = await call(base, 'GET', `/v1/ai-sdk/chat/${encodeURIComponent(chat)}/messages`, token);
  assert.equal(r.status, 200, JSON.stringify(r.data));
  return r.data;
}

/** The stored assistant text of each turn of a chat, by turn id. */
async function storedReplies(base, chat, token) {
  const t = await transcript(base, chat, token);
  const out = {};
  for (const m of t.messages.filter((m) => m.role === 'assistant')) {
    out[m.id] = { text: m.parts.filter((p) => p.type === 'text').map((p) => p.text).join(''), status: m.metadata.baton.status };
  }
  return out;
}

async function running(base, chat, token) {
  return (await transcript(base, chat, token)).running_turn_id;
}

// ---------------------------------------------------------------------------
// The page.

const box = (page) => page.getByRole('textbox', { name: 'message', exact: true });

async function say(page, text, policy) {
  if (policy) await page.getByRole('combobox', { name: 'policy' }).selectOption(policy);
  await box(page).fill(text);
  await page.getByRole('button', { name: 'Send', exact: true }).click();
}

/** What the page shows: each message's role, id, status and text. */
function shown(page) {
  return page.locator('[data-testid="message"]').evaluateAll((els) =>
    els.map((e) => ({
      role: e.dataset.role,
      id: e.dataset.id,
      status: e.dataset.status,
      text: Array.from(e.querySelectorAll('[data-testid="text"]'), (t) => t.textContent).join(''),
    })),
  );
}

/** Waits until the last assistant message has this status. */
async function lastTurnEnds(page, status) {
  await page.waitForFunction(
    (s) => {
      const all = document.querySelectorAll('[data-testid="message"][data-role="assistant"]');
      return all.length > 0 && all[all.length - 1].dataset.status === s;
    },
    status,
    { timeout: PATIENCE },
  );
}

/** Waits until the last assistant message's text is exactly `text`. */
async function lastTextIs(page, text) {
  await page.waitForFunction(
    (want) => {
      const all = document.querySelectorAll('[data-testid="message"][data-role="assistant"]');
      const last = all[all.length - 1];
      return last && Array.from(last.querySelectorAll('[data-testid="text"]'), (t) => t.textContent).join('') === want;
    },
    text,
    { timeout: PATIENCE },
  );
}

async function statusIs(page, s) {
  await page.waitForFunction((want) => document.querySelector('[data-testid="status"]')?.textContent === want, s, { timeout: PATIENCE });
}

/** The page's assistant messages equal the stored replies of their turns. */
async function showsStoredReplies(page, base, chat, token) {
  const stored = await storedReplies(base, chat, token);
  const seen = (await shown(page)).filter((m) => m.role === 'assistant');
  assert.ok(seen.length > 0);
  for (const m of seen) {
    assert.ok(stored[m.id], `turn ${m.id} is in the log`);
    if (stored[m.id].status === 'completed') assert.equal(m.text, stored[m.id].text, `turn ${m.id}: the page holds the stored reply`);
  }
  assert.equal(new Set(seen.map((m) => m.id)).size, seen.length, 'each turn once');
}

const stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function restartServer() {
  process.stdout.write('@@restart\n');
  const { value, done } = await stdinLines.next();
  assert.ok(!done && value.trim() === 'restarted', `the harness restarted the server (got ${value})`);
}

// ---------------------------------------------------------------------------
// Scenarios

const scenarios = [];
const scenario = (name, fn, allow = []) => scenarios.push({ name, fn, allow });
let apps;

scenario('send and see tokens stream; the stop button ends the turn cancelled', async ({ page }) => {
  await page.goto(`${apps.open}/#tokens`);
  await say(page, '/hang streaming tokens here');
  // The whole echo is on the page while the turn still runs: tokens stream.
  await lastTextIs(page, 'echo: streaming tokens here');
  assert.ok(await running(OPEN, 'tokens'), 'the turn is still running');
  await statusIs(page, 'streaming');
  await page.getByRole('button', { name: 'Stop', exact: true }).click();
  await lastTurnEnds(page, 'cancelled');
  await statusIs(page, 'ready');
  assert.equal(await running(OPEN, 'tokens'), null);
  await say(page, 'and a whole reply');
  await lastTurnEnds(page, 'completed');
  await lastTextIs(page, 'echo: and a whole reply');
  await showsStoredReplies(page, OPEN, 'tokens');
});

scenario('reload mid-turn: the answer goes on and ends equal to the stored reply, nothing twice', async ({ page }) => {
  await page.goto(`${apps.open}/#reload`);
  // The turn cannot end by itself: after the reload the text can only come
  // from the replay of what was streamed.
  await say(page, '/hang one two three four');
  await lastTextIs(page, 'echo: one two three four');
  await page.reload();
  await lastTextIs(page, 'echo: one two three four');
  await statusIs(page, 'streaming');
  await page.getByRole('button', { name: 'Stop', exact: true }).click();
  await lastTurnEnds(page, 'cancelled');
  await lastTextIs(page, 'echo: one two three four');
  // A turn that completes after the reload.
  await say(page, '/sleep 3000 a b c d e f g h i j');
  await page.waitForFunction(() => {
    const all = document.querySelectorAll('[data-testid="message"][data-role="assistant"]');
    return all.length === 2 && all[1].textContent.includes('echo:');
  });
  await page.reload();
  await lastTurnEnds(page, 'completed');
  await lastTextIs(page, 'echo: a b c d e f g h i j');
  await showsStoredReplies(page, OPEN, 'reload');
  const seen = await shown(page);
  assert.deepEqual(seen.map((m) => m.role), ['user', 'assistant', 'user', 'assistant']);
});

scenario('reload with the server restarted mid-turn: the log as stored, and the chat goes on', async ({ page }) => {
  await page.goto(`${apps.restart}/#restarted`);
  await say(page, 'before the restart');
  await lastTurnEnds(page, 'completed');
  await say(page, '/hang cut off by the restart');
  await lastTextIs(page, 'echo: cut off by the restart');
  await restartServer();
  await page.reload();
  // The killed process's turn ended `lost` at start-up: nothing resumes,
  // the page shows the log.
  await lastTurnEnds(page, 'lost');
  await statusIs(page, 'ready');
  const seen = await shown(page);
  assert.deepEqual(seen.map((m) => [m.role, m.status]), [['user', ''], ['assistant', 'completed'], ['user', ''], ['assistant', 'lost']]);
  assert.equal(seen[1].text, 'echo: before the restart');
  await say(page, 'after the restart');
  await lastTurnEnds(page, 'completed');
  await lastTextIs(page, 'echo: after the restart');
  await showsStoredReplies(page, RESTART, 'restarted');
}, [/Failed to load resource/, /ERR_CONNECTION|ERR_EMPTY_RESPONSE|network error/i]);

scenario('a second message while the first streams follows the policy', async ({ page }) => {
  await page.goto(`${apps.open}/#policies`);
  // queue: it waits with its position, then streams its own turn.
  await say(page, '/hang first');
  await lastTextIs(page, 'echo: first');
  await say(page, 'second', 'queue');
  await page.getByTestId('notice').filter({ hasText: 'queued: position 1' }).waitFor();
  await page.getByRole('button', { name: 'Stop', exact: true }).click();
  await page.waitForFunction(() => document.querySelectorAll('[data-testid="message"][data-role="assistant"]').length === 2);
  await lastTurnEnds(page, 'completed');
  await lastTextIs(page, 'echo: second');
  // interrupt: the running turn is cancelled, the new message runs.
  await say(page, '/hang third', 'queue');
  await lastTextIs(page, 'echo: third');
  await say(page, 'fourth', 'interrupt');
  await page.waitForFunction(() => document.querySelectorAll('[data-testid="message"][data-role="assistant"]').length === 4);
  await lastTurnEnds(page, 'completed');
  await lastTextIs(page, 'echo: fourth');
  const seen = await shown(page);
  assert.deepEqual(seen.filter((m) => m.role === 'assistant').map((m) => m.status), ['cancelled', 'completed', 'cancelled', 'completed']);
  // reject: a 409 while a turn runs, nothing stored.
  await say(page, '/hang fifth', 'queue');
  await lastTextIs(page, 'echo: fifth');
  await say(page, 'refused', 'reject');
  await page.getByTestId('error').filter({ hasText: 'session_busy' }).waitFor();
  await page.getByRole('button', { name: 'Stop', exact: true }).click();
  await page.waitForFunction(async () => {
    const r = await fetch('/v1/ai-sdk/chat/policies/messages');
    return (await r.json()).running_turn_id === null;
  });
  const t = await transcript(OPEN, 'policies');
  assert.ok(t.messages.every((m) => m.parts.every((p) => p.text !== 'refused')), 'a rejected message is not stored');
  await showsStoredReplies(page, OPEN, 'policies');
}, [/status of 409/]);

scenario('two tabs on one chat see one order', async ({ page, browser, watch }) => {
  const other = await page.context().newPage();
  watch(other, []);
  await page.goto(`${apps.open}/#two-tabs`);
  await other.goto(`${apps.open}/#two-tabs`);
  await say(page, '/sleep 1500 from the first tab');
  await page.waitForFunction(() => document.querySelector('[data-testid="message"][data-role="assistant"]')?.textContent.includes('echo:'));
  await say(other, 'from the second tab', 'queue');
  await lastTurnEnds(page, 'completed');
  await lastTurnEnds(other, 'completed');
  await lastTextIs(other, 'echo: from the second tab');
  await page.reload();
  await other.reload();
  await lastTurnEnds(page, 'completed');
  await lastTurnEnds(other, 'completed');
  const [a, b] = [await shown(page), await shown(other)];
  assert.deepEqual(a, b, 'both tabs show one order');
  assert.deepEqual(a.map((m) => m.text), ['/sleep 1500 from the first tab', 'echo: from the first tab', 'from the second tab', 'echo: from the second tab']);
  await showsStoredReplies(page, OPEN, 'two-tabs');
});

scenario("another owner's chat is not found", async ({ page, browser, watch }) => {
  await page.addInitScript((t) => localStorage.setItem('baton-token', t), TOKENS.alice);
  await page.goto(`${apps.owners}/#alices-chat`);
  await say(page, 'for alice only');
  await lastTurnEnds(page, 'completed');
  const sid = (await transcript(OWNERS, 'alices-chat', TOKENS.alice)).session_id;
  assert.ok(sid);
  const bobs = await browser.newContext();
  try {
    const bob = await bobs.newPage();
    const problems = [];
    bob.on('console', (m) => {
      if (m.type() === 'error' && !/status of 404/.test(m.text())) problems.push(m.text());
    });
    bob.on('pageerror', (e) => problems.push(e.message));
    await bob.addInitScript((t) => localStorage.setItem('baton-token', t), TOKENS.bob);
    await bob.goto(`${apps.owners}/#${sid}`);
    await bob.getByTestId('not-found').waitFor();
    // The same name is bob's own chat: empty.
    await bob.goto(`${apps.owners}/#alices-chat`);
    await bob.reload();
    await bob.getByTestId('messages').waitFor({ state: 'attached' });
    assert.equal(await bob.locator('[data-testid="message"]').count(), 0);
    assert.deepEqual(problems, [], 'no console errors in the other owner\'s page');
  } finally {
    await bobs.close();
  }
  // Alice's page, reloaded, shows her chat.
  await page.reload();
  await lastTurnEnds(page, 'completed');
  assert.equal((await shown(page))[0].text, 'for alice only');
});

// ---------------------------------------------------------------------------
// The runner

apps = { open: await appServer(OPEN), owners: await appServer(OWNERS), restart: await appServer(RESTART) };
const browser = await chromium.launch({
  executablePath: process.env.BATON_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
let failed = 0;
const started = Date.now();
const only = process.env.BATON_SCENARIO || '';
const chosen = scenarios.filter((x) => x.name.includes(only));
for (const s of chosen) {
  const t0 = Date.now();
  const problems = [];
  const watch = (page, allow) => {
    page.on('console', (m) => {
      if (m.type() === 'error' && !allow.some((re) => re.test(m.text()))) problems.push(`console error: ${m.text()}`);
    });
    page.on('pageerror', (e) => problems.push(`uncaught: ${e.message}`));
  };
  const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  context.setDefaultTimeout(PATIENCE);
  const page = await context.newPage();
  watch(page, s.allow);
  try {
    await s.fn({ page, browser, watch: (p, extra) => watch(p, [...s.allow, ...extra]) });
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
console.log(`${chosen.length - failed}/${chosen.length} scenarios passed in ${Date.now() - started} ms`);
process.exit(failed ? 1 : 0);
