//! R21 across a crash: the daemon is killed with SIGKILL while mail arrives,
//! restarted on the same data folder, and everything still reaches the CRM,
//! repeats only under their original webhook-id.

mod support;

use std::collections::HashMap;

use support::{
    child::ChildDaemon,
    daemon::{Api, test_config},
    receiver::Receiver,
    stack::{Stack, message, new_message_id},
};

const MESSAGES: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r21_sigkill_while_50_messages_arrive_loses_and_doubles_nothing() {
    let stack = Stack::get();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(&dir.path().join("data"), &stack, &receiver);
    let me = stack.new_user("me").await;
    let ann = stack.new_user("ann").await;

    let daemon = ChildDaemon::start(&config, dir.path()).await;
    let api = Api::new(&daemon.base);
    api.put_contact("L1", "c-ann", &ann.address, &["u1"]).await;
    api.connect("L1", "u1", &stack, &me).await;
    api.wait_active("L1", "u1").await;

    let sender = {
        let (stack, ann, me) = (Stack::get(), ann.clone(), me.clone());
        tokio::spawn(async move {
            for n in 0..MESSAGES {
                let subject = format!("crash #{n:02}");
                stack
                    .deliver(
                        &ann.address,
                        &[&me.address],
                        &message(
                            &ann.address,
                            &me.address,
                            &subject,
                            &new_message_id("c"),
                            None,
                        ),
                    )
                    .await;
            }
        })
    };
    // Kill it mid-stream, once some messages made it through.
    receiver
        .wait_for_count("the first messages", 5, |r| r.kind() == "message.inbound")
        .await;
    daemon.kill().await;
    let before_restart = receiver.accepted().len();
    sender.await.unwrap();
    stack.wait_count(&me, "INBOX", MESSAGES as u32).await;

    let daemon = ChildDaemon::start(&config, dir.path()).await;
    // Counted by subject: a delivery the kill cut short is repeated (at
    // least once), so the count of deliveries reaches 50 before the last
    // messages arrive.
    support::eventually(
        "every message after the restart",
        support::DEADLINE,
        async || {
            let subjects: std::collections::HashSet<String> = receiver
                .accepted()
                .iter()
                .filter(|r| r.kind() == "message.inbound")
                .map(|r| r.subject().to_string())
                .collect();
            (subjects.len() >= MESSAGES).then_some(())
        },
    )
    .await;
    let delivered: Vec<_> = receiver
        .accepted()
        .into_iter()
        .filter(|r| r.kind() == "message.inbound")
        .collect();
    let mut ids_by_subject: HashMap<String, String> = HashMap::new();
    for r in receiver
        .accepted()
        .iter()
        .filter(|r| r.kind() == "message.inbound")
    {
        assert!(r.signature_valid);
        let first = ids_by_subject
            .entry(r.subject().to_string())
            .or_insert_with(|| r.webhook_id.clone());
        assert_eq!(
            first,
            &r.webhook_id,
            "a repeat of {:?} must carry its original webhook-id",
            r.subject()
        );
    }
    let expected: Vec<String> = (0..MESSAGES).map(|n| format!("crash #{n:02}")).collect();
    let mut got: Vec<String> = ids_by_subject.keys().cloned().collect();
    got.sort();
    assert_eq!(got, expected, "every message delivered, none invented");
    eprintln!(
        "killed after {before_restart} acknowledged events; {} deliveries in all for {MESSAGES} messages",
        delivered.len()
    );
    let status = daemon.terminate().await;
    assert!(status.success(), "clean exit on SIGTERM: {status}");
}
