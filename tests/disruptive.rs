//! Tests that restart the shared mail stack under a running daemon. They are
//! ignored by a plain `cargo test` and run alone by scripts/test.sh.

mod support;

use std::process::Command;

use support::{
    daemon::{Api, Daemon, test_config},
    receiver::Receiver,
    stack::{Stack, message, new_message_id},
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
    let stack = Stack::get();
    let receiver = Receiver::start().await;
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(test_config(data.path(), &stack, &receiver)).await;
    let api = Api::new(&daemon.base);
    let me = stack.new_user("me").await;
    let ann = stack.new_user("ann").await;
    api.put_contact("L1", "c-ann", &ann.address, &["u1"]).await;
    api.connect("L1", "u1", &stack, &me).await;
    api.wait_active("L1", "u1").await;
    let send = async |subject: &str| {
        stack
            .deliver(
                &ann.address,
                &[&me.address],
                &message(
                    &ann.address,
                    &me.address,
                    subject,
                    &new_message_id("r"),
                    None,
                ),
            )
            .await
    };
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
