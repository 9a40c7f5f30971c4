//! Positions in a document's log: (epoch, stream id), as handed to clients and sent back on resume.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A log entry id, ordered like a Redis stream id (`ms-seq`). `0-0` means "before the first
/// entry": a client holding it has seen nothing of this epoch.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(from = "(u64, u64)", into = "(u64, u64)")]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    pub const fn new(ms: u64, seq: u64) -> Self {
        StreamId { ms, seq }
    }

    /// The smallest id greater than `self` (what an exclusive range starts at).
    pub fn successor(self) -> Self {
        match self.seq.checked_add(1) {
            Some(seq) => StreamId { ms: self.ms, seq },
            None => StreamId {
                ms: self.ms.saturating_add(1),
                seq: 0,
            },
        }
    }
}

impl From<(u64, u64)> for StreamId {
    fn from((ms, seq): (u64, u64)) -> Self {
        StreamId { ms, seq }
    }
}

impl From<StreamId> for (u64, u64) {
    fn from(id: StreamId) -> Self {
        (id.ms, id.seq)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Where a client is in a document's log. The epoch names one incarnation of the log: when a
/// log is lost or recreated it gets a new epoch, and a position from another epoch is never
/// trusted for replay (the client gets a state-vector sync instead).
///
/// On the wire: a MessagePack array `[epoch, ms, seq]`. Epochs stay below 2^53 so that
/// JavaScript clients can hold them as plain numbers. As text (headers, SSE ids):
/// `epoch.ms-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "(u64, u64, u64)", into = "(u64, u64, u64)")]
pub struct Position {
    pub epoch: u64,
    pub id: StreamId,
}

impl Position {
    pub const fn new(epoch: u64, id: StreamId) -> Self {
        Position { epoch, id }
    }
}

impl From<(u64, u64, u64)> for Position {
    fn from((epoch, ms, seq): (u64, u64, u64)) -> Self {
        Position {
            epoch,
            id: StreamId { ms, seq },
        }
    }
}

impl From<Position> for (u64, u64, u64) {
    fn from(p: Position) -> Self {
        (p.epoch, p.id.ms, p.id.seq)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.epoch, self.id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a position is written `epoch.ms-seq` (three unsigned integers)")]
pub struct PositionParseError;

impl FromStr for Position {
    type Err = PositionParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (epoch, id) = s.split_once('.').ok_or(PositionParseError)?;
        let (ms, seq) = id.split_once('-').ok_or(PositionParseError)?;
        let n = |x: &str| x.parse::<u64>().map_err(|_| PositionParseError);
        Ok(Position::new(n(epoch)?, StreamId::new(n(ms)?, n(seq)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_order_like_redis_stream_ids() {
        assert!(StreamId::new(1, 5) < StreamId::new(2, 0));
        assert!(StreamId::new(2, 0) < StreamId::new(2, 1));
        assert_eq!(StreamId::new(1, u64::MAX).successor(), StreamId::new(2, 0));
    }

    #[test]
    fn text_form_round_trips_and_rejects_junk() {
        let p = Position::new(7, StreamId::new(1700, 2));
        assert_eq!(p.to_string(), "7.1700-2");
        assert_eq!("7.1700-2".parse::<Position>(), Ok(p));
        for bad in ["", "7", "7.1", "7.1-", "x.1-2", "7.1-2-3", "-1.2-3"] {
            assert!(bad.parse::<Position>().is_err(), "{bad}");
        }
    }
}
