// Benchmark (not a test; data-flow step 3 under a join storm): C stock-protocol clients join a
// document of about MB megabytes at once (y-websocket sync step 1 with an empty state vector)
// and wait for the whole document. Prints p50/max time to the whole document and the server's
// peak RSS growth (VmHWM, so run it on a fresh server process).
//
// Usage (from tests/js, against a running chorus with raised limits, e.g.
// CHORUS_MAX_CONNECTIONS_PER_IP=0 CHORUS_MAX_API_REQUESTS_PER_SECOND=0
// CHORUS_MAX_UPDATE_BYTES=67108864 CHORUS_MAX_MESSAGE_BYTES=67108864):
//   node bench-joinstorm.mjs PORT SERVER_PID C MB
import * as Y from 'yjs'
import WebSocket from 'ws'
import fs from 'node:fs'
const [port, pid, C, MB] = process.argv.slice(2).map(Number)
const rss = () => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))[1])
const hwm = () => Number(/VmHWM:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))[1])
const doc = new Y.Doc()
const t = doc.getText('t')
const chunk = 'abcdefghij'.repeat(10000)
for (let i = 0; i < MB * 10; i++) t.insert(t.length, chunk)
const update = Y.encodeStateAsUpdate(doc)
const res = await fetch(`http://127.0.0.1:${port}/v1/docs/storm/updates`, { method: 'POST', body: update })
if (res.status !== 200) { console.error('post', res.status, await res.text()); process.exit(1) }
await new Promise(r => setTimeout(r, 500))
const before = rss()
const started = performance.now()
const times = []
await Promise.all(Array.from({ length: C }, () => new Promise((resolve, reject) => {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/y/storm`)
  ws.binaryType = 'nodebuffer'
  ws.on('open', () => ws.send(Buffer.from([0, 0, 1, 0])))
  ws.on('message', (m) => {
    if (m[0] === 0 && m[1] === 1 && m.length >= update.length) { times.push(performance.now() - started); ws.close(); resolve() }
  })
  ws.on('error', reject)
})))
times.sort((a, b) => a - b)
console.log(JSON.stringify({ joiners: C, doc_bytes: update.length, p50_ms: Math.round(times[C >> 1]), max_ms: Math.round(times[C - 1]), rss_before_mb: Math.round(before / 1024), peak_growth_mb: Math.round((hwm() - before) / 1024) }))
process.exit(0)
