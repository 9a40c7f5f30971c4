//! The write door's tests: refusals and their one answer per protocol, the order of the steps,
//! document size, the dependency wait and held updates, the token at the append, chains.

use super::*;
use crate::backplane::embedded::EmbeddedBackplane;
use yrs::updates::decoder::Decode;
use yrs::{ReadTxn, Text, Transact};

fn doc_id() -> DocId {
    DocId::parse("door").expect("doc id")
}

/// Two updates of one yrs client: the second builds on the first.
fn two_edits() -> (Bytes, Bytes) {
    let doc = yrs::Doc::with_client_id(7);
    let text = doc.get_or_insert_text("t");
    text.insert(&mut doc.transact_mut(), 0, "a");
    let first = doc
        .transact()
        .encode_state_as_update_v1(&Default::default());
    let after_first = doc.transact().state_vector();
    text.insert(&mut doc.transact_mut(), 1, "b");
    let second = doc.transact().encode_state_as_update_v1(&after_first);
    (Bytes::from(first), Bytes::from(second))
}

struct Fixture {
    door: Door,
    auth: Arc<Auth>,
    _dir: tempfile::TempDir,
}

fn fixture(limits: WriteLimits) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let tracker = tokio_util::task::TaskTracker::new();
    let backplane =
        EmbeddedBackplane::open(&dir.path().join("log.redb"), 1 << 20, &tracker).expect("open log");
    let auth = Arc::new(Auth::hs256(b"k"));
    let door = Door::new(1, Arc::new(backplane), auth.clone(), limits);
    Fixture {
        door,
        auth,
        _dir: dir,
    }
}

fn limits() -> WriteLimits {
    WriteLimits {
        max_update_bytes: 1 << 16,
        max_document_bytes: 1 << 20,
        missing_deps_wait: Duration::ZERO,
    }
}

fn principal(auth: &Auth, access: &str) -> Principal {
    let claims = serde_json::json!({
        "sub": "ann", "jti": "j1", "exp": crate::auth::now_secs() + 600,
        "docs": [{"doc": "door", "access": access}],
    });
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"k"),
    )
    .expect("encode");
    auth.verify(Some(&token)).expect("valid token")
}

/// A handle whose document is loaded and holds nothing.
fn empty_doc() -> DocHandle {
    let (handle, _commands) = DocHandle::for_tests(&doc_id());
    handle.publish_known([], true);
    handle
}

fn write(door: &Door, p: &Principal, update: Bytes, seq: Option<u64>) -> Write {
    let checked = door.check(p, &doc_id(), &update).expect("checked");
    Write {
        update,
        checked,
        seq,
    }
}

fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The one table: every refusal, and what each protocol answers (the integration suites
/// hold the protocols to it: auth.rs, hostile.rs, http_api.rs, yjs_compat.rs).
#[test]
fn every_refusal_has_one_answer_per_protocol() {
    use CloseCode as C;
    use ErrorCode as E;
    use StatusCode as S;
    let rejected = || Rejected::Malformed("x");
    let too_large = || Rejected::TooLarge(2, 1);
    let appended = || BackplaneError::Storage("disk".into());
    type Row = (Refusal, E, Fault, Option<C>, (S, &'static str), YjsAnswer);
    #[rustfmt::skip]
    let table: Vec<Row> = vec![
        (Refusal::ReadOnly, E::ReadOnly, Fault::Client, None,
            (S::FORBIDDEN, "forbidden"),
            YjsAnswer::DenyOnce("read-only: this token may not write to the document")),
        (Refusal::DocumentFull(9), E::DocumentTooLarge, Fault::Client, None,
            (S::PAYLOAD_TOO_LARGE, "document_too_large"),
            YjsAnswer::Deny("document size limit reached; it takes no more updates")),
        (Refusal::TooLarge(too_large()), E::TooLarge, Fault::Client, None,
            (S::PAYLOAD_TOO_LARGE, "too_large"), YjsAnswer::Close(C::MessageTooBig)),
        (Refusal::Invalid(rejected()), E::BadUpdate, Fault::Client, None,
            (S::BAD_REQUEST, "bad_update"), YjsAnswer::Charge),
        (Refusal::MissingDependencies, E::MissingDependencies, Fault::Client, None,
            (S::CONFLICT, "missing_dependencies"),
            YjsAnswer::DenyAndCharge("update refused: it builds on changes this document does not have")),
        (Refusal::Lost, E::MissingDependencies, Fault::Server, None,
            (S::CONFLICT, "missing_dependencies"), YjsAnswer::Close(C::InternalError)),
        (Refusal::Token(AuthError::Expired), E::Forbidden, Fault::Client, Some(C::TokenExpired),
            (S::UNAUTHORIZED, "token_expired"), YjsAnswer::Close(C::TokenExpired)),
        (Refusal::Token(AuthError::Revoked), E::Forbidden, Fault::Client, Some(C::Revoked),
            (S::UNAUTHORIZED, "token_revoked"), YjsAnswer::Close(C::Revoked)),
        (Refusal::AppendFailed(appended()), E::AppendFailed, Fault::Server, None,
            (S::SERVICE_UNAVAILABLE, "append_failed"), YjsAnswer::Close(C::InternalError)),
    ];
    for (refusal, code, fault, close, http, yjs) in table {
        assert_eq!(refusal.error_code(), code, "{refusal:?}");
        assert_eq!(refusal.fault(), fault, "{refusal:?}");
        assert_eq!(refusal.native_close(), close, "{refusal:?}");
        assert_eq!(refusal.http(), http, "{refusal:?}");
        assert_eq!(refusal.yjs(), yjs, "{refusal:?}");
        // Only our own failures are retryable by the client as they are.
        assert_eq!(
            code.retryable(),
            matches!(refusal, Refusal::AppendFailed(_)),
            "{refusal:?}"
        );
    }
}

#[test]
fn validation_sorts_size_from_garbage() {
    assert!(matches!(
        Refusal::rejected(Rejected::TooManyClients(1 << 20)),
        Refusal::TooLarge(_)
    ));
    assert!(matches!(
        Refusal::rejected(Rejected::TooDeep),
        Refusal::Invalid(_)
    ));
}

#[tokio::test]
async fn access_then_validation_before_any_document() {
    let f = fixture(WriteLimits {
        max_update_bytes: 64,
        ..limits()
    });
    let reader = principal(&f.auth, "read");
    let writer = principal(&f.auth, "write");
    let (first, _) = two_edits();
    let refused = f.door.check(&reader, &doc_id(), &first);
    assert!(
        matches!(refused, Err(Refusal::ReadOnly)),
        "{:?}",
        refused.err()
    );
    let elsewhere = f
        .door
        .check(&writer, &DocId::parse("other").expect("id"), &first);
    assert!(
        matches!(elsewhere, Err(Refusal::ReadOnly)),
        "{:?}",
        elsewhere.err()
    );
    assert_eq!(count(&f.door.stats.refused_writes), 2);
    let garbage = f
        .door
        .check(&writer, &doc_id(), &Bytes::from_static(&[9, 9, 9]));
    assert!(
        matches!(garbage, Err(Refusal::Invalid(_))),
        "{:?}",
        garbage.err()
    );
    let big = f
        .door
        .check(&writer, &doc_id(), &Bytes::from_static(&[0; 65]));
    assert!(matches!(big, Err(Refusal::TooLarge(_))), "{:?}", big.err());
    assert!(f.door.check(&writer, &doc_id(), &first).is_ok());
    assert_eq!(
        count(&f.door.stats.refused_writes),
        2,
        "validation is not access"
    );
}

#[tokio::test]
async fn a_full_document_takes_nothing_more() {
    let f = fixture(WriteLimits {
        max_document_bytes: 100,
        ..limits()
    });
    let p = principal(&f.auth, "write");
    let handle = empty_doc();
    handle.inner.approx_size.store(100, Ordering::Relaxed);
    let (first, _) = two_edits();
    let w = write(&f.door, &p, first, None);
    let refused = f
        .door
        .admit_checked(&p, &handle, &mut Writer::request(), w)
        .await;
    assert!(
        matches!(refused, Err(Refusal::DocumentFull(100))),
        "{:?}",
        refused.err()
    );
}

#[tokio::test]
async fn a_writer_may_build_on_its_own_admitted_appends() {
    let f = fixture(limits());
    let p = principal(&f.auth, "write");
    let handle = empty_doc();
    let (first, second) = two_edits();
    // Without the first, the second is missing what it builds on (no wait configured).
    let w = write(&f.door, &p, second.clone(), None);
    let refused = f
        .door
        .admit_checked(&p, &handle, &mut Writer::socket(3), w)
        .await;
    assert!(matches!(refused, Err(Refusal::MissingDependencies)));
    assert_eq!(count(&f.door.stats.refused_missing_deps), 1);
    // Admitted in order by one writer: the second builds on the first's clocks.
    let mut writer = Writer::socket(3);
    for (update, seq) in [(first, 1), (second, 2)] {
        let w = write(&f.door, &p, update, Some(seq));
        let append = f
            .door
            .admit_checked(&p, &handle, &mut writer, w)
            .await
            .map_err(|e| e.to_string())
            .expect("admitted");
        let done = append.await;
        assert_eq!((done.seq, done.chain), (Some(seq), 0));
        assert!(done.result.is_ok());
    }
    assert_eq!(writer.own.get(&7), Some(&2));
}

#[tokio::test]
async fn the_token_is_checked_again_at_the_append() {
    let f = fixture(limits());
    let p = principal(&f.auth, "write");
    let handle = empty_doc();
    let (first, _) = two_edits();
    let w = write(&f.door, &p, first, None);
    // Revoked after the check, before the append (as during a dependency wait).
    f.auth
        .revoke(None, Some("j1"), p.exp, crate::auth::now_secs());
    let mut writer = Writer::socket(3);
    let refused = f.door.admit_checked(&p, &handle, &mut writer, w).await;
    assert!(matches!(refused, Err(Refusal::Token(AuthError::Revoked))));
    assert_eq!(count(&f.door.stats.refused_writes), 1);
    assert!(writer.own.is_empty(), "nothing was admitted");
}

#[tokio::test]
async fn what_builds_on_a_lost_append_is_the_servers_fault() {
    let f = fixture(limits());
    let p = principal(&f.auth, "write");
    let handle = empty_doc();
    let (first, second) = two_edits();
    let mut writer = Writer::socket(3);
    writer.admitted(&write(&f.door, &p, first, None).checked.deps);
    writer.append_failed(0);
    writer.append_failed(0);
    assert_eq!(writer.chain, 1, "one new chain per failed chain");
    let w = write(&f.door, &p, second, Some(5));
    let refused = f.door.admit_checked(&p, &handle, &mut writer, w).await;
    assert!(matches!(refused, Err(Refusal::Lost)));
    assert_eq!(count(&f.door.stats.refused_missing_deps), 1);
}

#[test]
fn a_writer_keeps_only_a_failed_chain_after_unsubscribing() {
    let mut writer = Writer::socket(3);
    writer.own.insert(7, 2);
    assert!(!writer.unsubscribed(), "nothing worth keeping");
    writer.own.insert(7, 2);
    writer.append_failed(0);
    assert_eq!(writer.lost, HashSet::from([7]));
    assert!(writer.unsubscribed(), "the failed chain stays");
    assert!(writer.own.is_empty() && writer.lost.is_empty());
    let origin = writer.origin(9, Some(4)).expect("a socket has an origin");
    assert_eq!(
        (origin.node, origin.conn, origin.seq, origin.chain),
        (9, 3, Some(4), 1)
    );
    assert!(
        Writer::request().origin(9, None).is_none(),
        "requests are not acked"
    );
}

#[tokio::test]
async fn held_updates_wait_in_order_and_are_admitted_when_met() {
    let f = fixture(WriteLimits {
        missing_deps_wait: Duration::from_secs(60),
        ..limits()
    });
    let p = principal(&f.auth, "write");
    let handle = empty_doc();
    let (first, second) = two_edits();
    let (mut writer, mut holding, mut appends) = (Writer::socket(3), Holding::default(), vec![]);
    let w = write(&f.door, &p, second, None);
    let offered = f
        .door
        .offer(&p, &handle, &mut writer, &mut holding, w, &mut appends);
    assert_eq!(offered.ok(), Some(0));
    assert!(appends.is_empty() && !holding.is_empty());
    assert!(
        holding.wake().is_some(),
        "the session is told when to look again"
    );
    // Nothing new: it stays held.
    let released = f
        .door
        .release(&p, &handle, &mut writer, &mut holding, &mut appends);
    assert_eq!((released.ok(), appends.len()), (Some(0), 0));
    // The first arrives: both are admitted, the first one first.
    let w = write(&f.door, &p, first, None);
    let offered = f
        .door
        .offer(&p, &handle, &mut writer, &mut holding, w, &mut appends);
    assert_eq!(offered.ok(), Some(0));
    assert_eq!(appends.len(), 2);
    assert!(holding.is_empty() && holding.wake().is_none());
    let mut positions = vec![];
    for append in appends {
        positions.push(append.await.result.expect("appended"));
    }
    assert!(positions[0].id < positions[1].id);
}

#[tokio::test]
async fn held_updates_are_bounded_and_expire() {
    let f = fixture(limits());
    let p = principal(&f.auth, "write");
    let handle = empty_doc();
    let (_, second) = two_edits();
    let (mut writer, mut holding, mut appends) = (Writer::socket(3), Holding::default(), vec![]);
    for _ in 0..MAX_HELD {
        let w = write(&f.door, &p, second.clone(), None);
        let offered = f
            .door
            .offer(&p, &handle, &mut writer, &mut holding, w, &mut appends);
        assert_eq!(offered.ok(), Some(0));
    }
    let w = write(&f.door, &p, second.clone(), None);
    let full = f
        .door
        .offer(&p, &handle, &mut writer, &mut holding, w, &mut appends);
    assert!(matches!(full, Err(Refusal::MissingDependencies)));
    assert_eq!(count(&f.door.stats.refused_missing_deps), 1);
    // No wait configured: every held one is due, and each is refused.
    let released = f
        .door
        .release(&p, &handle, &mut writer, &mut holding, &mut appends);
    assert_eq!(released.ok(), Some(MAX_HELD));
    assert_eq!(
        count(&f.door.stats.refused_missing_deps),
        1 + MAX_HELD as u64
    );
    assert!(holding.is_empty() && holding.bytes == 0 && appends.is_empty());
    // The byte budget binds before the count: two of the largest updates.
    assert!(holding.has_room(100, 50));
    assert!(!holding.has_room(101, 50));
}

#[test]
fn the_second_edit_really_builds_on_the_first() {
    // Guards the fixture the tests above lean on.
    let (first, second) = two_edits();
    let deps = validate::check_update(&second, 1 << 16)
        .expect("valid")
        .deps;
    assert!(!deps.met_by(|_| 0));
    assert!(yrs::Update::decode_v1(&first).is_ok());
}
