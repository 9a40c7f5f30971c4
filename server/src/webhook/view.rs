//! Change webhooks, a sender's view of one document's log (between data-flow step 4 and the POST): which changes each URL has not been sent, read once.
//!
//! A sender wakes several times per delivery (each debounce deadline a new change pushed back,
//! each retry), and every wake needs the head and the ids and sizes of the unsent changes. The
//! first read takes the log after the lowest cursor; later ones only what follows the head
//! read last. Only ids and sizes are kept (not the updates), and at most [`MAX_CHANGES`] of
//! them: past that the view starts over from the log itself, whose length compaction bounds.

use crate::backplane::{Backplane, BackplaneResult, LogHead};
use chorus_protocol::{DocId, Position, StreamId};

/// Changes one view holds at most (16 bytes each).
pub const MAX_CHANGES: usize = 100_000;

/// One log entry, as far as a webhook needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub id: StreamId,
    pub bytes: u64,
}

#[derive(Default)]
pub struct LogView {
    /// As of the last read; `None` before the first.
    head: Option<LogHead>,
    /// The changes after the lowest cursor up to `head`, oldest first.
    changes: Vec<Change>,
}

impl LogView {
    /// The head as of the last [`refresh`](Self::refresh).
    pub fn head(&self) -> LogHead {
        self.head.unwrap_or(LogHead::NONE)
    }

    /// The changes after `after`, up to the head.
    pub fn after(&self, after: StreamId) -> &[Change] {
        let start = self.changes.partition_point(|c| c.id <= after);
        &self.changes[start..]
    }

    /// Brings the view up to the log's head, for URLs whose last delivered positions are
    /// `cursors`.
    pub async fn refresh(
        &mut self,
        log: &dyn Backplane,
        doc: &DocId,
        cursors: &[Option<Position>],
    ) -> BackplaneResult<()> {
        if let Some(seen) = self.head.filter(|_| self.changes.len() < MAX_CHANGES) {
            let (head, newer) = log.read_after(doc, seen.last).await?;
            if head.epoch == seen.epoch {
                self.changes.extend(newer.iter().map(change));
                self.head = Some(head);
                // What every URL has is no longer needed.
                let start = self
                    .changes
                    .partition_point(|c| c.id <= base_in(cursors, head.epoch));
                self.changes.drain(..start);
                return Ok(());
            }
        }
        // First read, a new epoch, or too much held: after the lowest cursor, then again from
        // the start if some URL has no cursor in the epoch the log turned out to be in.
        let lowest = cursors
            .iter()
            .map(|c| c.map_or(StreamId::ZERO, |p| p.id))
            .min()
            .unwrap_or(StreamId::ZERO);
        let (mut head, mut entries) = log.read_after(doc, lowest).await?;
        let base = base_in(cursors, head.epoch);
        if base < lowest {
            (head, entries) = log.read_after(doc, base).await?;
        }
        self.changes = entries.iter().map(change).collect();
        self.head = Some(head);
        Ok(())
    }
}

/// The lowest cursor among `cursors` in `epoch` (`ZERO` if some URL has none there).
fn base_in(cursors: &[Option<Position>], epoch: u64) -> StreamId {
    cursors
        .iter()
        .map(|c| {
            c.filter(|p| p.epoch == epoch)
                .map_or(StreamId::ZERO, |p| p.id)
        })
        .min()
        .unwrap_or(StreamId::ZERO)
}

fn change(e: &crate::backplane::Entry) -> Change {
    Change {
        id: e.id,
        bytes: e.update.len() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::embedded::EmbeddedBackplane;
    use bytes::Bytes;

    #[tokio::test]
    async fn a_view_reads_once_then_only_what_follows_and_forgets_what_every_url_has() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tracker = tokio_util::task::TaskTracker::new();
        let log =
            EmbeddedBackplane::open(&dir.path().join("log.redb"), 1 << 20, &tracker).expect("open");
        let doc = DocId::parse("viewed").expect("doc");
        let mut positions = Vec::new();
        for n in 1..=3u8 {
            let p = log.append(&doc, Bytes::from(vec![n; n as usize]), None, None);
            positions.push(p.await.expect("append"));
        }
        let mut view = LogView::default();
        view.refresh(&log, &doc, &[None]).await.expect("refresh");
        assert_eq!(view.head().last, positions[2].id);
        assert_eq!(view.after(StreamId::ZERO).len(), 3);
        assert_eq!(view.after(positions[0].id)[0].bytes, 2);

        let p4 = log.append(&doc, Bytes::from_static(b"four"), None, None);
        let p4 = p4.await.expect("append");
        // The URL now has the first two: they go from the view, the new one comes in.
        view.refresh(&log, &doc, &[Some(positions[1])])
            .await
            .expect("refresh");
        assert_eq!(view.head().last, p4.id);
        let ids: Vec<StreamId> = view.after(StreamId::ZERO).iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![positions[2].id, p4.id]);

        // A cursor of another epoch counts as none: the whole log again.
        let mut fresh = LogView::default();
        let stale = Position::new(p4.epoch + 1, p4.id);
        fresh
            .refresh(&log, &doc, &[Some(stale)])
            .await
            .expect("refresh");
        assert_eq!(fresh.after(StreamId::ZERO).len(), 4);
        log.close().await;
    }
}
