// Test driver: a stock Yjs client (yjs + y-websocket) controlled over stdin/stdout by the Rust integration tests
//
// Usage: node ystock.mjs <serverBaseWsUrl> <docName>
//   e.g. node ystock.mjs ws://127.0.0.1:1234/y doc1   -> connects to ws://127.0.0.1:1234/y/doc1
//   (y-websocket builds the URL as serverBaseWsUrl + '/' + docName)
//
// Protocol: newline-delimited JSON on both sides.
//   stdin  (commands): insert, append, delete, text, awareness, peers, state, edit, content, quit
//   (see handleCommand; edit and content reach every root type, see `resolve`)
//   stdout (replies + events): one JSON object per line, nothing else is ever written there.
//   stderr: free-form diagnostics only.
//
// Spontaneous events (may interleave with replies, so readers must filter on "event"):
//   {"event":"ready","clientID":N}                      first line, before connecting
//   {"event":"status","status":"connecting"|"connected"|"disconnected"}
//   {"event":"synced","synced":true}
//   {"event":"text","text":"..."}                        every change of the shared text 't'
//   {"event":"awareness","peers":[{"clientID":N,"state":{...}}, ...]}
//   {"event":"closed","code":N,"reason":"..."}           server closed with a "do not reconnect" code (4400-4499)
//   {"event":"error","message":"..."}                    bad command or uncaught exception

import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'
import readline from 'node:readline'

const [serverUrl, docName] = process.argv.slice(2)
if (!serverUrl || !docName) {
  process.stderr.write('usage: node ystock.mjs <serverBaseWsUrl e.g. ws://127.0.0.1:1234/y> <docName>\n')
  process.exit(2)
}

// ---------------------------------------------------------------------------
// Output: one JSON object per line on stdout. `cb` runs once the line is flushed.
// ---------------------------------------------------------------------------
const emit = (obj, cb) => {
  process.stdout.write(JSON.stringify(obj) + '\n', cb)
}

// If the test closed our stdout there is nobody left to talk to: leave quietly
// (and avoid an error -> uncaughtException -> write -> error loop).
process.stdout.on('error', (err) => {
  process.stderr.write(`ystock: stdout error: ${err.message}\n`)
  process.exit(0)
})

const errorMessage = (err) => (err && err.stack) ? String(err.stack) : String(err)

// Report crashes as events instead of dying silently; keep running so the test
// can still observe / quit the driver.
process.on('uncaughtException', (err) => {
  process.stderr.write(`ystock: uncaught exception: ${errorMessage(err)}\n`)
  emit({ event: 'error', message: String(err && err.message ? err.message : err) })
})
process.on('unhandledRejection', (err) => {
  process.stderr.write(`ystock: unhandled rejection: ${errorMessage(err)}\n`)
  emit({ event: 'error', message: String(err && err.message ? err.message : err) })
})

// ---------------------------------------------------------------------------
// Yjs document + provider
// ---------------------------------------------------------------------------
const doc = new Y.Doc()
const text = doc.getText('t')

emit({ event: 'ready', clientID: doc.clientID })

// Equivalent to { connect: true }, except that we connect only after the
// listeners below are attached, so the initial 'connecting' status is reported.
const provider = new WebsocketProvider(serverUrl, docName, doc, {
  WebSocketPolyfill: WebSocket,
  connect: false
})
const awareness = provider.awareness

// All awareness states except our own, as [{clientID, state}].
const peers = () => {
  const out = []
  awareness.getStates().forEach((state, clientID) => {
    if (clientID !== doc.clientID) out.push({ clientID, state })
  })
  return out
}

provider.on('status', ({ status }) => emit({ event: 'status', status }))
provider.on('sync', (synced) => {
  if (synced) emit({ event: 'synced', synced: true })
})
provider.on('closed', ({ code, reason }) => emit({ event: 'closed', code, reason }))
provider.on('connection-error', (ev) => {
  process.stderr.write(`ystock: connection error: ${ev && ev.message ? ev.message : 'unknown'}\n`)
})
text.observe(() => emit({ event: 'text', text: text.toString() }))
awareness.on('change', () => emit({ event: 'awareness', peers: peers() }))

process.stderr.write(`ystock: clientID ${doc.clientID} connecting to ${provider.url}\n`)
provider.connect()

// ---------------------------------------------------------------------------
// Shutdown: destroy the provider (which sends an awareness "left" message and
// closes the socket), then exit 0 once `finalLine` is flushed and the socket has
// closed (or after a short grace period).
// ---------------------------------------------------------------------------
let shuttingDown = false
const shutdown = (finalLine) => {
  if (shuttingDown) return
  shuttingDown = true
  const socket = provider.ws // grab before destroy() drops the reference
  provider.destroy()
  let exited = false
  const exit = () => {
    if (exited) return
    exited = true
    process.exit(0)
  }
  const afterFlush = () => {
    if (socket && socket.readyState !== WebSocket.CLOSED) {
      socket.once('close', exit)
      setTimeout(exit, 1000).unref()
    } else {
      exit()
    }
  }
  if (finalLine) emit(finalLine, afterFlush)
  else afterFlush()
}

// ---------------------------------------------------------------------------
// Every root type: `edit` applies a list of ops in one transaction, `content` reads roots.
// A target is {root, type: text|map|array|xml, path: [key or index, ...]}: the root by name
// and type, then nested types inside it by map key or array index.
// ---------------------------------------------------------------------------
const rootOf = (name, type) => {
  switch (type) {
    case 'text': return doc.getText(name)
    case 'map': return doc.getMap(name)
    case 'array': return doc.getArray(name)
    case 'xml': return doc.getXmlFragment(name)
    default: throw new Error(`unknown root type ${type}`)
  }
}
const resolve = (op) => {
  let node = rootOf(op.root, op.type)
  for (const step of op.path || []) {
    node = node.get(step)
    if (node === undefined) throw new Error(`no ${step} on the path ${JSON.stringify(op.path)}`)
  }
  return node
}
// A value to insert: plain JSON, or {"$type": "map"|"array"|"text"|"element", ...} for a
// nested shared type (with its initial content).
const valueOf = (v) => {
  if (v === null || typeof v !== 'object' || !v.$type) return v
  switch (v.$type) {
    case 'map': { const m = new Y.Map(); for (const [k, x] of Object.entries(v.entries || {})) m.set(k, valueOf(x)); return m }
    case 'array': { const a = new Y.Array(); a.push((v.items || []).map(valueOf)); return a }
    case 'text': { const t = new Y.Text(); t.insert(0, v.text || ''); return t }
    case 'element': { const e = new Y.XmlElement(v.name); for (const [k, x] of Object.entries(v.attrs || {})) e.setAttribute(k, x); if (v.text) e.insert(0, [new Y.XmlText(v.text)]); return e }
    default: throw new Error(`unknown $type ${v.$type}`)
  }
}
const applyOp = (op) => {
  const node = resolve(op)
  switch (op.op) {
    case 'insert':
      if (node instanceof Y.Text) node.insert(op.index, op.text, op.attrs || undefined)
      else node.insert(op.index, op.values.map(valueOf))
      break
    case 'delete': node.delete(op.index, op.len); break
    case 'format': node.format(op.index, op.len, op.attrs); break
    case 'set': node.set(op.key, valueOf(op.value)); break
    case 'unset': node.delete(op.key); break
    default: throw new Error(`unknown op ${op.op}`)
  }
}
const contentOf = (name, type) => {
  const root = rootOf(name, type)
  if (type === 'text') return root.toDelta()
  if (type === 'xml') return root.toString()
  return root.toJSON()
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------
const handleCommand = (msg) => {
  switch (msg.cmd) {
    case 'insert':
      text.insert(msg.index, String(msg.text))
      emit({ ok: 'insert' })
      break
    case 'append':
      // Index and insert in one step: an index read with `text` first may be stale by the
      // time `insert` runs (remote updates arrive in between) and land inside another insert.
      text.insert(text.length, String(msg.text))
      emit({ ok: 'append' })
      break
    case 'delete':
      text.delete(msg.index, msg.len)
      emit({ ok: 'delete' })
      break
    case 'text':
      emit({ text: text.toString() })
      break
    case 'awareness':
      awareness.setLocalState(msg.state === undefined ? null : msg.state)
      emit({ ok: 'awareness' })
      break
    case 'peers':
      emit({ peers: peers() })
      break
    case 'state':
      emit({ update: Buffer.from(Y.encodeStateAsUpdate(doc)).toString('base64') })
      break
    case 'edit':
      doc.transact(() => msg.ops.forEach(applyOp))
      emit({ ok: 'edit' })
      break
    case 'content': {
      const out = {}
      for (const [name, type] of Object.entries(msg.roots)) out[name] = contentOf(name, type)
      emit({ content: out })
      break
    }
    case 'quit':
      shutdown({ ok: 'quit' })
      break
    default:
      emit({ event: 'error', message: `unknown command: ${JSON.stringify(msg.cmd)}` })
  }
}

const rl = readline.createInterface({ input: process.stdin, terminal: false })
rl.on('line', (line) => {
  if (shuttingDown || line.trim() === '') return
  let msg
  try {
    msg = JSON.parse(line)
  } catch (err) {
    emit({ event: 'error', message: `invalid JSON command: ${err.message}` })
    return
  }
  try {
    handleCommand(msg)
  } catch (err) {
    process.stderr.write(`ystock: command failed: ${errorMessage(err)}\n`)
    emit({ event: 'error', message: String(err && err.message ? err.message : err) })
  }
})
// stdin closed (test dropped the pipe): leave cleanly with exit code 0.
rl.on('close', () => shutdown(null))
