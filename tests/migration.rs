//! Issue 22 item 6: an install moves from sled to PostgreSQL with
//! `mailbridge migrate`, and nothing it owed the CRM is lost or repeated.

mod support;

use support::{
    daemon::{API_KEY, Api, Daemon, test_config, test_postgres_url},
    receiver::Receiver,
    stack::Stack,
    world::mail,
};

/// A daemon on sled syncs three messages while the CRM's receiver is down
/// (their events wait in the outbox) and stops; `mailbridge migrate` copies
/// its store into PostgreSQL; a daemon on PostgreSQL, on the same data
/// folder and key, delivers the waiting events under their original
/// webhook-ids, forwards none of the old mail again, and serves the
/// history and `/raw` of what sled synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i22_6_a_sled_install_moves_to_postgres_with_nothing_lost_or_repeated() {
    let stack = Stack::get();
    let receiver = Receiver::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path(), &stack, &receiver);
    // Sled first, whichever engine the other tests run on.
    config.storage.backend = mailbridge::config::StorageBackend::Sled;
    let me = stack.new_user("me").await;
    let ann = stack.new_user("ann").await;

    receiver.set_failing(true);
    let sled = Daemon::start(config.clone()).await;
    let api = Api::new(&sled.base);
    api.put_contact("L1", "c-ann", &ann.address, &["u1"]).await;
    api.connect("L1", "u1", &stack, &me).await;
    api.wait_active("L1", "u1").await;
    for n in 0..3 {
        mail(&stack, &ann, &me, &format!("before the move #{n}"), None).await;
    }
    // Each event was tried (and refused): it is committed and waits.
    support::eventually("three refused attempts", support::DEADLINE, async || {
        (receiver.distinct(|r| r.subject().starts_with("before the move")) == 3).then_some(())
    })
    .await;
    let waiting: std::collections::BTreeMap<String, String> = receiver
        .all()
        .into_iter()
        .filter(|r| r.subject().starts_with("before the move"))
        .map(|r| (r.subject().to_string(), r.webhook_id.clone()))
        .collect();
    assert_eq!(waiting.len(), 3);
    sled.stop().await;

    let schema = format!("migrated_{}", uuid::Uuid::new_v4().simple());
    let url = test_postgres_url();
    let migrate = |schema: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mailbridge"))
            .args(["migrate", "--from"])
            .arg(data.path())
            .args(["--to", &url, "--schema", schema])
            .output()
            .unwrap()
    };
    let moved = migrate(&schema);
    let printed = String::from_utf8_lossy(&moved.stdout).into_owned();
    assert!(
        moved.status.success(),
        "migrate: {printed}{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    assert!(printed.contains("counts checked"), "{printed}");
    // A second run into the same schema is refused: it holds data now.
    let again = migrate(&schema);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds data"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    let mut on_postgres = config.clone();
    on_postgres.storage.backend = mailbridge::config::StorageBackend::Postgres;
    on_postgres.storage.postgres.url = Some(url.clone());
    on_postgres.storage.postgres.schema = schema.clone();
    receiver.set_failing(false);
    let daemon = Daemon::start(on_postgres).await;
    let api = Api::new(&daemon.base);
    for (subject, webhook_id) in &waiting {
        let delivered = receiver
            .wait_for(subject, |r| r.subject() == subject.as_str())
            .await;
        assert_eq!(
            &delivered.webhook_id, webhook_id,
            "{subject}: its original webhook-id"
        );
    }
    api.wait_active("L1", "u1").await;
    // Anchored: a later message through the same mailbox, then count.
    mail(&stack, &ann, &me, "after the move", None).await;
    let after = receiver
        .wait_for("the later message", |r| r.subject() == "after the move")
        .await;
    for subject in waiting.keys() {
        assert_eq!(
            receiver.distinct(|r| r.subject() == subject.as_str()),
            1,
            "{subject} is not forwarded again"
        );
    }

    let (status, history) = api
        .send(
            reqwest::Method::GET,
            "/v1/locations/L1/contacts/c-ann/messages",
            None,
        )
        .await;
    assert_eq!(status, 200, "{history}");
    let subjects: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["subject"].as_str())
        .collect();
    assert_eq!(subjects.len(), 4, "{subjects:?}");
    assert_eq!(subjects.first(), Some(&"after the move"));
    for old in history["messages"].as_array().unwrap().iter().skip(1) {
        let id = old["id"].as_str().unwrap();
        let raw = api
            .http
            .get(format!("{}/v1/messages/{id}/raw", api.base))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(raw.status(), 200, "the source of {id}");
        let raw = raw.text().await.unwrap();
        assert!(raw.contains("before the move"), "{raw}");
    }
    assert_ne!(after.webhook_id, "", "the new message has its own event");
    daemon.stop().await;
}
