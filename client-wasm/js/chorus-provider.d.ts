// Types of chorus-provider.js, the bridge between a stock Yjs Y.Doc (+ y-protocols Awareness) and one document of a ChorusClient.
import type * as Y from 'yjs';
import type { Awareness } from 'y-protocols/awareness';
import type { ObservableV2 } from 'lib0/observable';
import type { ChorusClient, ChorusDoc } from './chorus_client.js';

export interface ChorusProviderOptions {
  /** The awareness an editor binding reads (y-codemirror.next, y-prosemirror); a new one by default. */
  awareness?: Awareness;
  /** Least time between two presence sends of this document (ms, default 50: ≤ 20 states a second). */
  presenceIntervalMs?: number;
}

export type ChorusProviderStatus = 'connecting' | 'connected' | 'disconnected';

export interface ChorusProviderEvents {
  /** The document is (or stopped being) up to date with the server. `replay`: resumed from the saved position. */
  synced: (synced: boolean, info: { replay: boolean }) => void;
  /** Same as `synced` (y-websocket's name). */
  sync: (synced: boolean, info: { replay: boolean }) => void;
  /** The shared socket's state; `state` is the client's own (`synced`, `reconnecting`, `offline`, ...). */
  status: (event: { status: ChorusProviderStatus; state: string }) => void;
  /** `true` once the server acknowledged every local change, `false` as soon as one is waiting. */
  saved: (saved: boolean) => void;
}

/**
 * Syncs `ydoc` through `client` as document `name`. Many providers may share one client (one socket).
 * With the client's `persist` option a reload resumes by position and re-sends unacknowledged edits.
 */
export declare class ChorusProvider extends ObservableV2<ChorusProviderEvents> {
  constructor(client: ChorusClient, name: string, ydoc: Y.Doc, options?: ChorusProviderOptions);
  readonly client: ChorusClient;
  readonly name: string;
  readonly doc: Y.Doc;
  readonly awareness: Awareness;
  /** The client's handle of this document (presence list, raw text API). */
  readonly chorusDoc: ChorusDoc;
  readonly synced: boolean;
  readonly saved: boolean;
  readonly status: ChorusProviderStatus;
  /** Local updates the server has not acknowledged yet. */
  readonly pendingUpdates: number;
  /** Unsubscribes the document (the server removes this client's presence) and drops peers from the awareness. */
  destroy(): void;
}
