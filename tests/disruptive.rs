//! Tests that restart the shared mail stack under a running daemon. They are
//! ignored by a plain `cargo test` and run alone by scripts/test.sh.

mod support;

use std::process::Command;

use support::{
    stack::Stack,
    world::{World, mail},
};

fn stack_script(name: &str) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/mailstack")
        .join(name);
    let status = Command::new(&script)
        .status()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(status.success(), "{} failed: {status}", script.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared mail stack; scripts/test.sh runs it alone"]
async fn r21_dovecot_restart_under_the_daemon_resumes_with_nothing_lost() {
    let World {
        stack,
        receiver,
        daemon,
        api,
        me,
        ann,
        _data,
    } = World::connected(serde_json::json!({})).await;
    let send = async |subject: &str| mail(&stack, &ann, &me, subject, None).await;
    send("before restart").await;
    receiver
        .wait_for("the first message", |r| r.subject() == "before restart")
        .await;

    stack_script("stop.sh");
    stack_script("start.sh");
    // Delivered at once, while the daemon is still reconnecting.
    for n in 0..5 {
        send(&format!("after restart #{n}")).await;
    }
    receiver
        .wait_for_count("the messages sent during the reconnect", 5, |r| {
            r.subject().starts_with("after restart")
        })
        .await;
    let (_, status) = api
        .send(
            reqwest::Method::GET,
            "/v1/locations/L1/users/u1/mailbox",
            None,
        )
        .await;
    assert_eq!(status["state"], "active");
    daemon.stop().await;
}

fn postfix(command: &str) {
    let stack = Stack::get();
    let config = stack.runtime.join("etc/postfix");
    let status = Command::new("postfix")
        .arg("-c")
        .arg(&config)
        .arg(command)
        .status()
        .unwrap_or_else(|e| panic!("postfix {command}: {e}"));
    assert!(status.success(), "postfix {command} failed: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the shared Postfix; scripts/test.sh runs it alone"]
async fn r05_a_send_while_postfix_is_down_stays_queued_and_goes_out_when_it_returns() {
    let World {
        stack,
        receiver,
        daemon,
        api,
        ann,
        _data,
        ..
    } = World::connected(serde_json::json!({})).await;

    postfix("stop");
    let (status, accepted, _) = api
        .send_message(
            "L1",
            "u1",
            serde_json::json!({"contact_id": "c-ann", "subject": "while down", "text": "x"}),
            None,
        )
        .await;
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["id"].as_str().unwrap().to_string();
    // It was tried, failed transiently, and waits in the queue.
    let state = support::eventually("a failed attempt", support::DEADLINE, async || {
        let (_, state) = api
            .send(reqwest::Method::GET, &format!("/v1/messages/{id}"), None)
            .await;
        (state["attempts"].as_u64().unwrap_or(0) >= 1 && state["status"] == "queued")
            .then_some(state)
    })
    .await;
    assert!(
        state["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{state}"
    );

    postfix("start");
    let sent = receiver
        .wait_for("message.sent", |r| r.kind() == "message.sent")
        .await;
    assert_eq!(sent.data()["id"], id.as_str());
    stack.wait_count(&ann, "INBOX", 1).await;
    assert!(receiver.all().iter().all(|r| r.kind() != "message.failed"));
    daemon.stop().await;
}
