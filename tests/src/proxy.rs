//! A TCP proxy a test can cut: a node behind it loses Redis (or anything else) while the rest
//! of the test keeps it, the way a network partition cuts one node off.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards connections on a free local port to `target` until cut.
pub struct CutProxy {
    pub addr: SocketAddr,
    /// Cancelled to cut: every forwarded connection ends and new ones are closed at once.
    /// `None` while cut.
    link: Arc<Mutex<Option<CancellationToken>>>,
    stop: CancellationToken,
}

impl CutProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let link = Arc::new(Mutex::new(Some(CancellationToken::new())));
        let stop = CancellationToken::new();
        let (accepting, halt) = (link.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (inbound, _) = tokio::select! {
                    _ = halt.cancelled() => return,
                    a = listener.accept() => match a {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let Some(token) = accepting.lock().expect("proxy lock").clone() else {
                    drop(inbound); // cut: refuse by closing at once
                    continue;
                };
                tokio::spawn(forward(inbound, target, token));
            }
        });
        CutProxy { addr, link, stop }
    }

    /// `redis://` URL of the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Ends every forwarded connection and refuses new ones until [`CutProxy::restore`].
    pub fn cut(&self) {
        if let Some(token) = self.link.lock().expect("proxy lock").take() {
            token.cancel();
        }
    }

    pub fn restore(&self) {
        let mut link = self.link.lock().expect("proxy lock");
        if link.is_none() {
            *link = Some(CancellationToken::new());
        }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.cut();
        self.stop.cancel();
    }
}

async fn forward(mut inbound: TcpStream, target: SocketAddr, cut: CancellationToken) {
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        _ = cut.cancelled() => {}
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
    }
}
