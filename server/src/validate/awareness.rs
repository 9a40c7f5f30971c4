//! Write path edge for presence: a client's awareness update is checked (counts, clocks, JSON
//! states) before yrs decodes it.

use super::lib0::{Lib0Reader, read_client};
use super::scan::json_depth_ok;
use super::{MAX_CLOCK, Rejected};
use yrs::sync::awareness::AwarenessUpdate;
use yrs::updates::decoder::Decode;

/// Decodes a y-protocols awareness update, refusing states that are not JSON (stock Yjs
/// clients `JSON.parse` every state they receive; one bad string would break all of them).
pub fn decode_awareness(bytes: &[u8], max_bytes: usize) -> Result<AwarenessUpdate, Rejected> {
    if bytes.len() > max_bytes {
        return Err(Rejected::TooLarge(bytes.len(), max_bytes));
    }
    let mut r = Lib0Reader::new(bytes);
    let n = r.count(3)?;
    for _ in 0..n {
        read_client(&mut r)?;
        if r.var_u64()? > MAX_CLOCK {
            return Err(Rejected::Malformed("awareness clock beyond 2^32"));
        }
        let json = r.string()?;
        json_depth_ok(json)?;
        if serde_json::from_str::<serde::de::IgnoredAny>(json).is_err() {
            return Err(Rejected::BadJson);
        }
    }
    AwarenessUpdate::decode_v1(bytes).map_err(|_| Rejected::Malformed("awareness update"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::Doc;
    use yrs::updates::encoder::Encode;

    #[test]
    fn awareness_must_carry_json() {
        let mut good = yrs::sync::Awareness::new(Doc::with_client_id(1));
        good.set_local_state_raw(r#"{"name":"ann"}"#);
        let bytes = good.update().expect("update").encode_v1();
        assert!(decode_awareness(&bytes, 1 << 20).is_ok());
        let mut bad = yrs::sync::Awareness::new(Doc::with_client_id(2));
        bad.set_local_state_raw("{not json");
        let bytes = bad.update().expect("update").encode_v1();
        assert_eq!(
            decode_awareness(&bytes, 1 << 20).err(),
            Some(Rejected::BadJson)
        );
    }
}
