//! Issue 10: files and secrets. What the daemon writes is its owner's
//! alone; the credentials' key can live outside the data folder; no secret
//! reaches the log of a full run, even at trace level.

mod support;

use std::os::unix::fs::PermissionsExt as _;

use support::{
    child::ChildDaemon,
    daemon::{API_KEY, Api, test_config},
    receiver::{Receiver, SECRET},
    stack::{Stack, message, new_message_id},
};

/// Every file and folder below `root`, with its mode.
fn modes(root: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        found.push((path.clone(), meta.permissions().mode() & 0o777));
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                pending.push(entry.unwrap().path());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_owner_only_the_key_lives_apart_and_no_secret_is_logged() {
    let stack = Stack::get();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key_file = dir.path().join("keys").join("mailbridge.key");
    std::fs::create_dir_all(key_file.parent().unwrap()).unwrap();
    let mut config = test_config(&data, &stack, &receiver);
    config.storage.encryption_key_file = Some(key_file.clone());
    let me = stack.new_user("me").await;
    let ann = stack.new_user("ann").await;

    let daemon = ChildDaemon::start_logging(&config, dir.path(), "trace").await;
    let api = Api::new(&daemon.base);
    api.put_contact("L1", "c-ann", &ann.address, &["u1"]).await;
    api.connect("L1", "u1", &stack, &me).await;
    api.wait_active("L1", "u1").await;
    stack
        .deliver(
            &ann.address,
            &[&me.address],
            &message(
                &ann.address,
                &me.address,
                "logged?",
                &new_message_id("s"),
                None,
            ),
        )
        .await;
    receiver
        .wait_for("the message", |r| r.subject() == "logged?")
        .await;
    let (status, accepted, _) = api
        .send_message(
            "L1",
            "u1",
            serde_json::json!({"contact_id": "c-ann", "subject": "sent", "text": "x"}),
            None,
        )
        .await;
    assert_eq!(status, 202, "{accepted}");
    receiver
        .wait_for("message.sent", |r| r.kind() == "message.sent")
        .await;
    let log = daemon.log();
    daemon.terminate().await;

    for secret in [me.password.as_str(), API_KEY, SECRET] {
        assert!(!log.contains(secret), "a secret reached the log: {secret}");
    }
    let key = std::fs::read_to_string(&key_file).expect("the key where it was configured");
    assert!(!log.contains(key.trim()), "the key reached the log");
    assert!(
        !data.join("secret.key").exists(),
        "no key kept in the data folder"
    );
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let open: Vec<_> = modes(&data)
        .into_iter()
        .filter(|(_, mode)| mode & 0o077 != 0)
        .collect();
    assert!(open.is_empty(), "readable by others: {open:?}");
}

/// `Config`'s Debug output names no secret.
#[test]
fn the_configuration_prints_no_secret() {
    let mut config = mailbridge::config::Config::default();
    config.api.keys = vec![API_KEY.into()];
    config.webhooks = vec![mailbridge::config::WebhookConfig {
        url: "https://hook-user:url-password-456@crm.example.com/hooks?token=url-token-123".into(),
        secret: SECRET.into(),
    }];
    config.storage.encryption_key = Some("c2VjcmV0LWtleS0zMi1ieXRlcy1sb25nLW9rLW9rIQ==".into());
    config.providers.gmail.oauth.client_secret = Some("oauth-client-secret-xyz".into());
    config.storage.postgres.url = Some("postgres://bridge:pg-password-789@db/m".into());
    let printed = format!("{config:?}");
    for secret in [
        API_KEY,
        SECRET,
        "url-token-123",
        "url-password-456",
        "c2VjcmV0LWtleS0zMi1ieXRlcy1sb25nLW9rLW9rIQ==",
        "oauth-client-secret-xyz",
        "pg-password-789",
    ] {
        assert!(!printed.contains(secret), "{secret} in {printed}");
    }
}
