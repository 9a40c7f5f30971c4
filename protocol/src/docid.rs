//! Document ids: what the server accepts as a document name, checked once at the edge.

use std::fmt;
use std::sync::Arc;

/// Longest document id accepted, in bytes.
pub const MAX_DOC_ID_LEN: usize = 200;

/// A validated document id: 1..=200 bytes of `A-Z a-z 0-9 - _ . ~ : @`, not starting with `.`.
/// The alphabet is safe in URL paths, file names, Redis keys (no `{}`) and log lines, so no
/// layer below has to escape it. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocId(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocIdError {
    #[error("document id is empty")]
    Empty,
    #[error("document id is longer than {MAX_DOC_ID_LEN} bytes")]
    TooLong,
    #[error("document id may only contain A-Z a-z 0-9 - _ . ~ : @ and may not start with '.'")]
    BadCharacter,
}

impl DocId {
    pub fn parse(s: &str) -> Result<Self, DocIdError> {
        if s.is_empty() {
            return Err(DocIdError::Empty);
        }
        if s.len() > MAX_DOC_ID_LEN {
            return Err(DocIdError::TooLong);
        }
        let ok = |b: u8| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':' | b'@')
        };
        if s.starts_with('.') || !s.bytes().all(ok) {
            return Err(DocIdError::BadCharacter);
        }
        Ok(DocId(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names_and_rejects_the_rest() {
        for ok in ["a", "room-1", "team:notes@v2", "x.y_z~"] {
            assert!(DocId::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(DocId::parse(""), Err(DocIdError::Empty));
        assert_eq!(DocId::parse(&"a".repeat(201)), Err(DocIdError::TooLong));
        for bad in [".", "..", "a/b", "a b", "{a}", "é", "a\0"] {
            assert_eq!(DocId::parse(bad), Err(DocIdError::BadCharacter), "{bad}");
        }
    }
}
