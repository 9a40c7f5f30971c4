// Shared by the browser tests: real `chorus` processes (port, data dir, extra flags), headless chromium through playwright-core, and the demo page's editor as a user drives it.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const CHORUS = path.join(ROOT, 'target/debug/chorus');
export const WEB = path.join(ROOT, 'web-demo');
export const ARTIFACTS = path.join(ROOT, 'test-artifacts');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
export const DEADLINE = 15_000;

export async function freePort() {
  const srv = net.createServer();
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const { port } = srv.address();
  srv.close();
  await once(srv, 'close');
  return port;
}

/** Fails early, with the command to run, when the binary or the built page is missing. */
export async function checkBuilt() {
  await fs.access(CHORUS).catch(() => { throw new Error(`${CHORUS} missing: build it with cargo build -p chorus-server --bin chorus`); });
  for (const f of ['pkg/chorus_client_bg.wasm', 'pkg/chorus-provider.js', 'dist/app.js', 'dist/lib.js']) {
    await fs.access(path.join(WEB, f)).catch(() => { throw new Error(`web-demo/${f} missing: run scripts/build-wasm.sh`); });
  }
}

/** A `chorus` process on a fixed port and data dir, so it can be killed and started again. */
export class ChorusProcess {
  constructor(port, dataDir, extraArgs = [], binary = CHORUS) {
    this.binary = binary;
    this.port = port;
    this.dataDir = dataDir;
    this.extraArgs = extraArgs;
    this.proc = null;
    this.log = '';
  }

  get http() { return `http://127.0.0.1:${this.port}`; }

  get ws() { return `ws://127.0.0.1:${this.port}`; }

  async start() {
    this.proc = spawn(this.binary, ['serve', '--listen', `127.0.0.1:${this.port}`, '--data-dir', this.dataDir, '--static-dir', WEB, ...this.extraArgs], {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, RUST_LOG: 'warn' },
    });
    this.proc.stderr.on('data', (d) => { this.log += d; });
    const until = Date.now() + DEADLINE;
    for (;;) {
      if (this.proc.exitCode !== null) throw new Error(`chorus exited early:\n${this.log}`);
      try {
        const r = await fetch(`${this.http}/healthz`);
        if (r.ok) return;
      } catch { /* not listening yet */ }
      if (Date.now() > until) throw new Error(`chorus did not answer /healthz within ${DEADLINE} ms:\n${this.log}`);
      await new Promise((r) => setTimeout(r, 25));
    }
  }

  /** kill -9: no goodbye to the clients, they see the socket drop. */
  async kill() {
    if (!this.proc || this.proc.exitCode !== null) return;
    const exited = once(this.proc, 'exit');
    this.proc.kill('SIGKILL');
    await exited;
  }
}

/** Playwright gives every launch a fresh, throwaway user-data dir. */
export function launch() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
}

/** Collects uncaught page errors and console errors (except refused WebSocket attempts, expected while a server is down). */
export function watchErrors(page, label, into) {
  page.on('pageerror', (e) => into.push(`${label}: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !/WebSocket connection to .* failed|net::ERR_INTERNET_DISCONNECTED/.test(m.text())) into.push(`${label}: console: ${m.text()}`);
  });
}

export const room = () => `e2e-${Math.random().toString(36).slice(2, 10)}`;

export const waitStatus = (page, state) =>
  page.waitForFunction((s) => window.chorusDemo?.status === s, state, { timeout: DEADLINE });

/** What the editor shows. */
export const editorText = (page) => page.evaluate(() => window.chorusDemo.text());

/** Waits until the editor (what the user sees) contains every string. */
export const waitForText = (page, parts) =>
  page.waitForFunction((ps) => ps.every((p) => window.chorusDemo?.text?.().includes(p)), parts, { timeout: DEADLINE });

export const waitSaved = (page) =>
  page.waitForFunction(() => window.chorusDemo.provider.saved && window.chorusDemo.saved, null, { timeout: DEADLINE });

/** Clicks into the editor, moves to the end of the document and types like a user. */
export async function typeAtEnd(page, s) {
  await page.click('.cm-content');
  await page.keyboard.press('Control+End');
  await page.keyboard.type(s);
}

export async function typeAtStart(page, s) {
  await page.click('.cm-content');
  await page.keyboard.press('Control+Home');
  await page.keyboard.type(s);
}

/** Occurrences of `needle` in `hay`. */
export const count = (hay, needle) => hay.split(needle).length - 1;
