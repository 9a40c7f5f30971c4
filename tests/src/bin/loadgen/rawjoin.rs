//! A join storm's client (outside the data flow: it plays a stock client at steps 1 and 3),
//! reading its socket the way the floor's readers do.
//!
//! Why not tungstenite here: it gathers every message whole, so 150 joiners of a 20 MB
//! document allocate, fault in and copy 3 GB on the generator's core, which then costs about
//! three times what the floor's readers pay and becomes what the storm measures. This client
//! speaks the same protocol (HTTP upgrade, masked client frames, the stock first messages of
//! each server, pongs) but reads into one 64 KB buffer, parses frame headers, looks at the
//! first bytes of each message to tell what it is, and only counts the rest.

use super::{Got, Proto, Target, host_port};
use anyhow::{Context, bail};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Bytes of a message kept to tell what it is (a Hocuspocus document-name prefix, the message
/// type, the sync step and the length of what follows fit easily).
const HEAD: usize = 64;

/// One joined client's socket.
pub struct Joined {
    pub stream: TcpStream,
    /// When it had received as many content bytes as it waited for.
    pub took: Duration,
    /// The content messages whole, when asked to keep them (for the check after the storm).
    pub kept: Vec<Vec<u8>>,
}

/// Connects to `doc`, sends what a stock client sends first, and reads until `want` bytes of
/// document content (sync step 2 and update messages) have arrived.
pub async fn join(
    target: &Target,
    doc: &str,
    ip: u8,
    t0: Instant,
    want: usize,
    keep: bool,
) -> anyhow::Result<Joined> {
    let url = target.ws_url(doc).await?;
    let (mut stream, rest) = upgrade(&url, ip).await?;
    let first = match target.proto {
        // Token first; sync step 1 once authenticated.
        Proto::Hocuspocus => target.auth(doc),
        _ => target.sync(doc, 0, &[0]),
    };
    send(&mut stream, &first.into_data()).await?;
    let mut reader = Frames::new(keep);
    let mut buf = vec![0u8; 64 * 1024];
    buf[..rest.len()].copy_from_slice(&rest);
    let mut n = rest.len();
    loop {
        for event in reader.feed(&buf[..n]) {
            match event {
                Event::Ping(payload) => send_frame(&mut stream, 0xA, &payload).await?,
                Event::Message { head, len, whole } => {
                    let mut scratch = Vec::new();
                    match target.parse(&head, &mut scratch) {
                        Got::Authenticated => {
                            send(&mut stream, &target.sync(doc, 0, &[0]).into_data()).await?
                        }
                        // The head is cut short, so `parse` may not see the update's bytes:
                        // tell content by the step instead.
                        _ if is_content(target, &head) => {
                            reader.have += len;
                            if let Some(m) = whole {
                                reader.kept.push(m);
                            }
                        }
                        _ => {}
                    }
                }
                Event::Close => bail!("the server closed the socket"),
            }
        }
        if reader.have >= want {
            return Ok(Joined {
                stream,
                took: t0.elapsed(),
                kept: std::mem::take(&mut reader.kept),
            });
        }
        n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("closed before the whole document");
        }
    }
}

/// Whether a message (by its first bytes) carries document content: a sync step 2 or an
/// update (for Hocuspocus also inside its SyncReply, type 4).
fn is_content(target: &Target, head: &[u8]) -> bool {
    let mut b = head;
    if target.proto == Proto::Hocuspocus && super::get_bytes(&mut b).is_none() {
        return false;
    }
    matches!(
        (super::get_var(&mut b), super::get_var(&mut b)),
        (Some(0 | 4), Some(1 | 2))
    )
}

/// The HTTP upgrade, by hand; returns the stream and the bytes read past the response.
async fn upgrade(url: &str, ip: u8) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let addr = host_port(url)?;
    let rest = url.split("://").nth(1).context("URL without scheme")?;
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, ip.max(2)), 0)))?;
    let mut stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut got = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let end = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("closed during the upgrade");
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if got.len() > 16 * 1024 {
            bail!("upgrade response too long");
        }
    };
    if !got.starts_with(b"HTTP/1.1 101") {
        bail!(
            "upgrade refused: {}",
            String::from_utf8_lossy(&got[..end.min(200)])
        );
    }
    Ok((stream, got.split_off(end)))
}

async fn send(stream: &mut TcpStream, payload: &[u8]) -> anyhow::Result<()> {
    send_frame(stream, 0x2, payload).await
}

/// A client frame: FIN, masked with a zero key (servers unmask; the key's value is ours).
async fn send_frame(stream: &mut TcpStream, opcode: u8, payload: &[u8]) -> anyhow::Result<()> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => f.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(payload);
    stream.write_all(&f).await?;
    Ok(())
}

/// What the frame reader found.
enum Event {
    Ping(Vec<u8>),
    /// A whole data message: its first bytes, its length, and all of it when kept.
    Message {
        head: Vec<u8>,
        len: usize,
        whole: Option<Vec<u8>>,
    },
    Close,
}

/// Server frames parsed from a byte stream; payloads are counted, not gathered.
struct Frames {
    keep: bool,
    /// Header bytes of the next frame, while incomplete.
    header: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    opcode: u8,
    fin: bool,
    /// The data message being read.
    head: Vec<u8>,
    len: usize,
    whole: Option<Vec<u8>>,
    /// Payload of a control frame being read.
    control: Vec<u8>,
    /// Content bytes received so far.
    have: usize,
    kept: Vec<Vec<u8>>,
}

impl Frames {
    fn new(keep: bool) -> Self {
        Frames {
            keep,
            header: Vec::with_capacity(14),
            remaining: 0,
            opcode: 0,
            fin: false,
            head: Vec::new(),
            len: 0,
            whole: None,
            control: Vec::new(),
            have: 0,
            kept: Vec::new(),
        }
    }

    /// The header's length once its first two bytes are known.
    fn header_len(&self) -> Option<usize> {
        let b1 = *self.header.get(1)?;
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        Some(2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 })
    }

    fn feed(&mut self, mut data: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some((&first, rest)) = data.split_first() {
            if self.remaining == 0 {
                // Between frames: a header byte.
                self.header.push(first);
                data = rest;
                if !self.header_done() {
                    continue;
                }
                self.start_frame();
            } else {
                let take = (self.remaining as usize).min(data.len());
                self.payload(&data[..take]);
                data = &data[take..];
                self.remaining -= take as u64;
            }
            if self.remaining == 0 {
                self.header.clear();
                events.extend(self.end_frame());
            }
        }
        events
    }

    fn header_done(&self) -> bool {
        self.header_len().is_some_and(|n| self.header.len() == n)
    }

    fn start_frame(&mut self) {
        let h = &self.header;
        self.fin = h[0] & 0x80 != 0;
        self.opcode = h[0] & 0x0f;
        self.remaining = match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes(h[2..10].try_into().unwrap_or([0; 8])),
            n => u64::from(n),
        };
        if self.opcode & 0x8 == 0 && self.opcode != 0 {
            // A new data message.
            self.head.clear();
            self.len = 0;
            self.whole = self.keep.then(Vec::new);
        }
        self.control.clear();
    }

    fn payload(&mut self, bytes: &[u8]) {
        if self.opcode & 0x8 != 0 {
            self.control.extend_from_slice(bytes);
            return;
        }
        let room = HEAD.saturating_sub(self.head.len()).min(bytes.len());
        self.head.extend_from_slice(&bytes[..room]);
        self.len += bytes.len();
        if let Some(w) = &mut self.whole {
            w.extend_from_slice(bytes);
        }
    }

    fn end_frame(&mut self) -> Option<Event> {
        match self.opcode {
            0x8 => Some(Event::Close),
            0x9 => Some(Event::Ping(std::mem::take(&mut self.control))),
            0xA => None,
            _ if self.fin => Some(Event::Message {
                head: std::mem::take(&mut self.head),
                len: self.len,
                whole: self.whole.take(),
            }),
            _ => None,
        }
    }
}
