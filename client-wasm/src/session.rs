//! The sans-IO client session: socket events and local edits in, frames to send and events for the application out.
//!
//! A driver (the browser binding in `wasm.rs`, or a native test) owns the socket and the timers
//! and feeds the session: `connecting` / `opened` / `received` / `closed`, plus the
//! application's edits. It then drains `poll_transmit` (bytes to write to the socket) and
//! `poll_event` (what to tell the application). Nothing here does I/O or reads a clock, so every
//! path — resume, resend, backoff — is unit-tested natively with scripted frames.

use crate::backoff::Backoff;
use crate::document::{DocError, DocState, Persisted, TextOp};
use crate::presence::PresenceChange;
use base64::Engine as _;
use chorus_protocol::{ClientFrame, DocId, ServerFrame};
use std::collections::{BTreeMap, VecDeque};

/// Connection status, as shown to the user (the demo's badge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// A socket is being opened.
    Connecting { attempt: u32 },
    /// The socket is open; some open document has not had its `synced` answer yet.
    Connected,
    /// Every open document is up to date with the server.
    Synced,
    /// The socket closed; the next attempt starts in `in_ms`.
    Reconnecting { in_ms: u32, attempt: u32 },
    /// Not connected and not retrying (closed by the application, or a close code that says
    /// retrying cannot help).
    Offline { reason: String },
}

/// Something the application may want to hear about.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Status(Status),
    /// A document got its `synced` answer (`replay`: exact replay from our position).
    Synced {
        doc: String,
        replay: bool,
    },
    /// The shared text changed by something other than this client's text API.
    TextChanged {
        doc: String,
        ops: Vec<TextOp>,
    },
    /// A v1 update received from the server and applied (for applications that mirror the
    /// document elsewhere).
    RemoteUpdate {
        doc: String,
        update: Vec<u8>,
    },
    /// Peers' presence changed.
    Presence {
        doc: String,
        change: PresenceChange,
    },
    /// The server refused something, or a frame could not be understood.
    Error {
        doc: Option<String>,
        code: String,
        message: String,
    },
    /// The document's persistable state changed (content, position or pending updates).
    Dirty {
        doc: String,
    },
    /// The server says the socket's token expires at `expires_at` (Unix seconds): get a fresh
    /// one and pass it to [`Session::refresh_token`], or the socket is closed (4101).
    TokenExpiring {
        expires_at: u64,
    },
}

/// What the driver should do after a socket closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseDecision {
    Reconnect { in_ms: u32 },
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Down,
    Connecting,
    Open,
}

#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// First backoff window.
    pub min_delay_ms: u32,
    /// Largest backoff window.
    pub max_delay_ms: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            min_delay_ms: 250,
            max_delay_ms: 10_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("bad document id: {0}")]
    BadDocId(#[from] chorus_protocol::DocIdError),
    #[error("document {0:?} is not open")]
    NotOpen(String),
    #[error(transparent)]
    Doc(#[from] DocError),
    #[error("persisted state is unreadable: {0}")]
    Persisted(String),
}

#[derive(Debug)]
pub struct Session {
    docs: BTreeMap<String, DocState>,
    link: Link,
    backoff: Backoff,
    stopped: bool,
    status: Option<Status>,
    outgoing: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
}

impl Session {
    pub fn new(config: SessionConfig) -> Self {
        Session {
            docs: BTreeMap::new(),
            link: Link::Down,
            backoff: Backoff::new(config.min_delay_ms, config.max_delay_ms),
            stopped: false,
            status: None,
            outgoing: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    // ---- driver side -------------------------------------------------------------------

    /// The driver starts opening a socket.
    pub fn connecting(&mut self) {
        self.stopped = false;
        self.link = Link::Connecting;
        let attempt = self.backoff.attempt();
        self.set_status(Status::Connecting { attempt });
    }

    /// The socket is open: subscribe every document from its last position, resend what was
    /// never acknowledged, and announce my presence again.
    pub fn opened(&mut self) {
        self.link = Link::Open;
        let names: Vec<String> = self.docs.keys().cloned().collect();
        for name in names {
            self.subscribe(&name);
        }
        self.update_status();
    }

    /// A binary message arrived.
    pub fn received(&mut self, bytes: &[u8]) {
        match ServerFrame::decode(bytes) {
            Ok(frame) => self.handle(frame),
            Err(e) => self.events.push_back(Event::Error {
                doc: None,
                code: "bad_frame".into(),
                message: e.to_string(),
            }),
        }
    }

    /// The socket closed (or failed to open) with `code`. `random` is uniform in `[0, 1)`
    /// for the jitter; `fresh_credentials` says the driver can fetch a new token, which makes
    /// the 41xx "change something first" codes worth a retry.
    pub fn closed(&mut self, code: u16, random: f64, fresh_credentials: bool) -> CloseDecision {
        self.link = Link::Down;
        self.outgoing.clear();
        let mut forgotten = Vec::new();
        for (name, d) in &mut self.docs {
            d.synced = false;
            let removed = d.presence.forget_peers();
            if !removed.is_empty() {
                forgotten.push((name.clone(), removed));
            }
        }
        for (doc, removed) in forgotten {
            self.events.push_back(Event::Presence {
                doc,
                change: PresenceChange {
                    removed,
                    ..PresenceChange::default()
                },
            });
        }
        let stop_reason = if self.stopped {
            Some("closed by the application".to_string())
        } else {
            match code {
                1003 => Some("the server refused a frame type (1003)".into()),
                1008 => Some("the server closed for policy violation (1008)".into()),
                1009 => Some("a message was too large (1009)".into()),
                4100..=4199 if !fresh_credentials => {
                    Some(format!("the server refused the credentials ({code})"))
                }
                _ => None,
            }
        };
        match stop_reason {
            Some(reason) => {
                self.set_status(Status::Offline { reason });
                CloseDecision::Stop
            }
            None => {
                let attempt = self.backoff.attempt() + 1;
                let in_ms = self.backoff.next_delay_ms(random);
                self.set_status(Status::Reconnecting { in_ms, attempt });
                CloseDecision::Reconnect { in_ms }
            }
        }
    }

    /// The application closes the client: no more reconnects until `connecting` again.
    pub fn shutdown(&mut self) {
        self.stopped = true;
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.outgoing.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ---- application side --------------------------------------------------------------

    /// Opens a document (idempotent). When connected it is subscribed at once.
    pub fn open(&mut self, name: &str) -> Result<(), SessionError> {
        DocId::parse(name)?;
        if self.docs.contains_key(name) {
            return Ok(());
        }
        self.docs.insert(name.to_string(), DocState::new());
        if self.link == Link::Open {
            self.subscribe(name);
        }
        self.update_status();
        Ok(())
    }

    /// Opens a document from state persisted by [`Session::persist`] (e.g. before a reload):
    /// it resumes from the saved position and resends the saved unacknowledged updates.
    pub fn open_persisted(&mut self, name: &str, saved: &str) -> Result<(), SessionError> {
        DocId::parse(name)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(saved)
            .map_err(|e| SessionError::Persisted(e.to_string()))?;
        let saved: Persisted =
            rmp_serde::from_slice(&bytes).map_err(|e| SessionError::Persisted(e.to_string()))?;
        let mut doc = DocState::new();
        doc.restore(saved)?;
        if self.docs.insert(name.to_string(), doc).is_some() {
            // Replacing an open document: the server keeps the subscription; the subscribe
            // below simply answers again from the restored position.
        }
        if self.link == Link::Open {
            self.subscribe(name);
        }
        self.update_status();
        Ok(())
    }

    /// The document's persistable state as text (base64 of MessagePack).
    pub fn persist(&self, name: &str) -> Option<String> {
        let d = self.docs.get(name)?;
        let bytes = rmp_serde::to_vec_named(&d.persist()).ok()?;
        Some(base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    /// Closes a document: unsubscribes (the server removes my presence there) and forgets it.
    pub fn close(&mut self, name: &str) {
        if self.docs.remove(name).is_some() && self.link == Link::Open {
            self.send(&ClientFrame::Unsubscribe { doc: name.into() });
        }
        self.update_status();
    }

    /// Whether `Event::TextChanged` is produced for this document (on by default; off when
    /// the application mirrors the document elsewhere and reads raw updates instead).
    pub fn set_text_events(&mut self, name: &str, on: bool) -> Result<(), SessionError> {
        self.doc_mut(name)?.set_text_events(on);
        Ok(())
    }

    pub fn doc(&self, name: &str) -> Option<&DocState> {
        self.docs.get(name)
    }

    pub fn doc_names(&self) -> impl Iterator<Item = &str> {
        self.docs.keys().map(String::as_str)
    }

    pub fn insert(&mut self, name: &str, index: u32, chunk: &str) -> Result<(), SessionError> {
        let d = self.doc_mut(name)?;
        let update = d.insert(index, chunk)?;
        self.push_local(name, update);
        Ok(())
    }

    pub fn delete(&mut self, name: &str, index: u32, count: u32) -> Result<(), SessionError> {
        let d = self.doc_mut(name)?;
        let update = d.delete(index, count)?;
        self.push_local(name, update);
        Ok(())
    }

    /// Applies a raw v1 update made elsewhere by the application and sends it to the server.
    /// Text changes it causes are reported like remote ones.
    pub fn apply_local_update(&mut self, name: &str, update: &[u8]) -> Result<(), SessionError> {
        let d = self.doc_mut(name)?;
        d.apply(update)?;
        let ops = d.take_deltas();
        self.push_local(name, update.to_vec());
        for ops in ops {
            self.events.push_back(Event::TextChanged {
                doc: name.into(),
                ops,
            });
        }
        Ok(())
    }

    /// Sets my presence state (JSON text, or `None` to clear it) in a document.
    pub fn set_presence(&mut self, name: &str, json: Option<&str>) -> Result<(), SessionError> {
        let d = self.doc_mut(name)?;
        let update = d.presence.set_local(json);
        if self.link == Link::Open {
            self.send(&ClientFrame::Awareness {
                doc: name.into(),
                update,
            });
        }
        Ok(())
    }

    // ---- internals ---------------------------------------------------------------------

    fn doc_mut(&mut self, name: &str) -> Result<&mut DocState, SessionError> {
        self.docs
            .get_mut(name)
            .ok_or_else(|| SessionError::NotOpen(name.into()))
    }

    fn push_local(&mut self, name: &str, update: Vec<u8>) {
        let Some(d) = self.docs.get_mut(name) else {
            return;
        };
        let seq = d.queue(update.clone());
        if self.link == Link::Open {
            self.send(&ClientFrame::Update {
                doc: name.into(),
                update,
                seq: Some(seq),
            });
        }
        self.events.push_back(Event::Dirty { doc: name.into() });
    }

    fn subscribe(&mut self, name: &str) {
        let Some(d) = self.docs.get_mut(name) else {
            return;
        };
        let mut frames = vec![ClientFrame::Subscribe {
            doc: name.into(),
            position: d.position,
            state_vector: Some(d.state_vector()),
        }];
        // Frames on one socket are handled in order, so these follow the subscription.
        frames.extend(d.pending.iter().map(|(seq, u)| ClientFrame::Update {
            doc: name.into(),
            update: u.clone(),
            seq: Some(*seq),
        }));
        if let Some(update) = d.presence.reannounce() {
            frames.push(ClientFrame::Awareness {
                doc: name.into(),
                update,
            });
        }
        for f in &frames {
            self.send(f);
        }
    }

    fn send(&mut self, frame: &ClientFrame) {
        match frame.encode() {
            Ok(bytes) => self.outgoing.push_back(bytes),
            Err(e) => self.events.push_back(Event::Error {
                doc: None,
                code: "encode".into(),
                message: e.to_string(),
            }),
        }
    }

    /// Sends a fresh token over the open socket (answer to [`Event::TokenExpiring`]).
    pub fn refresh_token(&mut self, token: &str) {
        self.send(&ClientFrame::Auth {
            token: token.to_string(),
        });
    }

    fn handle(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::AuthExpiring { expires_at } => {
                self.events.push_back(Event::TokenExpiring { expires_at });
            }
            ServerFrame::Synced {
                doc,
                update,
                position,
                replay,
            } => {
                let Some(d) = self.docs.get_mut(&doc) else {
                    return;
                };
                let had_position = d.position.is_some();
                if let Err(e) = d.apply(&update) {
                    return self.doc_error(&doc, e);
                }
                // `synced` is the one frame allowed to move a position anywhere (a new epoch,
                // or back after the server lost entries).
                d.position = Some(position);
                d.synced = true;
                let upload = (!replay && had_position).then(|| d.encode_state());
                self.report_remote(&doc, update);
                self.events.push_back(Event::Synced {
                    doc: doc.clone(),
                    replay,
                });
                if let Some(state) = upload {
                    // Not a replay although we had a position: the server's log was trimmed
                    // or recreated, and it may lack edits it once acknowledged to us. Send our
                    // whole state once; whatever it already has applies as a no-op.
                    self.push_local(&doc, state);
                }
                self.update_status();
            }
            ServerFrame::Update {
                doc,
                update,
                position,
            } => {
                let Some(d) = self.docs.get_mut(&doc) else {
                    return;
                };
                if let Err(e) = d.apply(&update) {
                    return self.doc_error(&doc, e);
                }
                d.advance(position);
                self.report_remote(&doc, update);
            }
            ServerFrame::Awareness { doc, update } => {
                let Some(d) = self.docs.get_mut(&doc) else {
                    return;
                };
                match d.presence.apply(&update) {
                    Ok((change, resend)) => {
                        if let Some(update) = resend
                            && self.link == Link::Open
                        {
                            self.send(&ClientFrame::Awareness {
                                doc: doc.clone(),
                                update,
                            });
                        }
                        if !change.is_empty() {
                            self.events.push_back(Event::Presence { doc, change });
                        }
                    }
                    Err(e) => self.events.push_back(Event::Error {
                        doc: Some(doc),
                        code: "bad_awareness".into(),
                        message: e.to_string(),
                    }),
                }
            }
            ServerFrame::Ack { doc, seq, position } => {
                let Some(d) = self.docs.get_mut(&doc) else {
                    return;
                };
                if let Some(seq) = seq {
                    d.pending.remove(&seq);
                }
                d.advance(position);
                self.events.push_back(Event::Dirty { doc });
            }
            ServerFrame::Error {
                code,
                message,
                doc,
                seq,
            } => {
                // A refused update that cannot succeed later is dropped, or it would be resent
                // forever. A retryable one stays pending and goes out again on the next
                // connection.
                if let (Some(name), Some(seq)) = (&doc, seq)
                    && !code.retryable()
                    && let Some(d) = self.docs.get_mut(name)
                {
                    d.pending.remove(&seq);
                    self.events.push_back(Event::Dirty { doc: name.clone() });
                }
                self.events.push_back(Event::Error {
                    doc,
                    code: code.as_str().into(),
                    message,
                });
            }
        }
    }

    fn report_remote(&mut self, doc: &str, update: Vec<u8>) {
        let Some(d) = self.docs.get_mut(doc) else {
            return;
        };
        for ops in d.take_deltas() {
            self.events.push_back(Event::TextChanged {
                doc: doc.into(),
                ops,
            });
        }
        self.events.push_back(Event::RemoteUpdate {
            doc: doc.into(),
            update,
        });
        self.events.push_back(Event::Dirty { doc: doc.into() });
    }

    fn doc_error(&mut self, doc: &str, e: DocError) {
        self.events.push_back(Event::Error {
            doc: Some(doc.into()),
            code: "bad_update".into(),
            message: e.to_string(),
        });
    }

    fn update_status(&mut self) {
        if self.link != Link::Open {
            return;
        }
        if self.docs.values().all(|d| d.synced) {
            self.backoff.reset();
            self.set_status(Status::Synced);
        } else {
            self.set_status(Status::Connected);
        }
    }

    fn set_status(&mut self, status: Status) {
        if self.status.as_ref() != Some(&status) {
            self.status = Some(status.clone());
            self.events.push_back(Event::Status(status));
        }
    }

    pub fn status(&self) -> Option<&Status> {
        self.status.as_ref()
    }
}
