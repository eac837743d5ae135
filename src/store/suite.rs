//! One test suite for the [`Store`] trait. Every engine runs all of it.

use chrono::{TimeZone as _, Utc};

use super::*;
use crate::model::{
    Credentials, Endpoint, FlagState, FolderCursor, FolderRole, Integration, Mailbox, MailboxState,
    Provider, Security, Thread, ThreadRoute,
};

/// A store as the suite sees it: the trait, and what the tests read of the
/// trees beneath it (every `KvStore` is one, whatever its engine).
pub(super) trait SuiteStore: Store {
    fn stored_count(&self, tree: engine::Tree) -> usize;
    fn outbox_values_as_stored(&self) -> Vec<Vec<u8>>;
}

impl<E: engine::Engine> SuiteStore for kv_store::KvStore<E> {
    fn stored_count(&self, tree: engine::Tree) -> usize {
        kv_store::KvStore::stored_count(self, tree)
    }

    fn outbox_values_as_stored(&self) -> Vec<Vec<u8>> {
        kv_store::KvStore::outbox_values_as_stored(self)
    }
}

/// Opens an engine's store on a data folder; the same folder again
/// reopens what was stored there. An error is the store's refusal of the
/// data, never an earlier open still letting go.
type Opener = fn(&std::path::Path) -> anyhow::Result<Box<dyn SuiteStore>>;

/// Every engine the suite runs against, one opener each: the tests that
/// reopen a store (or look beneath it) loop over these, the others over
/// [`engines`].
fn openers() -> Vec<Opener> {
    let mut openers: Vec<Opener> = vec![open_sled];
    if engine::postgres::testing::database_url().is_some() {
        openers.push(open_postgres);
    }
    openers
}

/// The store on the test PostgreSQL (scripts/postgres/start.sh), in a
/// schema named after the data folder, so the same folder reopens the same
/// data; files (sources, bodies) stay in the folder, as on sled.
fn open_postgres(path: &std::path::Path) -> anyhow::Result<Box<dyn SuiteStore>> {
    use sha2::Digest as _;
    let url = engine::postgres::testing::database_url()
        .ok_or_else(|| anyhow::anyhow!("no test PostgreSQL"))?;
    let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
    let schema = format!("s_{}", &data_encoding::HEXLOWER.encode(&digest)[..24]);
    let engine =
        engine::postgres::PostgresEngine::open(engine::postgres::testing::options(&url, &schema))?;
    Ok(Box::new(kv_store::KvStore::with_engine(
        engine,
        path,
        secret_box::SecretBox::from_key(&[1; 32]),
    )?))
}

/// A fresh store on every engine, each in a folder of its own.
fn engines() -> Vec<(tempfile::TempDir, Box<dyn SuiteStore>)> {
    openers()
        .into_iter()
        .map(|open| {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path()).unwrap();
            (dir, store)
        })
        .collect()
}

/// The sled store at `path`: sled lets go of its lock a moment after the
/// last handle of an earlier open is dropped, so a reopen waits for that.
fn open_sled(path: &std::path::Path) -> anyhow::Result<Box<dyn SuiteStore>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match SledStore::open(path, secret_box::SecretBox::from_key(&[1; 32])) {
            Ok(store) => return Ok(Box::new(store)),
            Err(err)
                if err.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::yield_now();
            }
            Err(err) => return Err(err),
        }
    }
}

fn contact(id: &str, emails: &[&str]) -> Contact {
    Contact {
        location_id: "L1".into(),
        id: id.into(),
        emails: emails.iter().map(|e| e.to_string()).collect(),
        name: Some("Ann".into()),
        assigned_user_ids: vec!["u1".into()],
        created_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
    }
}

pub(crate) fn mailbox(address: &str) -> Mailbox {
    let endpoint = Endpoint {
        host: "127.0.0.1".into(),
        port: 993,
        security: Security::Tls,
    };
    Mailbox {
        address: address.into(),
        provider: Provider::Imap,
        credentials: Credentials::Password {
            username: address.into(),
            password: "top-secret-password".into(),
        },
        imap: endpoint.clone(),
        smtp: endpoint,
        daily_send_limit: None,
        save_sent: Default::default(),
        state: MailboxState::Connecting,
        last_error: None,
        connected_at: Utc::now(),
        generation: 0,
        folders: Vec::new(),
    }
}

/// Accepts a send over the thread as the store now holds it.
pub(super) fn accept(
    store: &dyn Store,
    record: &SendRecord,
    thread: &Thread,
    daily_limit: Option<u32>,
    now_ms: i64,
) -> StoreResult<SendAcceptance> {
    let before = store.thread(&thread.id).unwrap();
    store.accept_send(
        &NewSend {
            record,
            submitted: b"submitted copy",
            filed: b"filed copy",
            thread,
            thread_before: before.as_ref(),
            events: &[],
        },
        daily_limit,
        now_ms,
    )
}

/// me@x.test connected for L1/u1, its INBOX cursor at `start`.
fn connect_inbox_at(store: &dyn Store, start: FolderCursor) {
    store
        .connect(
            &mailbox("me@x.test"),
            &integration("L1", "u1", "me@x.test"),
            &[(FolderRole::Inbox, start)],
            &[],
            &[],
        )
        .unwrap();
}

fn integration(location: &str, user: &str, mailbox: &str) -> Integration {
    Integration {
        location_id: location.into(),
        user_id: user.into(),
        mailbox: mailbox.into(),
        connected_at: Utc::now(),
        baseline: vec![],
        smart_bcc_address: "x@bcc".into(),
    }
}

fn event(id: &str, ordering_key: &str, data: serde_json::Value) -> Event {
    Event {
        id: id.into(),
        kind: "message.inbound".into(),
        timestamp: Utc::now(),
        ordering_key: ordering_key.into(),
        data,
    }
}

#[test]
fn contacts_upsert_lookup_by_email_and_delete() {
    for (_dir, store) in engines() {
        store
            .put_contacts(&[contact("c1", &["ann@x.test", "a2@x.test"]).into()])
            .unwrap();
        assert_eq!(
            store.contacts_by_email("L1", "ann@x.test").unwrap().len(),
            1
        );
        assert!(
            store
                .contacts_by_email("L2", "ann@x.test")
                .unwrap()
                .is_empty()
        );
        // changing the emails drops the old index entry
        store
            .put_contacts(&[contact("c1", &["new@x.test"]).into()])
            .unwrap();
        assert!(
            store
                .contacts_by_email("L1", "ann@x.test")
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store.contacts_by_email("L1", "new@x.test").unwrap()[0].id,
            "c1"
        );
        assert!(store.delete_contact("L1", "c1").unwrap());
        assert!(!store.delete_contact("L1", "c1").unwrap());
        assert!(
            store
                .contacts_by_email("L1", "new@x.test")
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.contact("L1", "c1").unwrap(), None);
    }
}

#[test]
fn connect_seeds_cursors_once_and_disconnect_releases_the_last_user() {
    for (dir, store) in engines() {
        let first = FolderCursor::new(5, 10);
        let later = FolderCursor::new(5, 99);
        store
            .connect(
                &mailbox("me@x.test"),
                &integration("L1", "u1", "me@x.test"),
                &[(FolderRole::Inbox, first)],
                &[],
                &[],
            )
            .unwrap();
        store
            .connect(
                &mailbox("me@x.test"),
                &integration("L2", "u1", "me@x.test"),
                &[(FolderRole::Inbox, later)],
                &[],
                &[],
            )
            .unwrap();
        assert_eq!(
            store.cursor("me@x.test", FolderRole::Inbox).unwrap(),
            Some(first),
            "existing cursor kept"
        );
        assert_eq!(store.integrations_of_mailbox("me@x.test").unwrap().len(), 2);
        // credentials are sealed on disk
        let on_disk: Vec<u8> = walk(dir.path());
        assert!(
            !contains(&on_disk, b"top-secret-password"),
            "password readable on disk"
        );
        assert_eq!(
            store.mailbox("me@x.test").unwrap().unwrap().credentials,
            mailbox("me@x.test").credentials
        );

        let gone = store.disconnect("L1", "u1", &[]).unwrap().unwrap();
        assert!(!gone.mailbox_released);
        assert!(store.mailbox("me@x.test").unwrap().is_some());
        let gone = store.disconnect("L2", "u1", &[]).unwrap().unwrap();
        assert!(gone.mailbox_released);
        assert!(store.mailbox("me@x.test").unwrap().is_none());
        assert_eq!(store.cursor("me@x.test", FolderRole::Inbox).unwrap(), None);
        assert_eq!(store.disconnect("L2", "u1", &[]).unwrap(), None);
    }
}

#[test]
fn update_email_moves_the_integration() {
    for (_dir, store) in engines() {
        let cursor = FolderCursor::new(1, 7);
        let released = store
            .connect(
                &mailbox("old@x.test"),
                &integration("L1", "u1", "old@x.test"),
                &[(FolderRole::Inbox, cursor)],
                &[],
                &[],
            )
            .unwrap();
        assert_eq!(released, None);
        let mut queued = send_record("s-old", None);
        queued.mailbox = "old@x.test".into();
        let mut thread = send_thread();
        thread.mailbox = "old@x.test".into();
        accept(store.as_ref(), &queued, &thread, None, 0).unwrap();
        let mut failed = queued.clone();
        let failed_event = crate::send_queue::failed(&mut failed, "moved".into());
        let released = store
            .connect(
                &mailbox("new@x.test"),
                &integration("L1", "u1", "new@x.test"),
                &[],
                &[(failed, failed_event)],
                &[],
            )
            .unwrap();
        assert_eq!(
            released.as_deref(),
            Some("old@x.test"),
            "R18: released at once"
        );
        assert!(store.mailbox("old@x.test").unwrap().is_none());
        assert_eq!(store.cursor("old@x.test", FolderRole::Inbox).unwrap(), None);
        assert_eq!(
            store.send("s-old").unwrap().unwrap().status,
            crate::model::SendStatus::Failed
        );
        assert!(store.unsettled_sends().unwrap().is_empty());
        assert_eq!(
            store.threads_of_mailbox("old@x.test").unwrap(),
            vec![thread]
        );
        assert!(
            store
                .integrations_of_mailbox("old@x.test")
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store.integrations_of_mailbox("new@x.test").unwrap().len(),
            1
        );
    }
}

#[test]
fn ingest_commits_cursor_thread_and_events_together() {
    for (_dir, store) in engines() {
        let thread = Thread {
            id: "thr_1".into(),
            mailbox: "me@x.test".into(),
            routes: vec![ThreadRoute {
                location_id: "L1".into(),
                user_id: "u1".into(),
                contact_id: "c1".into(),
            }],
            created_at: Utc::now(),
            message_ids: vec!["<a@x>".into()],
            subject: None,
        };
        store
            .connect(
                &mailbox("me@x.test"),
                &integration("L1", "u1", "me@x.test"),
                &[(FolderRole::Inbox, FolderCursor::new(1, 7))],
                &[],
                &[],
            )
            .unwrap();
        let commit = IngestCommit {
            mailbox: "me@x.test".into(),
            thread_mailbox: "me@x.test".into(),
            folder: FolderRole::Inbox,
            cursor_before: FolderCursor::new(1, 7),
            cursor: FolderCursor::new(1, 8),
            thread_keys_seen: vec!["<a@x>".into()],
            answered_seen: vec![],
            thread_seen: None,
            thread: Some(thread.clone()),
            new_contacts: vec![],
            located: None,
            message_ids: vec!["<a@x>".into()],
            answers: vec![],
            events: vec![event("evt_1", "thr_1", serde_json::json!({"n": 1}))],
            history: vec![],
            synced: Some(("<a@x>".into(), vec![("L1".into(), "u1".into())])),
        };
        let l1u1 = vec![("L1".to_string(), "u1".to_string())];
        assert!(store.synced_to("<a@x>", &l1u1).unwrap().is_empty());
        store.commit_ingest(&commit, None).unwrap();
        assert_eq!(
            store.synced_to("<a@x>", &l1u1).unwrap(),
            vec![("L1".to_string(), "u1".to_string())],
            "the message is known as synced for that integration, with the commit"
        );
        assert!(
            store.synced_to("<a@x", &l1u1).unwrap().is_empty(),
            "no prefix match"
        );
        let mut again = commit.clone();
        again.cursor_before = FolderCursor::new(1, 8);
        again.cursor = FolderCursor::new(1, 9);
        again.thread_seen = Some(thread.clone());
        assert!(
            matches!(
                store.commit_ingest(&again, None),
                Err(StoreError::AlreadySynced)
            ),
            "a second commit of the message for the same integration is refused whole"
        );
        assert_eq!(
            store
                .cursor("me@x.test", FolderRole::Inbox)
                .unwrap()
                .unwrap()
                .next_uid,
            8
        );
        assert_eq!(
            store
                .cursor("me@x.test", FolderRole::Inbox)
                .unwrap()
                .unwrap()
                .next_uid,
            8
        );
        let found = store
            .thread_of("me@x.test", &["<nope@x>".into(), "<a@x>".into()])
            .unwrap();
        assert_eq!(found, Some(thread));
        assert_eq!(
            store.thread_of("other@x.test", &["<a@x>".into()]).unwrap(),
            None
        );
        assert_eq!(store.outbox_len().unwrap(), 1);
    }
}

#[test]
fn outbox_keeps_order_updates_and_large_bodies() {
    for (_dir, store) in engines() {
        let big = "x".repeat(200 * 1024);
        store
            .enqueue(&[
                event("evt_1", "t", serde_json::json!({"n": 1})),
                event("evt_2", "t", serde_json::json!({"text": big})),
                event("evt_3", "t", serde_json::json!({"n": 3})),
            ])
            .unwrap();
        let page = store.outbox_page(None, 10).unwrap();
        let ids: Vec<&str> = page.iter().map(|(_, e)| e.event.id.as_str()).collect();
        assert_eq!(ids, ["evt_1", "evt_2", "evt_3"]);
        assert_eq!(
            page[1].1.event.data["text"].as_str().map(str::len),
            Some(200 * 1024)
        );

        let (seq2, mut entry2) = page[1].clone();
        entry2.attempts = 3;
        entry2.delivered_to.push("http://a".into());
        store.update_outbox(seq2, &entry2).unwrap();
        let again = store.outbox_page(Some(page[0].0), 1).unwrap();
        assert_eq!(again[0].1, entry2, "update keeps the large body");

        store.complete_outbox(page[0].0).unwrap();
        store.bury_outbox(page[2].0, &page[2].1).unwrap();
        let rest = store.outbox_page(None, 10).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].1.event.id, "evt_2");
        assert_eq!(store.outbox_len().unwrap(), 1);
    }
}

#[test]
fn state_survives_reopening() {
    for open in openers() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path()).unwrap();
            store
                .put_contacts(&[contact("c1", &["ann@x.test"]).into()])
                .unwrap();
            store
                .enqueue(&[event("evt_1", "t", serde_json::json!({}))])
                .unwrap();
            store.put_setting("k", b"v").unwrap();
        }
        let store = open(dir.path()).unwrap();
        assert!(store.contact("L1", "c1").unwrap().is_some());
        assert_eq!(store.outbox_len().unwrap(), 1);
        assert_eq!(store.setting("k").unwrap().as_deref(), Some(&b"v"[..]));
    }
}

fn walk(dir: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            all.extend(walk(&path));
        } else {
            all.extend(std::fs::read(&path).unwrap_or_default());
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub(super) fn send_record(id: &str, key: Option<&str>) -> crate::model::SendRecord {
    use crate::model::{Direction, MessageEventData, Origin, SendRecord, SendStatus};
    SendRecord {
        id: id.into(),
        location_id: "L1".into(),
        user_id: "u1".into(),
        contact_id: "c1".into(),
        mailbox: "me@x.test".into(),
        thread_id: "thr_s".into(),
        message_id: format!("<{id}@x.test>"),
        status: SendStatus::Queued,
        error: None,
        smtp_response: None,
        attempts: 0,
        next_attempt_ms: 0,
        created_at: Utc::now(),
        sent_at: None,
        idempotency_key: key.map(str::to_string),
        recipients: vec!["ann@x.test".into()],
        data: MessageEventData {
            id: id.into(),
            location_id: "L1".into(),
            user_id: "u1".into(),
            contact_id: "c1".into(),
            contact_ids: vec!["c1".into()],
            thread_id: "thr_s".into(),
            mailbox: "me@x.test".into(),
            direction: Direction::Outbound,
            origin: Origin::Crm,
            message_id: None,
            in_reply_to: None,
            references: vec![],
            from: None,
            to: vec![],
            cc: vec![],
            bcc: vec![],
            subject: Some(id.into()),
            date: None,
            text: None,
            html: None,
            attachments: vec![],
        },
        filed_in_sent: false,
        filing_attempts: 0,
        filing_abandoned: false,
        outcome_checks: 0,
        submitted_message_id: None,
    }
}

pub(super) fn send_thread() -> Thread {
    Thread {
        id: "thr_s".into(),
        mailbox: "me@x.test".into(),
        routes: vec![],
        created_at: Utc::now(),
        message_ids: vec![],
        subject: None,
    }
}

/// Issue 22 item 2: a contact's history reads newest first, before a time
/// and up to a limit, as `Store::history` says, on every engine (the engine
/// interface reads the contact's keys backwards as a range), and never
/// another contact's.
#[test]
fn history_reads_newest_first_before_a_time_up_to_a_limit() {
    for (_dir, store) in engines() {
        let records = [
            ("msg_a", "c1", 1_000),
            ("msg_b", "c1", 2_000),
            ("msg_c", "c1", 3_000),
        ];
        for (id, contact, at_ms) in records.into_iter().chain([("msg_other", "c2", 4_000)]) {
            let mut sent = send_record(id, None);
            sent.status = crate::model::SendStatus::Sent;
            sent.created_at = Utc.timestamp_millis_opt(at_ms).unwrap();
            sent.data.contact_id = contact.into();
            store.update_send(&sent, &[]).unwrap();
        }
        let ids = |before_ms: Option<i64>, limit: usize| -> Vec<String> {
            store
                .history("L1", "c1", before_ms, limit)
                .unwrap()
                .into_iter()
                .map(|record| record.id)
                .collect()
        };
        assert_eq!(ids(None, 10), ["msg_c", "msg_b", "msg_a"]);
        assert_eq!(ids(None, 2), ["msg_c", "msg_b"]);
        assert_eq!(ids(Some(3_000), 10), ["msg_b", "msg_a"]);
        assert_eq!(ids(Some(3_000), 1), ["msg_b"]);
    }
}

#[test]
fn sends_respect_idempotency_and_the_rolling_limit_and_settle() {
    use crate::model::SendStatus;
    for (_dir, store) in engines() {
        let now = Utc::now().timestamp_millis();
        let accept = |id: &str, key: Option<&str>| {
            accept(
                store.as_ref(),
                &send_record(id, key),
                &send_thread(),
                Some(2),
                now,
            )
            .unwrap()
        };
        assert_eq!(accept("msg_1", Some("k")), SendAcceptance::Accepted);
        match accept("msg_dup", Some("k")) {
            SendAcceptance::Repeat(first) => assert_eq!(first.id, "msg_1"),
            other => panic!("expected the first send back, got {other:?}"),
        }
        assert_eq!(accept("msg_2", None), SendAcceptance::Accepted);
        assert!(
            matches!(accept("msg_3", None), SendAcceptance::LimitReached { limit: 2, retry_at_ms } if retry_at_ms > now)
        );
        assert!(
            store.send("msg_dup").unwrap().is_none(),
            "a repeat stores nothing"
        );
        assert!(store.is_crm_message("me@x.test", "<msg_1@x.test>").unwrap());
        assert_eq!(
            store
                .thread_of("me@x.test", &["<msg_2@x.test>".into()])
                .unwrap()
                .unwrap()
                .id,
            "thr_s"
        );
        assert_eq!(store.unsettled_sends().unwrap().len(), 2);

        let mut sent = store.send("msg_1").unwrap().unwrap();
        sent.status = SendStatus::Sent;
        store.update_send(&sent, &[]).unwrap();
        assert!(
            store
                .unsettled_sends()
                .unwrap()
                .iter()
                .any(|s| s.id == "msg_1"),
            "sent, its copy not yet in Sent: still the queue's"
        );
        sent.filed_in_sent = true;
        store.update_send(&sent, &[]).unwrap();
        let mut failed = store.send("msg_2").unwrap().unwrap();
        failed.status = crate::model::SendStatus::Failed;
        store.update_send(&failed, &[]).unwrap();
        assert!(store.unsettled_sends().unwrap().is_empty());
        assert_eq!(
            store.quota_use("me@x.test", now).unwrap().0,
            1,
            "the failed send gave its quota back"
        );
        let history = store.history("L1", "c1", None, 10).unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].id, "msg_1");
        // Outside the window, the quota is free again.
        assert_eq!(
            store
                .quota_use("me@x.test", now + QUOTA_WINDOW_MS + 1)
                .unwrap()
                .0,
            0
        );
    }
}

#[test]
fn settings_can_be_taken_once_listed_by_prefix_and_keys_are_kept_sealed() {
    for (dir, store) in engines() {
        store.put_setting("flow:a", b"1").unwrap();
        store.put_setting("flow:b", b"2").unwrap();
        store.put_setting("other", b"3").unwrap();
        let mut listed = store.settings_with_prefix("flow:").unwrap();
        listed.sort();
        assert_eq!(
            listed,
            vec![
                ("flow:a".to_string(), b"1".to_vec()),
                ("flow:b".to_string(), b"2".to_vec())
            ]
        );
        assert_eq!(store.take_setting("flow:a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.take_setting("flow:a").unwrap(), None, "taken once");

        let key = store.secret_key("state_key").unwrap();
        assert_eq!(
            store.secret_key("state_key").unwrap(),
            key,
            "made once, then kept"
        );
        assert_ne!(store.secret_key("another").unwrap(), key);
        assert!(!contains(&walk(dir.path()), &key), "kept encrypted");
    }
}

#[test]
fn needs_reauth_is_recorded_once_kept_against_later_states_and_ended_only_by_connect() {
    for (_dir, store) in engines() {
        store
            .connect(
                &mailbox("me@x.test"),
                &integration("L1", "u1", "me@x.test"),
                &[],
                &[],
                &[],
            )
            .unwrap();
        let event = crate::event_data::MailboxLifecycle::new("L1", "u1", "me@x.test")
            .event("mailbox.needs_reauth");
        let events = std::slice::from_ref(&event);
        let refused = mailbox("me@x.test").credentials;
        let newer = Credentials::Password {
            username: "me@x.test".into(),
            password: "newer".into(),
        };
        assert!(
            !store
                .mark_needs_reauth("me@x.test", &newer, "stale verdict", events)
                .unwrap(),
            "a verdict on other credentials changes nothing"
        );
        assert!(
            store
                .mark_needs_reauth("me@x.test", &refused, "refused", events)
                .unwrap()
        );
        assert!(
            !store
                .mark_needs_reauth("me@x.test", &refused, "again", events)
                .unwrap()
        );
        assert_eq!(store.outbox_len().unwrap(), 1, "one event");
        let stored = store.mailbox("me@x.test").unwrap().unwrap();
        assert_eq!(stored.state, MailboxState::NeedsReauth);
        assert_eq!(stored.last_error.as_deref(), Some("refused"));
        store
            .connect(
                &mailbox("me@x.test"),
                &integration("L1", "u1", "me@x.test"),
                &[],
                &[],
                &[],
            )
            .unwrap();
        assert_ne!(
            store.mailbox("me@x.test").unwrap().unwrap().state,
            MailboxState::NeedsReauth
        );
    }
}

#[test]
fn refreshed_credentials_never_replace_newer_ones() {
    for (_dir, store) in engines() {
        let mut mine = mailbox("me@x.test");
        store
            .connect(&mine, &integration("L1", "u1", "me@x.test"), &[], &[], &[])
            .unwrap();
        let renewed = Credentials::OAuth2 {
            username: "me@x.test".into(),
            refresh_token: "r1".into(),
            access_token: Some("a2".into()),
            expires_at: None,
            issued_at: None,
        };
        assert!(
            store
                .replace_credentials("me@x.test", &mine.credentials, &renewed)
                .unwrap()
        );
        // A connect with other credentials came first: the stale refresh loses.
        mine.credentials = Credentials::Password {
            username: "me@x.test".into(),
            password: "new".into(),
        };
        store
            .connect(&mine, &integration("L1", "u1", "me@x.test"), &[], &[], &[])
            .unwrap();
        assert!(
            !store
                .replace_credentials("me@x.test", &renewed, &renewed)
                .unwrap()
        );
        assert_eq!(
            store.mailbox("me@x.test").unwrap().unwrap().credentials,
            mine.credentials
        );
    }
}

#[test]
fn an_unreadable_outbox_entry_is_set_aside_and_dead_letters_can_be_replayed() {
    for (dir, store) in engines() {
        let big = "x".repeat(200 * 1024);
        store
            .enqueue(&[
                event("evt_1", "t1", serde_json::json!({"n": 1})),
                event("evt_2", "t2", serde_json::json!({"text": big})),
                event("evt_3", "t3", serde_json::json!({"n": 3})),
            ])
            .unwrap();
        // The big event's body, kept in a file, is damaged on disk.
        std::fs::write(dir.path().join("event-bodies/evt_2.json"), b"{ not json").unwrap();

        let page = store.outbox_page(None, 10).unwrap();
        let ids: Vec<&str> = page.iter().map(|(_, e)| e.event.id.as_str()).collect();
        assert_eq!(ids, ["evt_1", "evt_3"], "the rest flows on");
        let dead = store.dead_letters(None, 10).unwrap();
        assert_eq!(dead.len(), 1);
        assert!(dead[0].entry.is_none());
        assert!(
            dead[0].reason.starts_with("unreadable"),
            "{}",
            dead[0].reason
        );
        assert_eq!(
            store.replay_dead_letter(dead[0].id).unwrap(),
            Replay::Unreadable
        );

        // A buried event comes back at the end of the outbox, under its own id.
        let (first, mut entry) = page[0].clone();
        entry.attempts = 9;
        entry.last_error = Some("answered 500".into());
        store.bury_outbox(first, &entry).unwrap();
        let dead = store.dead_letters(None, 10).unwrap();
        let buried = dead.iter().find(|d| d.entry.is_some()).unwrap();
        assert_eq!(buried.reason, "answered 500");
        assert_eq!(
            store.replay_dead_letter(buried.id).unwrap(),
            Replay::Requeued
        );
        assert_eq!(
            store.replay_dead_letter(buried.id).unwrap(),
            Replay::NotFound
        );
        let ids: Vec<(String, u32)> = store
            .outbox_page(None, 10)
            .unwrap()
            .into_iter()
            .map(|(_, e)| (e.event.id, e.attempts))
            .collect();
        assert_eq!(
            ids,
            [("evt_3".to_string(), 0), ("evt_1".to_string(), 0)],
            "requeued last, with a fresh retry budget"
        );
    }
}

#[test]
fn a_disconnect_forgets_what_the_integration_received() {
    for (_dir, store) in engines() {
        store
            .connect(
                &mailbox("me@x.test"),
                &integration("L1", "u1", "me@x.test"),
                &[(FolderRole::Inbox, FolderCursor::new(1, 1))],
                &[],
                &[],
            )
            .unwrap();
        let commit = IngestCommit {
            mailbox: "me@x.test".into(),
            thread_mailbox: "me@x.test".into(),
            folder: FolderRole::Inbox,
            cursor_before: FolderCursor::new(1, 1),
            cursor: FolderCursor::new(1, 2),
            thread_keys_seen: vec![],
            answered_seen: vec![],
            thread_seen: None,
            thread: None,
            new_contacts: vec![],
            located: None,
            message_ids: vec![],
            answers: vec![],
            events: vec![],
            history: vec![],
            synced: Some(("<a@x>|f".into(), vec![("L1".into(), "u1".into())])),
        };
        store.commit_ingest(&commit, None).unwrap();
        let l1u1 = vec![("L1".to_string(), "u1".to_string())];
        assert_eq!(store.synced_to("<a@x>|f", &l1u1).unwrap().len(), 1);
        store.disconnect("L1", "u1", &[]).unwrap();
        assert!(store.synced_to("<a@x>|f", &l1u1).unwrap().is_empty());
    }
}

fn l1_thread(routes_to: &str, message_ids: &[&str]) -> Thread {
    Thread {
        id: "thr_c".into(),
        mailbox: "me@x.test".into(),
        routes: vec![ThreadRoute {
            location_id: routes_to.into(),
            user_id: "u1".into(),
            contact_id: "c1".into(),
        }],
        created_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        message_ids: message_ids.iter().map(|m| m.to_string()).collect(),
        subject: None,
    }
}

fn ingest_commit(before: FolderCursor, seen: Option<Thread>, thread: Thread) -> IngestCommit {
    IngestCommit {
        mailbox: "me@x.test".into(),
        thread_mailbox: "me@x.test".into(),
        folder: FolderRole::Inbox,
        cursor_before: before,
        cursor: FolderCursor::new(before.uid_validity, before.next_uid + 1),
        thread_keys_seen: vec!["<b@x>".into(), "<a@x>".into()],
        answered_seen: vec![],
        thread_seen: seen,
        thread: Some(thread),
        new_contacts: vec![],
        located: None,
        message_ids: vec!["<b@x>".into()],
        answers: vec![],
        events: vec![event("evt_i", "thr_c", serde_json::json!({"n": 1}))],
        history: vec![],
        synced: None,
    }
}

/// R6 whatever the order folders are read in: a reply files the messages it
/// answers under its thread; the first thread to answer one keeps it; an
/// answered id is neither one of the thread's own messages nor a synced one
/// (R21); and an original routed before the reply committed is refused
/// (`ThreadChanged`), to be routed again over the reply's thread.
#[test]
fn r06_an_answered_message_finds_the_thread_that_answered_it_first() {
    for (_dir, store) in engines() {
        let start = FolderCursor::new(1, 1);
        connect_inbox_at(store.as_ref(), start);
        let answered_by = |store: &dyn Store| {
            store
                .thread_answering("me@x.test", &["<a@x>".into()])
                .unwrap()
                .map(|thread| thread.id)
        };
        // The reply <b@x> answers <a@x>.
        let mut reply = ingest_commit(start, None, l1_thread("L1", &["<b@x>"]));
        reply.answers = vec!["<a@x>".into()];
        store.commit_ingest(&reply, None).unwrap();
        assert_eq!(answered_by(store.as_ref()), Some("thr_c".to_string()));
        assert!(
            store
                .thread_of("me@x.test", &["<a@x>".into()])
                .unwrap()
                .is_none(),
            "answered, not one of the thread's own messages"
        );
        let l1u1 = vec![("L1".to_string(), "u1".to_string())];
        assert!(store.synced_to("<a@x>|f", &l1u1).unwrap().is_empty());

        // A new thread `id` for message `own`, routed as if none was found.
        let starting = |next_uid: u32, id: &str, own: &str| IngestCommit {
            thread_keys_seen: vec![own.into()],
            message_ids: vec![own.into()],
            events: vec![],
            ..ingest_commit(
                FolderCursor::new(1, next_uid),
                None,
                Thread {
                    id: id.into(),
                    ..l1_thread("L1", &[own])
                },
            )
        };

        // Another thread that answers <a@x> does not take it over.
        let mut other = starting(2, "thr_d", "<c@x>");
        other.answers = vec!["<a@x>".into()];
        store.commit_ingest(&other, None).unwrap();
        assert_eq!(answered_by(store.as_ref()), Some("thr_c".to_string()));

        // The original, routed before the reply committed, is refused...
        let mut original = starting(3, "thr_e", "<a@x>");
        original.answered_seen = vec!["<a@x>".into()];
        assert!(
            matches!(
                store.commit_ingest(&original, None),
                Err(StoreError::ThreadChanged)
            ),
            "routed as if nothing answered it"
        );
        // ...and commits routed over the reply's thread.
        original.thread_seen = store
            .thread_answering("me@x.test", &["<a@x>".into()])
            .unwrap();
        original.thread = original.thread_seen.clone();
        store.commit_ingest(&original, None).unwrap();
        let joined = store.thread_of("me@x.test", &["<a@x>".into()]).unwrap();
        assert_eq!(joined.map(|thread| thread.id), Some("thr_c".to_string()));
    }
}

/// Issue 7 item 8: an ingest routed over a thread that a CRM send pinned
/// meanwhile is refused whole, so the pin is not undone (R13).
#[test]
fn r13_an_ingest_over_a_thread_changed_meanwhile_is_refused_whole() {
    for (_dir, store) in engines() {
        let start = FolderCursor::new(1, 1);
        connect_inbox_at(store.as_ref(), start);
        let first = l1_thread("L1", &["<a@x>"]);
        store
            .commit_ingest(&ingest_commit(start, None, first.clone()), None)
            .unwrap();
        let at_two = FolderCursor::new(1, 2);
        // A CRM send pins the thread to L2 while the next message is routed
        // over the thread as it was.
        let mut pinned = l1_thread("L2", &["<a@x>", "<crm@x>"]);
        pinned.routes[0].location_id = "L2".into();
        let mut send = send_record("msg_pin", None);
        send.thread_id = pinned.id.clone();
        assert_eq!(
            accept(store.as_ref(), &send, &pinned, None, 0).unwrap(),
            SendAcceptance::Accepted
        );
        let stale = ingest_commit(at_two, Some(first.clone()), first.clone());
        let outbox_before = store.outbox_len().unwrap();
        assert!(matches!(
            store.commit_ingest(&stale, Some(b"source")),
            Err(StoreError::ThreadChanged)
        ));
        assert_eq!(
            store.thread("thr_c").unwrap(),
            Some(pinned.clone()),
            "the pin holds"
        );
        assert_eq!(
            store
                .cursor("me@x.test", FolderRole::Inbox)
                .unwrap()
                .unwrap()
                .next_uid,
            2
        );
        assert_eq!(
            store.outbox_len().unwrap(),
            outbox_before,
            "no event queued"
        );
        // Routed again over the pinned thread, it commits.
        let mut fresh_thread = pinned.clone();
        fresh_thread.remember(Some("<b@x>"), None);
        store
            .commit_ingest(
                &ingest_commit(at_two, Some(pinned), fresh_thread.clone()),
                None,
            )
            .unwrap();
        assert_eq!(store.thread("thr_c").unwrap(), Some(fresh_thread));
    }
}

/// Issue 7 item 8: a send planned over a thread that an ingest changed
/// meanwhile is not accepted; nothing of it is kept.
#[test]
fn r12_a_send_over_a_thread_changed_meanwhile_is_not_accepted() {
    for (_dir, store) in engines() {
        let stored = l1_thread("L1", &["<a@x>", "<b@x>"]);
        let mut seed = send_record("msg_seed", None);
        seed.thread_id = stored.id.clone();
        accept(store.as_ref(), &seed, &stored, None, 0).unwrap();
        let read_before = l1_thread("L1", &["<a@x>"]);
        let mut pinned = read_before.clone();
        pinned.routes[0].location_id = "L2".into();
        let mut send = send_record("msg_late", None);
        send.thread_id = pinned.id.clone();
        let detached = [event(
            "evt_d",
            "thr_c",
            serde_json::json!({"detached": true}),
        )];
        let outbox_before = store.outbox_len().unwrap();
        let result = store.accept_send(
            &NewSend {
                record: &send,
                submitted: b"s",
                filed: b"f",
                thread: &pinned,
                thread_before: Some(&read_before),
                events: &detached,
            },
            Some(10),
            0,
        );
        assert!(matches!(result, Err(StoreError::ThreadChanged)));
        assert_eq!(store.thread("thr_c").unwrap(), Some(stored.clone()));
        assert!(store.send("msg_late").unwrap().is_none());
        assert_eq!(
            store.quota_use("me@x.test", 1).unwrap().0,
            1,
            "no quota taken"
        );
        assert_eq!(store.outbox_len().unwrap(), outbox_before);
        for copy in [SourceCopy::Filed, SourceCopy::Submission] {
            assert_eq!(store.message_source("msg_late", copy).unwrap(), None);
        }
        // Over the thread as it is, the send and its detach events are one commit.
        let result = store.accept_send(
            &NewSend {
                record: &send,
                submitted: b"s",
                filed: b"f",
                thread: &pinned,
                thread_before: Some(&stored),
                events: &detached,
            },
            Some(10),
            0,
        );
        assert_eq!(result.unwrap(), SendAcceptance::Accepted);
        assert_eq!(store.outbox_len().unwrap(), outbox_before + 1);
        assert_eq!(
            store
                .message_source("msg_late", SourceCopy::Submission)
                .unwrap()
                .as_deref(),
            Some(&b"s"[..])
        );
    }
}

/// Issue 7 item 8: a watcher still finishing after its mailbox was
/// disconnected (and connected again) never moves the new cursor.
#[test]
fn a_stale_watcher_never_moves_a_cursor() {
    for (_dir, store) in engines() {
        let connect = |at: FolderCursor| {
            store
                .connect(
                    &mailbox("me@x.test"),
                    &integration("L1", "u1", "me@x.test"),
                    &[(FolderRole::Inbox, at)],
                    &[],
                    &[],
                )
                .unwrap();
        };
        connect(FolderCursor::new(1, 5));
        store.disconnect("L1", "u1", &[]).unwrap();
        let stale = FolderCursor::new(1, 5);
        assert!(matches!(
            store.set_cursor(
                "me@x.test",
                FolderRole::Inbox,
                Some(stale),
                FolderCursor::new(1, 6)
            ),
            Err(StoreError::CursorMoved)
        ));
        assert!(
            matches!(
                store.set_cursor(
                    "me@x.test",
                    FolderRole::Inbox,
                    None,
                    FolderCursor::new(1, 6)
                ),
                Err(StoreError::CursorMoved)
            ),
            "no first cursor for a mailbox that is not connected"
        );
        assert_eq!(store.cursor("me@x.test", FolderRole::Inbox).unwrap(), None);
        connect(FolderCursor::new(1, 40));
        let mut commit = ingest_commit(stale, None, l1_thread("L1", &[]));
        commit.thread = None;
        assert!(matches!(
            store.commit_ingest(&commit, Some(b"late")),
            Err(StoreError::CursorMoved)
        ));
        assert_eq!(
            store.cursor("me@x.test", FolderRole::Inbox).unwrap(),
            Some(FolderCursor::new(1, 40)),
            "the reconnect's baseline stands"
        );
        // The live watcher moves it; when it last moved does not matter.
        let mut live = FolderCursor::new(1, 41);
        live.moved_at = Some(Utc::now());
        store
            .set_cursor(
                "me@x.test",
                FolderRole::Inbox,
                Some(FolderCursor::new(1, 40)),
                live,
            )
            .unwrap();
        assert_eq!(
            store.cursor("me@x.test", FolderRole::Inbox).unwrap(),
            Some(live)
        );
    }
}

/// The store owns message sources: kept with the commit that reaches them,
/// never without it, the submission copy dropped once the send can no
/// longer be submitted, and pruned by age except while a send waits.
#[test]
fn message_sources_live_and_die_with_their_records() {
    for (_dir, store) in engines() {
        let start = FolderCursor::new(1, 1);
        connect_inbox_at(store.as_ref(), start);
        let history = |id: &str| MessageEventData {
            id: id.into(),
            ..send_record("x", None).data
        };
        let mut kept = ingest_commit(start, None, l1_thread("L1", &[]));
        kept.history = vec![history("msg_in")];
        store.commit_ingest(&kept, Some(b"inbound source")).unwrap();
        assert_eq!(
            store
                .message_source("msg_in", SourceCopy::Filed)
                .unwrap()
                .as_deref(),
            Some(&b"inbound source"[..])
        );
        let mut refused = ingest_commit(start, None, l1_thread("L1", &[]));
        refused.history = vec![history("msg_refused")];
        assert!(store.commit_ingest(&refused, Some(b"x")).is_err());
        assert_eq!(
            store
                .message_source("msg_refused", SourceCopy::Filed)
                .unwrap(),
            None
        );

        let mut send = send_record("msg_out", None);
        accept(store.as_ref(), &send, &send_thread(), None, 0).unwrap();
        assert!(
            store
                .message_source("msg_out", SourceCopy::Submission)
                .unwrap()
                .is_some()
        );
        assert_eq!(
            store
                .prune_message_sources(std::time::Duration::ZERO)
                .unwrap(),
            2
        );
        assert_eq!(
            store.message_source("msg_in", SourceCopy::Filed).unwrap(),
            None
        );
        assert!(
            store
                .message_source("msg_out", SourceCopy::Submission)
                .unwrap()
                .is_some(),
            "a send still to be submitted keeps its copy whatever its age"
        );
        send.status = crate::model::SendStatus::Sent;
        store.update_send(&send, &[]).unwrap();
        assert_eq!(
            store
                .message_source("msg_out", SourceCopy::Submission)
                .unwrap(),
            None
        );
    }
}

/// R10: an update that does not name the creation time keeps the stored
/// one, so which of two duplicates wins does not flip.
#[test]
fn r10_an_update_without_created_at_keeps_the_stored_one() {
    for (_dir, store) in engines() {
        let first = contact("c1", &["ann@x.test"]);
        store.put_contacts(&[first.clone().into()]).unwrap();
        let mut update = contact("c1", &["ann@x.test", "ann2@x.test"]);
        update.created_at = Utc::now();
        let stored = store
            .put_contacts(&[ContactUpsert {
                contact: update,
                created_at_given: false,
            }])
            .unwrap();
        assert_eq!(stored[0].created_at, first.created_at);
        assert_eq!(
            store.contact("L1", "c1").unwrap().unwrap().created_at,
            first.created_at
        );
        assert_eq!(
            store.contacts_by_email("L1", "ann2@x.test").unwrap().len(),
            1
        );
    }
}

/// R10: concurrent upserts of one contact never lose an address from the
/// index: whichever record is stored last, each of its addresses finds it.
#[test]
fn r10_concurrent_upserts_of_one_contact_keep_the_index_whole() {
    for (_dir, store) in engines() {
        let store: std::sync::Arc<dyn Store> = std::sync::Arc::<dyn SuiteStore>::from(store);
        store
            .put_contacts(&[contact("c1", &["a@x.test"]).into()])
            .unwrap();
        for round in 0..500 {
            let writers: Vec<_> = [vec!["a@x.test"], vec!["b@x.test"]]
                .into_iter()
                .map(|emails| {
                    let store = store.clone();
                    std::thread::spawn(move || {
                        store
                            .put_contacts(&[contact("c1", &emails).into()])
                            .unwrap();
                    })
                })
                .collect();
            for writer in writers {
                writer.join().unwrap();
            }
            let stored = store.contact("L1", "c1").unwrap().unwrap();
            for email in &stored.emails {
                assert_eq!(
                    store.contacts_by_email("L1", email).unwrap().len(),
                    1,
                    "round {round}: {email} of the stored record is not in the index"
                );
            }
        }
    }
}

/// R15: a contact Auto BCC would create is created once. Its id taken
/// meanwhile (the CRM changed that contact's address): kept, no second
/// `contact.created`, the message still lands. Its address taken meanwhile:
/// the commit is refused so the message is routed again over that contact.
#[test]
fn r15_a_contact_to_create_that_exists_meanwhile_is_never_created_twice() {
    for (_dir, store) in engines() {
        let start = FolderCursor::new(1, 1);
        connect_inbox_at(store.as_ref(), start);
        let created = |id: &str, email: &str| Contact {
            id: id.into(),
            ..contact("unused", &[email])
        };
        let with_contact = |before: FolderCursor, new: Contact| {
            let mut commit = ingest_commit(before, None, l1_thread("L1", &[]));
            commit.events = vec![
                Event {
                    kind: "contact.created".into(),
                    ..event("evt_c", "thr_c", serde_json::json!({"id": new.id}))
                },
                event("evt_m", "thr_c", serde_json::json!({"n": 1})),
            ];
            commit.new_contacts = vec![new];
            commit
        };
        // The CRM moved auto_1 to another address; the old one is free.
        store
            .put_contacts(&[created("auto_1", "moved@x.test").into()])
            .unwrap();
        let outbox = store.outbox_len().unwrap();
        store
            .commit_ingest(&with_contact(start, created("auto_1", "old@x.test")), None)
            .unwrap();
        assert_eq!(
            store.outbox_len().unwrap(),
            outbox + 1,
            "the message, no contact.created"
        );
        assert_eq!(
            store.contact("L1", "auto_1").unwrap().unwrap().emails,
            vec!["moved@x.test".to_string()],
            "the CRM's contact is kept"
        );
        // Another contact has the address meanwhile: routed again.
        store
            .put_contacts(&[created("c-crm", "taken@x.test").into()])
            .unwrap();
        let at_two = FolderCursor::new(1, 2);
        assert!(matches!(
            store.commit_ingest(
                &with_contact(at_two, created("auto_2", "taken@x.test")),
                None
            ),
            Err(StoreError::DirectoryChanged)
        ));
        assert!(store.contact("L1", "auto_2").unwrap().is_none());
    }
}

/// Issue 9: a synced message is found again by where the mailbox keeps it;
/// its flag changes and their events move with the cursor's HIGHESTMODSEQ
/// in one commit, and never from a stale cursor.
#[test]
fn flag_changes_of_a_located_message_commit_with_the_cursor() {
    for (_dir, store) in engines() {
        let start = FolderCursor {
            highest_modseq: Some(10),
            ..FolderCursor::new(1, 1)
        };
        connect_inbox_at(store.as_ref(), start);
        let entry = crate::model::LocatedMessage {
            record_id: "msg_1".into(),
            message_id: Some("<b@x>".into()),
            thread_id: "thr_c".into(),
            routes: l1_thread("L1", &[]).routes,
            flags: FlagState::default(),
            labels: None,
        };
        let mut commit = ingest_commit(start, None, l1_thread("L1", &[]));
        commit.cursor.highest_modseq = Some(10);
        commit.located = Some((1, 1, entry.clone()));
        store.commit_ingest(&commit, None).unwrap();
        assert_eq!(
            store.located("me@x.test", FolderRole::Inbox, 1, 1).unwrap(),
            Some(entry)
        );
        assert_eq!(
            store.located("me@x.test", FolderRole::Inbox, 1, 2).unwrap(),
            None
        );

        let at = store
            .cursor("me@x.test", FolderRole::Inbox)
            .unwrap()
            .unwrap();
        let seen = FlagState {
            seen: true,
            ..FlagState::default()
        };
        let outbox = store.outbox_len().unwrap();
        let updated = event("evt_u", "thr_c", serde_json::json!({"seen": true}));
        let change = |before, after, event| LocatedChange {
            uid_validity: 1,
            uid: 1,
            flags_before: before,
            flags_after: Some(after),
            labels_after: None,
            moved_to: None,
            events: vec![event],
        };
        assert!(matches!(
            store.commit_flag_changes(
                "me@x.test",
                FolderRole::Inbox,
                FolderCursor::new(1, 1),
                Some(12),
                &[change(FlagState::default(), seen, updated.clone())],
            ),
            Err(StoreError::CursorMoved)
        ));
        // Judged against flags that are no longer stored (the CRM queued a
        // change meanwhile): dropped with its event, the cursor still moves.
        let flagged = FlagState {
            flagged: true,
            ..FlagState::default()
        };
        store
            .commit_flag_changes(
                "me@x.test",
                FolderRole::Inbox,
                at,
                Some(11),
                &[change(flagged, seen, updated.clone())],
            )
            .unwrap();
        assert_eq!(store.outbox_len().unwrap(), outbox, "nothing queued");
        assert_eq!(
            store
                .located("me@x.test", FolderRole::Inbox, 1, 1)
                .unwrap()
                .unwrap()
                .flags,
            FlagState::default()
        );
        store
            .commit_flag_changes(
                "me@x.test",
                FolderRole::Inbox,
                at,
                Some(12),
                &[change(FlagState::default(), seen, updated)],
            )
            .unwrap();
        assert_eq!(
            store
                .located("me@x.test", FolderRole::Inbox, 1, 1)
                .unwrap()
                .unwrap()
                .flags,
            seen
        );
        assert_eq!(
            store
                .cursor("me@x.test", FolderRole::Inbox)
                .unwrap()
                .unwrap()
                .highest_modseq,
            Some(12)
        );
        assert_eq!(store.outbox_len().unwrap(), outbox + 1);
        store.disconnect("L1", "u1", &[]).unwrap();
        assert_eq!(
            store.located("me@x.test", FolderRole::Inbox, 1, 1).unwrap(),
            None
        );
    }
}

/// Issue 9: a change the CRM asks for is queued with its outcome already
/// recorded (so the watcher does not report it back); a message no longer
/// where it was queues nothing.
#[test]
fn a_crm_change_is_queued_with_its_outcome_recorded() {
    for (_dir, store) in engines() {
        let start = FolderCursor::new(1, 1);
        connect_inbox_at(store.as_ref(), start);
        let mut commit = ingest_commit(start, None, l1_thread("L1", &[]));
        commit.located = Some((
            1,
            1,
            crate::model::LocatedMessage {
                record_id: "msg_1".into(),
                message_id: Some("<b@x>".into()),
                thread_id: "thr_c".into(),
                routes: vec![],
                flags: FlagState::default(),
                labels: None,
            },
        ));
        store.commit_ingest(&commit, None).unwrap();
        let (location, _) = store.locate_record("msg_1").unwrap().unwrap();
        let change = |seen, to_trash| crate::model::MailboxChange {
            record_id: "msg_1".into(),
            location: location.clone(),
            seen,
            flagged: None,
            to_trash,
            attempts: 0,
            next_attempt_ms: 0,
            created_at: Utc::now(),
        };
        assert!(
            store
                .queue_mailbox_change(&change(Some(true), false))
                .unwrap()
        );
        assert!(store.locate_record("msg_1").unwrap().unwrap().1.flags.seen);
        assert!(store.queue_mailbox_change(&change(None, true)).unwrap());
        assert_eq!(
            store.locate_record("msg_1").unwrap(),
            None,
            "gone from INBOX"
        );
        assert!(
            !store
                .queue_mailbox_change(&change(Some(false), false))
                .unwrap()
        );
        let queued = store.mailbox_changes().unwrap();
        assert_eq!(queued.len(), 2);
        assert!(queued[1].1.to_trash, "in order");
        store.update_mailbox_change(queued[0].0, None).unwrap();
        assert_eq!(store.mailbox_changes().unwrap().len(), 1);
    }
}

/// Issue 9: a message gone to another watched folder of the mailbox is
/// followed there (same record, new place) in the commit that reports it.
#[test]
fn a_message_moved_to_a_watched_folder_is_followed_there() {
    for (_dir, store) in engines() {
        let start = FolderCursor {
            highest_modseq: Some(10),
            ..FolderCursor::new(1, 1)
        };
        connect_inbox_at(store.as_ref(), start);
        let entry = crate::model::LocatedMessage {
            record_id: "msg_1".into(),
            message_id: Some("<b@x>".into()),
            thread_id: "thr_c".into(),
            routes: l1_thread("L1", &[]).routes,
            flags: FlagState::default(),
            labels: None,
        };
        let mut commit = ingest_commit(start, None, l1_thread("L1", &[]));
        commit.cursor.highest_modseq = Some(10);
        commit.located = Some((1, 1, entry.clone()));
        store.commit_ingest(&commit, None).unwrap();
        let at = store
            .cursor("me@x.test", FolderRole::Inbox)
            .unwrap()
            .unwrap();
        let clients = FolderRole::listed("Clients");
        let moved = LocatedChange {
            uid_validity: 1,
            uid: 1,
            flags_before: FlagState::default(),
            flags_after: None,
            labels_after: None,
            moved_to: Some((clients, 77, 5)),
            events: vec![event(
                "evt_m",
                "thr_c",
                serde_json::json!({"folder": "Clients"}),
            )],
        };
        store
            .commit_flag_changes("me@x.test", FolderRole::Inbox, at, Some(11), &[moved])
            .unwrap();
        assert_eq!(
            store.located("me@x.test", FolderRole::Inbox, 1, 1).unwrap(),
            None
        );
        assert_eq!(
            store.located("me@x.test", clients, 77, 5).unwrap(),
            Some(entry)
        );
        let (location, _) = store.locate_record("msg_1").unwrap().unwrap();
        assert_eq!(
            (location.folder, location.uid_validity, location.uid),
            (clients, 77, 5)
        );
    }
}

/// Issue 9: a folder the mailbox no longer lists forgets its cursor, so
/// listing it again starts from the present (R2), not from the gap.
#[test]
fn a_folder_no_longer_listed_forgets_its_cursor() {
    for (_dir, store) in engines() {
        let clients = FolderRole::listed("Clients");
        let mut listing = mailbox("me@x.test");
        listing.folders = vec!["Clients".into()];
        let integration = integration("L1", "u1", "me@x.test");
        let baseline = [
            (FolderRole::Inbox, FolderCursor::new(1, 1)),
            (clients, FolderCursor::new(9, 4)),
        ];
        store
            .connect(&listing, &integration, &baseline, &[], &[])
            .unwrap();
        assert_eq!(
            store.cursor("me@x.test", clients).unwrap(),
            Some(FolderCursor::new(9, 4))
        );
        store
            .connect(
                &mailbox("me@x.test"),
                &integration,
                &baseline[..1],
                &[],
                &[],
            )
            .unwrap();
        assert_eq!(store.cursor("me@x.test", clients).unwrap(), None);
        assert!(
            store
                .cursor("me@x.test", FolderRole::Inbox)
                .unwrap()
                .is_some(),
            "INBOX keeps its cursor"
        );
    }
}

/// Issue 10: a mailbox another integration uses keeps its servers and its
/// login; its only integration may move it, and a second may join it as it is.
#[test]
fn a_shared_mailbox_keeps_its_servers_and_login() {
    for (_dir, store) in engines() {
        let first = integration("L1", "u1", "me@x.test");
        store
            .connect(&mailbox("me@x.test"), &first, &[], &[], &[])
            .unwrap();
        // Alone on it, an integration may move it to another server.
        let mut moved = mailbox("me@x.test");
        moved.imap.host = "imap.elsewhere.test".into();
        store.connect(&moved, &first, &[], &[], &[]).unwrap();
        // A second integration joins it only as it is.
        let second = integration("L2", "u9", "me@x.test");
        let mut hijack = moved.clone();
        hijack.smtp.host = "smtp.attacker.test".into();
        assert!(matches!(
            store.connect(&hijack, &second, &[], &[], &[]),
            Err(StoreError::MailboxInUse)
        ));
        let mut own_login = moved.clone();
        own_login.credentials = Credentials::Password {
            username: "attacker@x.test".into(),
            password: "theirs".into(),
        };
        assert!(matches!(
            store.connect(&own_login, &second, &[], &[], &[]),
            Err(StoreError::MailboxInUse)
        ));
        assert_eq!(
            store.mailbox("me@x.test").unwrap().unwrap().smtp,
            moved.smtp,
            "nothing was stored"
        );
        let mut same = moved.clone();
        same.imap.host = "IMAP.elsewhere.test.".into();
        store.connect(&same, &second, &[], &[], &[]).unwrap();
        // Now shared, not even its first integration moves it alone.
        assert!(matches!(
            store.connect(&mailbox("me@x.test"), &first, &[], &[], &[]),
            Err(StoreError::MailboxInUse)
        ));
    }
}

/// Issue 9: a message the watcher finds gone, whose location the CRM's own
/// DELETE removed meanwhile, is not reported back as `message.deleted`.
#[test]
fn a_removal_of_a_message_no_longer_located_queues_nothing() {
    for (_dir, store) in engines() {
        let start = FolderCursor {
            highest_modseq: Some(10),
            ..FolderCursor::new(1, 1)
        };
        connect_inbox_at(store.as_ref(), start);
        let at = store
            .cursor("me@x.test", FolderRole::Inbox)
            .unwrap()
            .unwrap();
        let outbox = store.outbox_len().unwrap();
        let gone = LocatedChange {
            uid_validity: 1,
            uid: 7,
            flags_before: FlagState::default(),
            flags_after: None,
            labels_after: None,
            moved_to: None,
            events: vec![event("evt_d", "thr_c", serde_json::json!({"folder": null}))],
        };
        store
            .commit_flag_changes("me@x.test", FolderRole::Inbox, at, Some(11), &[gone])
            .unwrap();
        assert_eq!(store.outbox_len().unwrap(), outbox, "nothing queued");
        assert_eq!(
            store
                .cursor("me@x.test", FolderRole::Inbox)
                .unwrap()
                .unwrap()
                .highest_modseq,
            Some(11),
            "the cursor still moves"
        );
    }
}

/// Issue 11 item 6: the outbox answers what is due from its index — the
/// oldest entry of each thread, in order, a retry holding its thread — and
/// the index is rebuilt from what was committed when the store opens again.
#[test]
fn the_outbox_hands_out_each_threads_oldest_entry_when_due_and_after_a_reopen() {
    for open in openers() {
        let dir = tempfile::tempdir().unwrap();
        let reopen = || open(dir.path()).unwrap();
        let ids = |due: &OutboxDue| -> Vec<String> {
            due.entries
                .iter()
                .map(|(_, e)| e.event.id.clone())
                .collect()
        };
        let none = |_: u64| false;
        {
            let store = reopen();
            store
                .enqueue(&[
                    event("a1", "thread-a", serde_json::json!({})),
                    event("a2", "thread-a", serde_json::json!({})),
                    event("b1", "thread-b", serde_json::json!({})),
                ])
                .unwrap();
            let due = store.outbox_due(0, 10, &none).unwrap();
            assert_eq!(ids(&due), ["a1", "b1"]);
            assert_eq!(due.pending, 3);
            assert_eq!(due.next_due_ms, None);

            // a1 fails and is retried at 5,000: a2 waits behind it.
            let (a1, mut entry) = due.entries[0].clone();
            entry.next_attempt_ms = 5_000;
            store.update_outbox(a1, &entry).unwrap();
            let b1 = due.entries[1].0;
            store.complete_outbox(b1).unwrap();
            let due = store.outbox_due(1_000, 10, &none).unwrap();
            assert!(due.entries.is_empty());
            assert_eq!(due.next_due_ms, Some(5_000));
            assert_eq!(store.outbox_len().unwrap(), 2);
        }
        let store = reopen();
        assert_eq!(store.outbox_len().unwrap(), 2, "rebuilt from the outbox");
        let due = store.outbox_due(1_000, 10, &none).unwrap();
        assert_eq!(due.next_due_ms, Some(5_000), "the retry time was kept");
        let due = store.outbox_due(5_000, 10, &none).unwrap();
        assert_eq!(ids(&due), ["a1"]);
        assert!(
            store
                .outbox_due(5_000, 10, &|s| s == due.entries[0].0)
                .unwrap()
                .entries
                .is_empty(),
            "an entry in flight is not handed out again, nor the next of its thread"
        );
        store.complete_outbox(due.entries[0].0).unwrap();
        let due = store.outbox_due(5_000, 10, &none).unwrap();
        assert_eq!(ids(&due), ["a2"]);
    }
}

/// Issue 11 item 5: a catch-up batch commits each message at once (the
/// next one is routed over it) but none of its events goes out until the
/// batch is made durable, with one flush.
#[test]
fn a_deferred_ingest_is_seen_at_once_and_delivered_only_once_durable() {
    let none = |_: u64| false;
    for (_dir, store) in engines() {
        let start = FolderCursor::new(1, 1);
        connect_inbox_at(store.as_ref(), start);
        let first = l1_thread("L1", &["<a@x>"]);
        store
            .commit_ingest_deferred(
                &ingest_commit(start, None, first.clone()),
                KeptSource::Nothing,
            )
            .unwrap();
        assert_eq!(
            store.cursor("me@x.test", FolderRole::Inbox).unwrap(),
            Some(FolderCursor::new(1, 2)),
            "the next message of the batch starts from the moved cursor"
        );
        assert_eq!(
            store
                .thread_of("me@x.test", &["<b@x>".to_string()])
                .unwrap()
                .map(|t| t.id),
            Some(first.id.clone()),
            "and is routed over the thread the first one filed"
        );
        let second = ingest_commit(FolderCursor::new(1, 2), Some(first.clone()), first.clone());
        store
            .commit_ingest_deferred(&second, KeptSource::Nothing)
            .unwrap();
        assert!(
            store
                .outbox_due(i64::MAX, 10, &none)
                .unwrap()
                .entries
                .is_empty(),
            "nothing is delivered before the batch is durable"
        );
        store.make_durable().unwrap();
        let due = store.outbox_due(i64::MAX, 10, &none).unwrap();
        assert_eq!(due.pending, 2, "both events, once durable");
        assert_eq!(due.entries.len(), 1, "one thread: one at a time, in order");
    }
}

/// Issue 11 item 5: sources a batch writes ahead are kept through a commit
/// that is refused (a retry may still refer to them) and go when the batch
/// drops them.
#[test]
fn sources_written_ahead_stay_until_dropped() {
    for (_dir, store) in engines() {
        store
            .write_sources_ahead(&[
                ("msg_a", b"From: a\r\n\r\nA"),
                ("msg_b", b"From: b\r\n\r\nB"),
            ])
            .unwrap();
        assert_eq!(
            store.message_source("msg_b", SourceCopy::Filed).unwrap(),
            Some(b"From: b\r\n\r\nB".to_vec())
        );
        let start = FolderCursor::new(1, 1);
        connect_inbox_at(store.as_ref(), start);
        let stale = ingest_commit(FolderCursor::new(1, 5), None, l1_thread("L1", &["<a@x>"]));
        assert!(matches!(
            store.commit_ingest_deferred(&stale, KeptSource::WrittenAhead),
            Err(StoreError::CursorMoved)
        ));
        assert!(
            store
                .message_source("msg_a", SourceCopy::Filed)
                .unwrap()
                .is_some()
        );
        store.drop_source_written_ahead("msg_a");
        assert_eq!(
            store.message_source("msg_a", SourceCopy::Filed).unwrap(),
            None
        );
        assert!(
            store
                .message_source("msg_b", SourceCopy::Filed)
                .unwrap()
                .is_some()
        );
    }
}

/// A synced message's event carries its history record: the webhook data
/// is the record's, through a failed attempt and a reopen, and a buried
/// entry keeps it too. (The sled store holds it once, under history.)
#[test]
fn a_synced_messages_event_carries_its_history_record() {
    for open in openers() {
        let dir = tempfile::tempdir().unwrap();
        let reopen = || open(dir.path()).unwrap();
        let none = |_: u64| false;
        let record = MessageEventData {
            id: "msg_kept_once".into(),
            text: Some("the body, once".into()),
            ..send_record("x", None).data
        };
        let record_data = serde_json::to_value(&record).unwrap();
        {
            let store = reopen();
            let start = FolderCursor::new(1, 1);
            connect_inbox_at(&*store, start);
            let mut commit = ingest_commit(start, None, l1_thread("L1", &[]));
            commit.history = vec![record.clone()];
            commit.events = vec![
                event("evt_message", "thr_c", record_data.clone()),
                event("evt_other", "thr_d", serde_json::json!({"n": 2})),
            ];
            store.commit_ingest(&commit, None).unwrap();
            let stored = store.outbox_values_as_stored();
            let holds = |value: &[u8], text: &str| {
                value
                    .windows(text.len())
                    .any(|window| window == text.as_bytes())
            };
            assert!(!holds(&stored[0], "the body, once"), "no second copy");
            assert!(holds(&stored[1], "\"n\":2"), "other data stays inline");

            let due = store.outbox_due(i64::MAX, 10, &none).unwrap();
            let (sequence, mut entry) = due.entries[0].clone();
            assert_eq!(entry.event.data, record_data);
            entry.next_attempt_ms = 5;
            entry.last_error = Some("502".into());
            store.update_outbox(sequence, &entry).unwrap();
        }
        let store = reopen();
        let due = store.outbox_due(i64::MAX, 10, &none).unwrap();
        let (sequence, entry) = due
            .entries
            .into_iter()
            .find(|(_, entry)| entry.event.id == "evt_message")
            .unwrap();
        assert_eq!(entry.event.data, record_data, "after a retry and a reopen");
        assert_eq!(entry.last_error.as_deref(), Some("502"));
        store.bury_outbox(sequence, &entry).unwrap();
        let buried = store.dead_letters(None, 10).unwrap();
        assert_eq!(buried[0].entry.as_ref().unwrap().event.data, record_data);
    }
}

/// Two users of one location whose mailboxes both get a message from the
/// same contact: each delivery keeps its own history record, and each
/// event carries its own user's data.
#[test]
fn two_users_of_one_location_each_keep_their_own_record_of_a_message() {
    for (_dir, store) in engines() {
        let start = FolderCursor::new(1, 1);
        connect_inbox_at(store.as_ref(), start);
        let record = |user: &str| MessageEventData {
            id: "msg_shared".into(),
            user_id: user.into(),
            ..send_record("x", None).data
        };
        let mut commit = ingest_commit(start, None, l1_thread("L1", &[]));
        commit.history = vec![record("u1"), record("u2")];
        commit.events = ["u1", "u2"]
            .iter()
            .map(|user| {
                event(
                    &format!("evt_{user}"),
                    "thr_c",
                    serde_json::to_value(record(user)).unwrap(),
                )
            })
            .collect();
        store.commit_ingest(&commit, None).unwrap();

        let mut delivered: Vec<(String, serde_json::Value)> = Vec::new();
        let none = |_: u64| false;
        while let Some((sequence, entry)) = store
            .outbox_due(i64::MAX, 10, &none)
            .unwrap()
            .entries
            .into_iter()
            .next()
        {
            delivered.push((entry.event.id.clone(), entry.event.data["user_id"].clone()));
            store.complete_outbox(sequence).unwrap();
        }
        assert_eq!(
            delivered,
            [
                ("evt_u1".to_string(), serde_json::json!("u1")),
                ("evt_u2".to_string(), serde_json::json!("u2"))
            ]
        );
        let contact = &record("u1").contact_id;
        let kept = store.history("L1", contact, None, 10).unwrap();
        let mut users: Vec<&str> = kept.iter().map(|r| r.user_id.as_str()).collect();
        users.sort();
        assert_eq!(users, ["u1", "u2"]);
    }
}

/// Data written by a newer build is refused with words that say so, not
/// misread (an older build delivered events without their data).
#[test]
fn data_from_a_newer_build_is_refused() {
    for open in openers() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path()).unwrap();
            store
                .put_setting("\u{0}store-format", &99u64.to_be_bytes())
                .unwrap();
        }
        let Err(refused) = open(dir.path()) else {
            panic!("a newer format was opened");
        };
        assert!(
            refused.to_string().contains("newer mailbridge"),
            "{refused:#}"
        );
    }
}

/// Issue 21 item 6: failed tries at a message are counted across calls
/// (durably, per mailbox, folder, UIDVALIDITY and UID); a message is listed
/// only once set aside, and only if the commit that moves its cursor and
/// carries its event went through (a stale watcher's does not); a released
/// mailbox forgets them.
#[test]
fn failed_tries_are_counted_and_a_message_is_listed_only_once_set_aside() {
    for (_dir, store) in engines() {
        connect_inbox_at(store.as_ref(), FolderCursor::new(1, 7));
        let now = Utc::now();
        let try_at = |uid: u32, message_id: Option<&str>| crate::model::UnprocessableMessage {
            mailbox: "me@x.test".into(),
            folder: FolderRole::Inbox,
            folder_name: "INBOX".into(),
            uid_validity: 1,
            uid,
            message_id: message_id.map(str::to_string),
            reason: crate::model::UnprocessableReason::NotReturned,
            error: "not returned".into(),
            attempts: 1,
            first_failed_at: now,
            last_failed_at: now,
            set_aside_at: None,
        };
        assert_eq!(
            store
                .count_failed_try(&try_at(7, Some("<m@x>")))
                .unwrap()
                .attempts,
            1
        );
        let counted = store.count_failed_try(&try_at(7, None)).unwrap();
        assert_eq!(counted.attempts, 2);
        assert_eq!(
            counted.message_id.as_deref(),
            Some("<m@x>"),
            "kept from an earlier try"
        );
        assert_eq!(
            store.count_failed_try(&try_at(8, None)).unwrap().attempts,
            1
        );
        assert!(store.set_aside_messages("me@x.test").unwrap().is_empty());

        let record = crate::model::UnprocessableMessage {
            set_aside_at: Some(now),
            ..counted
        };
        let step = |before: FolderCursor| IngestCommit {
            thread: None,
            thread_keys_seen: vec![],
            message_ids: vec![],
            events: vec![event("evt_u", "me@x.test", serde_json::json!({"uid": 7}))],
            ..ingest_commit(before, None, l1_thread("u1", &[]))
        };
        assert!(matches!(
            store.set_aside(&record, &step(FolderCursor::new(1, 6))),
            Err(StoreError::CursorMoved)
        ));
        assert!(store.set_aside_messages("me@x.test").unwrap().is_empty());

        store
            .set_aside(&record, &step(FolderCursor::new(1, 7)))
            .unwrap();
        assert_eq!(store.set_aside_messages("me@x.test").unwrap(), vec![record]);
        assert_eq!(
            store
                .cursor("me@x.test", FolderRole::Inbox)
                .unwrap()
                .map(|c| c.next_uid),
            Some(8)
        );
        assert!(
            store
                .outbox_page(None, 100)
                .unwrap()
                .iter()
                .any(|(_, entry)| entry.event.id == "evt_u")
        );

        store.disconnect("L1", "u1", &[]).unwrap();
        assert!(store.set_aside_messages("me@x.test").unwrap().is_empty());
    }
}

// --- retention (issue 21 item 1): one test per rule; the sweep takes `now`,
// so seconds-long retentions are seen without waiting.

/// Every rule at `secs` seconds (message sources: none, unless a test says).
fn retention_of(secs: u64) -> Retention {
    let keep = Some(std::time::Duration::from_secs(secs));
    Retention {
        messages: None,
        history: keep,
        sends: keep,
        dead_letters: keep,
        batch: 10_000,
    }
}

/// Unix ms `secs` seconds from now.
fn in_secs(secs: i64) -> i64 {
    Utc::now().timestamp_millis() + secs * 1_000
}

/// A synced message's history record under a fresh (time-minted) record id.
fn synced_record() -> MessageEventData {
    MessageEventData {
        id: crate::model::new_id("msg"),
        thread_id: "thr_c".into(),
        ..send_record("x", None).data
    }
}

/// Issue 21 item 1, history: a history record goes after `history`, except
/// while an event not yet delivered holds its data there.
#[test]
fn retention_history_goes_after_its_time_but_not_while_an_event_needs_it() {
    for open in openers() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        let start = FolderCursor::new(1, 1);
        connect_inbox_at(&*store, start);
        let delivered = synced_record();
        let pending = synced_record();
        let mut first = ingest_commit(start, None, l1_thread("L1", &[]));
        first.thread = None;
        first.history = vec![delivered.clone()];
        first.events = vec![];
        store.commit_ingest(&first, None).unwrap();
        let mut second = ingest_commit(first.cursor, None, l1_thread("L1", &[]));
        second.thread = None;
        second.history = vec![pending.clone()];
        second.events = vec![event(
            "evt_pending",
            "thr_c",
            serde_json::to_value(&pending).unwrap(),
        )];
        store.commit_ingest(&second, None).unwrap();
        let ids = |store: &dyn SuiteStore| -> Vec<String> {
            let mut ids: Vec<String> = store
                .history("L1", "c1", None, 10)
                .unwrap()
                .into_iter()
                .map(|record| record.id)
                .collect();
            ids.sort();
            ids
        };
        let mut both = vec![delivered.id.clone(), pending.id.clone()];
        both.sort();

        let report = store.sweep(in_secs(0), &retention_of(3600)).unwrap();
        assert_eq!(report.history, 0, "nothing is old yet");
        assert_eq!(ids(&*store), both);

        let report = store.sweep(in_secs(2), &retention_of(1)).unwrap();
        assert_eq!(report.history, 1);
        assert_eq!(
            ids(&*store),
            vec![pending.id.clone()],
            "the undelivered event keeps its record"
        );
        let none = |_: u64| false;
        let due = store.outbox_due(i64::MAX, 10, &none).unwrap();
        assert_eq!(
            due.entries[0].1.event.data,
            serde_json::to_value(&pending).unwrap(),
            "and still reads its data from it"
        );
        store.complete_outbox(due.entries[0].0).unwrap();
        let report = store.sweep(in_secs(2), &retention_of(1)).unwrap();
        assert_eq!(report.history, 1);
        assert!(ids(&*store).is_empty(), "delivered, it goes");
    }
}

/// Issue 21 item 1, dead letters: they go `dead_letters` after they were
/// set aside, and `delete_dead_letter` removes one at once.
#[test]
fn retention_dead_letters_go_after_their_time_or_when_deleted() {
    for (_dir, store) in engines() {
        store
            .enqueue(&[
                event("evt_a", "k", serde_json::json!({"n": 1})),
                event("evt_b", "k2", serde_json::json!({"n": 2})),
            ])
            .unwrap();
        let none = |_: u64| false;
        for (sequence, entry) in store.outbox_due(i64::MAX, 10, &none).unwrap().entries {
            store.bury_outbox(sequence, &entry).unwrap();
        }
        let letters = store.dead_letters(None, 10).unwrap();
        assert_eq!(letters.len(), 2);

        assert!(store.delete_dead_letter(letters[0].id).unwrap());
        assert!(!store.delete_dead_letter(letters[0].id).unwrap(), "gone");
        assert_eq!(store.dead_letters(None, 10).unwrap().len(), 1);

        let report = store.sweep(in_secs(0), &retention_of(3600)).unwrap();
        assert_eq!(report.dead_letters, 0);
        assert_eq!(store.dead_letters(None, 10).unwrap().len(), 1);
        let report = store.sweep(in_secs(2), &retention_of(1)).unwrap();
        assert_eq!(report.dead_letters, 1);
        assert!(store.dead_letters(None, 10).unwrap().is_empty());
    }
}

/// Issue 21 item 1, sends: a settled send goes after `sends` with its index
/// entries; one not settled stays whatever its age.
#[test]
fn retention_settled_sends_go_after_their_time_and_unsettled_ones_stay() {
    for open in openers() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        let now = Utc::now().timestamp_millis();
        let queued = send_record("msg_queued", None);
        let mut sent = send_record("msg_sent", None);
        accept(&*store, &queued, &send_thread(), None, now).unwrap();
        accept(&*store, &sent, &send_thread(), None, now).unwrap();
        sent.status = crate::model::SendStatus::Sent;
        sent.filed_in_sent = true;
        store.update_send(&sent, &[]).unwrap();

        let report = store.sweep(in_secs(0), &retention_of(3600)).unwrap();
        assert_eq!(report.sends, 0);
        let report = store.sweep(in_secs(2), &retention_of(1)).unwrap();
        assert_eq!(report.sends, 1);
        assert_eq!(store.send("msg_sent").unwrap(), None);
        assert!(
            !store
                .is_crm_message("me@x.test", "<msg_sent@x.test>")
                .unwrap()
        );
        assert!(
            store.send("msg_queued").unwrap().is_some(),
            "an unsettled send stays"
        );
        assert!(
            store
                .is_crm_message("me@x.test", "<msg_queued@x.test>")
                .unwrap()
        );
        assert_eq!(store.unsettled_sends().unwrap().len(), 1);
    }
}

/// Issue 21 item 1, idempotency keys: kept 48 hours, then removed (not
/// only ignored).
#[test]
fn retention_idempotency_keys_go_after_48_hours() {
    for open in openers() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        let now = Utc::now().timestamp_millis();
        accept(
            &*store,
            &send_record("msg_k", Some("key")),
            &send_thread(),
            None,
            now,
        )
        .unwrap();
        assert_eq!(store.stored_count(engine::Tree::Idempotency), 1);
        let forever = Retention {
            history: None,
            sends: None,
            dead_letters: None,
            ..retention_of(1)
        };
        let report = store
            .sweep(now + IDEMPOTENCY_WINDOW_MS - 1_000, &forever)
            .unwrap();
        assert_eq!(report.idempotency_keys, 0);
        match accept(
            &*store,
            &send_record("msg_again", Some("key")),
            &send_thread(),
            None,
            now,
        ) {
            Ok(SendAcceptance::Repeat(first)) => assert_eq!(first.id, "msg_k"),
            other => panic!("within 48 hours the key still answers: {other:?}"),
        }
        let report = store
            .sweep(now + IDEMPOTENCY_WINDOW_MS + 1_000, &forever)
            .unwrap();
        assert_eq!(report.idempotency_keys, 1);
        assert_eq!(store.stored_count(engine::Tree::Idempotency), 0);
        assert!(
            store.send("msg_k").unwrap().is_some(),
            "the send is not the key's to remove"
        );
    }
}

/// Issue 21 item 1, quota: entries past the rolling window go, even for a
/// mailbox that never sends again (and so never reads its own).
#[test]
fn retention_quota_entries_go_past_the_window() {
    for open in openers() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        let now = Utc::now().timestamp_millis();
        accept(
            &*store,
            &send_record("msg_q", None),
            &send_thread(),
            None,
            now,
        )
        .unwrap();
        assert_eq!(store.stored_count(engine::Tree::Quota), 1);
        let report = store
            .sweep(now + QUOTA_WINDOW_MS - 1_000, &retention_of(3600 * 1000))
            .unwrap();
        assert_eq!(report.quota, 0);
        let report = store
            .sweep(now + QUOTA_WINDOW_MS + 1_000, &retention_of(3600 * 1000))
            .unwrap();
        assert_eq!(report.quota, 1);
        assert_eq!(store.stored_count(engine::Tree::Quota), 0);
    }
}

/// The LocatedMessage of a synced record in thread `thr_c`.
fn located_entry(record: &MessageEventData) -> crate::model::LocatedMessage {
    crate::model::LocatedMessage {
        record_id: record.id.clone(),
        message_id: Some("<b@x>".into()),
        thread_id: "thr_c".into(),
        routes: l1_thread("L1", &[]).routes,
        flags: FlagState::default(),
        labels: None,
    }
}

/// Issue 22 item 2: an operator's listing pages through mailboxes in address
/// order, each page starting after the last address of the one before, on
/// every engine; what `keep` refuses takes no room on a page.
#[test]
fn mailbox_summaries_page_in_address_order_after_an_address() {
    for (_dir, store) in engines() {
        for (n, address) in ["c@x.test", "a@x.test", "d@x.test", "b@x.test"]
            .into_iter()
            .enumerate()
        {
            store
                .connect(
                    &mailbox(address),
                    &integration("L1", &format!("u{n}"), address),
                    &[],
                    &[],
                    &[],
                )
                .unwrap();
        }
        let page = |after: Option<&str>, limit: usize, skip: &str| {
            store
                .mailbox_summaries_after(after, limit, &mut |summary| summary.address != skip)
                .unwrap()
                .into_iter()
                .map(|summary| summary.address)
                .collect::<Vec<String>>()
        };
        assert_eq!(page(None, 2, ""), ["a@x.test", "b@x.test"]);
        assert_eq!(page(Some("b@x.test"), 2, ""), ["c@x.test", "d@x.test"]);
        assert_eq!(page(Some("b@x"), 1, ""), ["b@x.test"]);
        assert_eq!(page(Some("d@x.test"), 2, ""), Vec::<String>::new());
        assert_eq!(page(None, 2, "b@x.test"), ["a@x.test", "c@x.test"]);
    }
}

/// Issue 22 item 2: a folder's synced messages within a UID range come back
/// in UID order, at most the `latest` highest, on every engine (the engine
/// interface reads the range backwards), never another UIDVALIDITY's.
#[test]
fn located_in_reads_the_latest_of_a_uid_range_in_uid_order() {
    for (_dir, store) in engines() {
        let mut cursor = FolderCursor::new(1, 1);
        connect_inbox_at(store.as_ref(), cursor);
        for (uid_validity, uid) in [(1, 3), (1, 5), (1, 7), (1, 9), (2, 4)] {
            let mut commit = ingest_commit(cursor, None, l1_thread("L1", &[]));
            commit.thread = None;
            commit.events = vec![];
            commit.located = Some((uid_validity, uid, located_entry(&synced_record())));
            store.commit_ingest(&commit, None).unwrap();
            cursor = commit.cursor;
        }
        let uids = |uid_validity: u32, range: std::ops::RangeInclusive<u32>, latest: usize| {
            store
                .located_in("me@x.test", FolderRole::Inbox, uid_validity, range, latest)
                .unwrap()
                .into_iter()
                .map(|(uid, _)| uid)
                .collect::<Vec<u32>>()
        };
        assert_eq!(uids(1, 1..=9, 10), [3, 5, 7, 9]);
        assert_eq!(uids(1, 1..=9, 2), [7, 9], "the latest, in UID order");
        assert_eq!(uids(1, 4..=7, 10), [5, 7]);
        assert_eq!(uids(1, 4..=8, 1), [7]);
        assert_eq!(uids(1, 1..=u32::MAX, 10), [3, 5, 7, 9]);
        assert_eq!(uids(2, 1..=9, 10), [4]);
    }
}

/// Issue 21 item 1, located messages: the places under a folder's old
/// UIDVALIDITY go once its cursor has a new one.
#[test]
fn retention_places_under_an_old_uidvalidity_go() {
    for open in openers() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        let start = FolderCursor::new(1, 1);
        connect_inbox_at(&*store, start);
        let record = synced_record();
        let mut commit = ingest_commit(start, None, l1_thread("L1", &[]));
        commit.history = vec![record.clone()];
        commit.located = Some((1, 1, located_entry(&record)));
        store.commit_ingest(&commit, None).unwrap();

        let report = store.sweep(in_secs(0), &retention_of(3600)).unwrap();
        assert_eq!(report.located, 0, "under the current UIDVALIDITY it stays");
        assert!(store.locate_record(&record.id).unwrap().is_some());

        store
            .set_cursor(
                "me@x.test",
                FolderRole::Inbox,
                Some(commit.cursor),
                FolderCursor::new(2, 1),
            )
            .unwrap();
        let report = store.sweep(in_secs(0), &retention_of(3600)).unwrap();
        assert_eq!(report.located, 1);
        assert_eq!(
            store.located("me@x.test", FolderRole::Inbox, 1, 1).unwrap(),
            None
        );
        assert_eq!(store.locate_record(&record.id).unwrap(), None);
        assert_eq!(store.stored_count(engine::Tree::RecordLocations), 0);
        assert!(
            store.record_info(&record.id).unwrap().is_some(),
            "what is known of it stays for `history`"
        );
    }
}

/// Issue 21 item 1, message records and R21 marks: a record no longer in a
/// watched folder goes after `history` with its "already synced" marks;
/// while located, or named by an undelivered event, it stays.
#[test]
fn retention_records_and_synced_marks_go_once_nothing_holds_them() {
    for open in openers() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        let start = FolderCursor::new(1, 1);
        connect_inbox_at(&*store, start);
        let record = synced_record();
        let l1u1 = vec![("L1".to_string(), "u1".to_string())];
        let mut commit = ingest_commit(start, None, l1_thread("L1", &[]));
        commit.history = vec![record.clone()];
        commit.located = Some((1, 1, located_entry(&record)));
        commit.synced = Some(("<b@x>".into(), l1u1.clone()));
        store.commit_ingest(&commit, None).unwrap();
        let none = |_: u64| false;
        let deliver_all = || {
            for (sequence, _) in store.outbox_due(i64::MAX, 10, &none).unwrap().entries {
                store.complete_outbox(sequence).unwrap();
            }
        };
        deliver_all();

        store.sweep(in_secs(2), &retention_of(1)).unwrap();
        assert!(
            store.record_info(&record.id).unwrap().is_some(),
            "located: kept"
        );
        assert_eq!(store.synced_to("<b@x>", &l1u1).unwrap(), l1u1);

        store
            .enqueue(&[event(
                "evt_updated",
                "thr_c",
                serde_json::json!({"id": record.id, "seen": true}),
            )])
            .unwrap();
        store
            .set_cursor(
                "me@x.test",
                FolderRole::Inbox,
                Some(commit.cursor),
                FolderCursor::new(2, 1),
            )
            .unwrap();
        let report = store.sweep(in_secs(2), &retention_of(1)).unwrap();
        assert_eq!(report.located, 1);
        assert_eq!(report.records, 0, "an undelivered event names it");
        assert!(store.record_info(&record.id).unwrap().is_some());

        deliver_all();
        let report = store.sweep(in_secs(0), &retention_of(3600)).unwrap();
        assert_eq!((report.records, report.synced), (0, 0), "not old yet");
        let report = store.sweep(in_secs(2), &retention_of(1)).unwrap();
        assert_eq!((report.records, report.synced), (1, 1));
        assert_eq!(store.record_info(&record.id).unwrap(), None);
        assert!(store.synced_to("<b@x>", &l1u1).unwrap().is_empty());
    }
}

/// Issue 21 item 1, threads: a thread stays while anything names it (here
/// a located message), then goes with its thread keys, never leaving one
/// that leads nowhere.
#[test]
fn retention_a_thread_stays_while_named_then_goes_with_its_keys() {
    for open in openers() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        let start = FolderCursor::new(1, 1);
        connect_inbox_at(&*store, start);
        let record = synced_record();
        let mut commit = ingest_commit(start, None, l1_thread("L1", &[]));
        commit.history = vec![record.clone()];
        commit.located = Some((1, 1, located_entry(&record)));
        commit.answers = vec!["<a@x>".into()];
        store.commit_ingest(&commit, None).unwrap();
        let none = |_: u64| false;
        for (sequence, _) in store.outbox_due(i64::MAX, 10, &none).unwrap().entries {
            store.complete_outbox(sequence).unwrap();
        }
        assert_eq!(store.stored_count(engine::Tree::ThreadKeys), 2);

        let report = store.sweep(in_secs(2), &retention_of(1)).unwrap();
        assert_eq!(report.history, 1, "its history went");
        assert_eq!(
            report.threads, 0,
            "the located message still names the thread"
        );
        assert!(
            store
                .thread_of("me@x.test", &["<b@x>".into()])
                .unwrap()
                .is_some()
        );

        store
            .set_cursor(
                "me@x.test",
                FolderRole::Inbox,
                Some(commit.cursor),
                FolderCursor::new(2, 1),
            )
            .unwrap();
        let report = store.sweep(in_secs(2), &retention_of(1)).unwrap();
        assert_eq!((report.threads, report.thread_keys), (1, 2));
        assert_eq!(store.thread("thr_c").unwrap(), None);
        assert_eq!(
            store.thread_of("me@x.test", &["<b@x>".into()]).unwrap(),
            None
        );
        assert_eq!(
            store
                .thread_answering("me@x.test", &["<a@x>".into()])
                .unwrap(),
            None
        );
        assert_eq!(store.stored_count(engine::Tree::ThreadKeys), 0);
    }
}

/// Issue 21 item 1, a send's thread: kept while the send is, whatever its age.
#[test]
fn retention_a_send_keeps_its_thread() {
    for open in openers() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        let old_thread = Thread {
            created_at: Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap(),
            ..send_thread()
        };
        let now = Utc::now().timestamp_millis();
        accept(&*store, &send_record("msg_t", None), &old_thread, None, now).unwrap();
        let keep_sends = Retention {
            sends: None,
            ..retention_of(1)
        };
        let report = store.sweep(in_secs(2), &keep_sends).unwrap();
        assert_eq!(report.threads, 0);
        assert!(store.thread("thr_s").unwrap().is_some());
        let mut settled = store.send("msg_t").unwrap().unwrap();
        settled.status = crate::model::SendStatus::Failed;
        store.update_send(&settled, &[]).unwrap();
        let report = store.sweep(in_secs(2), &retention_of(1)).unwrap();
        assert_eq!((report.sends, report.threads), (1, 1));
        assert_eq!(store.thread("thr_s").unwrap(), None);
    }
}

/// Issue 21 item 1, `.submit.eml` copies: one no send can use any more (a
/// crash between its write and its send's commit) goes; a queued send's
/// stays whatever its age.
#[test]
fn retention_orphaned_submission_copies_go() {
    for open in openers() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        accept(
            &*store,
            &send_record("msg_live", None),
            &send_thread(),
            None,
            0,
        )
        .unwrap();
        let orphan = dir.path().join("messages").join("send_orphan.submit.eml");
        std::fs::write(&orphan, b"left by a crash").unwrap();
        let grace = retention::ORPHAN_GRACE.as_secs() as i64;

        let report = store
            .sweep(in_secs(grace - 60), &retention_of(3600 * 1000))
            .unwrap();
        assert_eq!(
            report.submission_copies, 0,
            "within its grace a copy may be a commit under way"
        );
        assert!(orphan.exists());
        let report = store
            .sweep(in_secs(grace + 60), &retention_of(3600 * 1000))
            .unwrap();
        assert_eq!(report.submission_copies, 1);
        assert!(!orphan.exists());
        assert!(
            store
                .message_source("msg_live", SourceCopy::Submission)
                .unwrap()
                .is_some(),
            "a queued send keeps its copy"
        );
    }
}

/// Issue 21 item 1, event bodies: a body file no outbox entry refers to
/// (its commit failed) goes; one an entry refers to stays.
#[test]
fn retention_orphaned_event_bodies_go() {
    for open in openers() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        let large = "x".repeat(64 * 1024);
        store
            .enqueue(&[event(
                "evt_large",
                "k",
                serde_json::json!({ "body": large }),
            )])
            .unwrap();
        let bodies = dir.path().join("event-bodies");
        let orphan = bodies.join("evt_orphan.json");
        std::fs::write(&orphan, b"{}").unwrap();
        assert_eq!(std::fs::read_dir(&bodies).unwrap().count(), 2);
        let grace = retention::ORPHAN_GRACE.as_secs() as i64;
        let report = store
            .sweep(in_secs(grace + 60), &retention_of(3600 * 1000))
            .unwrap();
        assert_eq!(report.event_bodies, 1);
        assert!(!orphan.exists());
        let none = |_: u64| false;
        let due = store.outbox_due(i64::MAX, 10, &none).unwrap();
        assert_eq!(
            due.entries[0].1.event.data["body"],
            serde_json::json!(large)
        );
    }
}

/// Issue 21 item 1, message sources: the sweep applies `messages`.
#[test]
fn retention_the_sweep_prunes_message_sources() {
    for (_dir, store) in engines() {
        let start = FolderCursor::new(1, 1);
        connect_inbox_at(store.as_ref(), start);
        let record = synced_record();
        let mut commit = ingest_commit(start, None, l1_thread("L1", &[]));
        commit.history = vec![record.clone()];
        store.commit_ingest(&commit, Some(b"a source")).unwrap();
        let report = store.sweep(in_secs(0), &retention_of(3600)).unwrap();
        assert_eq!(
            report.message_sources, 0,
            "no `messages` rule, nothing pruned"
        );
        let rules = Retention {
            messages: Some(std::time::Duration::ZERO),
            ..retention_of(3600)
        };
        let report = store.sweep(in_secs(0), &rules).unwrap();
        assert_eq!(report.message_sources, 1);
        assert_eq!(
            store.message_source(&record.id, SourceCopy::Filed).unwrap(),
            None
        );
    }
}

/// Issue 21 item 1: a backlog is worked off `batch` items at a time, the
/// report saying more is left.
#[test]
fn retention_a_pass_stops_at_its_batch_and_says_more_is_left() {
    for (_dir, store) in engines() {
        store
            .enqueue(&[
                event("evt_1", "k1", serde_json::json!({})),
                event("evt_2", "k2", serde_json::json!({})),
                event("evt_3", "k3", serde_json::json!({})),
            ])
            .unwrap();
        let none = |_: u64| false;
        for (sequence, entry) in store.outbox_due(i64::MAX, 10, &none).unwrap().entries {
            store.bury_outbox(sequence, &entry).unwrap();
        }
        let rules = Retention {
            batch: 2,
            ..retention_of(1)
        };
        let first = store.sweep(in_secs(2), &rules).unwrap();
        assert_eq!(first.dead_letters, 2);
        assert!(first.more);
        let second = store.sweep(in_secs(2), &rules).unwrap();
        assert_eq!(second.dead_letters, 1);
        assert!(!second.more);
        assert!(store.dead_letters(None, 10).unwrap().is_empty());
    }
}
