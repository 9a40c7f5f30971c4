//! Who may connect and what they may touch (data-flow step 1): signed tokens → a principal
//! with per-document read/write grants, checked before the upgrade and on every subscribe.
//!
//! Tokens are JWTs signed with a shared HS256 secret, or with an Ed25519 or ES256 key whose
//! public half the node holds. Claims: `sub` (who), `exp` (until when), optional `jti` (this
//! token's id) and `iat`, and `docs`: a list of grants `{"doc": "notes-1" | "team-*", "access":
//! "read" | "write"}`. A pattern ending in `*` grants every document id with that prefix.

use axum::http::StatusCode;
use chorus_protocol::{CloseCode, DocId};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Read,
    Write,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Grant {
    /// An exact document id, or a prefix followed by `*`.
    pub doc: String,
    pub access: Access,
}

impl Grant {
    fn matches(&self, doc: &DocId) -> bool {
        match self.doc.strip_suffix('*') {
            Some(prefix) => doc.as_str().starts_with(prefix),
            None => self.doc == doc.as_str(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    docs: Vec<Grant>,
}

/// The verified holder of a token (or everyone, when auth is off).
#[derive(Debug, Clone)]
pub struct Principal {
    pub sub: String,
    pub jti: Option<String>,
    pub iat: Option<u64>,
    /// Unix seconds after which the token is no longer valid; `None` when auth is off.
    pub exp: Option<u64>,
    grants: Option<Vec<Grant>>,
}

impl Principal {
    /// Auth is off: everyone may do everything, forever.
    pub fn open() -> Self {
        Principal {
            sub: "anonymous".into(),
            jti: None,
            iat: None,
            exp: None,
            grants: None,
        }
    }

    /// The strongest access any grant gives to `doc`.
    pub fn access(&self, doc: &DocId) -> Option<Access> {
        match &self.grants {
            None => Some(Access::Write),
            Some(grants) => grants
                .iter()
                .filter(|g| g.matches(doc))
                .map(|g| g.access)
                .max(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "a token is required (query parameter `token`, `Authorization: Bearer`, or subprotocol `chorus-token.<jwt>`)"
    )]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is invalid: {0}")]
    Invalid(String),
    #[error("the token was revoked")]
    Revoked,
    #[error("the token does not grant access to this document")]
    Forbidden,
    #[error("origin not allowed")]
    Origin,
}

impl AuthError {
    /// How a socket held under a token that stopped being valid is closed.
    pub fn close_code(&self) -> CloseCode {
        match self {
            AuthError::Expired => CloseCode::TokenExpired,
            _ => CloseCode::Revoked,
        }
    }

    /// The HTTP status and the `error` code of its JSON body, for a request refused with it
    /// (at the door of any request, or at a write's append; see `doc::admit::Refusal`).
    pub fn http(&self) -> (StatusCode, &'static str) {
        match self {
            AuthError::Forbidden | AuthError::Origin => (StatusCode::FORBIDDEN, "forbidden"),
            AuthError::Expired => (StatusCode::UNAUTHORIZED, "token_expired"),
            AuthError::Revoked => (StatusCode::UNAUTHORIZED, "token_revoked"),
            AuthError::Missing | AuthError::Invalid(_) => (StatusCode::UNAUTHORIZED, "bad_token"),
        }
    }
}

/// What a node verifies tokens with. `None` keys: auth is off.
pub struct Auth {
    key: Option<(DecodingKey, Validation)>,
    revoked: Revocations,
}

#[derive(Default)]
struct Revocations {
    /// token id → its expiry (kept until then).
    jti: Mutex<HashMap<String, u64>>,
    /// subject → revocation time: tokens of that subject issued at or before it are refused.
    sub: Mutex<HashMap<String, u64>>,
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Auth {
    pub fn disabled() -> Self {
        Auth {
            key: None,
            revoked: Revocations::default(),
        }
    }

    pub fn hs256(secret: &[u8]) -> Self {
        Self::with_key(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    /// A PEM public key: Ed25519 (`EdDSA`) or P-256 (`ES256`).
    pub fn public_key_pem(pem: &[u8]) -> Result<Self, String> {
        if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            return Ok(Self::with_key(key, Algorithm::EdDSA));
        }
        DecodingKey::from_ec_pem(pem)
            .map(|key| Self::with_key(key, Algorithm::ES256))
            .map_err(|e| format!("not an Ed25519 or P-256 public key in PEM form: {e}"))
    }

    fn with_key(key: DecodingKey, alg: Algorithm) -> Self {
        let mut validation = Validation::new(alg);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Auth {
            key: Some((key, validation)),
            revoked: Revocations::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// Verifies a token (or, with auth off, lets anyone in).
    pub fn verify(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        let Some((key, validation)) = &self.key else {
            return Ok(Principal::open());
        };
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let claims = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })?
            .claims;
        let principal = Principal {
            sub: claims.sub,
            jti: claims.jti,
            iat: claims.iat,
            exp: Some(claims.exp),
            grants: Some(claims.docs),
        };
        if self.is_revoked(&principal) {
            return Err(AuthError::Revoked);
        }
        Ok(principal)
    }

    /// Whether a principal verified earlier may still act: not expired, not revoked since.
    /// The write path asks before every append, so a revocation or an expiry stops writes at
    /// once, whatever the socket's writer is busy with (it may be stuck on a slow peer for up
    /// to twice `--slow-client-timeout` before its close goes out).
    pub fn still_valid(&self, p: &Principal) -> Result<(), AuthError> {
        if p.exp.is_some_and(|exp| now_secs() >= exp) {
            return Err(AuthError::Expired);
        }
        if self.is_revoked(p) {
            return Err(AuthError::Revoked);
        }
        Ok(())
    }

    pub fn is_revoked(&self, p: &Principal) -> bool {
        if let Some(jti) = &p.jti
            && lock(&self.revoked.jti).contains_key(jti)
        {
            return true;
        }
        match lock(&self.revoked.sub).get(&p.sub) {
            // Tokens without `iat` cannot prove they came after the revocation.
            Some(at) => p.iat.is_none_or(|iat| iat <= *at),
            None => false,
        }
    }

    /// Revokes a token id (until `exp`, default a day after `at`) or every token of a subject
    /// issued up to `at`. Applying the same revocation twice (it comes back from the shared
    /// stream) changes nothing; an older one never undoes a newer one.
    pub fn revoke(&self, sub: Option<&str>, jti: Option<&str>, exp: Option<u64>, at: u64) {
        if let Some(jti) = jti {
            let now = now_secs();
            let mut map = lock(&self.revoked.jti);
            map.retain(|_, until| *until > now);
            let until = exp.unwrap_or(at + 86_400);
            let kept = map.entry(jti.to_string()).or_insert(until);
            *kept = (*kept).max(until);
        }
        if let Some(sub) = sub {
            let mut map = lock(&self.revoked.sub);
            let kept = map.entry(sub.to_string()).or_insert(at);
            *kept = (*kept).max(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn token(secret: &[u8], claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("encode")
    }

    fn doc(s: &str) -> DocId {
        DocId::parse(s).expect("id")
    }

    #[test]
    fn grants_match_exact_ids_and_prefixes_and_the_strongest_wins() {
        let auth = Auth::hs256(b"k");
        let t = token(
            b"k",
            json!({"sub": "ann", "exp": now_secs() + 60, "docs": [
                {"doc": "team-*", "access": "read"},
                {"doc": "team-notes", "access": "write"},
                {"doc": "solo", "access": "read"}
            ]}),
        );
        let p = auth.verify(Some(&t)).expect("valid");
        assert_eq!(p.access(&doc("team-notes")), Some(Access::Write));
        assert_eq!(p.access(&doc("team-plans")), Some(Access::Read));
        assert_eq!(p.access(&doc("solo")), Some(Access::Read));
        assert_eq!(p.access(&doc("solo2")), None);
        assert_eq!(p.access(&doc("other")), None);
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let auth = Auth::hs256(b"k");
        assert_eq!(auth.verify(None).err(), Some(AuthError::Missing));
        let expired = token(b"k", json!({"sub": "a", "exp": now_secs() - 10}));
        assert_eq!(auth.verify(Some(&expired)).err(), Some(AuthError::Expired));
        let wrong_key = token(b"other", json!({"sub": "a", "exp": now_secs() + 60}));
        assert!(matches!(
            auth.verify(Some(&wrong_key)),
            Err(AuthError::Invalid(_))
        ));
        let mut tampered = token(b"k", json!({"sub": "a", "exp": now_secs() + 60}));
        tampered.insert(tampered.len() / 2, 'x');
        assert!(matches!(
            auth.verify(Some(&tampered)),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            auth.verify(Some("not.a.jwt")),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn revocation_by_token_id_and_by_subject() {
        let auth = Auth::hs256(b"k");
        let exp = now_secs() + 60;
        let a = token(b"k", json!({"sub": "a", "exp": exp, "jti": "t1"}));
        let b = token(b"k", json!({"sub": "b", "exp": exp, "iat": now_secs() - 5}));
        assert!(auth.verify(Some(&a)).is_ok() && auth.verify(Some(&b)).is_ok());
        auth.revoke(None, Some("t1"), Some(exp), now_secs());
        auth.revoke(Some("b"), None, None, now_secs());
        assert_eq!(auth.verify(Some(&a)).err(), Some(AuthError::Revoked));
        assert_eq!(auth.verify(Some(&b)).err(), Some(AuthError::Revoked));
        let later = token(b"k", json!({"sub": "b", "exp": exp, "iat": now_secs() + 1}));
        assert!(
            auth.verify(Some(&later)).is_ok(),
            "a token issued after the revocation works"
        );
    }

    #[test]
    fn a_verified_principal_stops_being_valid_when_revoked_or_expired() {
        let auth = Auth::hs256(b"k");
        let t = token(
            b"k",
            json!({"sub": "s", "exp": now_secs() + 60, "iat": now_secs() - 1}),
        );
        let p = auth.verify(Some(&t)).expect("valid");
        assert_eq!(auth.still_valid(&p), Ok(()));
        auth.revoke(Some("s"), None, None, now_secs());
        assert_eq!(auth.still_valid(&p), Err(AuthError::Revoked));
        let mut stale = p.clone();
        stale.sub = "other".into();
        stale.exp = Some(now_secs());
        assert_eq!(auth.still_valid(&stale), Err(AuthError::Expired));
        assert_eq!(AuthError::Expired.close_code(), CloseCode::TokenExpired);
        assert_eq!(AuthError::Revoked.close_code(), CloseCode::Revoked);
    }

    #[test]
    fn auth_off_lets_everyone_write() {
        let p = Auth::disabled().verify(None).expect("open");
        assert_eq!(p.access(&doc("anything")), Some(Access::Write));
        assert_eq!(p.exp, None);
    }
}
