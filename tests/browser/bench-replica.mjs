// Run by hand (node --expose-gc tests/browser/bench-replica.mjs): what the wasm client's own yrs replica of a Y.Doc-bound document costs (memory, CPU per keystroke, join), the figures behind the choice argued in client-wasm/js/chorus-provider.js.
//
// The real wasm package (web-demo/pkg, built by scripts/build-wasm.sh) runs in node against a
// scripted socket: every frame the client sends is accepted, and the script plays the server
// (acks for local updates, `update` and `synced` frames for remote ones), so the client goes
// through exactly the code it runs in a browser, minus the network.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const PKG = path.join(ROOT, 'web-demo/pkg');
const Y = await import(path.join(ROOT, 'web-demo/node_modules/yjs/dist/yjs.mjs'));
const { initSync, ChorusClient } = await import(path.join(PKG, 'chorus_client.js'));

const KEYSTROKES = Number(process.env.KEYSTROKES || 20_000);
const gc = globalThis.gc ?? (() => { throw new Error('run with node --expose-gc'); });

// ---- a minimal MessagePack encoder for the server's frames (maps, strings, bin, uints, arrays, bools)
function pack(v, out = []) {
  if (v === true || v === false) out.push(v ? 0xc3 : 0xc2);
  else if (typeof v === 'number') {
    if (v < 128) out.push(v);
    else if (v < 2 ** 32) out.push(0xce, (v >>> 24) & 255, (v >>> 16) & 255, (v >>> 8) & 255, v & 255);
    else { const hi = Math.floor(v / 2 ** 32); out.push(0xcf, ...[hi >>> 24, hi >>> 16, hi >>> 8, hi].map((x) => x & 255), ...[v >>> 24, v >>> 16, v >>> 8, v].map((x) => x & 255)); }
  } else if (typeof v === 'string') {
    const b = Buffer.from(v);
    if (b.length < 32) out.push(0xa0 | b.length); else out.push(0xd9, b.length);
    out.push(...b);
  } else if (v instanceof Uint8Array) {
    out.push(0xc6, (v.length >>> 24) & 255, (v.length >>> 16) & 255, (v.length >>> 8) & 255, v.length & 255);
    for (const x of v) out.push(x);
  } else if (Array.isArray(v)) {
    out.push(0x90 | v.length);
    for (const x of v) pack(x, out);
  } else {
    const keys = Object.keys(v);
    out.push(0x80 | keys.length);
    for (const k of keys) { pack(k, out); pack(v[k], out); }
  }
  return out;
}
const frame = (f) => new Uint8Array(pack(f)).buffer;

// ---- a scripted socket in place of the browser's WebSocket
let socket = null;
globalThis.WebSocket = class {
  constructor() { socket = this; this.sent = 0; queueMicrotask(() => this.onopen?.()); }
  send() { this.sent++; }
  close() {}
  set binaryType(_) {}
};
const deliver = (f) => socket.onmessage({ data: frame(f) });

const wasmBytes = fs.readFileSync(path.join(PKG, 'chorus_client_bg.wasm'));
const wasm = initSync({ module: wasmBytes });
const wasmMemory = () => wasm.memory.buffer.byteLength;

// ---- an editor's edit trace: one update per keystroke, typed mostly in runs, sometimes elsewhere
function trace(n) {
  const doc = new Y.Doc();
  const text = doc.getText('text');
  const updates = [];
  doc.on('update', (u) => updates.push(u));
  let at = 0;
  let seed = 42;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  const t0 = performance.now();
  for (let i = 0; i < n; i++) {
    if (rnd() < 0.02) at = Math.floor(rnd() * text.length); // jump elsewhere
    if (rnd() < 0.1 && at > 0) { text.delete(at - 1, 1); at--; } else { text.insert(at, i % 7 === 6 ? ' ' : 'abcdefghij'[i % 10]); at++; }
  }
  return { doc, updates, yjsMs: performance.now() - t0 };
}

const fmtUs = (ms, n) => `${((ms * 1000) / n).toFixed(1)} µs`;
const mb = (b) => `${(b / 1e6).toFixed(2)} MB`;

const { doc: source, updates, yjsMs } = trace(KEYSTROKES);
const finalState = Y.encodeStateAsUpdate(source);
console.log(`edit trace: ${KEYSTROKES} keystrokes, ${source.getText('text').length} characters, final state ${finalState.length} bytes`);
console.log(`Yjs, making each keystroke in the editor's Y.Doc (insert + update event): ${fmtUs(yjsMs, KEYSTROKES)} per keystroke`);

// 1. The Y.Doc the editor holds anyway: JS heap for the whole trace applied keystroke by keystroke.
gc(); gc();
const heap0 = process.memoryUsage().heapUsed;
const mirror = new Y.Doc();
let t = performance.now();
for (const u of updates) Y.applyUpdate(mirror, u);
const yApplyMs = performance.now() - t;
gc(); gc();
const yHeap = process.memoryUsage().heapUsed - heap0;
console.log(`Y.Doc: ${mb(yHeap)} of JS heap; applying a keystroke's update: ${fmtUs(yApplyMs, KEYSTROKES)}`);

// 2. The wasm replica: every keystroke goes through ChorusDoc.applyUpdate (what the provider
//    calls), the client frames it for the socket, and the scripted server acknowledges it.
const client = new ChorusClient('ws://bench/v1/ws', {});
await new Promise((r) => queueMicrotask(r));
await new Promise((r) => setTimeout(r, 0));
const mem0 = wasmMemory();
const local = client.open('local');
deliver({ type: 'synced', doc: 'local', update: new Uint8Array([0, 0]), position: [1, 1, 0], replay: false });
// Frames are encoded before the clock starts: the script's MessagePack is not what is measured.
const acks = updates.map((_, i) => frame({ type: 'ack', doc: 'local', seq: i + 1, position: [1, 1, i + 1] }));
t = performance.now();
for (let i = 0; i < updates.length; i++) {
  local.applyUpdate(updates[i]);
  socket.onmessage({ data: acks[i] });
}
const relayMs = performance.now() - t;
const memLocal = wasmMemory() - mem0;
if (local.pendingUpdates !== 0) throw new Error(`pending ${local.pendingUpdates}`);
if (local.text() !== source.getText('text').toString()) throw new Error('replica differs');
console.log(`wasm replica, local keystroke (applyUpdate + frame + ack): ${fmtUs(relayMs, KEYSTROKES)} per keystroke; wasm memory grew ${mb(memLocal)} (64 KiB pages, high-water mark)`);

// 3. The other direction: remote keystrokes through the replica into a Y.Doc (what a peer's page does).
const remote = client.open('remote');
const peer = new Y.Doc();
remote.onRemoteUpdate((u) => Y.applyUpdate(peer, u));
deliver({ type: 'synced', doc: 'remote', update: new Uint8Array([0, 0]), position: [1, 1, 0], replay: false });
const remoteFrames = updates.map((u, i) => frame({ type: 'update', doc: 'remote', update: u, position: [1, 2, i + 1] }));
t = performance.now();
for (const f of remoteFrames) socket.onmessage({ data: f });
const remoteMs = performance.now() - t;
if (peer.getText('text').toString() !== source.getText('text').toString()) throw new Error('peer differs');
console.log(`remote keystroke, server frame → replica → Y.Doc: ${fmtUs(remoteMs, KEYSTROKES)} per keystroke (of which Y.applyUpdate ≈ ${fmtUs(yApplyMs, KEYSTROKES)})`);

// 4. Joining a large document: the synced answer applied to the replica, then to the Y.Doc.
const big = new Y.Doc();
const chunk = 'The quick brown fox jumps over the lazy dog. '.repeat(100);
for (let i = 0; i < 500; i++) big.getText('text').insert(big.getText('text').length, chunk);
const bigState = Y.encodeStateAsUpdate(big);
big.destroy();
const bigFrame = frame({ type: 'synced', doc: 'join', update: bigState, position: [1, 3, 1], replay: false });
gc(); gc();
const heap1 = process.memoryUsage().heapUsed;
const joined = new Y.Doc();
const mem1 = wasmMemory();
const join = client.open('join');
let applyJs = 0;
join.onRemoteUpdate((u) => { const s = performance.now(); Y.applyUpdate(joined, u); applyJs = performance.now() - s; });
t = performance.now();
socket.onmessage({ data: bigFrame });
const joinMs = performance.now() - t;
gc(); gc();
const joinedHeap = process.memoryUsage().heapUsed - heap1;
if (joined.getText('text').length !== 500 * chunk.length) throw new Error('join incomplete');
console.log(`join of a ${mb(bigState.length)} document (500 pasted chunks): ${(joinMs - applyJs).toFixed(1)} ms in the client (frame decode + replica + copy to JS) + ${applyJs.toFixed(1)} ms in Y.applyUpdate; wasm memory grew ${mb(wasmMemory() - mem1)}, the Y.Doc holds ${mb(joinedHeap)} of JS heap`);
console.log(`wasm linear memory now ${mb(wasmMemory())}`);
