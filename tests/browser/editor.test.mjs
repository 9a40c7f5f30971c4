// Browser end-to-end tests of the editor stack: CodeMirror + y-codemirror.next on a Y.Doc, synced by ChorusProvider through the wasm client to real `chorus` processes (and a stock y-websocket client on /y/{doc}).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import {
  ARTIFACTS, DEADLINE, ROOT, ChorusProcess, checkBuilt, count, editorText, freePort, launch, room, typeAtEnd, typeAtStart,
  waitForText, waitSaved, waitStatus, watchErrors,
} from './harness.mjs';

// The stock Yjs client of the compatibility tests (npm ci in tests/js): one yjs instance for both.
const MODULES = path.join(ROOT, 'tests/js/node_modules');
const Y = await import(path.join(MODULES, 'yjs/dist/yjs.mjs'));
const { WebsocketProvider } = await import(path.join(MODULES, 'y-websocket/src/y-websocket.js'));
const { default: WebSocket } = await import(path.join(MODULES, 'ws/wrapper.mjs'));

let browser;
let server;
let dataDir;
const pageErrors = [];

before(async () => {
  await checkBuilt();
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'chorus-editor-'));
  server = new ChorusProcess(await freePort(), dataDir);
  await server.start();
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await server?.kill();
  if (dataDir) await fs.rm(dataDir, { recursive: true, force: true });
});

/** A visitor with its own context (storage, identity) on the demo page of room `r`. */
async function visitor(r, srv = server) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 760 } });
  const page = await context.newPage();
  watchErrors(page, r, pageErrors);
  await page.goto(`${srv.http}/?room=${r}`);
  await waitStatus(page, 'synced');
  return page;
}

/** Where B's editor draws the caret labelled `name`: its document offset, or null. */
const caretOffset = (page, name) => page.evaluate((n) => {
  const info = [...document.querySelectorAll('.cm-ySelectionInfo')].find((el) => el.textContent === n);
  if (!info) return null;
  return window.chorusDemo.view.posAtDOM(info.closest('.cm-ySelectionCaret'));
}, name);

test('two pages type concurrently in the editor and converge; a remote caret stays on its character when text is typed before it', async () => {
  const r = room();
  const [a, b] = [await visitor(r), await visitor(r)];
  await typeAtEnd(a, '[middle]');
  await waitForText(b, ['[middle]']);
  // Both type at the same time, at opposite ends, keystroke by keystroke.
  await Promise.all([typeAtEnd(a, ' Alpha was here.'), typeAtStart(b, 'Bravo was here. ')]);
  const whole = 'Bravo was here. [middle] Alpha was here.';
  await Promise.all([waitForText(a, [whole]), waitForText(b, [whole])]);
  assert.equal(await editorText(a), whole);
  assert.equal(await editorText(b), whole);

  // A puts its caret right after "[middle]"; B sees it there.
  const nameA = await a.evaluate(() => window.chorusDemo.me.name);
  await a.click('.cm-content');
  await a.keyboard.press('Control+Home');
  const after = whole.indexOf('[middle]') + '[middle]'.length;
  for (let i = 0; i < after; i++) await a.keyboard.press('ArrowRight');
  await b.waitForFunction(([n, at]) => {
    const info = [...document.querySelectorAll('.cm-ySelectionInfo')].find((el) => el.textContent === n);
    return info && window.chorusDemo.view.posAtDOM(info.closest('.cm-ySelectionCaret')) === at;
  }, [nameA, after], { timeout: DEADLINE });

  // B types before it: A has not moved, and B still draws A's caret after "[middle]" — the
  // caret is anchored to a character (a Yjs relative position), not to an index.
  const typed = 'Charlie? ';
  await typeAtStart(b, typed);
  await waitForText(a, [typed + whole]);
  await b.waitForFunction(([n, at]) => {
    const info = [...document.querySelectorAll('.cm-ySelectionInfo')].find((el) => el.textContent === n);
    return info && window.chorusDemo.view.posAtDOM(info.closest('.cm-ySelectionCaret')) === at;
  }, [nameA, after + typed.length], { timeout: DEADLINE }).catch(async (e) => {
    throw new Error(`A's caret in B is at ${await caretOffset(b, nameA)}, want ${after + typed.length}: ${e.message}`);
  });
  const textB = await editorText(b);
  const at = await caretOffset(b, nameA);
  assert.equal(textB.slice(at - '[middle]'.length, at), '[middle]');

  // A selects "[middle]": B highlights it in A's colour.
  for (let i = 0; i < '[middle]'.length; i++) await a.keyboard.press('Shift+ArrowLeft');
  await b.waitForFunction(() => [...document.querySelectorAll('.cm-ySelection')].map((el) => el.textContent).join('') === '[middle]', null, { timeout: DEADLINE });

  await fs.mkdir(ARTIFACTS, { recursive: true });
  await b.mouse.move(640, 330, { steps: 4 });
  await a.mouse.move(760, 420, { steps: 4 });
  const nameB = await b.evaluate(() => window.chorusDemo.me.name);
  await a.waitForFunction((n) => [...document.querySelectorAll('.cursor')].some((el) => el.textContent === n && el.style.opacity === '1'), nameB, { timeout: DEADLINE });
  await b.waitForFunction((n) => [...document.querySelectorAll('.cursor')].some((el) => el.textContent === n && el.style.opacity === '1'), nameA, { timeout: DEADLINE });
  await b.screenshot({ path: path.join(ARTIFACTS, 'editor-two-users.png') });
  await Promise.all([a.context().close(), b.context().close()]);
});

test('typed while offline: arrives at the other page exactly once when the page is back online', async () => {
  const r = room();
  const [a, b] = [await visitor(r), await visitor(r)];
  await typeAtEnd(a, 'online first. ');
  await waitForText(b, ['online first. ']);
  await waitSaved(a);

  await a.context().setOffline(true);
  await a.waitForFunction(() => window.chorusDemo.status !== 'synced', null, { timeout: DEADLINE });
  const offline = 'typed-while-offline';
  await typeAtEnd(a, offline);
  // Kept locally and shown as not saved.
  await a.waitForFunction(() => document.getElementById('saved').dataset.state === 'unsaved', null, { timeout: DEADLINE });
  await fs.mkdir(ARTIFACTS, { recursive: true });
  await a.screenshot({ path: path.join(ARTIFACTS, 'editor-offline.png') });
  assert.ok(!(await editorText(b)).includes(offline), 'nothing reaches B while A is offline');

  await a.context().setOffline(false);
  await waitStatus(a, 'synced');
  await waitForText(b, [offline]);
  await waitSaved(a);
  // A second visitor that loads the room from the server sees it once too.
  const c = await visitor(r);
  await waitForText(c, [offline]);
  for (const p of [a, b, c]) assert.equal(count(await editorText(p), offline), 1);
  assert.equal(await editorText(a), await editorText(b));
  assert.equal(await editorText(c), await editorText(b));
  await Promise.all([a.context().close(), b.context().close(), c.context().close()]);
});

test('an edit made just before a reload, never acknowledged, is delivered after the reload, once', async () => {
  const r = room();
  const [a, b] = [await visitor(r), await visitor(r)];
  await typeAtEnd(a, 'base. ');
  await waitForText(b, ['base. ']);
  await waitSaved(a);
  // Hold A's frames to the server (in the page's WebSocket, as a slow network would): the edit
  // below is queued in the client and can never be acknowledged before the reload.
  let hold = false;
  await a.routeWebSocket(/\/v1\/ws/, (ws) => {
    const up = ws.connectToServer();
    ws.onMessage((m) => { if (!hold) up.send(m); });
    up.onMessage((m) => ws.send(m));
  });
  // The route applies to sockets opened from now on.
  await a.reload();
  await waitStatus(a, 'synced');
  hold = true;
  const edit = 'reloaded-before-ack';
  await typeAtEnd(a, edit);
  assert.ok((await a.evaluate(() => window.chorusDemo.provider.pendingUpdates)) > 0, 'the edit is not acknowledged');
  assert.equal(await a.evaluate(() => window.chorusDemo.provider.saved), false);
  hold = false;
  await a.reload();
  await waitStatus(a, 'synced');
  await waitForText(b, [edit]);
  await waitSaved(a);
  assert.equal(count(await editorText(b), edit), 1);
  assert.equal(count(await editorText(a), edit), 1);
  assert.equal(await editorText(a), await editorText(b));
  await Promise.all([a.context().close(), b.context().close()]);
});

test('a reloaded page resumes by replay from its saved position (the server says replay: true)', async () => {
  const r = room();
  const a = await visitor(r);
  await typeAtEnd(a, 'resume me.');
  await waitSaved(a);
  // Read the server's own answer off the wire: a MessagePack map with `replay: true`.
  const replayTrue = Buffer.concat([Buffer.from([0xa6]), Buffer.from('replay'), Buffer.from([0xc3])]);
  const replayFalse = Buffer.concat([Buffer.from([0xa6]), Buffer.from('replay'), Buffer.from([0xc2])]);
  const answers = [];
  a.on('websocket', (ws) => ws.on('framereceived', ({ payload }) => {
    const b = Buffer.isBuffer(payload) ? payload : Buffer.from(payload);
    if (b.includes(Buffer.from('synced'))) answers.push(b.includes(replayTrue) ? true : b.includes(replayFalse) ? false : null);
  }));
  await a.reload();
  await waitStatus(a, 'synced');
  assert.deepEqual(answers, [true], 'one synced frame, a replay');
  assert.deepEqual(await a.evaluate(() => window.chorusDemo.syncs), [true]);
  assert.equal(await editorText(a), 'resume me.');
  await a.context().close();
});

test('ChorusProvider on /v1/ws and a stock y-websocket WebsocketProvider on /y/{doc} converge, with presence both ways', async () => {
  const r = room();
  const a = await visitor(r);
  const ydoc = new Y.Doc();
  const stock = new WebsocketProvider(`${server.ws}/y`, r, ydoc, { WebSocketPolyfill: WebSocket });
  try {
    stock.awareness.setLocalStateField('user', { name: 'Stock Yjs', color: '#0090ff' });
    await new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('y-websocket did not sync')), DEADLINE);
      stock.once('sync', () => { clearTimeout(t); resolve(); });
    });
    await typeAtEnd(a, 'from the editor. ');
    ydoc.getText('text').insert(0, 'from stock Yjs. ');
    await waitForText(a, ['from stock Yjs. from the editor. ']);
    const until = Date.now() + DEADLINE;
    while (ydoc.getText('text').toString() !== (await editorText(a))) {
      if (Date.now() > until) throw new Error(`not converged: ${ydoc.getText('text').toString()} vs ${await editorText(a)}`);
      await new Promise((res) => setTimeout(res, 20));
    }
    // Presence: the stock client is listed on the page; the page's user reaches the stock client.
    await a.waitForFunction(() => [...document.querySelectorAll('#people li')].some((li) => li.textContent.includes('Stock Yjs')), null, { timeout: DEADLINE });
    const nameA = await a.evaluate(() => window.chorusDemo.me.name);
    const names = () => [...stock.awareness.getStates().values()].map((s) => s.user?.name);
    const until2 = Date.now() + DEADLINE;
    while (!names().includes(nameA)) {
      if (Date.now() > until2) throw new Error(`stock client sees ${JSON.stringify(names())}, not ${nameA}`);
      await new Promise((res) => setTimeout(res, 20));
    }
  } finally {
    stock.destroy();
    // The provider leaves its Awareness (and that one's interval timer) alive; destroying
    // the doc ends it, else this test file's process never exits.
    ydoc.destroy();
  }
  await a.context().close();
});

test('tokenProvider refreshes the token in the browser: the socket outlives the first token', async () => {
  const secret = 'editor-test-secret';
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'chorus-editor-auth-'));
  const authed = new ChorusProcess(await freePort(), dir, ['--auth-secret', secret, '--token-warning', '2s']);
  await authed.start();
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const mint = (ttl) => {
    const exp = Math.floor(Date.now() / 1000) + ttl;
    const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: 'editor-test', exp, docs: [{ doc: '*', access: 'write' }] })}`;
    return { token: `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`, exp };
  };
  const context = await browser.newContext();
  const page = await context.newPage();
  watchErrors(page, 'auth', pageErrors);
  const sockets = [];
  page.on('websocket', (ws) => { sockets.push(ws.url()); });
  // The first token expires 4 s from now: the server warns at 2 s, the provider asks again.
  const first = mint(4);
  const tokens = [first.token];
  await page.exposeFunction('mintToken', () => { const t = tokens.length === 1 ? first.token : mint(600).token; tokens.push(t); return t; });
  // A plain same-origin page to run modules in; the browser's favicon request would log a 404.
  await page.route('**/favicon.ico', (route) => route.fulfill({ status: 204 }));
  await page.goto(`${authed.http}/healthz`);
  const r = room();
  await page.evaluate(async ([r]) => {
    const { init, ChorusClient, ChorusProvider, Y } = await import('/dist/lib.js');
    await init();
    let calls = 0;
    const client = new ChorusClient(`ws://${location.host}/v1/ws`, { tokenProvider: async () => { calls++; return window.mintToken(); } });
    const ydoc = new Y.Doc();
    const provider = new ChorusProvider(client, r, ydoc);
    window.t = { client, ydoc, provider, calls: () => calls };
    await new Promise((resolve) => provider.on('synced', (s) => { if (s) resolve(); }));
  }, [r]);
  // The refresh happened: the provider was asked a second time, on the same socket.
  await page.waitForFunction(() => window.t.calls() >= 2, null, { timeout: DEADLINE });
  // Past the first token's expiry (a deadline, not a sleep: the server closes at `exp`), an
  // edit still goes through on that socket.
  await page.waitForFunction((exp) => Date.now() / 1000 > exp + 1, first.exp, { timeout: DEADLINE });
  await page.evaluate(() => window.t.ydoc.getText('text').insert(0, 'after expiry'));
  await page.waitForFunction(() => window.t.provider.saved && window.t.provider.synced, null, { timeout: DEADLINE });
  const stored = await (await fetch(`${authed.http}/v1/docs/${r}?token=${mint(60).token}`)).arrayBuffer();
  const check = new Y.Doc();
  Y.applyUpdate(check, new Uint8Array(stored));
  assert.equal(check.getText('text').toString(), 'after expiry');
  assert.equal(sockets.length, 1, `one socket for the whole test, got ${sockets.length}`);
  await context.close();
  await authed.kill();
  await fs.rm(dir, { recursive: true, force: true });
});

test('no page threw', () => {
  assert.deepEqual(pageErrors, []);
});
