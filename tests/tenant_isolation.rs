//! Issue 10: one location cannot take over another's mailbox. A mailbox
//! several integrations share keeps its servers and its login.

mod support;

use support::{scripted_gmail::ScriptedGmail, world::World};

/// Another location claims the first one's address with a server that takes
/// any login (its own), then with its own account on the real server: both
/// are refused with 409 before anything changes; the first location's
/// mailbox stays active and its sends still leave through the real server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_location_cannot_point_a_shared_mailbox_at_its_own_server_or_login() {
    let w = World::connected(serde_json::json!({})).await;
    let takes_any_login = ScriptedGmail::start().await;
    let path = "/v1/locations/L2/users/intruder/mailbox";
    let claim = |auth: serde_json::Value, imap: serde_json::Value, smtp: serde_json::Value| {
        serde_json::json!({
            "email": w.me.address,
            "provider": "imap",
            "auth": auth,
            "imap": imap,
            "smtp": smtp,
        })
    };

    // Its own servers, any password.
    let (status, body) = w
        .api
        .send(
            reqwest::Method::PUT,
            path,
            Some(claim(
                serde_json::json!({"type": "password", "username": w.me.address, "password": "anything"}),
                takes_any_login.endpoint(),
                takes_any_login.endpoint(),
            )),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "mailbox_in_use");

    // The real servers, but its own account there (ann's login).
    let (status, body) = w
        .api
        .send(
            reqwest::Method::PUT,
            path,
            Some(claim(
                serde_json::json!({"type": "password", "username": w.ann.address, "password": w.ann.password}),
                serde_json::to_value(w.stack.imap_endpoint()).unwrap(),
                serde_json::to_value(w.stack.smtp_endpoint()).unwrap(),
            )),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "mailbox_in_use");

    // Nothing moved: the first location's mailbox is as it was, and its
    // next send reaches ann through the real stack.
    let (status, mailbox) = w
        .api
        .send(
            reqwest::Method::GET,
            "/v1/locations/L1/users/u1/mailbox",
            None,
        )
        .await;
    assert_eq!(status, 200, "{mailbox}");
    assert_eq!(mailbox["state"], "active");
    let (status, accepted, _) = w
        .send(serde_json::json!({"contact_id": "c-ann", "subject": "still mine", "text": "x"}))
        .await;
    assert_eq!(status, 202, "{accepted}");
    w.receiver
        .wait_for("message.sent", |r| r.kind() == "message.sent")
        .await;
    w.stack.wait_count(&w.ann, "INBOX", 1).await;
    assert_eq!(
        w.stack.count(&w.me, "Sent").await,
        1,
        "filed in the real Sent folder"
    );

    // A second location with the mailbox's own login and servers may join.
    let (status, body) = w
        .api
        .send(
            reqwest::Method::PUT,
            path,
            Some(claim(
                serde_json::json!({"type": "password", "username": w.me.address, "password": w.me.password}),
                serde_json::to_value(w.stack.imap_endpoint()).unwrap(),
                serde_json::to_value(w.stack.smtp_endpoint()).unwrap(),
            )),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    w.daemon.stop().await;
}
