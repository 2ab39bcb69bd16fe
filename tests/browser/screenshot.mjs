// Takes the README's picture of the inspector (docs/inspector.png) with the
// system's Chromium, against a `baton serve` at BATON_URL started with
// `--demo-word-delay-ms 60`:
//   node tests/browser/screenshot.mjs   (from the repository root)

import { chromium } from 'playwright-core';

const base = process.env.BATON_URL || 'http://127.0.0.1:7700';
const out = process.env.BATON_SCREENSHOT || 'docs/inspector.png';

async function post(path, body) {
  const resp = await fetch(base + path, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
  return resp.json();
}

const browser = await chromium.launch({
  executablePath: process.env.BATON_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 1340 }, deviceScaleFactor: 1 });
const { id } = await post('/v1/sessions', { message: 'summarize the release notes' });
await page.goto(`${base}/sessions/${id}`);
await page.locator('[data-type="turn_ended"]').first().waitFor();
await post(`/v1/sessions/${id}/messages`, { content: '/hang' });
await post(`/v1/sessions/${id}/messages`, { content: 'never mind, stop', policy: 'interrupt' });
await page.locator('[data-type="turn_ended"]').nth(2).waitFor();
await post(`/v1/sessions/${id}/messages`, { content: '/sleep 6000 now list the three riskiest changes first and explain why' });
await post(`/v1/sessions/${id}/messages`, { content: 'and keep it short' });
await page.waitForFunction(() => {
  const live = document.querySelector('.entry.live .content');
  return live && live.textContent.split(' ').length > 6;
});
await page.screenshot({ path: out });
await browser.close();
console.log(`wrote ${out}`);
