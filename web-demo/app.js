// The demo's glue: page events → ChorusDoc (text edits, presence at ≤20 Hz), and ChorusDoc events → the page (text with the caret kept, remote cursors and carets, people, badge).
import init, { ChorusClient } from './pkg/chorus_client.js';

const $ = (id) => document.getElementById(id);

// ---- who and where -------------------------------------------------------------------------
const ADJECTIVES = ['Amber', 'Brisk', 'Calm', 'Dapper', 'Eager', 'Fuzzy', 'Gentle', 'Happy', 'Jolly', 'Keen', 'Lucky', 'Mellow', 'Nimble', 'Plucky', 'Quiet', 'Rapid', 'Sunny', 'Witty'];
const ANIMALS = ['Otter', 'Falcon', 'Panda', 'Lynx', 'Heron', 'Koala', 'Fox', 'Walrus', 'Gecko', 'Bison', 'Puffin', 'Badger', 'Orca', 'Ibis', 'Marmot', 'Yak'];
const COLOURS = ['#e5484d', '#f76b15', '#d6a100', '#30a46c', '#12a594', '#0090ff', '#3e63dd', '#8e4ec6', '#d6409f', '#6d5dfc'];
const pick = (a) => a[Math.floor(Math.random() * a.length)];

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
const demo = { room, me, status: 'connecting', syncedMs: null, peers: [], client: null, doc: null };
window.chorusDemo = demo;

await init();
const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1/ws`;
const client = new ChorusClient(wsUrl, { persist: 'chorus-demo:', minDelayMs: 200, maxDelayMs: 5000 });
const doc = client.open(room);
demo.client = client;
demo.doc = doc;
demo.syncs = []; // replay flag of every synced answer (true: resumed from a saved position)
doc.onSynced(({ replay }) => demo.syncs.push(replay));
// Save the newest state before the page goes away, so a reload resumes from it.
window.addEventListener('pagehide', () => client.flush());

// ---- connection badge ----------------------------------------------------------------------
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
});
client.onError((e) => console.warn('chorus error', e));

// ---- the shared text -----------------------------------------------------------------------
const ta = $('text');
let model = doc.text(); // what the textarea showed after the last sync with the document
ta.value = model;
ta.disabled = false;

// Local typing: diff the textarea against the model (common prefix and suffix) and send the
// middle as one delete + one insert. Works for typing, paste, cut, drag and undo alike.
ta.addEventListener('input', () => {
  const next = ta.value;
  let start = 0;
  const max = Math.min(model.length, next.length);
  while (start < max && model.charCodeAt(start) === next.charCodeAt(start)) start++;
  let endOld = model.length, endNew = next.length;
  while (endOld > start && endNew > start && model.charCodeAt(endOld - 1) === next.charCodeAt(endNew - 1)) { endOld--; endNew--; }
  if (endOld > start) doc.delete(start, endOld - start);
  if (endNew > start) doc.insert(start, next.slice(start, endNew));
  model = next;
  sendCaret();
  renderCarets();
});

// Remote edits arrive as deltas; move the local selection through them so the caret stays
// on the same character, then show the document's text.
// `push`: an insertion exactly at the index moves it right (a collapsed caret is pushed along,
// like in other collaborative editors); without it the index stays left of the insertion
// (the end of a selection does not swallow text typed right after it).
function shift(index, delta, push = true) {
  let at = 0; // position in the text before the change
  let out = index;
  for (const op of delta) {
    if (at > index) break;
    if (op.retain !== undefined) at += op.retain;
    else if (op.delete !== undefined) {
      if (at < index) out -= Math.min(op.delete, index - at);
      at += op.delete;
    } else if (op.insert !== undefined && (at < index || (push && at === index))) {
      out += op.insert.length;
    }
  }
  return out;
}
doc.onChange((delta) => {
  const focused = document.activeElement === ta;
  const { selectionStart: s, selectionEnd: e, selectionDirection: dir, scrollTop } = ta;
  const ns = shift(s, delta), ne = s === e ? ns : shift(e, delta, false);
  model = doc.text();
  ta.value = model;
  ta.scrollTop = scrollTop;
  if (focused) ta.setSelectionRange(ns, ne, dir);
  // Carets of peers sit on the old indexes until their next presence update: move them too.
  for (const p of peers.values()) if (p.caret) { p.caret = { anchor: shift(p.caret.anchor, delta), head: shift(p.caret.head, delta) }; }
  renderCarets();
});

// ---- presence: one state per visitor, sent at most every 50 ms ------------------------------
const local = { name: me.name, colour: me.colour, cursor: null, caret: null };
let presenceDirty = true;
function sendCaret() {
  local.caret = document.activeElement === ta ? { anchor: ta.selectionStart, head: ta.selectionEnd } : null;
  presenceDirty = true;
}
const stage = $('stage');
document.addEventListener('pointermove', (ev) => {
  const r = stage.getBoundingClientRect();
  local.cursor = { x: Math.round(ev.clientX - r.left), y: Math.round(ev.clientY - r.top) };
  presenceDirty = true;
});
document.addEventListener('pointerleave', () => { local.cursor = null; presenceDirty = true; });
document.addEventListener('selectionchange', () => { if (document.activeElement === ta) sendCaret(); });
ta.addEventListener('blur', sendCaret);
ta.addEventListener('keyup', sendCaret);
ta.addEventListener('click', sendCaret);
// Coalesce: pointer events fire at 60–240 Hz; the network sees at most 20 states a second.
setInterval(() => {
  if (!presenceDirty) return;
  presenceDirty = false;
  doc.setPresence(local);
}, 50);

// Peers as the page knows them, keyed by client id, with an interpolated cursor position.
const peers = new Map();
doc.onPresence((list) => {
  const seen = new Set();
  for (const { clientId, state, self } of list) {
    if (self || !state) continue;
    seen.add(clientId);
    let p = peers.get(clientId);
    if (!p) { p = { x: null, y: null }; peers.set(clientId, p); }
    p.name = String(state.name ?? 'someone').slice(0, 40);
    p.colour = /^#[0-9a-f]{6}$/i.test(state.colour) ? state.colour : '#888888';
    p.target = state.cursor && Number.isFinite(state.cursor.x) ? state.cursor : null;
    p.caret = state.caret && Number.isFinite(state.caret.head) ? state.caret : null;
  }
  for (const [id, p] of peers) if (!seen.has(id)) { p.el?.remove(); peers.delete(id); }
  demo.peers = [...peers.values()].map((p) => ({ name: p.name, colour: p.colour, cursor: p.target, caret: p.caret }));
  renderPeople(list);
  renderCarets();
});

function renderPeople(list) {
  const ul = $('people');
  ul.replaceChildren();
  const everyone = list.filter((p) => p.state).sort((a, b) => (b.self - a.self) || String(a.state.name).localeCompare(String(b.state.name)));
  for (const { state, self } of everyone) {
    const li = document.createElement('li');
    const av = document.createElement('span');
    av.className = 'avatar';
    av.style.background = /^#[0-9a-f]{6}$/i.test(state.colour) ? state.colour : '#888';
    av.textContent = String(state.name ?? '?').slice(0, 1);
    const name = document.createElement('span');
    name.textContent = String(state.name ?? 'someone').slice(0, 40);
    li.append(av, name);
    if (self) { const you = document.createElement('span'); you.className = 'you'; you.textContent = 'you'; li.append(you); }
    ul.append(li);
  }
}

// Remote mouse cursors: each frame moves the drawn position a share of the way to the latest
// received one, so 20 Hz updates look like smooth motion.
const cursorLayer = $('cursors');
function cursorEl(p) {
  const el = document.createElement('div');
  el.className = 'cursor';
  el.innerHTML = `<svg width="18" height="22" viewBox="0 0 18 22"><path d="M1 1 L1 17 L5.5 13 L8.5 20 L11.5 18.7 L8.6 12 L15 12 Z" stroke="white" stroke-width="1.5" stroke-linejoin="round"/></svg><span class="label"></span>`;
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
    if (!p.el) p.el = cursorEl(p);
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

// Remote carets in the textarea: a hidden mirror with the same font and wrapping tells where
// an index is drawn.
const mirror = $('mirror');
const caretLayer = $('carets');
function caretXY(index) {
  const text = model.slice(0, index);
  mirror.textContent = text;
  const mark = document.createElement('span');
  mark.textContent = '\u200b';
  mirror.append(mark);
  return { x: mark.offsetLeft + 1, y: mark.offsetTop + 1 - ta.scrollTop, h: mark.offsetHeight || 25 };
}
function renderCarets() {
  caretLayer.replaceChildren();
  mirror.style.width = `${ta.clientWidth + 2}px`;
  for (const p of peers.values()) {
    if (!p.caret) continue;
    const head = Math.min(p.caret.head, model.length);
    const { x, y, h } = caretXY(head);
    if (y < 0 || y > ta.clientHeight) continue;
    const c = document.createElement('div');
    c.className = 'caret';
    c.style.cssText = `left:${x}px;top:${y}px;height:${h}px;background:${p.colour}`;
    const flag = document.createElement('span');
    flag.className = 'flag';
    flag.textContent = p.name;
    flag.style.background = p.colour;
    c.append(flag);
    caretLayer.append(c);
  }
}
ta.addEventListener('scroll', renderCarets);
new ResizeObserver(renderCarets).observe(ta);

// Back online: try at once instead of waiting out the backoff.
window.addEventListener('online', () => client.reconnect());
