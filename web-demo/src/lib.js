// A one-file library bundle (dist/lib.js) for pages without a bundler, and for the browser tests: the wasm client's init and ChorusClient, ChorusProvider, and the Yjs it binds to (one copy).
export { default as init, ChorusClient } from '../pkg/chorus_client.js';
export { ChorusProvider } from '../pkg/chorus-provider.js';
export * as Y from 'yjs';
export { Awareness } from 'y-protocols/awareness';
