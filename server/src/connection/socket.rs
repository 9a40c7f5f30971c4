//! The raw socket under a WebSocket connection (data-flow steps 1 and 6): frames read with
//! tungstenite, frames written by hand — straight from the document's shared bytes.
//!
//! Why not a WebSocket crate for writing: every one we could use (tungstenite, axum's wrapper,
//! tokio-websockets) copies each outgoing message into a per-connection write buffer. For a
//! document with N readers that is N copies of every update, a wake of each connection's
//! writer task, and for a 20 MB join answer N × 20 MB of buffers. Server→client frames are
//! unmasked, so a frame is a 2–10 byte header followed by the payload as is: we write the
//! header from the stack and the payload from the `Bytes` every recipient shares, in one
//! vectored write, from whichever task has the frame (usually the document's owner) when
//! nothing else is queued for the socket ([`DirectSocket`]). Writing frames is small and
//! carries no parsing of hostile input.
//!
//! Reading stays with tungstenite: it parses what the client sends (masking, fragmentation,
//! control frames, size limits), which is where a hand-written parser would be a risk. It runs
//! over the socket's non-blocking reads; what it wants to send itself (a pong, the reply to a
//! client's close) is captured and queued in order with everything else, never written behind
//! our frames' backs.

use crate::doc::outbox::{DirectSocket, Sent};
use bytes::{Buf, Bytes};
use std::io::{self, IoSlice, Read, Write};
use std::time::Duration;
use tokio::net::TcpStream;
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};

/// Opcodes of the frames we write.
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;

/// A frame header: FIN set, no mask, the payload length in the shortest form.
pub fn header(opcode: u8, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80 | opcode;
    match len {
        0..=125 => {
            h[1] = len as u8;
            (h, 2)
        }
        126..=0xFFFF => {
            h[1] = 126;
            h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            (h, 4)
        }
        _ => {
            h[1] = 127;
            h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            (h, 10)
        }
    }
}

/// A whole frame in one buffer, for frames written once to one socket (close, ping).
pub fn framed(opcode: u8, payload: &[u8]) -> Bytes {
    let (h, n) = header(opcode, payload.len());
    let mut out = Vec::with_capacity(n + payload.len());
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// A close frame with a code and its reason.
pub fn close_frame(code: chorus_protocol::CloseCode) -> Bytes {
    let mut payload = code.code().to_be_bytes().to_vec();
    payload.extend_from_slice(code.reason().as_bytes());
    framed(CLOSE, &payload)
}

/// One upgraded WebSocket's TCP stream, shared by the connection's reader, its writer and
/// whoever writes to it directly (all through `&self`: tokio's readiness API needs no lock).
pub struct Socket {
    pub tcp: TcpStream,
}

impl Socket {
    /// Writes as much of `chunks` (raw bytes, already framed) as the socket takes now,
    /// dropping what was written from the front. Never waits.
    pub fn try_write_chunks(&self, chunks: &mut Vec<Bytes>) -> io::Result<()> {
        const MAX_SLICES: usize = 64;
        while !chunks.is_empty() {
            let slices: Vec<IoSlice<'_>> = chunks
                .iter()
                .take(MAX_SLICES)
                .map(|c| IoSlice::new(c))
                .collect();
            let mut n = self.tcp.try_write_vectored(&slices)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let mut done = 0;
            for c in chunks.iter_mut() {
                if n >= c.len() {
                    n -= c.len();
                    done += 1;
                } else {
                    c.advance(n);
                    break;
                }
            }
            chunks.drain(..done);
        }
        Ok(())
    }

    /// Writes every chunk, waiting for the socket as needed; gives up when the peer accepts
    /// nothing for `stall` (it stopped reading).
    pub async fn write_all(&self, mut chunks: Vec<Bytes>, stall: Duration) -> Wrote {
        loop {
            match self.try_write_chunks(&mut chunks) {
                Ok(()) => return Wrote::Ok,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Wrote::Failed,
            }
            match tokio::time::timeout(stall, self.tcp.writable()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Wrote::Failed,
                Err(_) => return Wrote::Stalled(chunks),
            }
        }
    }

    /// Half-closes the stream after our close frame: the peer reads the frame and then the end.
    pub fn shutdown_write(&self) {
        let _ = socket2::SockRef::from(&self.tcp).shutdown(std::net::Shutdown::Write);
    }
}

/// How a bounded write ended.
pub enum Wrote {
    Ok,
    /// The socket is gone.
    Failed,
    /// The peer accepted nothing for the whole slow-client timeout; what is still unwritten
    /// (a frame may be cut in the middle: only its rest may follow).
    Stalled(Vec<Bytes>),
}

impl DirectSocket for Socket {
    fn try_send(&self, payload: &Bytes) -> Sent {
        let (h, n) = header(BINARY, payload.len());
        let slices = [IoSlice::new(&h[..n]), IoSlice::new(payload)];
        match self.tcp.try_write_vectored(&slices) {
            Ok(w) if w == n + payload.len() => Sent::All,
            Ok(0) => Sent::Failed,
            Ok(w) if w < n => {
                Sent::Partial(vec![Bytes::copy_from_slice(&h[w..n]), payload.clone()])
            }
            Ok(w) => Sent::Partial(vec![payload.slice(w - n..)]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Sent::Blocked,
            Err(_) => Sent::Failed,
        }
    }

    fn try_send_raw(&self, raw: &Bytes) -> Sent {
        match self.tcp.try_write(raw) {
            Ok(w) if w == raw.len() => Sent::All,
            Ok(0) => Sent::Failed,
            Ok(w) => Sent::Partial(vec![raw.slice(w..)]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Sent::Blocked,
            Err(_) => Sent::Failed,
        }
    }
}

/// The frames a writer sends for drained payloads: header and shared payload, no copy of it.
pub fn frame_all(raw: Vec<Bytes>, payloads: Vec<Bytes>) -> Vec<Bytes> {
    let mut chunks = raw;
    chunks.reserve(payloads.len() * 2);
    for p in payloads {
        let (h, n) = header(BINARY, p.len());
        chunks.push(Bytes::copy_from_slice(&h[..n]));
        chunks.push(p);
    }
    chunks
}

/// What the reader got from the socket.
pub enum Got {
    Message(tungstenite::Message),
    /// Nothing more to read right now.
    WouldBlock,
    Closed,
    Error(tungstenite::Error),
}

/// tungstenite over the socket's non-blocking reads. Its own writes (pongs, a close reply)
/// land in `replies`, for the caller to queue in order with every other frame.
pub struct FrameReader {
    ws: WebSocketContext,
    replies: Vec<u8>,
}

struct Io<'a> {
    tcp: &'a TcpStream,
    out: &'a mut Vec<u8>,
}

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.try_read(buf)
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl FrameReader {
    /// `read_buf`: bytes the HTTP layer read past the upgrade request.
    pub fn new(read_buf: Bytes, read_buffer: usize, max_message: usize) -> Self {
        let mut config = WebSocketConfig::default();
        config.read_buffer_size = read_buffer;
        // tungstenite writes only pongs and close replies, and we take them at once.
        config.write_buffer_size = 0;
        config.max_message_size = Some(max_message);
        config.max_frame_size = Some(max_message);
        FrameReader {
            ws: WebSocketContext::from_partially_read(
                read_buf.to_vec(),
                Role::Server,
                Some(config),
            ),
            replies: Vec::new(),
        }
    }

    pub fn read(&mut self, tcp: &TcpStream) -> Got {
        let mut io = Io {
            tcp,
            out: &mut self.replies,
        };
        match self.ws.read(&mut io) {
            Ok(m) => Got::Message(m),
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                Got::WouldBlock
            }
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Got::Closed
            }
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Got::Closed
            }
            Err(e) => Got::Error(e),
        }
    }

    /// Frames tungstenite wrote (pongs, a close reply), taken.
    pub fn take_replies(&mut self) -> Option<Bytes> {
        (!self.replies.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.replies)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_use_the_shortest_length_form() {
        assert_eq!(header(BINARY, 5).1, 2);
        assert_eq!(header(BINARY, 125).0[..2], [0x82, 125]);
        let (h, n) = header(BINARY, 126);
        assert_eq!((n, &h[..4]), (4, &[0x82, 126, 0, 126][..]));
        let (h, n) = header(BINARY, 70_000);
        assert_eq!(n, 10);
        assert_eq!(
            u64::from_be_bytes(h[2..10].try_into().expect("eight bytes")),
            70_000
        );
    }

    #[test]
    fn our_frames_parse_as_websocket_frames() {
        use tungstenite::protocol::frame::FrameHeader;
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 200_000] {
            let payload = vec![7u8; len];
            let f = framed(BINARY, &payload);
            let mut cursor = io::Cursor::new(f.to_vec());
            let (head, plen) = FrameHeader::parse(&mut cursor)
                .expect("parses")
                .expect("whole header");
            assert!(head.is_final);
            assert!(head.mask.is_none());
            assert_eq!(plen as usize, len);
            assert_eq!(cursor.position() as usize + len, f.len());
        }
    }
}
