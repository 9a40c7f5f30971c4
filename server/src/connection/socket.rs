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
//! A payload larger than [`FRAGMENT`] (a whole-document answer, say) is never written
//! directly: the connection's writer sends it as a fragmented message, one run of header and
//! slice per fragment, and pings and pongs that come up meanwhile go between fragments (control
//! frames may interleave a fragmented message). So a joiner whose 20 MB answer takes longer than
//! the heartbeat timeout still gets pings and can answer them, and the silence check sees its
//! pongs instead of closing it mid-answer.
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
pub const CONTINUATION: u8 = 0x0;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// Payloads larger than this go out as fragments of this size. 1 MiB: a fragment takes about a
/// second on a 10 Mbit/s link, so a ping waits at most that long behind it; per fragment the
/// writer pays one header and one check for pings, nothing per byte.
pub const FRAGMENT: usize = 1 << 20;

/// A frame header: FIN set, no mask, the payload length in the shortest form.
pub fn header(opcode: u8, len: usize) -> ([u8; 10], usize) {
    fragment_header(opcode, true, len)
}

/// A frame header with FIN as given (a fragment of a longer message has it only on the last).
fn fragment_header(opcode: u8, fin: bool, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = if fin { 0x80 } else { 0 } | opcode;
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

    /// Writes `runs` in order, waiting for the socket as needed; between two runs, writes the
    /// frames `between` hands out first (pings and pongs that came up while a long message
    /// was being written). Gives up like [`Socket::write_all`].
    pub async fn write_runs(
        &self,
        runs: Vec<Vec<Bytes>>,
        stall: Duration,
        mut between: impl FnMut() -> Vec<Bytes>,
    ) -> Wrote {
        let mut runs = runs.into_iter();
        while let Some(run) = runs.next() {
            let wrote = match self.write_all(run, stall).await {
                Wrote::Ok if runs.len() > 0 => {
                    let controls = between();
                    if controls.is_empty() {
                        continue;
                    }
                    self.write_all(controls, stall).await
                }
                wrote => wrote,
            };
            match wrote {
                Wrote::Ok => {}
                Wrote::Failed => return Wrote::Failed,
                Wrote::Stalled(mut rest) => {
                    rest.extend(runs.flatten());
                    return Wrote::Stalled(rest);
                }
            }
        }
        Wrote::Ok
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
        if payload.len() > FRAGMENT {
            return Sent::Later;
        }
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

/// The frames a writer sends for drained payloads, as runs that [`Socket::write_runs`] may
/// put pings between: header and shared payload, no copy of it; a payload over [`FRAGMENT`]
/// becomes one run per fragment (slices of the same bytes), smaller frames share a run.
pub fn frame_all(raw: Vec<Bytes>, payloads: Vec<Bytes>) -> Vec<Vec<Bytes>> {
    let mut runs = Vec::new();
    let mut run = raw;
    run.reserve(payloads.len() * 2);
    for p in payloads {
        if p.len() <= FRAGMENT {
            let (h, n) = header(BINARY, p.len());
            run.push(Bytes::copy_from_slice(&h[..n]));
            run.push(p);
            continue;
        }
        let mut at = 0;
        while at < p.len() {
            let end = (at + FRAGMENT).min(p.len());
            let opcode = if at == 0 { BINARY } else { CONTINUATION };
            let (h, n) = fragment_header(opcode, end == p.len(), end - at);
            run.push(Bytes::copy_from_slice(&h[..n]));
            run.push(p.slice(at..end));
            runs.push(std::mem::take(&mut run));
            at = end;
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// Whether `raw` is exactly one ping or pong frame of ours (unmasked), the frames that may go
/// between the fragments of a message. A close reply may not: nothing follows a close.
pub fn is_ping_or_pong(raw: &Bytes) -> bool {
    match raw.as_ref() {
        [b0, b1, rest @ ..] => {
            (*b0 == 0x80 | PING || *b0 == 0x80 | PONG)
                && *b1 <= 125
                && rest.len() == usize::from(*b1)
        }
        _ => false,
    }
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

    /// Parses every frame of `runs` (concatenated): (opcode, fin, payload) each.
    fn parse_frames(runs: &[Vec<Bytes>]) -> Vec<(u8, bool, Vec<u8>)> {
        use tungstenite::protocol::frame::FrameHeader;
        let bytes: Vec<u8> = runs.iter().flatten().flat_map(|c| c.to_vec()).collect();
        let mut cursor = io::Cursor::new(&bytes[..]);
        let mut frames = Vec::new();
        while (cursor.position() as usize) < bytes.len() {
            let (head, len) = FrameHeader::parse(&mut cursor)
                .expect("parses")
                .expect("whole header");
            let at = cursor.position() as usize;
            frames.push((
                u8::from(head.opcode),
                head.is_final,
                bytes[at..at + len as usize].to_vec(),
            ));
            cursor.set_position((at + len as usize) as u64);
        }
        frames
    }

    #[test]
    fn a_payload_over_a_fragment_goes_as_a_fragmented_message_one_run_per_fragment() {
        let big: Vec<u8> = (0..FRAGMENT * 2 + 10).map(|i| i as u8).collect();
        let runs = frame_all(
            vec![framed(PING, b"p")],
            vec![Bytes::from_static(b"small"), Bytes::from(big.clone())],
        );
        // The ping and the small frame ride with the first fragment; then one run each.
        assert_eq!(runs.len(), 3);
        let frames = parse_frames(&runs);
        let kinds: Vec<(u8, bool)> = frames.iter().map(|(o, f, _)| (*o, *f)).collect();
        assert_eq!(
            kinds,
            [
                (PING, true),
                (BINARY, true),
                (BINARY, false),
                (CONTINUATION, false),
                (CONTINUATION, true)
            ]
        );
        assert_eq!(frames[1].2, b"small");
        let joined: Vec<u8> = frames[2..].iter().flat_map(|f| f.2.clone()).collect();
        assert_eq!(joined, big, "the fragments are the payload, in order");
        assert!(frames[2..4].iter().all(|f| f.2.len() == FRAGMENT));
    }

    #[test]
    fn only_single_pings_and_pongs_may_go_between_fragments() {
        assert!(is_ping_or_pong(&framed(PING, &[])));
        assert!(is_ping_or_pong(&framed(PONG, b"0123456789")));
        assert!(!is_ping_or_pong(&close_frame(
            chorus_protocol::CloseCode::GoingAway
        )));
        let two = [framed(PONG, b"a").to_vec(), framed(PING, b"b").to_vec()].concat();
        assert!(!is_ping_or_pong(&Bytes::from(two)));
        assert!(!is_ping_or_pong(&framed(BINARY, b"x")));
        assert!(!is_ping_or_pong(&Bytes::from_static(&[0x89])));
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
