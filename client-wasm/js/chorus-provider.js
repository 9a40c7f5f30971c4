// Between a stock Yjs `Y.Doc` (an editor binding's document) and one document of a ChorusClient: Y.Doc updates → client → server, server updates → Y.Doc, y-protocols Awareness ⇄ client presence.
//
// Usage (ES module, shipped next to the wasm package as pkg/chorus-provider.js):
//
//   const client = new ChorusClient('wss://host/v1/ws', { persist: true, tokenProvider });
//   const provider = new ChorusProvider(client, 'my-doc', ydoc, { awareness });
//   provider.on('synced', (synced, { replay }) => ...);
//   provider.on('saved', (saved) => ...);       // true once the server acknowledged every local change
//
// ## Why the wasm client keeps its own yrs replica of a bound document
//
// The provider could instead make the client a pure relay (bytes in, bytes out, no yrs document on
// the wasm side). It does not, because the replica is what makes the client's guarantees hold
// without the application's help:
//   - a (re)subscription carries the replica's state vector, so a resume that cannot be a replay
//     (trimmed log, new epoch) is an exact diff, and the session re-uploads its whole state when the
//     server's log was lost (`synced` with `replay: false` after a position) — a relay would have to
//     call back into JS for both, at moments (socket open) where the Y.Doc may be mid-transaction;
//   - persistence (`persist` option) writes position, state and unacknowledged updates as one record,
//     so a reload resumes by replay and re-sends exactly the edits the server never acknowledged;
//     a relay would split that record between wasm (position, pending) and JS (state), and a crash
//     between the two writes would resume from a position the stored state does not reach;
//   - documents opened without a Y.Doc (the client's own text API, presence-only rooms) keep working
//     the same way, through one code path.
// What it costs, measured with `node --expose-gc tests/browser/bench-replica.mjs` (the real wasm
// package in node 20 against a scripted server, on the shared 2-core build machine; ranges over
// four runs). Trace: 20,000 keystrokes, one update each as an editor makes them (15,660
// characters, 85 KB final state):
//   - CPU per keystroke: Yjs itself takes 11–22 µs to make one in the editor's Y.Doc and 7–12 µs
//     to apply one; the client takes 9–15 µs to take a local one through the replica (apply,
//     queue, frame, ack) and 13–18 µs for a remote one from frame to Y.Doc. Most of that (frame,
//     seq, ack, position) a relay would pay too; at 60 keystrokes a second it is < 0.1% of a core.
//   - memory: the replica grew wasm memory by 0.79 MB for that trace (64 KiB pages, so rounded
//     up), against 0.17–0.41 MB of JS heap for the Y.Doc. For a 2.25 MB document joined in one
//     answer, wasm memory grew 6.9 MB (the frame, the decoded update and the document coexist
//     during the apply; wasm memory never shrinks) against 2.1 MB of JS heap for the Y.Doc, and
//     the join took 7–13 ms in the client plus 2 ms in Y.applyUpdate.
// So the replica costs little CPU and about three times the document's size in wasm memory. For
// the documents editors hold (kilobytes to a few megabytes) that buys the guarantees above; an
// application that binds tens of megabytes would want a relay mode (not built). One saving was
// made from these figures: the client no longer builds text deltas for documents nobody reads
// them from (`onChange` turns them on); before, every update was also turned into a delta,
// which tripled the per-keystroke cost (30 µs) and made the 2.25 MB join peak at 11.5 MB.
//
// Echoes: updates the provider applies to the Y.Doc carry the provider as transaction origin, and
// the Y.Doc 'update' listener skips that origin, so server updates are never sent back. Updates
// the provider sends are never echoed by the server either (it answers them with an `ack`).
import * as Y from 'yjs';
import { Awareness, removeAwarenessStates } from 'y-protocols/awareness';
import { ObservableV2 } from 'lib0/observable';

/** How often remote awareness states are marked fresh (see `_renewRemote`). */
const RENEW_MS = 5_000;

/** Whether a v1 update changes nothing (no structs, no deletions). */
function isEmptyUpdate(update) {
  if (update.length <= 2) return true;
  const { structs, ds } = Y.decodeUpdate(update);
  return structs.length === 0 && ds.clients.size === 0;
}

/** The client's connection state, in the vocabulary of y-websocket's `status` event. */
function linkOf(state) {
  switch (state) {
    case 'connected':
    case 'synced':
      return 'connected';
    case 'connecting':
      return 'connecting';
    default:
      return 'disconnected';
  }
}

export class ChorusProvider extends ObservableV2 {
  /**
   * @param {import('./chorus_client.js').ChorusClient} client one client (one socket) may carry many providers
   * @param {string} name the document id on the server
   * @param {Y.Doc} ydoc
   * @param {{ awareness?: Awareness, presenceIntervalMs?: number }} [options]
   */
  constructor(client, name, ydoc, { awareness = new Awareness(ydoc), presenceIntervalMs = 50 } = {}) {
    super();
    this.client = client;
    this.name = name;
    this.doc = ydoc;
    this.awareness = awareness;
    this.presenceIntervalMs = presenceIntervalMs;
    this.synced = false;
    this.saved = true;
    this.status = 'connecting';
    this._destroyed = false;
    /** Peers' awareness client ids this provider put into `awareness`. */
    this._remote = new Set();
    this._presenceTimer = null;
    this._lastPresenceAt = -Infinity;

    this.chorusDoc = client.open(name);

    // 1. What the client already holds (persisted from an earlier page) goes into the Y.Doc first,
    //    then whatever the Y.Doc holds beyond it goes out as one local update.
    const held = this.chorusDoc.encodeState();
    if (!isEmptyUpdate(held)) Y.applyUpdate(ydoc, held, this);
    const missing = Y.encodeStateAsUpdate(ydoc, Y.encodeStateVectorFromUpdate(held));
    if (!isEmptyUpdate(missing)) this.chorusDoc.applyUpdate(missing);

    // 2. Local changes out, server changes in.
    this._onDocUpdate = (update, origin) => {
      if (origin === this || this._destroyed) return;
      this.chorusDoc.applyUpdate(update);
    };
    ydoc.on('update', this._onDocUpdate);
    this.chorusDoc.onRemoteUpdate((update) => {
      if (!this._destroyed) Y.applyUpdate(ydoc, update, this);
    });

    // 3. Sync state, connection status, saved state.
    this.chorusDoc.onSynced(({ replay }) => {
      if (this._destroyed) return;
      this._setSynced(true, replay);
    });
    // The client has no way to unregister a status listener: after destroy() it stays, inert.
    client.onStatus((s) => {
      if (this._destroyed) return;
      const status = linkOf(s.state);
      if (status !== 'connected') this._setSynced(false, false);
      if (status !== this.status) {
        this.status = status;
        this.emit('status', [{ status, state: s.state }]);
      }
    });
    this.chorusDoc.onPending((pending) => {
      if (this._destroyed) return;
      const saved = pending === 0;
      if (saved !== this.saved) {
        this.saved = saved;
        this.emit('saved', [saved]);
      }
    });
    this.saved = this.chorusDoc.pendingUpdates === 0;
    if (this.chorusDoc.synced) this._setSynced(true, false);

    // 4. Presence: my awareness state out (throttled), peers' presence into the awareness.
    this._onAwarenessUpdate = ({ added, updated, removed }, origin) => {
      if (origin === this) return;
      const me = awareness.clientID;
      if (added.includes(me) || updated.includes(me) || removed.includes(me)) this._schedulePresence();
    };
    awareness.on('update', this._onAwarenessUpdate);
    this.chorusDoc.onPresence((list, change) => this._applyPresence(list, change));
    if (awareness.getLocalState() !== null) this._schedulePresence();
    // The Awareness drops a remote state it has not heard from in 30 s. A Chorus peer is removed by
    // the server when it leaves (or its node dies), and an unchanged state is not re-sent, so the
    // client's presence list is the truth: keep every state it holds fresh.
    this._renew = setInterval(() => this._renewRemote(), RENEW_MS);

    // 5. A reload must not lose what the server has not acknowledged: write the client's
    //    persisted copy now rather than after its debounce (no-op without the `persist` option).
    this._onPageHide = () => client.flush();
    if (typeof window !== 'undefined') window.addEventListener('pagehide', this._onPageHide);
  }

  /** Local updates the server has not acknowledged yet. */
  get pendingUpdates() {
    return this.chorusDoc.pendingUpdates;
  }

  _setSynced(synced, replay) {
    if (synced === this.synced && !synced) return;
    this.synced = synced;
    // y-websocket emits both names; editors and apps listen to either.
    this.emit('synced', [synced, { replay }]);
    this.emit('sync', [synced, { replay }]);
  }

  _schedulePresence() {
    if (this._presenceTimer !== null || this._destroyed) return;
    // Leading edge at once, then at most one send per interval: pointer moves and selections fire
    // far faster than anyone can see, and the newest state is all a peer needs.
    const wait = Math.max(0, this._lastPresenceAt + this.presenceIntervalMs - performance.now());
    this._presenceTimer = setTimeout(() => {
      this._presenceTimer = null;
      if (this._destroyed) return;
      this._lastPresenceAt = performance.now();
      this.chorusDoc.setPresence(this.awareness.getLocalState());
    }, wait);
  }

  _applyPresence(list, { added, updated, removed }) {
    if (this._destroyed) return;
    const awareness = this.awareness;
    const byId = new Map(list.map((p) => [p.clientId, p.state]));
    const now = Date.now();
    const out = { added: [], updated: [], removed: [] };
    const put = (id, into) => {
      const state = byId.get(id);
      // An id equal to my own awareness id would overwrite my state; peers never use it.
      if (state == null || id === awareness.clientID) return;
      const meta = awareness.meta.get(id);
      awareness.meta.set(id, { clock: (meta?.clock ?? 0) + 1, lastUpdated: now });
      awareness.states.set(id, state);
      this._remote.add(id);
      into.push(id);
    };
    for (const id of added) put(id, this._remote.has(id) ? out.updated : out.added);
    for (const id of updated) put(id, out.updated);
    const gone = removed.filter((id) => this._remote.delete(id));
    if (gone.length) {
      // The y-protocols helper bumps the clocks and emits 'change'/'update' itself.
      removeAwarenessStates(awareness, gone, this);
    }
    if (out.added.length || out.updated.length) {
      awareness.emit('change', [out, this]);
      awareness.emit('update', [out, this]);
    }
  }

  _renewRemote() {
    const now = Date.now();
    for (const id of this._remote) {
      const meta = this.awareness.meta.get(id);
      if (meta) meta.lastUpdated = now;
    }
  }

  /** Stops syncing: unsubscribes the document (the server removes my presence there) and drops peers from the awareness. */
  destroy() {
    if (this._destroyed) return;
    this._destroyed = true;
    clearInterval(this._renew);
    clearTimeout(this._presenceTimer);
    this.doc.off('update', this._onDocUpdate);
    this.awareness.off('update', this._onAwarenessUpdate);
    if (typeof window !== 'undefined') window.removeEventListener('pagehide', this._onPageHide);
    // Persist before closing, so unacknowledged edits are kept for the next page.
    this.client.flush();
    this.chorusDoc.close();
    const peers = [...this._remote];
    this._remote.clear();
    if (peers.length) removeAwarenessStates(this.awareness, peers, this);
    super.destroy();
  }
}
