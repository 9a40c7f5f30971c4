// Run by hand (node tests/browser/bench-editor.mjs): the demo editor's bundle sizes (wasm + JS, gzipped), page load → synced, and keystroke → other page latency, measured in headless chromium against a real chorus process.
//
// Uses target/release/chorus when it exists (cargo build --release -p chorus-server --bin chorus),
// else target/debug/chorus, and web-demo as built by scripts/build-wasm.sh. LOADS and KEYS set the
// sample counts.
import fs from 'node:fs/promises';
import { existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { CHORUS, ROOT, WEB, ChorusProcess, freePort, launch, room, waitStatus } from './harness.mjs';

const LOADS = Number(process.env.LOADS || 15);
const KEYS = Number(process.env.KEYS || 300);

const pct = (xs, p) => { const s = [...xs].sort((a, b) => a - b); return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]; };
const summary = (xs) => `p50 ${pct(xs, 50).toFixed(1)} ms, p95 ${pct(xs, 95).toFixed(1)} ms, max ${Math.max(...xs).toFixed(1)} ms (n=${xs.length})`;

// ---- 1. What a first visit downloads.
const files = [
  ['wasm client', 'pkg/chorus_client_bg.wasm'],
  ['wasm-bindgen glue', 'pkg/chorus_client.js'],
  ['demo bundle (CodeMirror, y-codemirror.next, yjs, ChorusProvider)', 'dist/app.js'],
  ['library bundle (ChorusProvider + yjs, no editor)', 'dist/lib.js'],
  ['provider module alone (unbundled)', 'pkg/chorus-provider.js'],
];
console.log('Bundle sizes (gzip -9 level as served compressed by a typical CDN/proxy):');
let pageTotal = 0;
let pageGz = 0;
for (const [what, f] of files) {
  const bytes = await fs.readFile(path.join(WEB, f));
  const gz = gzipSync(bytes, { level: 9 }).length;
  if (!f.includes('lib.js') && !f.includes('chorus-provider')) { pageTotal += bytes.length; pageGz += gz; }
  console.log(`  ${what.padEnd(66)} ${(bytes.length / 1024).toFixed(0).padStart(5)} KiB, ${(gz / 1024).toFixed(0).padStart(4)} KiB gzipped  (${f})`);
}
console.log(`  ${'demo page total (wasm + glue + demo bundle)'.padEnd(66)} ${(pageTotal / 1024).toFixed(0).padStart(5)} KiB, ${(pageGz / 1024).toFixed(0).padStart(4)} KiB gzipped`);

// ---- 2. A server and a browser.
const release = path.join(ROOT, 'target/release/chorus');
const binary = existsSync(release) ? release : CHORUS;
const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'chorus-bench-editor-'));
const server = new ChorusProcess(await freePort(), dataDir, [], binary);
await server.start();
console.log(`\nServer: ${binary}, embedded log in ${dataDir}; ${os.cpus().length} CPUs`);
const browser = await launch();

try {
  // ---- 3. Page load → synced, each visit in a fresh context (empty cache, no saved position).
  const r = room();
  const seed = await browser.newContext();
  const seeder = await seed.newPage();
  await seeder.goto(`${server.http}/?room=${r}`);
  await waitStatus(seeder, 'synced');
  await seeder.evaluate(() => window.chorusDemo.ydoc.getText('text').insert(0, 'A document of a few lines.\n'.repeat(40)));
  await seeder.waitForFunction(() => window.chorusDemo.provider.saved);
  const cold = [];
  const warm = [];
  for (let i = 0; i < LOADS; i++) {
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    await page.goto(`${server.http}/?room=${r}`);
    await waitStatus(page, 'synced');
    cold.push(await page.evaluate(() => window.chorusDemo.syncedMs));
    // The same visitor again: HTTP cache and saved position (resume by replay).
    await page.reload();
    await waitStatus(page, 'synced');
    warm.push(await page.evaluate(() => window.chorusDemo.syncedMs));
    await ctx.close();
  }
  console.log('\nPage load → synced (navigation start → every document synced, performance.now() in the page):');
  console.log(`  first visit (cold cache, full state):   ${summary(cold)}`);
  console.log(`  reload (HTTP cache, resume by replay):  ${summary(warm)}`);

  // ---- 4. Keystroke in page A → the character in page B's Y.Doc and editor.
  const ctxA = await browser.newContext();
  const ctxB = await browser.newContext();
  const a = await ctxA.newPage();
  const b = await ctxB.newPage();
  const r2 = room();
  for (const p of [a, b]) { await p.goto(`${server.http}/?room=${r2}`); await waitStatus(p, 'synced'); }
  await a.evaluate(() => {
    window.keyAt = [];
    document.addEventListener('keydown', () => window.keyAt.push(performance.timeOrigin + performance.now()), true);
  });
  await b.evaluate(() => {
    window.seenAt = [];
    // y-codemirror.next updates the editor inside this same observer chain; the editor's DOM
    // is updated before the next frame.
    window.chorusDemo.ydoc.getText('text').observe(() => window.seenAt.push(performance.timeOrigin + performance.now()));
  });
  await a.click('.cm-content');
  for (let i = 0; i < KEYS; i++) {
    await a.keyboard.press(String.fromCharCode(97 + (i % 26)));
    await b.waitForFunction((n) => window.seenAt.length >= n, i + 1, { polling: 1 });
  }
  const sent = await a.evaluate(() => window.keyAt);
  const seen = await b.evaluate(() => window.seenAt);
  const lat = sent.map((t, i) => seen[i] - t);
  const textA = await a.evaluate(() => window.chorusDemo.text());
  const textB = await b.evaluate(() => window.chorusDemo.text());
  if (textA !== textB) throw new Error('pages differ');
  console.log('\nKeystroke in page A (keydown) → change applied in page B (Y.Text observer), one keystroke at a time:');
  console.log(`  ${summary(lat)}`);
  await Promise.all([ctxA.close(), ctxB.close(), seed.close()]);
} finally {
  await browser.close();
  await server.kill();
  await fs.rm(dataDir, { recursive: true, force: true });
}
