// Browser end-to-end tests: real `chorus` processes serving web-demo/, driven through Debian's chromium with Playwright (run by node --test).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import {
  ARTIFACTS, DEADLINE, ChorusProcess, checkBuilt, freePort, launch, room, typeAtEnd, typeAtStart, waitForText, waitStatus,
  watchErrors, editorText,
} from './harness.mjs';

let browser;
let server;
let dataDir;
const pageErrors = [];

before(async () => {
  await checkBuilt();
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'chorus-browser-'));
  server = new ChorusProcess(await freePort(), dataDir);
  await server.start();
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await server?.kill();
  if (dataDir) await fs.rm(dataDir, { recursive: true, force: true });
});

/** A visitor: its own browser context (own storage, own identity) on the demo page of `room`. */
async function visitor(room) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 760 } });
  const page = await context.newPage();
  watchErrors(page, room, pageErrors);
  const loaded = Date.now();
  await page.goto(`http://127.0.0.1:${server.port}/?room=${room}`);
  await waitStatus(page, 'synced');
  page.loadToSyncedMs = Date.now() - loaded;
  return page;
}

const text = (page) => page.evaluate(() => window.chorusDemo.doc.text());

test('the demo loads, syncs, and shows the page-load-to-synced time', async (t) => {
  const page = await visitor(room());
  const ms = await page.evaluate(() => window.chorusDemo.syncedMs);
  assert.ok(Number.isInteger(ms) && ms >= 0, `syncedMs ${ms}`);
  assert.match(await page.textContent('#metrics'), /synced in \d+ ms/);
  t.diagnostic(`page load to synced: ${ms} ms in the page (performance.now), ${page.loadToSyncedMs} ms seen by the test`);
  assert.equal(await page.getAttribute('#badge', 'data-state'), 'synced');
  await page.context().close();
});

test('two pages on one room converge when both type', async () => {
  const r = room();
  const [a, b] = [await visitor(r), await visitor(r)];
  await typeAtEnd(a, '[middle]');
  await waitForText(b, ['[middle]']);
  // At the same time: A appends, B types at the start.
  await Promise.all([
    typeAtEnd(a, ' Alpha types here.'),
    typeAtStart(b, 'Bravo types too. '),
  ]);
  const parts = ['Bravo types too. [middle] Alpha types here.'];
  await Promise.all([waitForText(a, parts), waitForText(b, parts)]);
  // Both at the very same spot: characters may interleave, but both pages end up equal and
  // nothing is lost.
  const before = (await text(a)).length;
  await Promise.all([typeAtEnd(a, ' 1111'), typeAtEnd(b, ' 2222')]);
  const converged = (p) => p.waitForFunction((n) => {
    const v = window.chorusDemo.text();
    return v.length === n && (v.match(/1/g) || []).length === 4 && (v.match(/2/g) || []).length === 4;
  }, before + 10, { timeout: DEADLINE });
  await Promise.all([converged(a), converged(b)]);
  const [ta, tb] = [await text(a), await text(b)];
  assert.equal(ta, tb);
  // What each user sees is the document's text.
  assert.equal(await editorText(a), ta);
  assert.equal(await editorText(b), tb);
  await Promise.all([a.context().close(), b.context().close()]);
});

test('a reload resumes from the saved position instead of refetching', async () => {
  const r = room();
  const a = await visitor(r);
  await typeAtEnd(a, 'persisted locally.');
  // Acknowledged by the server; the demo flushes its localStorage copy on pagehide.
  await a.waitForFunction(() => window.chorusDemo.doc.pendingUpdates === 0, null, { timeout: DEADLINE });
  await a.reload();
  await waitStatus(a, 'synced');
  assert.deepEqual(await a.evaluate(() => window.chorusDemo.syncs), [true], 'answered by replay from the saved position');
  assert.equal(await editorText(a), 'persisted locally.');
  await a.context().close();
});

test("page A's cursor, caret and name appear on page B; screenshot of two users; a leaver disappears", async () => {
  const r = room();
  const [a, b] = [await visitor(r), await visitor(r)];
  const nameA = await a.evaluate(() => window.chorusDemo.me.name);
  const nameB = await b.evaluate(() => window.chorusDemo.me.name);
  await typeAtEnd(a, 'Two people, one text.\nMove your mouse: everyone sees it.');
  await a.mouse.move(700, 520, { steps: 8 });
  // B lists A, and draws A's cursor where A's pointer is (same layout, same viewport).
  await b.waitForFunction((n) => [...document.querySelectorAll('#people li')].some((li) => li.textContent.includes(n)), nameA, { timeout: DEADLINE });
  await b.waitForFunction((n) => {
    const c = [...document.querySelectorAll('.cursor')].find((el) => el.textContent === n);
    if (!c || c.style.opacity !== '1') return false;
    const m = /translate\(([-\d.]+)px, ([-\d.]+)px\)/.exec(c.style.transform);
    return m && Math.abs(+m[1] - 700) < 2 && Math.abs(+m[2] - 520) < 2;
  }, nameA, { timeout: DEADLINE });
  // A's caret (at the end of the text) is drawn in B's editor with A's name.
  await a.click('.cm-content');
  await a.keyboard.press('Control+End');
  await b.waitForFunction((n) => [...document.querySelectorAll('.cm-ySelectionInfo')].some((c) => c.textContent === n), nameA, { timeout: DEADLINE });
  // And the other way round, for the picture.
  await b.mouse.move(380, 300, { steps: 8 });
  await a.waitForFunction((n) => [...document.querySelectorAll('.cursor')].some((el) => el.textContent === n && el.style.opacity === '1'), nameB, { timeout: DEADLINE });
  await fs.mkdir(ARTIFACTS, { recursive: true });
  const shot = path.join(ARTIFACTS, 'demo-two-users.png');
  await b.screenshot({ path: shot });
  const size = (await fs.stat(shot)).size;
  assert.ok(size > 10_000, `screenshot ${shot} is ${size} bytes`);
  // When B leaves, A's list and cursors drop B (the server broadcasts B's state as null).
  await b.context().close();
  await a.waitForFunction((n) => ![...document.querySelectorAll('#people li')].some((li) => li.textContent.includes(n))
    && ![...document.querySelectorAll('.cursor')].some((el) => el.textContent === n), nameB, { timeout: DEADLINE });
  await a.context().close();
});

test('both pages reconnect after a server restart and converge, including text typed while it was down', async () => {
  const r = room();
  const [a, b] = [await visitor(r), await visitor(r)];
  await typeAtEnd(a, 'before the restart. ');
  await waitForText(b, ['before the restart. ']);

  await server.kill();
  await Promise.all([waitStatus(a, 'reconnecting'), waitStatus(b, 'reconnecting')]);
  // Status and badge checked together in the page: with full jitter the backoff can be so
  // short that a separate read would already see the next attempt's "connecting".
  await a.waitForFunction(
    () => window.chorusDemo?.status !== 'reconnecting'
      || /retrying in/.test(document.getElementById('badge-text').textContent),
    null,
    { timeout: DEADLINE },
  );
  // Typed while the server is down: queued locally, unacknowledged.
  await typeAtEnd(a, 'A while offline. ');
  await typeAtEnd(b, 'B while offline. ');
  assert.ok(!(await text(b)).includes('A while offline.'));

  await server.start();
  // Backoff is capped at 5 s in the demo, so both are back well within the deadline.
  await Promise.all([waitStatus(a, 'synced'), waitStatus(b, 'synced')]);
  const all = ['before the restart. ', 'A while offline. ', 'B while offline. '];
  await Promise.all([waitForText(a, all), waitForText(b, all)]);
  assert.equal(await text(a), await text(b));

  // The server really has it (not just the two pages): a third visitor loads it from the log.
  const c = await visitor(r);
  await waitForText(c, all);
  assert.equal(await text(c), await text(a));
  await Promise.all([a.context().close(), b.context().close(), c.context().close()]);
});

test('the JS API: tokenProvider on connect, several documents on one socket, raw updates', async () => {
  const page = await visitor(room());
  const sockets = [];
  page.on('websocket', (ws) => sockets.push(ws.url()));
  const r = room();
  const result = await page.evaluate(async ([r]) => {
    const { ChorusClient } = await import('/pkg/chorus_client.js');
    let calls = 0;
    const client = new ChorusClient(`ws://${location.host}/v1/ws`, {
      tokenProvider: async () => `tok-${++calls}`,
    });
    const synced = new Promise((resolve) => client.onStatus((s) => { if (s.state === 'synced') resolve(); }));
    const one = client.open(`${r}-one`);
    const two = client.open(`${r}-two`);
    await synced;
    one.insert(0, 'first');
    two.insert(0, 'second');
    // Raw update out of one document, into a third: same text.
    const three = client.open(`${r}-three`);
    three.applyUpdate(one.encodeState());
    const out = { calls, one: one.text(), two: two.text(), three: three.text(), pending: one.pendingUpdates + two.pendingUpdates };
    client.close();
    return out;
  }, [r]);
  assert.equal(result.calls, 1);
  assert.deepEqual([result.one, result.two, result.three], ['first', 'second', 'first']);
  const mine = sockets.filter((u) => u.includes('token='));
  assert.deepEqual(mine.map((u) => new URL(u).searchParams.get('token')), ['tok-1'], 'one socket for three documents, with the token');
  await page.context().close();
});

test('no page threw', () => {
  assert.deepEqual(pageErrors, []);
});
