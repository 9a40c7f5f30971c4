//! WebSocket handshakes (data-flow step 1): the 101 answer, then the bare TCP stream handed to
//! [`connection::run`](crate::connection::run).
//!
//! Why not axum's `WebSocketUpgrade`: it hands over a tungstenite stream, through which every
//! byte we send would be copied into a per-connection buffer. The connection writes frames
//! itself (see `connection::socket`), so it needs the TCP stream, which hyper gives back once
//! the 101 is sent (`Upgraded::downcast`, with any bytes it read past the request).

use crate::connection::Upgraded;
use crate::connection::socket::Socket;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

/// A checked WebSocket upgrade request.
pub struct WsUpgrade {
    on_upgrade: hyper::upgrade::OnUpgrade,
    accept: HeaderValue,
}

/// Why a request to a WebSocket route is not a WebSocket handshake.
#[derive(Debug)]
pub struct NotUpgrade(&'static str);

impl IntoResponse for NotUpgrade {
    fn into_response(self) -> Response {
        let status = if self.0 == "method" {
            StatusCode::METHOD_NOT_ALLOWED
        } else {
            StatusCode::UPGRADE_REQUIRED
        };
        let body = serde_json::json!({
            "error": "not_a_websocket_handshake",
            "message": format!("a WebSocket (version 13) handshake is required: {}", self.0),
        });
        let mut resp = (status, axum::Json(body)).into_response();
        resp.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        resp
    }
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = NotUpgrade;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, NotUpgrade> {
        if parts.method != Method::GET {
            return Err(NotUpgrade("method"));
        }
        let h = &parts.headers;
        if !has_token(h, header::CONNECTION, "upgrade") {
            return Err(NotUpgrade("Connection: upgrade missing"));
        }
        if !has_token(h, header::UPGRADE, "websocket") {
            return Err(NotUpgrade("Upgrade: websocket missing"));
        }
        if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
            return Err(NotUpgrade("Sec-WebSocket-Version must be 13"));
        }
        let key = h
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(NotUpgrade("Sec-WebSocket-Key missing"))?;
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(NotUpgrade("the connection cannot be upgraded"))?;
        Ok(WsUpgrade {
            on_upgrade,
            accept: HeaderValue::from_str(&accept).map_err(|_| NotUpgrade("bad key"))?,
        })
    }
}

impl WsUpgrade {
    /// Answers 101; once hyper has sent it, `run` gets the socket (in a task on `tracker`).
    pub fn on_upgrade<F, Fut>(self, tracker: &TaskTracker, run: F) -> Response
    where
        F: FnOnce(Upgraded) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tracker.spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "WebSocket upgrade failed");
                    return;
                }
            };
            match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => {
                    let socket = Arc::new(Socket {
                        tcp: parts.io.into_inner(),
                    });
                    run(Upgraded {
                        socket,
                        read_buf: parts.read_buf,
                    })
                    .await
                }
                // Only `serve::serve`'s plain TCP connections reach the router.
                Err(_) => tracing::error!("WebSocket upgrade on a connection that is not TCP"),
            }
        });
        let mut resp = Response::new(axum::body::Body::empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::SEC_WEBSOCKET_ACCEPT, self.accept);
        resp
    }
}
