//! Issue 10: the SSRF guard. A mailbox's servers come from API callers; the
//! bridge checks every address before connecting, and its answers do not
//! tell which internal hosts and ports exist.

mod support;

use support::world::World;

async fn connect_at(w: &World, imap: serde_json::Value) -> (u16, serde_json::Value) {
    w.api
        .send(
            reqwest::Method::PUT,
            "/v1/locations/L1/users/u1/mailbox",
            Some(serde_json::json!({
                "email": w.me.address,
                "provider": "imap",
                "auth": {"type": "password", "username": w.me.address, "password": w.me.password},
                "imap": imap,
                "smtp": w.stack.smtp_endpoint(),
            })),
        )
        .await
}

/// Cloud metadata and link-local addresses are refused even with the
/// default `allow_private = true`; a closed port and a name that does not
/// resolve get the same words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_addresses_are_refused_and_unreachable_servers_look_alike() {
    let w = World::started().await;
    for host in ["169.254.169.254", "fd00:ec2::254", "[fe80::1]"] {
        let (status, body) = connect_at(
            &w,
            serde_json::json!({"host": host, "port": 993, "security": "tls"}),
        )
        .await;
        assert_eq!(status, 422, "{host}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("not an address the bridge connects to"),
            "{host}: {message}"
        );
    }
    // A port nothing listens on, and a name nobody has.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let (status, refused) = connect_at(
        &w,
        serde_json::json!({"host": "127.0.0.1", "port": closed, "security": "tls"}),
    )
    .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(
        refused["error"]["message"],
        format!("imap: could not connect to 127.0.0.1:{closed}")
    );
    let (status, unknown) = connect_at(
        &w,
        serde_json::json!({"host": "no-such-host.invalid", "port": 993, "security": "tls"}),
    )
    .await;
    assert_eq!(status, 422, "{unknown}");
    assert_eq!(
        unknown["error"]["message"],
        "imap: could not connect to no-such-host.invalid:993"
    );
    w.daemon.stop().await;
}

/// With `[network] allow_private = false`, a mailbox on a loopback or
/// private address is refused before any connection, and so is a webhook
/// URL naming one (the daemon does not start with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_are_refused_when_not_allowed() {
    let w = World::started_with(|config| {
        config.network.allow_private = false;
        // The test receiver listens on loopback: checked below on its own.
        config.webhooks.clear();
    })
    .await;
    let (status, body) =
        connect_at(&w, serde_json::to_value(w.stack.imap_endpoint()).unwrap()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("allow_private is false")),
        "{body}"
    );
    w.daemon.stop().await;

    let data = tempfile::tempdir().unwrap();
    let mut config = support::daemon::test_config(data.path(), &w.stack, &w.receiver);
    config.network.allow_private = false;
    let refused = mailbridge::run(
        config,
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    let error = format!(
        "{:#}",
        refused.expect_err("a loopback webhook URL is refused")
    );
    assert!(error.contains("refused by [network]"), "{error}");
}
