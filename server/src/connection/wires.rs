//! The wire protocols' frames (data-flow step 6): how each protocol encodes what a document
//! hands its subscribers, behind `doc`'s [`Wire`] trait.
//!
//! One static per wire, each with its own [`WireId`]: native MessagePack (`/v1/ws`),
//! y-websocket (`/y/{doc}`, framing from [`chorus_protocol::y_websocket`]), and Server-Sent
//! Events with and without presence. An SSE stream is a wire of its own, not a native reader
//! that re-encodes: its events are built once per update and shared by every SSE reader of the
//! document, as WebSocket frames are. Long-polls keep the native wire: a poll takes one answer,
//! merged from what it drained, so there is no per-update work to share.

use crate::doc::wire::{Answer, Join, Parts, Wire, WireId, one};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use chorus_protocol::y_websocket as yws;
use chorus_protocol::{DocId, ErrorCode, Position, ServerFrame, encode};

/// A y-websocket answer larger than this goes as pieces of about this size: a message about
/// as often as a fragment of another wire's answer (see `socket.rs`), each one frame with its
/// few bytes of y-protocols header.
const ANSWER_PIECE: usize = super::socket::FRAGMENT - 64;

/// `/v1/ws`: MessagePack frames naming their document; acks and typed errors.
pub struct Native;
pub static NATIVE: Native = Native;

/// `/y/{doc}`: y-protocols messages; one document per socket, so frames name none. No acks
/// and no error message: a stock client learns its update landed by the update itself.
pub struct YWebsocket;
pub static Y_WEBSOCKET: YWebsocket = YWebsocket;

/// `/v1/docs/{doc}/events`: text events, `id:` the position; presence only when asked for.
pub struct Sse {
    id: WireId,
    presence: bool,
}
pub static SSE: Sse = Sse {
    id: WireId::new(2),
    presence: false,
};
pub static SSE_PRESENCE: Sse = Sse {
    id: WireId::new(3),
    presence: true,
};

/// Every wire of the node (each id once).
pub static ALL: [&dyn Wire; 4] = [&NATIVE, &Y_WEBSOCKET, &SSE, &SSE_PRESENCE];

impl Wire for Native {
    fn id(&self) -> WireId {
        const ID: WireId = WireId::new(0);
        ID
    }

    fn name(&self) -> &'static str {
        "native"
    }

    fn update(&self, doc: &DocId, update: &[u8], position: Position) -> Bytes {
        Bytes::from(encode::update(doc.as_str(), update, position))
    }

    fn synced(&self, doc: &DocId, update: &[u8], position: Position, answer: Answer) -> Parts {
        let replay = answer == Answer::Replay;
        one(Bytes::from(encode::synced(
            doc.as_str(),
            update,
            position,
            replay,
        )))
    }

    fn awareness(&self, doc: &DocId, raw: &[u8]) -> Option<Bytes> {
        Some(Bytes::from(encode::awareness(doc.as_str(), raw)))
    }

    fn ack(&self, doc: &DocId, seq: Option<u64>, position: Position) -> Option<Bytes> {
        let frame = ServerFrame::Ack {
            doc: doc.to_string(),
            seq,
            position,
        };
        frame.encode().ok().map(Bytes::from)
    }

    fn error(&self, doc: &DocId, code: ErrorCode, message: &str) -> Option<Bytes> {
        let frame = ServerFrame::Error {
            code,
            message: message.into(),
            doc: Some(doc.as_str().to_owned()),
            seq: None,
        };
        frame.encode().ok().map(Bytes::from)
    }

    fn join(&self) -> Join {
        Join::Answer
    }
}

impl Wire for YWebsocket {
    fn id(&self) -> WireId {
        const ID: WireId = WireId::new(1);
        ID
    }

    fn name(&self) -> &'static str {
        "y-websocket"
    }

    fn update(&self, _: &DocId, update: &[u8], _: Position) -> Bytes {
        Bytes::from(yws::sync_update(update))
    }

    /// Every answer is a sync step 2: y-websocket has no positions and no replay flag. One
    /// larger than [`ANSWER_PIECE`] is cut into updates (`split_update`) sent as sync updates,
    /// the last as the step 2: the stock client reconnects after 30 s without a message
    /// (yhub#55), and gets one at least every piece; its `synced` still waits for the step 2.
    fn synced(&self, _: &DocId, update: &[u8], _: Position, _: Answer) -> Parts {
        let Some(pieces) = crate::validate::split_update(update, ANSWER_PIECE) else {
            return one(Bytes::from(yws::sync_step2(update)));
        };
        let last = pieces.len() - 1;
        pieces
            .iter()
            .enumerate()
            .map(|(i, piece)| {
                Bytes::from(if i == last {
                    yws::sync_step2(piece)
                } else {
                    yws::sync_update(piece)
                })
            })
            .collect()
    }

    fn awareness(&self, _: &DocId, raw: &[u8]) -> Option<Bytes> {
        Some(Bytes::from(yws::awareness(raw)))
    }

    fn ack(&self, _: &DocId, _: Option<u64>, _: Position) -> Option<Bytes> {
        None
    }

    /// y-websocket's only refusal is `permission denied`, which stock clients take as "stop
    /// sending"; a refused awareness update is not worth that.
    fn error(&self, _: &DocId, _: ErrorCode, _: &str) -> Option<Bytes> {
        None
    }

    /// A stock client sends its step 1 on connect and waits for our step 2; it also expects
    /// our step 1, to send what we lack.
    fn join(&self) -> Join {
        Join::Offer(|_, state_vector| Bytes::from(yws::sync_step1(state_vector)))
    }
}

impl Wire for Sse {
    fn id(&self) -> WireId {
        self.id
    }

    fn name(&self) -> &'static str {
        if self.presence { "sse+presence" } else { "sse" }
    }

    fn update(&self, _: &DocId, update: &[u8], position: Position) -> Bytes {
        event(None, Some(position), update)
    }

    /// A catch-up that is not an exact replay (first state, a trimmed or foreign position, a
    /// catch-up after the budget was exceeded) is `event: state`; a replay is a plain
    /// `message`, and an empty one says nothing (the reader already is at `position`).
    fn synced(&self, _: &DocId, update: &[u8], position: Position, answer: Answer) -> Parts {
        one(match answer {
            Answer::Replay if update == yrs::Update::EMPTY_V1 => Bytes::new(),
            Answer::Replay => event(None, Some(position), update),
            Answer::State => event(Some("state"), Some(position), update),
        })
    }

    /// `event: awareness`, without an id (presence moves no position).
    fn awareness(&self, _: &DocId, raw: &[u8]) -> Option<Bytes> {
        self.presence.then(|| event(Some("awareness"), None, raw))
    }

    /// Readers do not write.
    fn ack(&self, _: &DocId, _: Option<u64>, _: Position) -> Option<Bytes> {
        None
    }

    /// Nothing a reader does is refused per document; the stream ends with `event: close`.
    fn error(&self, _: &DocId, _: ErrorCode, _: &str) -> Option<Bytes> {
        None
    }

    fn join(&self) -> Join {
        Join::Answer
    }
}

/// One SSE event: `event:` when named, `id:` when it moves the position, the payload in base64.
fn event(name: Option<&str>, id: Option<Position>, data: &[u8]) -> Bytes {
    use std::io::Write;
    let mut out = Vec::with_capacity(32 + data.len().div_ceil(3) * 4);
    if let Some(name) = name {
        let _ = writeln!(out, "event: {name}");
    }
    if let Some(id) = id {
        let _ = writeln!(out, "id: {id}");
    }
    out.extend_from_slice(b"data: ");
    // Straight into the event, without a String in between.
    let start = out.len();
    out.resize(
        start + base64::encoded_len(data.len(), true).unwrap_or(0),
        0,
    );
    let written = B64.encode_slice(data, &mut out[start..]).unwrap_or(0);
    out.truncate(start + written);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_protocol::StreamId;

    #[test]
    fn every_wire_has_its_own_id_below_max_wires() {
        let ids: Vec<usize> = ALL.iter().map(|w| w.id().index()).collect();
        for (i, id) in ids.iter().enumerate() {
            assert!(*id < crate::doc::wire::MAX_WIRES);
            assert!(!ids[..i].contains(id), "wire id {id} taken twice");
        }
    }

    #[test]
    fn native_frames_decode_as_the_server_frames_they_name() {
        let doc = DocId::parse("d").expect("id");
        let p = Position::new(3, StreamId::new(5, 1));
        assert_eq!(
            ServerFrame::decode(&NATIVE.synced(&doc, &[1, 2], p, Answer::Replay)[0]).ok(),
            Some(ServerFrame::Synced {
                doc: "d".into(),
                update: vec![1, 2],
                position: p,
                replay: true,
            })
        );
        assert_eq!(
            ServerFrame::decode(&NATIVE.ack(&doc, Some(9), p).expect("ack")).ok(),
            Some(ServerFrame::Ack {
                doc: "d".into(),
                seq: Some(9),
                position: p,
            })
        );
    }

    #[test]
    fn y_websocket_answers_are_step_2_and_its_join_offers_step_1() {
        let doc = DocId::parse("d").expect("id");
        let p = Position::new(1, StreamId::new(1, 1));
        assert_eq!(
            &Y_WEBSOCKET.synced(&doc, &[0, 0], p, Answer::Replay)[..],
            [Bytes::from(yws::sync_step2(&[0, 0]))]
        );
        assert!(Y_WEBSOCKET.ack(&doc, Some(1), p).is_none());
        let Join::Offer(offer) = Y_WEBSOCKET.join() else {
            panic!("y-websocket joins with an offer")
        };
        assert_eq!(offer(&doc, &[0]), yws::sync_step1(&[0]));
    }

    /// yhub#55: a stock client gets a message at least every piece of a very large answer,
    /// and its `synced` only with the last.
    #[test]
    fn a_y_websocket_answer_larger_than_a_piece_goes_as_updates_then_step_2() {
        use yrs::updates::decoder::Decode;
        use yrs::{GetString, ReadTxn, Text, Transact};
        let doc = DocId::parse("d").expect("id");
        let p = Position::new(1, StreamId::new(1, 1));
        let source = yrs::Doc::new();
        let text = source.get_or_insert_text("t");
        // Inserted at the front each time: 300 blocks of 10 KB, 3 MB in all.
        for i in 0..300u32 {
            let chunk = char::from(b'a' + (i % 26) as u8).to_string().repeat(10_000);
            text.insert(&mut source.transact_mut(), 0, &chunk);
        }
        let state = source
            .transact()
            .encode_state_as_update_v1(&yrs::StateVector::default());
        let frames = Y_WEBSOCKET.synced(&doc, &state, p, Answer::State);
        assert!(frames.len() >= 3, "{} frames", frames.len());
        let copy = yrs::Doc::new();
        for (i, frame) in frames.iter().enumerate() {
            assert!(
                frame.len() <= super::super::socket::FRAGMENT,
                "one frame each"
            );
            let last = i == frames.len() - 1;
            let payload = match yrs::sync::Message::decode_v1(frame) {
                Ok(yrs::sync::Message::Sync(yrs::sync::SyncMessage::SyncStep2(u))) if last => u,
                Ok(yrs::sync::Message::Sync(yrs::sync::SyncMessage::Update(u))) if !last => u,
                other => panic!("frame {i}: {other:?}"),
            };
            let update = yrs::Update::decode_v1(&payload).expect("decodes");
            copy.transact_mut().apply_update(update).expect("applies");
        }
        assert_eq!(
            copy.get_or_insert_text("t").get_string(&copy.transact()),
            text.get_string(&source.transact())
        );
    }

    #[test]
    fn sse_events_carry_the_position_and_presence_only_when_asked() {
        let doc = DocId::parse("d").expect("id");
        let p = Position::new(1, StreamId::new(7, 0));
        let update = SSE.update(&doc, &[1, 2, 3], p);
        assert_eq!(&update[..], format!("id: {p}\ndata: AQID\n\n").as_bytes());
        let state = SSE.synced(&doc, &[1, 2, 3], p, Answer::State);
        assert!(state.len() == 1 && state[0].starts_with(b"event: state\n"));
        assert!(
            SSE.synced(&doc, yrs::Update::EMPTY_V1, p, Answer::Replay)
                .iter()
                .all(|f| f.is_empty()),
            "an empty replay says nothing"
        );
        assert!(SSE.awareness(&doc, &[0]).is_none());
        assert_eq!(
            SSE_PRESENCE.awareness(&doc, &[0]).as_deref(),
            Some(&b"event: awareness\ndata: AA==\n\n"[..])
        );
    }
}
