//! `mailbridge inspect --mailbox`: why a message does or does not sync, per
//! integration, from the running daemon (--api) or a stopped one's data folder.

mod support;

use support::{
    daemon::test_config,
    stack::{message, new_message_id},
    world::World,
};

async fn inspect(args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailbridge"))
        .arg("inspect")
        .args(args)
        .output()
        .await
        .expect("run mailbridge inspect");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_names_the_decision_and_the_rule_for_each_integration() {
    let w = World::connected(serde_json::json!({})).await;
    let files = tempfile::tempdir().unwrap();
    let from_ann = files.path().join("from-ann.eml");
    let from_stranger = files.path().join("from-stranger.eml");
    std::fs::write(
        &from_ann,
        message(
            &w.ann.address,
            &w.me.address,
            "hello",
            &new_message_id("i"),
            None,
        ),
    )
    .unwrap();
    std::fs::write(
        &from_stranger,
        message(
            "eve@elsewhere.test",
            &w.me.address,
            "spam",
            &new_message_id("i"),
            None,
        ),
    )
    .unwrap();
    let api = w.daemon.base.clone();
    // The daemon's own config: its data folder, its API key.
    let config = test_config(w._data.path(), &w.stack, &w.receiver);
    let config_file = files.path().join("mailbridge.toml");
    std::fs::write(&config_file, toml::to_string(&config).unwrap()).unwrap();
    let config_path = config_file.to_str().unwrap().to_string();

    let (ok, out) = inspect(&[
        from_ann.to_str().unwrap(),
        "--mailbox",
        &w.me.address,
        "--api",
        &api,
        "-c",
        &config_path,
    ])
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("L1/u1: → L1/c-ann as inbound (mailbox), a new thread, by R3"),
        "{out}"
    );
    let (ok, out) = inspect(&[
        from_stranger.to_str().unwrap(),
        "--mailbox",
        &w.me.address,
        "--api",
        &api,
        "-c",
        &config_path,
    ])
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains(
            "L1/u1: ignored: sender is not a contact assigned to the integration's user (R3)"
        ),
        "{out}"
    );
    let (ok, out) = inspect(&[
        from_ann.to_str().unwrap(),
        "--mailbox",
        &w.me.address,
        "--folder",
        "sent",
        "--json",
        "--api",
        &api,
        "-c",
        &config_path,
    ])
    .await;
    assert!(ok, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["folder"], "sent");
    assert_eq!(json["verdicts"][0]["synced"], false, "{json}");
    assert_eq!(json["message"]["subject"], "hello");

    // The daemon stopped, the data folder answers the same.
    w.daemon.stop().await;
    let (ok, out) = inspect(&[
        from_ann.to_str().unwrap(),
        "--mailbox",
        &w.me.address,
        "--config",
        &config_path,
    ])
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("L1/u1: → L1/c-ann as inbound (mailbox), a new thread, by R3"),
        "{out}"
    );
    // Nothing was stored or sent by inspecting.
    assert_eq!(w.receiver.distinct(|r| r.subject() == "hello"), 0);
}
