//! The browser face: a wasm-bindgen API (`ChorusClient`, `ChorusDoc`) that drives the sans-IO session with a WebSocket, timers and localStorage.
//!
//! Everything runs on the page's single thread. The session sits in an `Rc<RefCell<_>>`
//! shared by the socket handlers, timers and the JS-facing handles; JS callbacks are only
//! ever called after that borrow is released (`pump`), so a callback may call back into the
//! client (e.g. type in reaction to a change) without a double borrow.

use crate::session::{CloseDecision, Event, Session, SessionConfig, Status};
use js_sys::{Array, Function, JSON, Object, Promise, Reflect, Uint8Array};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use web_sys::{BinaryType, CloseEvent, MessageEvent, WebSocket};

type Shared = Rc<RefCell<Inner>>;

/// How long persistence waits after a change before writing localStorage (typing bursts are
/// written once, not per keystroke).
const PERSIST_DEBOUNCE_MS: i32 = 250;

#[derive(Default)]
struct DocListeners {
    change: Vec<Function>,
    remote_update: Vec<Function>,
    presence: Vec<Function>,
    synced: Vec<Function>,
    pending: Vec<Function>,
    /// The unacknowledged-update count last reported to `pending` listeners.
    last_pending: usize,
}

/// The closures of the current socket, kept alive as long as it may call them.
struct SocketHandlers {
    _open: Closure<dyn FnMut()>,
    _message: Closure<dyn FnMut(MessageEvent)>,
    _close: Closure<dyn FnMut(CloseEvent)>,
}

struct Inner {
    session: Session,
    url: String,
    token: Option<String>,
    token_provider: Option<Function>,
    ws: Option<WebSocket>,
    handlers: Option<SocketHandlers>,
    /// Bumped per socket, so events of a replaced socket are ignored.
    generation: u64,
    status: JsValue,
    status_listeners: Vec<Function>,
    error_listeners: Vec<Function>,
    docs: HashMap<String, DocListeners>,
    storage_prefix: Option<String>,
    dirty: BTreeSet<String>,
    persist_scheduled: bool,
    /// The server warned that the token expires: ask the provider for a fresh one.
    refresh_due: bool,
    /// The window's `online`/`offline` listeners, removed by `close()`.
    network: Option<NetworkHandlers>,
}

/// Follows the browser's network state: `offline` drops the socket at once (a socket across a
/// lost network is usually dead, and the browser may take minutes to notice; until the close,
/// edits would sit in its send buffer looking sent), `online` reconnects without waiting out
/// the backoff. Edits made meanwhile stay pending and are resent on the next socket.
struct NetworkHandlers {
    online: Closure<dyn FnMut()>,
    offline: Closure<dyn FnMut()>,
}

/// A connection to a Chorus server (`ws://host/v1/ws`), carrying any number of documents.
///
/// ```js
/// const client = new ChorusClient("ws://localhost:8080/v1/ws", { tokenProvider: async () => fetchToken() });
/// client.onStatus(s => console.log(s.state, s.inMs));
/// const doc = client.open("my-room");
/// doc.onChange(delta => console.log(delta)); // [{retain: 3}, {insert: "x"}, {delete: 1}]
/// doc.insert(0, "hello");
/// ```
#[wasm_bindgen]
pub struct ChorusClient {
    inner: Shared,
}

/// One open document of a `ChorusClient`: its shared text, raw updates, and presence.
#[wasm_bindgen]
pub struct ChorusDoc {
    inner: Shared,
    name: String,
}

fn obj(fields: &[(&str, JsValue)]) -> JsValue {
    let o = Object::new();
    for (k, v) in fields {
        let _ = Reflect::set(&o, &JsValue::from_str(k), v);
    }
    o.into()
}

fn opt_get(options: &JsValue, key: &str) -> Option<JsValue> {
    if options.is_undefined() || options.is_null() {
        return None;
    }
    Reflect::get(options, &JsValue::from_str(key))
        .ok()
        .filter(|v| !v.is_undefined() && !v.is_null())
}

fn status_js(s: &Status) -> JsValue {
    match s {
        Status::Connecting { attempt } => obj(&[
            ("state", "connecting".into()),
            ("attempt", (*attempt).into()),
        ]),
        Status::Connected => obj(&[("state", "connected".into())]),
        Status::Synced => obj(&[("state", "synced".into())]),
        Status::Reconnecting { in_ms, attempt } => obj(&[
            ("state", "reconnecting".into()),
            ("inMs", (*in_ms).into()),
            ("attempt", (*attempt).into()),
        ]),
        Status::Offline { reason } => obj(&[
            ("state", "offline".into()),
            ("reason", reason.as_str().into()),
        ]),
    }
}

fn js_err(e: impl std::fmt::Display) -> JsValue {
    js_sys::Error::new(&e.to_string()).into()
}

fn storage() -> Option<web_sys::Storage> {
    web_sys::window()?.local_storage().ok().flatten()
}

fn set_timeout(f: impl FnOnce() + 'static, ms: i32) {
    if let Some(w) = web_sys::window() {
        let cb = Closure::once_into_js(f);
        let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(cb.unchecked_ref(), ms);
    }
}

fn presence_list(inner: &Inner, doc: &str) -> JsValue {
    let list = Array::new();
    if let Some(d) = inner.session.doc(doc) {
        let me = d.client_id();
        for (id, json) in d.presence_states() {
            let state = JSON::parse(&json).unwrap_or(JsValue::NULL);
            list.push(&obj(&[
                ("clientId", (id as f64).into()),
                ("state", state),
                ("self", (id == me).into()),
            ]));
        }
    }
    list.into()
}

/// Writes the socket's outgoing frames, then turns session events into JS calls and makes
/// them with no borrow held.
fn pump(shared: &Shared) {
    loop {
        let mut calls: Vec<(Function, JsValue, JsValue)> = Vec::new();
        {
            let mut inner = shared.borrow_mut();
            while let Some(bytes) = inner.session.poll_transmit() {
                if let Some(ws) = &inner.ws {
                    let _ = ws.send_with_u8_array(&bytes);
                }
            }
            let mut any = false;
            while let Some(ev) = inner.session.poll_event() {
                any = true;
                collect_calls(&mut inner, ev, &mut calls);
            }
            if !any {
                break;
            }
        }
        for (f, a, b) in calls {
            if let Err(e) = f.call2(&JsValue::NULL, &a, &b) {
                web_sys::console::error_2(&"chorus: listener threw".into(), &e);
            }
        }
    }
    schedule_persist(shared);
    refresh_token_if_due(shared);
}

/// Answers the server's `auth_expiring` with a fresh token from the `tokenProvider`, on the
/// open socket (no reconnect). Without a provider the socket closes at expiry and the next
/// connection uses whatever `token` is then.
fn refresh_token_if_due(shared: &Shared) {
    let provider = {
        let mut inner = shared.borrow_mut();
        if !std::mem::take(&mut inner.refresh_due) {
            return;
        }
        inner.token_provider.clone()
    };
    let Some(provider) = provider else { return };
    let s = shared.clone();
    wasm_bindgen_futures::spawn_local(async move {
        if let Some(t) = ask_token(&provider).await {
            {
                let mut inner = s.borrow_mut();
                inner.token = Some(t.clone());
                inner.session.refresh_token(&t);
            }
            pump(&s);
        }
    });
}

/// Calls the `tokenProvider`, which may return a string or a Promise of one.
async fn ask_token(provider: &Function) -> Option<String> {
    let token = match provider.call0(&JsValue::NULL) {
        Ok(v) => match v.dyn_into::<Promise>() {
            Ok(p) => wasm_bindgen_futures::JsFuture::from(p).await,
            Err(v) => Ok(v),
        },
        Err(e) => Err(e),
    };
    token.ok().and_then(|t| t.as_string())
}

fn collect_calls(inner: &mut Inner, ev: Event, calls: &mut Vec<(Function, JsValue, JsValue)>) {
    let mut push = |fs: &[Function], a: JsValue, b: JsValue| {
        for f in fs {
            calls.push((f.clone(), a.clone(), b.clone()));
        }
    };
    match ev {
        Event::Status(s) => {
            inner.status = status_js(&s);
            push(
                &inner.status_listeners,
                inner.status.clone(),
                JsValue::UNDEFINED,
            );
        }
        Event::Synced { doc, replay } => {
            if let Some(l) = inner.docs.get(&doc) {
                push(
                    &l.synced,
                    obj(&[("replay", replay.into())]),
                    JsValue::UNDEFINED,
                );
            }
        }
        Event::TextChanged { doc, ops } => {
            // A document bound to a Y.Doc has no text listeners: skip the JSON round trip.
            if let Some(l) = inner.docs.get(&doc)
                && !l.change.is_empty()
            {
                let delta = serde_json::to_string(&ops)
                    .ok()
                    .and_then(|s| JSON::parse(&s).ok())
                    .unwrap_or(JsValue::NULL);
                push(&l.change, delta, JsValue::UNDEFINED);
            }
        }
        Event::RemoteUpdate { doc, update } => {
            // Copying the update into JS only pays when someone listens.
            if let Some(l) = inner.docs.get(&doc)
                && !l.remote_update.is_empty()
            {
                push(
                    &l.remote_update,
                    Uint8Array::from(&update[..]).into(),
                    JsValue::UNDEFINED,
                );
            }
        }
        Event::Presence { doc, change } => {
            if inner.docs.contains_key(&doc) {
                let ids = |v: &[u64]| -> JsValue {
                    v.iter()
                        .map(|i| JsValue::from(*i as f64))
                        .collect::<Array>()
                        .into()
                };
                let change = obj(&[
                    ("added", ids(&change.added)),
                    ("updated", ids(&change.updated)),
                    ("removed", ids(&change.removed)),
                ]);
                let list = presence_list(inner, &doc);
                if let Some(l) = inner.docs.get(&doc) {
                    push(&l.presence, list, change);
                }
            }
        }
        Event::Error { doc, code, message } => {
            let e = obj(&[
                ("doc", doc.map(JsValue::from).unwrap_or(JsValue::NULL)),
                ("code", code.into()),
                ("message", message.into()),
            ]);
            if inner.error_listeners.is_empty() {
                web_sys::console::warn_2(&"chorus:".into(), &e);
            }
            push(&inner.error_listeners, e, JsValue::UNDEFINED);
        }
        Event::TokenExpiring { .. } => inner.refresh_due = true,
        Event::Dirty { doc } => {
            // Every change of the pending set (a local update queued, an ack, a refusal) comes
            // with `Dirty`: tell `onPending` listeners when the count moved.
            let pending = inner.session.doc(&doc).map_or(0, |d| d.pending.len());
            if let Some(l) = inner.docs.get_mut(&doc)
                && l.last_pending != pending
            {
                l.last_pending = pending;
                push(&l.pending, (pending as u32).into(), JsValue::UNDEFINED);
            }
            if inner.storage_prefix.is_some() {
                inner.dirty.insert(doc);
            }
        }
    }
}

fn schedule_persist(shared: &Shared) {
    {
        let mut inner = shared.borrow_mut();
        if inner.dirty.is_empty() || inner.persist_scheduled {
            return;
        }
        inner.persist_scheduled = true;
    }
    let s = shared.clone();
    set_timeout(move || persist_now(&s), PERSIST_DEBOUNCE_MS);
}

fn persist_now(shared: &Shared) {
    let mut inner = shared.borrow_mut();
    inner.persist_scheduled = false;
    let (Some(prefix), Some(store)) = (inner.storage_prefix.clone(), storage()) else {
        return;
    };
    for doc in std::mem::take(&mut inner.dirty) {
        if let Some(text) = inner.session.persist(&doc) {
            // A full storage (quota) only costs the fast resume; the server still has the data
            // once acknowledged, so warn and carry on.
            if store.set_item(&format!("{prefix}{doc}"), &text).is_err() {
                web_sys::console::warn_1(&"chorus: could not persist to localStorage".into());
            }
        }
    }
}

fn with_token(url: &str, token: Option<&str>) -> String {
    match token {
        Some(t) => {
            let sep = if url.contains('?') { '&' } else { '?' };
            let t: String = js_sys::encode_uri_component(t).into();
            format!("{url}{sep}token={t}")
        }
        None => url.to_string(),
    }
}

fn connect(shared: &Shared) {
    let (provider, url, token) = {
        let mut inner = shared.borrow_mut();
        inner.session.connecting();
        (
            inner.token_provider.clone(),
            inner.url.clone(),
            inner.token.clone(),
        )
    };
    pump(shared);
    match provider {
        None => open_socket(shared, with_token(&url, token.as_deref())),
        Some(provider) => {
            // Ask for a fresh token before every connection (it may have expired while we
            // were away).
            let s = shared.clone();
            wasm_bindgen_futures::spawn_local(async move {
                match ask_token(&provider).await {
                    Some(t) => {
                        s.borrow_mut().token = Some(t.clone());
                        open_socket(&s, with_token(&url, Some(&t)));
                    }
                    None => {
                        web_sys::console::warn_1(&"chorus: tokenProvider gave no token".into());
                        let g = s.borrow().generation;
                        on_closed(&s, g, 1006);
                    }
                }
            });
        }
    }
}

fn open_socket(shared: &Shared, url: String) {
    let generation = {
        let mut inner = shared.borrow_mut();
        if inner.session.is_stopped() {
            return;
        }
        inner.generation += 1;
        inner.generation
    };
    let ws = match WebSocket::new(&url) {
        Ok(ws) => ws,
        Err(e) => {
            web_sys::console::error_2(&"chorus: cannot open socket".into(), &e);
            return on_closed(shared, generation, 1006);
        }
    };
    ws.set_binary_type(BinaryType::Arraybuffer);
    let s = shared.clone();
    let open = Closure::<dyn FnMut()>::new(move || {
        if s.borrow().generation == generation {
            s.borrow_mut().session.opened();
            pump(&s);
        }
    });
    let s = shared.clone();
    let message = Closure::<dyn FnMut(MessageEvent)>::new(move |e: MessageEvent| {
        if s.borrow().generation != generation {
            return;
        }
        if let Ok(buf) = e.data().dyn_into::<js_sys::ArrayBuffer>() {
            let bytes = Uint8Array::new(&buf).to_vec();
            s.borrow_mut().session.received(&bytes);
            pump(&s);
        }
    });
    let s = shared.clone();
    let close = Closure::<dyn FnMut(CloseEvent)>::new(move |e: CloseEvent| {
        on_closed(&s, generation, e.code());
    });
    ws.set_onopen(Some(open.as_ref().unchecked_ref()));
    ws.set_onmessage(Some(message.as_ref().unchecked_ref()));
    ws.set_onclose(Some(close.as_ref().unchecked_ref()));
    let mut inner = shared.borrow_mut();
    if let Some(old) = inner.ws.take() {
        old.set_onopen(None);
        old.set_onmessage(None);
        old.set_onclose(None);
        let _ = old.close();
    }
    inner.ws = Some(ws);
    // Replacing the handlers drops the previous socket's closures; that socket's callbacks
    // were unset above, so nothing can call them any more.
    inner.handlers = Some(SocketHandlers {
        _open: open,
        _message: message,
        _close: close,
    });
}

fn on_closed(shared: &Shared, generation: u64, code: u16) {
    let decision = {
        let mut inner = shared.borrow_mut();
        if inner.generation != generation {
            return;
        }
        // Invalidate this socket's remaining events, and unhook it: its closures are dropped
        // when the next socket's replace them, and a socket closed by us (offline) still fires
        // its close event later; calling a dropped closure throws in the page.
        inner.generation += 1;
        if let Some(ws) = inner.ws.take() {
            ws.set_onopen(None);
            ws.set_onmessage(None);
            ws.set_onclose(None);
        }
        let fresh = inner.token_provider.is_some();
        inner.session.closed(code, js_sys::Math::random(), fresh)
    };
    pump(shared);
    if let CloseDecision::Reconnect { in_ms } = decision {
        let s = shared.clone();
        let generation = shared.borrow().generation;
        set_timeout(
            move || {
                // A manual `reconnect()` meanwhile already started a newer socket.
                if s.borrow().generation == generation {
                    connect(&s);
                }
            },
            in_ms.min(i32::MAX as u32) as i32,
        );
    }
}

fn reconnect_now(shared: &Shared) {
    {
        let mut inner = shared.borrow_mut();
        if inner.ws.is_some() {
            return;
        }
        // Invalidates the pending backoff timer.
        inner.generation += 1;
    }
    connect(shared);
}

/// The browser lost the network: treat the socket as closed now (1006, so the usual backoff
/// applies until `online`). Does nothing between sockets, so repeated events are harmless.
fn drop_socket(shared: &Shared) {
    let (ws, generation) = {
        let inner = shared.borrow();
        (inner.ws.clone(), inner.generation)
    };
    let Some(ws) = ws else { return };
    // Its close event carries an old generation once `on_closed` ran, and is ignored.
    let _ = ws.close();
    on_closed(shared, generation, 1006);
}

fn watch_network(shared: &Shared) {
    let Some(w) = web_sys::window() else { return };
    let s = shared.clone();
    let online = Closure::<dyn FnMut()>::new(move || reconnect_now(&s));
    let s = shared.clone();
    let offline = Closure::<dyn FnMut()>::new(move || drop_socket(&s));
    let _ = w.add_event_listener_with_callback("online", online.as_ref().unchecked_ref());
    let _ = w.add_event_listener_with_callback("offline", offline.as_ref().unchecked_ref());
    shared.borrow_mut().network = Some(NetworkHandlers { online, offline });
}

#[wasm_bindgen]
impl ChorusClient {
    /// `url`: the server's native endpoint, e.g. `ws://localhost:8080/v1/ws`. `options`:
    /// `token` (string, sent as the `token` query parameter), `tokenProvider` (function
    /// returning a token or a Promise of one, called before every connection attempt),
    /// `minDelayMs`/`maxDelayMs` (backoff window, default 250/10000), `persist` (string key
    /// prefix, or `true` for `"chorus:"`: keep each document, its position and its unsent
    /// edits in localStorage so a reload resumes instead of refetching).
    #[wasm_bindgen(constructor)]
    pub fn new(url: String, options: JsValue) -> Result<ChorusClient, JsValue> {
        let num = |k: &str, d: u32| {
            opt_get(&options, k)
                .and_then(|v| v.as_f64())
                .map_or(d, |f| f.clamp(1.0, 3_600_000.0) as u32)
        };
        let defaults = SessionConfig::default();
        let config = SessionConfig {
            min_delay_ms: num("minDelayMs", defaults.min_delay_ms),
            max_delay_ms: num("maxDelayMs", defaults.max_delay_ms),
        };
        let token_provider = match opt_get(&options, "tokenProvider") {
            Some(f) => Some(
                f.dyn_into::<Function>()
                    .map_err(|_| js_err("tokenProvider must be a function"))?,
            ),
            None => None,
        };
        let storage_prefix = opt_get(&options, "persist").and_then(|v| {
            if let Some(s) = v.as_string() {
                Some(s)
            } else if v.as_bool() == Some(true) {
                Some("chorus:".to_string())
            } else {
                None
            }
        });
        let inner = Rc::new(RefCell::new(Inner {
            session: Session::new(config),
            url,
            token: opt_get(&options, "token").and_then(|v| v.as_string()),
            token_provider,
            ws: None,
            handlers: None,
            generation: 0,
            status: JsValue::NULL,
            status_listeners: Vec::new(),
            error_listeners: Vec::new(),
            docs: HashMap::new(),
            storage_prefix,
            dirty: BTreeSet::new(),
            persist_scheduled: false,
            refresh_due: false,
            network: None,
        }));
        watch_network(&inner);
        connect(&inner);
        Ok(ChorusClient { inner })
    }

    /// Opens (or returns) a document on this connection. With `persist`, a document saved by
    /// an earlier page resumes from its saved position and resends its unsent edits.
    pub fn open(&self, name: &str) -> Result<ChorusDoc, JsValue> {
        {
            let mut inner = self.inner.borrow_mut();
            let exists = inner.session.doc(name).is_some();
            if !exists {
                let saved = inner
                    .storage_prefix
                    .clone()
                    .and_then(|p| storage()?.get_item(&format!("{p}{name}")).ok().flatten());
                let restored = saved
                    .map(|s| inner.session.open_persisted(name, &s).is_ok())
                    .unwrap_or(false);
                if !restored {
                    inner.session.open(name).map_err(js_err)?;
                }
                // Text deltas cost a copy of every remote insertion; they are computed only
                // once someone listens (`onChange`).
                let _ = inner.session.set_text_events(name, false);
                // A restored document may start with unacknowledged updates.
                let pending = inner.session.doc(name).map_or(0, |d| d.pending.len());
                inner.docs.entry(name.to_string()).or_default().last_pending = pending;
            }
        }
        pump(&self.inner);
        Ok(ChorusDoc {
            inner: self.inner.clone(),
            name: name.to_string(),
        })
    }

    /// `cb(status)`: `{state: "connecting"|"connected"|"synced"|"reconnecting"|"offline", inMs?, attempt?, reason?}`.
    /// Called at once with the current status.
    #[wasm_bindgen(js_name = onStatus)]
    pub fn on_status(&self, cb: Function) {
        let now = self.inner.borrow().status.clone();
        if !now.is_null() {
            let _ = cb.call1(&JsValue::NULL, &now);
        }
        self.inner.borrow_mut().status_listeners.push(cb);
    }

    /// `cb({doc, code, message})` for refused requests (the codes of the README's error table).
    #[wasm_bindgen(js_name = onError)]
    pub fn on_error(&self, cb: Function) {
        self.inner.borrow_mut().error_listeners.push(cb);
    }

    /// The current status object (see `onStatus`).
    #[wasm_bindgen(getter)]
    pub fn status(&self) -> JsValue {
        self.inner.borrow().status.clone()
    }

    /// Reconnects now instead of waiting out the backoff (the client already does this when
    /// the browser reports it is online again).
    pub fn reconnect(&self) {
        reconnect_now(&self.inner);
    }

    /// Writes every changed document to localStorage now instead of after the debounce (call
    /// it on `pagehide`, so a reload resumes from the newest state).
    pub fn flush(&self) {
        persist_now(&self.inner);
    }

    /// Closes the socket for good; edits made afterwards stay local (and persisted).
    pub fn close(&self) {
        let ws = {
            let mut inner = self.inner.borrow_mut();
            inner.session.shutdown();
            if let (Some(n), Some(w)) = (inner.network.take(), web_sys::window()) {
                let _ = w.remove_event_listener_with_callback(
                    "online",
                    n.online.as_ref().unchecked_ref(),
                );
                let _ = w.remove_event_listener_with_callback(
                    "offline",
                    n.offline.as_ref().unchecked_ref(),
                );
            }
            inner.ws.clone()
        };
        match ws {
            Some(ws) => {
                let _ = ws.close_with_code(1000);
            }
            None => {
                let g = self.inner.borrow().generation;
                on_closed(&self.inner, g, 1000);
            }
        }
    }
}

impl ChorusDoc {
    fn edit<T>(
        &self,
        f: impl FnOnce(&mut Session) -> Result<T, crate::SessionError>,
    ) -> Result<T, JsValue> {
        let r = f(&mut self.inner.borrow_mut().session).map_err(js_err);
        pump(&self.inner);
        r
    }

    fn listeners(&self, f: impl FnOnce(&mut DocListeners)) {
        if let Some(l) = self.inner.borrow_mut().docs.get_mut(&self.name) {
            f(l);
        }
    }
}

#[wasm_bindgen]
impl ChorusDoc {
    #[wasm_bindgen(getter)]
    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// This replica's yrs client id (also its presence id).
    #[wasm_bindgen(getter, js_name = clientId)]
    pub fn client_id(&self) -> f64 {
        self.inner
            .borrow()
            .session
            .doc(&self.name)
            .map_or(0.0, |d| d.client_id() as f64)
    }

    /// Whether the document has its `synced` answer on the current socket.
    #[wasm_bindgen(getter)]
    pub fn synced(&self) -> bool {
        self.inner
            .borrow()
            .session
            .doc(&self.name)
            .is_some_and(|d| d.is_synced())
    }

    /// How many local updates the server has not acknowledged yet (0: everything is saved).
    #[wasm_bindgen(getter, js_name = pendingUpdates)]
    pub fn pending_updates(&self) -> u32 {
        self.inner
            .borrow()
            .session
            .doc(&self.name)
            .map_or(0, |d| d.pending_seqs().len() as u32)
    }

    /// The shared text.
    pub fn text(&self) -> String {
        self.inner
            .borrow()
            .session
            .doc(&self.name)
            .map(|d| d.text())
            .unwrap_or_default()
    }

    /// Inserts `chunk` at `index` (UTF-16 code units, like JS string indexes).
    pub fn insert(&self, index: u32, chunk: &str) -> Result<(), JsValue> {
        let name = self.name.clone();
        self.edit(|s| s.insert(&name, index, chunk))
    }

    /// Deletes `count` UTF-16 code units at `index`.
    pub fn delete(&self, index: u32, count: u32) -> Result<(), JsValue> {
        let name = self.name.clone();
        self.edit(|s| s.delete(&name, index, count))
    }

    /// `cb(delta)` when the text changes by anything but this client's `insert`/`delete`:
    /// a Quill-style delta, `[{retain: n}, {insert: "s"}, {delete: n}]`, in UTF-16 units.
    #[wasm_bindgen(js_name = onChange)]
    pub fn on_change(&self, cb: Function) {
        let _ = self
            .inner
            .borrow_mut()
            .session
            .set_text_events(&self.name, true);
        self.listeners(|l| l.change.push(cb));
    }

    /// `cb({replay})` each time the document is (re)synced with the server.
    #[wasm_bindgen(js_name = onSynced)]
    pub fn on_synced(&self, cb: Function) {
        self.listeners(|l| l.synced.push(cb));
    }

    /// `cb(count)` when the number of local updates the server has not acknowledged changes
    /// (`0`: every local change is saved on the server).
    #[wasm_bindgen(js_name = onPending)]
    pub fn on_pending(&self, cb: Function) {
        self.listeners(|l| l.pending.push(cb));
    }

    /// `cb(update: Uint8Array)` with every yrs v1 update received from the server.
    #[wasm_bindgen(js_name = onRemoteUpdate)]
    pub fn on_remote_update(&self, cb: Function) {
        self.listeners(|l| l.remote_update.push(cb));
    }

    /// Applies a yrs/Yjs v1 update made elsewhere and sends it to the server.
    #[wasm_bindgen(js_name = applyUpdate)]
    pub fn apply_update(&self, update: &[u8]) -> Result<(), JsValue> {
        let name = self.name.clone();
        self.edit(|s| s.apply_local_update(&name, update))
    }

    /// The whole document as one yrs v1 update (e.g. to load into a `Y.Doc`).
    #[wasm_bindgen(js_name = encodeState)]
    pub fn encode_state(&self) -> Vec<u8> {
        self.inner
            .borrow()
            .session
            .doc(&self.name)
            .map(|d| d.encode_state())
            .unwrap_or_default()
    }

    /// Sets my presence here (any JSON-serializable value, e.g. `{name, colour, cursor}`);
    /// `null` clears it.
    #[wasm_bindgen(js_name = setPresence)]
    pub fn set_presence(&self, state: JsValue) -> Result<(), JsValue> {
        let json = if state.is_null() || state.is_undefined() {
            None
        } else {
            Some(
                JSON::stringify(&state)?
                    .as_string()
                    .ok_or_else(|| js_err("presence must be JSON-serializable"))?,
            )
        };
        let name = self.name.clone();
        self.edit(|s| s.set_presence(&name, json.as_deref()))
    }

    /// Everyone present (me included): `[{clientId, state, self}]`.
    pub fn presence(&self) -> JsValue {
        presence_list(&self.inner.borrow(), &self.name)
    }

    /// `cb(list, {added, updated, removed})` when peers' presence changes (a peer that leaves
    /// is removed; on a lost connection every peer is removed until the server's snapshot).
    #[wasm_bindgen(js_name = onPresence)]
    pub fn on_presence(&self, cb: Function) {
        self.listeners(|l| l.presence.push(cb));
    }

    /// Unsubscribes and forgets the document (its persisted copy stays).
    pub fn close(&self) {
        {
            let mut inner = self.inner.borrow_mut();
            inner.session.close(&self.name);
            inner.docs.remove(&self.name);
        }
        pump(&self.inner);
    }
}
