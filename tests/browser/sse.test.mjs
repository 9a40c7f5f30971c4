// Browser SSE through a load balancer: Chromium's EventSource (nginx → two chorus processes → one Redis) applies events to a Yjs doc; the serving node is killed and the stream resumes on the other with Last-Event-ID.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import * as Y from '../js/node_modules/yjs/dist/yjs.mjs';
import { freePort } from './harness.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CHORUS = path.join(ROOT, 'target/debug/chorus');
const MODULES = path.join(ROOT, 'tests/js/node_modules');
const SHIPPED_NGINX = path.join(ROOT, 'server/deploy/nginx.conf');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const NGINX = ['/usr/sbin/nginx', '/usr/bin/nginx'].find((p) => existsSync(p)) || 'nginx';
const DEADLINE = 15_000;


async function until(what, check) {
  const end = Date.now() + DEADLINE;
  for (;;) {
    const v = await check().catch(() => undefined);
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A child process that is killed (SIGKILL) at the end, with its stderr kept for failures. */
function start(cmd, args) {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, RUST_LOG: 'warn' } });
  proc.log = '';
  proc.stderr.on('data', (d) => { proc.log += d; });
  return proc;
}

async function kill(proc) {
  if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = once(proc, 'exit');
  proc.kill('SIGKILL');
  await exited;
}

/** The shipped nginx.conf with only listen address, nodes, paths and worker limits rewritten (as tests/src/nginx.rs does). */
function renderNginx(dir, port, nodes) {
  let anchors = 0;
  let serversWritten = false;
  const out = [];
  for (const line of readFileSync(SHIPPED_NGINX, 'utf8').split('\n')) {
    const t = line.trim();
    let r = null;
    if (t === 'worker_processes auto;') r = 'worker_processes 1;';
    else if (t === 'worker_rlimit_nofile 65536;') r = '';
    else if (t === 'pid /run/nginx.pid;') r = `pid ${dir}/nginx.pid;`;
    else if (t === 'error_log /var/log/nginx/error.log warn;') r = `error_log ${dir}/error.log warn;`;
    else if (t === 'worker_connections 16384;') r = 'worker_connections 1024;';
    else if (t === 'access_log off;') r = ['access_log off;', ...['client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'].map((k) => `${k}_temp_path ${dir}/${k};`)].join('\n    ');
    else if (t === 'listen 80;') r = `listen 127.0.0.1:${port};`;
    else if (t.startsWith('server 10.0.0.')) {
      if (serversWritten) continue;
      serversWritten = true;
      const opts = t.split(' ').slice(2).join(' ');
      r = nodes.map((n) => `        server ${n} ${opts}`).join('\n');
    }
    if (r !== null) anchors += 1;
    out.push(r ?? line);
  }
  assert.equal(anchors, 8, 'server/deploy/nginx.conf changed shape');
  return out.join('\n');
}

/** An import map so the page can load yjs (and lib0, which it imports by bare name) unbundled. */
function importMap() {
  const pick = (e) => {
    if (typeof e === 'string') return e;
    for (const k of ['browser', 'module', 'import', 'default']) if (e?.[k]) return pick(e[k]);
    return null;
  };
  const imports = { yjs: '/m/yjs/dist/yjs.mjs', 'isomorphic.js': '/m/isomorphic.js/browser.mjs' };
  const lib0 = JSON.parse(readFileSync(path.join(MODULES, 'lib0/package.json'), 'utf8'));
  for (const [k, v] of Object.entries(lib0.exports)) {
    const target = pick(v);
    if (k.startsWith('./') && target && /\.m?js$/.test(target)) imports[`lib0/${k.slice(2)}`] = `/m/lib0/${target.slice(2)}`;
  }
  return { imports };
}

const PAGE = (map) => `<!doctype html>
<meta charset="utf-8">
<title>Chorus SSE reader</title>
<script type="importmap">${JSON.stringify(map)}</script>
<script type="module">
import * as Y from 'yjs';
const params = new URLSearchParams(location.search);
const doc = new Y.Doc();
const bytes = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
const r = window.reader = { opens: 0, errors: 0, states: 0, messages: 0, ids: [], firstEventAfterOpen: [], text: () => doc.getText('t').toString() };
const es = new EventSource('/v1/docs/' + params.get('doc') + '/events');
let fresh = false;
const got = (e) => {
  Y.applyUpdate(doc, bytes(e.data));
  r.ids.push(e.lastEventId);
  if (fresh) { fresh = false; r.firstEventAfterOpen.push({ at: Date.now(), kind: e.type, id: e.lastEventId }); }
};
es.onopen = () => { r.opens += 1; fresh = true; };
es.onerror = () => { r.errors += 1; };
es.onmessage = (e) => { r.messages += 1; got(e); };
es.addEventListener('state', (e) => { r.states += 1; got(e); });
</script>
<p>SSE reader</p>`;

let redis; let nodes = []; let nginx; let browser; let dir; let lbPort;

before(async () => {
  for (const f of [CHORUS, path.join(MODULES, 'yjs/dist/yjs.mjs')]) {
    await fs.access(f).catch(() => { throw new Error(`${f} missing: run scripts/test.sh (it builds chorus and runs npm ci in tests/js)`); });
  }
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'chorus-sse-'));
  const web = path.join(dir, 'web');
  await fs.mkdir(path.join(web, 'm'), { recursive: true });
  for (const m of ['yjs', 'lib0', 'isomorphic.js']) await fs.symlink(path.join(MODULES, m), path.join(web, 'm', m));
  await fs.writeFile(path.join(web, 'sse.html'), PAGE(importMap()));

  const redisPort = await freePort();
  redis = start('redis-server', ['--port', String(redisPort), '--bind', '127.0.0.1', '--dir', dir, '--save', '', '--appendonly', 'no']);
  await until('redis answers', async () => execFileSync('redis-cli', ['-p', String(redisPort), 'PING'], { stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim() === 'PONG');
  for (let i = 0; i < 2; i += 1) {
    const port = await freePort();
    const node = start(CHORUS, ['serve', '--listen', `127.0.0.1:${port}`, '--data-dir', path.join(dir, `node${i}`),
      '--redis-url', `redis://127.0.0.1:${redisPort}`, '--snapshot-dir', path.join(dir, 'snapshots'), '--static-dir', web]);
    node.port = port;
    nodes.push(node);
    await until(`node ${i} answers /healthz`, async () => (await fetch(`http://127.0.0.1:${port}/healthz`)).ok);
  }
  lbPort = await freePort();
  const conf = path.join(dir, 'nginx.conf');
  await fs.writeFile(conf, renderNginx(dir, lbPort, nodes.map((n) => `127.0.0.1:${n.port}`)));
  // One process, no workers: a SIGKILL at the end leaves nothing behind.
  nginx = start(NGINX, ['-p', dir, '-c', conf, '-g', 'daemon off; master_process off;']);
  await until('nginx answers', async () => (await fetch(`http://127.0.0.1:${lbPort}/healthz`)).ok);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  await kill(nginx);
  for (const n of nodes) await kill(n);
  await kill(redis);
  if (dir) await fs.rm(dir, { recursive: true, force: true });
});

/** A backend writer posting through the balancer; returns the position it was appended at. */
class Writer {
  constructor(doc) { this.doc = doc; this.y = new Y.Doc(); this.tokens = []; }

  async append(token) {
    const t = this.y.getText('t');
    const before = Y.encodeStateVector(this.y);
    t.insert(t.length, token);
    const r = await fetch(`http://127.0.0.1:${lbPort}/v1/docs/${this.doc}/updates`, {
      method: 'POST', headers: { 'content-type': 'application/octet-stream' }, body: Y.encodeStateAsUpdate(this.y, before),
    });
    const body = await r.text();
    assert.equal(r.status, 200, body);
    this.tokens.push(token);
    return JSON.parse(body).position;
  }

  text() { return this.y.getText('t').toString(); }
}

const connections = async (n) => (await (await fetch(`http://127.0.0.1:${n.port}/healthz`)).json()).connections;

test('EventSource through nginx receives the document and live updates, and resumes on another node after a kill with nothing missed or doubled', async (t) => {
  const docName = `sse-${Math.random().toString(36).slice(2, 10)}`;
  const w = new Writer(docName);
  for (let i = 0; i < 3; i += 1) await w.append(`[before-${i}]`);

  const page = await browser.newPage();
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  await page.goto(`http://127.0.0.1:${lbPort}/sse.html?doc=${docName}`);
  const has = (s) => page.waitForFunction((x) => window.reader?.text() === x, s, { timeout: DEADLINE });
  await has(w.text());
  assert.equal(await page.evaluate(() => window.reader.states), 1, 'the first event is the state');

  await w.append('[live-0]');
  await w.append('[live-1]');
  await has(w.text());
  assert.ok(await page.evaluate(() => window.reader.messages) >= 1, 'live updates arrive as message events');
  const lastId = await page.evaluate(() => window.reader.ids.at(-1));
  assert.match(lastId, /^\d+\.\d+-\d+$/, 'event ids are positions');

  // The page's stream is the only open connection: that node is the one to kill.
  const counts = await Promise.all(nodes.map(connections));
  const victim = counts.findIndex((c) => c >= 1);
  assert.ok(victim >= 0 && counts.filter((c) => c >= 1).length === 1, `exactly one node serves the stream: ${counts}`);
  const killedAt = Date.now();
  await kill(nodes[victim]);
  // Writes continue through the balancer (now to the survivor) while the browser reconnects.
  for (let i = 0; i < 3; i += 1) await w.append(`[after-kill-${i}]`);
  await has(w.text());

  const r = await page.evaluate(() => ({ ...window.reader, text: window.reader.text() }));
  assert.equal(r.opens, 2, 'one reconnect');
  const resumed = r.firstEventAfterOpen.at(-1);
  assert.equal(resumed.kind, 'message', 'resumed by replay after Last-Event-ID, not by a full state');
  assert.equal(r.states, 1, 'no second full state');
  for (const token of w.tokens) assert.equal(r.text.split(token).length - 1, 1, `${token} exactly once`);
  assert.equal(r.text, w.text());
  assert.equal(await connections(nodes[1 - victim]), 1, 'the stream lives on the surviving node');
  assert.deepEqual(pageErrors, []);
  t.diagnostic(`SSE reader resumed ${resumed.at - killedAt} ms after its node was killed (EventSource retry 1000 ms; kill → first replayed event in the page)`);
  await page.close();
});
