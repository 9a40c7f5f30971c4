// The demo's glue (bundled by esbuild into dist/app.js): CodeMirror 6 ⇄ Y.Doc (y-codemirror.next) ⇄ ChorusProvider ⇄ the wasm ChorusClient; awareness → people list, remote carets, mouse cursors, badge and saved indicator.
import init, { ChorusClient } from '../pkg/chorus_client.js';
import { ChorusProvider } from '../pkg/chorus-provider.js';
import * as Y from 'yjs';
import { Awareness } from 'y-protocols/awareness';
import { yCollab, yUndoManagerKeymap } from 'y-codemirror.next';
import { EditorView, keymap, lineNumbers, drawSelection, highlightActiveLine, highlightActiveLineGutter, placeholder } from '@codemirror/view';
import { EditorState } from '@codemirror/state';
import { defaultKeymap, indentWithTab } from '@codemirror/commands';

const $ = (id) => document.getElementById(id);

// ---- who and where -------------------------------------------------------------------------
const ADJECTIVES = ['Amber', 'Brisk', 'Calm', 'Dapper', 'Eager', 'Fuzzy', 'Gentle', 'Happy', 'Jolly', 'Keen', 'Lucky', 'Mellow', 'Nimble', 'Plucky', 'Quiet', 'Rapid', 'Sunny', 'Witty'];
const ANIMALS = ['Otter', 'Falcon', 'Panda', 'Lynx', 'Heron', 'Koala', 'Fox', 'Walrus', 'Gecko', 'Bison', 'Puffin', 'Badger', 'Orca', 'Ibis', 'Marmot', 'Yak'];
const COLOURS = ['#e5484d', '#f76b15', '#d6a100', '#30a46c', '#12a594', '#0090ff', '#3e63dd', '#8e4ec6', '#d6409f', '#6d5dfc'];
const pick = (a) => a[Math.floor(Math.random() * a.length)];
const colourOf = (c) => (/^#[0-9a-f]{6}$/i.test(c) ? c : '#888888');
const nameOf = (n) => String(n ?? 'someone').slice(0, 40);

// One identity per tab (sessionStorage), kept across reloads of that tab.
function identity() {
  const saved = sessionStorage.getItem('chorus-demo:me');
  if (saved) { try { return JSON.parse(saved); } catch { /* fall through */ } }
  const me = { name: `${pick(ADJECTIVES)} ${pick(ANIMALS)}`, colour: pick(COLOURS) };
  sessionStorage.setItem('chorus-demo:me', JSON.stringify(me));
  return me;
}

// The room comes from ?room=… or #…; without one, make one up and put it in the URL to share.
function roomName() {
  const q = new URLSearchParams(location.search).get('room');
  const h = decodeURIComponent(location.hash.slice(1));
  const clean = (s) => (s || '').replace(/[^A-Za-z0-9\-_.~:@]/g, '').replace(/^\.+/, '').slice(0, 200);
  let room = clean(q) || clean(h);
  if (!room) {
    room = `room-${Math.random().toString(36).slice(2, 8)}`;
    const url = new URL(location.href);
    url.searchParams.set('room', room);
    url.hash = '';
    history.replaceState(null, '', url);
  }
  return room;
}

const me = identity();
const room = roomName();
$('room-name').textContent = room;
$('me-name').textContent = me.name;
$('me-name').style.color = me.colour;
document.title = `Chorus — ${room}`;
$('share').addEventListener('click', async () => {
  try { await navigator.clipboard.writeText(location.href); $('share').textContent = 'Copied!'; }
  catch { $('share').textContent = location.href; }
  setTimeout(() => { $('share').textContent = 'Copy link'; }, 1500);
});

// Test and console hook: the live objects and a few facts about this page.
const demo = { room, me, status: 'connecting', syncedMs: null, syncs: [], saved: true, peers: [] };
window.chorusDemo = demo;

// ---- the client, the Y.Doc and the provider ------------------------------------------------
await init();
const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1/ws`;
// `persist`: position, state and unacknowledged edits survive a reload (localStorage).
const client = new ChorusClient(wsUrl, { persist: 'chorus-demo:', minDelayMs: 200, maxDelayMs: 5000 });
const ydoc = new Y.Doc();
const awareness = new Awareness(ydoc);
// `user` is what y-codemirror.next draws on remote carets; `pointer` is the mouse cursor.
awareness.setLocalState({ user: { name: me.name, color: me.colour, colorLight: `${me.colour}33` }, pointer: null });
const provider = new ChorusProvider(client, room, ydoc, { awareness });
const ytext = ydoc.getText('text'); // the same shared text the client's text API uses
Object.assign(demo, { client, ydoc, awareness, provider, doc: provider.chorusDoc });

provider.on('synced', (synced, { replay }) => { if (synced) demo.syncs.push(replay); });

// ---- connection badge and saved indicator --------------------------------------------------
let countdown = null;
client.onStatus((s) => {
  demo.status = s.state;
  const badge = $('badge');
  badge.className = `badge ${s.state}`;
  badge.dataset.state = s.state;
  clearInterval(countdown);
  const text = $('badge-text');
  if (s.state === 'reconnecting') {
    const until = performance.now() + s.inMs;
    const tick = () => {
      const left = Math.max(0, until - performance.now());
      text.textContent = `offline · retrying in ${(left / 1000).toFixed(1)} s`;
    };
    tick();
    countdown = setInterval(tick, 100);
  } else {
    text.textContent = { connecting: 'connecting…', connected: 'syncing…', synced: 'live', offline: `offline (${s.reason})` }[s.state] || s.state;
  }
  if (s.state === 'synced' && demo.syncedMs === null) {
    // performance.now() counts from navigation start: this is page load → synced.
    demo.syncedMs = Math.round(performance.now());
    $('metrics').textContent = `page load → synced in ${demo.syncedMs} ms`;
  }
  renderSaved();
});
client.onError((e) => console.warn('chorus error', e));

function renderSaved() {
  const el = $('saved');
  const saved = provider.saved;
  demo.saved = saved;
  const online = provider.status === 'connected';
  const state = saved ? 'saved' : online ? 'saving' : 'unsaved';
  el.dataset.state = state;
  el.className = `save-state ${state}`;
  el.textContent = { saved: 'All changes saved', saving: 'Saving…', unsaved: 'Unsaved · kept on this device' }[state];
  el.title = saved ? 'The server has acknowledged every change' : `${provider.pendingUpdates} change(s) waiting for the server`;
}
provider.on('saved', renderSaved);
provider.on('status', renderSaved);
renderSaved();

// ---- the editor ----------------------------------------------------------------------------
const theme = EditorView.theme({
  '&': { height: '100%', fontSize: '15px' },
  '.cm-scroller': { fontFamily: 'var(--mono)', lineHeight: '1.65' },
  '.cm-content': { padding: '16px 0' },
  '.cm-line': { padding: '0 20px 0 12px' },
  '.cm-gutters': { background: 'transparent', border: 'none', color: '#b7b3cc' },
  '.cm-activeLineGutter': { background: 'transparent', color: 'var(--ink)' },
  '.cm-activeLine': { background: 'rgba(109, 93, 252, .05)' },
  '&.cm-focused': { outline: 'none' },
  // Remote carets: a name flag always shown (y-codemirror.next only shows it on hover).
  '.cm-ySelectionCaret': { borderLeftWidth: '1px', borderRightWidth: '1px' },
  '.cm-ySelectionInfo': {
    opacity: '1', top: '-1.45em', left: '-1px', fontFamily: 'system-ui, sans-serif', fontWeight: '600',
    fontSize: '11px', lineHeight: '1', padding: '3px 5px', borderRadius: '4px 4px 4px 0',
  },
  '.cm-ySelectionCaretDot': { display: 'none' },
});
const view = new EditorView({
  parent: $('editor'),
  state: EditorState.create({
    doc: ytext.toString(),
    extensions: [
      lineNumbers(),
      highlightActiveLine(),
      highlightActiveLineGutter(),
      drawSelection(),
      EditorView.lineWrapping,
      placeholder('Type here — everyone in this room sees it live.'),
      keymap.of([...yUndoManagerKeymap, ...defaultKeymap, indentWithTab]),
      yCollab(ytext, awareness),
      theme,
    ],
  }),
});
demo.view = view;
demo.text = () => view.state.doc.toString();

// ---- people and mouse cursors, from the awareness ------------------------------------------
const peers = new Map(); // awareness client id → { name, colour, target, x, y, el }
function onAwareness() {
  const seen = new Set();
  const everyone = [];
  for (const [id, state] of awareness.getStates()) {
    const user = state?.user;
    if (!user) continue;
    const self = id === awareness.clientID;
    everyone.push({ name: nameOf(user.name), colour: colourOf(user.color), self });
    if (self) continue;
    seen.add(id);
    let p = peers.get(id);
    if (!p) { p = { x: null, y: null }; peers.set(id, p); }
    p.name = nameOf(user.name);
    p.colour = colourOf(user.color);
    const t = state.pointer;
    p.target = t && Number.isFinite(t.x) && Number.isFinite(t.y) ? t : null;
  }
  for (const [id, p] of peers) if (!seen.has(id)) { p.el?.remove(); peers.delete(id); }
  demo.peers = [...peers.values()].map((p) => ({ name: p.name, colour: p.colour, pointer: p.target }));
  renderPeople(everyone);
}
awareness.on('change', onAwareness);
onAwareness();

let peopleKey = '';
function renderPeople(everyone) {
  everyone.sort((a, b) => (b.self - a.self) || a.name.localeCompare(b.name));
  // Awareness changes with every pointer move; rebuild the list (and replay its arrival
  // animation) only when who is here changed.
  const key = JSON.stringify(everyone);
  if (key === peopleKey) return;
  peopleKey = key;
  const ul = $('people');
  ul.replaceChildren();
  for (const { name, colour, self } of everyone) {
    const li = document.createElement('li');
    const av = document.createElement('span');
    av.className = 'avatar';
    av.style.background = colour;
    av.textContent = name.slice(0, 1);
    const label = document.createElement('span');
    label.textContent = name;
    li.append(av, label);
    if (self) { const you = document.createElement('span'); you.className = 'you'; you.textContent = 'you'; li.append(you); }
    ul.append(li);
  }
}

// My pointer, relative to the main area (same layout on every page). The provider sends at most
// 20 states a second however fast pointer events fire.
const stage = $('stage');
document.addEventListener('pointermove', (ev) => {
  const r = stage.getBoundingClientRect();
  awareness.setLocalStateField('pointer', { x: Math.round(ev.clientX - r.left), y: Math.round(ev.clientY - r.top) });
});
document.documentElement.addEventListener('pointerleave', () => awareness.setLocalStateField('pointer', null));

// Remote mouse cursors: each frame moves the drawn position a share of the way to the latest
// received one, so 20 Hz updates look like smooth motion.
const cursorLayer = $('cursors');
function cursorEl() {
  const el = document.createElement('div');
  el.className = 'cursor';
  el.innerHTML = '<svg width="18" height="22" viewBox="0 0 18 22"><path d="M1 1 L1 17 L5.5 13 L8.5 20 L11.5 18.7 L8.6 12 L15 12 Z" stroke="white" stroke-width="1.5" stroke-linejoin="round"/></svg><span class="label"></span>';
  cursorLayer.append(el);
  return el;
}
let last = performance.now();
function frame(now) {
  const dt = Math.min(100, now - last);
  last = now;
  const k = 1 - Math.exp(-dt / 45);
  const r = stage.getBoundingClientRect();
  for (const p of peers.values()) {
    if (!p.el) p.el = cursorEl();
    p.el.querySelector('path').setAttribute('fill', p.colour);
    const label = p.el.querySelector('.label');
    label.textContent = p.name;
    label.style.background = p.colour;
    if (!p.target) { p.el.style.opacity = '0'; continue; }
    if (p.x === null) { p.x = p.target.x; p.y = p.target.y; }
    p.x += (p.target.x - p.x) * k;
    p.y += (p.target.y - p.y) * k;
    p.el.style.opacity = '1';
    p.el.style.transform = `translate(${r.left + p.x}px, ${r.top + p.y}px)`;
  }
  requestAnimationFrame(frame);
}
requestAnimationFrame(frame);
