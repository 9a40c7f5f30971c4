//! The y-websocket message framing (y-protocols `sync`, `awareness`, `auth`), server → client
//! direction: a message type, for sync a sub-type, then a var-uint length and the payload —
//! byte for byte what `yrs::sync::Message` writes. Encoders only, over bytes already encoded
//! (state vectors and updates are yrs v1), so the framing needs no CRDT library; the server
//! parses client messages itself, behind its validation guards.

/// Message types.
pub const MSG_SYNC: u8 = 0;
pub const MSG_AWARENESS: u8 = 1;
pub const MSG_AUTH: u8 = 2;
pub const MSG_QUERY_AWARENESS: u8 = 3;

/// Sync sub-types.
pub const MSG_SYNC_STEP_1: u8 = 0;
pub const MSG_SYNC_STEP_2: u8 = 1;
pub const MSG_SYNC_UPDATE: u8 = 2;

/// The auth sub-type a server sends to refuse a client.
pub const PERMISSION_DENIED: u8 = 0;

/// An awareness message with no clients in it: changes nothing, but counts as traffic for a
/// client that drops a silent socket (y-websocket does after 30 s).
pub const KEEPALIVE: &[u8] = &[MSG_AWARENESS, 1, 0];

fn write_var(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn message(tags: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(tags.len() + 5 + payload.len());
    out.extend_from_slice(tags);
    write_var(&mut out, payload.len());
    out.extend_from_slice(payload);
    out
}

/// Sync step 1: the sender's state vector (v1-encoded), asking for what it lacks.
pub fn sync_step1(state_vector: &[u8]) -> Vec<u8> {
    message(&[MSG_SYNC, MSG_SYNC_STEP_1], state_vector)
}

/// Sync step 2: the answer to a step 1, a v1 update.
pub fn sync_step2(update: &[u8]) -> Vec<u8> {
    message(&[MSG_SYNC, MSG_SYNC_STEP_2], update)
}

/// A live update (v1).
pub fn sync_update(update: &[u8]) -> Vec<u8> {
    message(&[MSG_SYNC, MSG_SYNC_UPDATE], update)
}

/// An awareness update (y-protocols encoding).
pub fn awareness(update: &[u8]) -> Vec<u8> {
    message(&[MSG_AWARENESS], update)
}

/// `permission denied` with a reason; stock clients log it and stop sending.
pub fn permission_denied(reason: &str) -> Vec<u8> {
    message(&[MSG_AUTH, PERMISSION_DENIED], reason.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_var_uints() {
        assert_eq!(sync_update(&[7; 3]), vec![0, 2, 3, 7, 7, 7]);
        let big = sync_step2(&[1; 300]);
        assert_eq!(&big[..4], &[0, 1, 0xac, 0x02]);
        assert_eq!(big.len(), 4 + 300);
        assert_eq!(awareness(&[]), vec![1, 0]);
        assert_eq!(permission_denied("no"), vec![2, 0, 2, b'n', b'o']);
        assert_eq!(
            KEEPALIVE,
            awareness(&[0]),
            "an awareness update of zero clients"
        );
    }
}
