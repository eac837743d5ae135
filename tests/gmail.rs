//! Gmail's own wire behaviour, against a server scripted after it (labels and
//! All Mail cannot be shown by the stack's Dovecot): issue 9's folders beyond
//! INBOX and Sent.

mod support;

use support::{
    scripted_gmail::{ALL_MAIL, INBOX, ScriptedGmail},
    stack::{message, new_message_id},
    world::World,
};

/// ann a contact of L1, and me connected as u1's Gmail mailbox at `gmail`.
async fn connected_to(gmail: &ScriptedGmail) -> World {
    let w = World::started().await;
    w.api
        .put_contact("L1", "c-ann", &w.ann.address, &["u1"])
        .await;
    let (status, body) = w
        .api
        .send(
            reqwest::Method::PUT,
            "/v1/locations/L1/users/u1/mailbox",
            Some(serde_json::json!({
                "email": w.me.address,
                "provider": "gmail",
                "auth": {"type": "password", "username": w.me.address, "password": "app-password"},
                "imap": gmail.endpoint(),
                "smtp": w.stack.smtp_endpoint(),
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    w.api.wait_active("L1", "u1").await;
    w
}

/// Mail a Gmail filter files past the inbox (only in All Mail, under a
/// label) is new mail of the mailbox (R3); mail labelled `\Inbox` is read from
/// INBOX alone, its copy in All Mail never downloaded; a draft never syncs;
/// an archived message is followed into All Mail as `message.updated`, and
/// its label changes there are `message.updated` with `labels`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r03_gmail_mail_filtered_past_the_inbox_syncs_from_all_mail_once() {
    let gmail = ScriptedGmail::start().await;
    let w = connected_to(&gmail).await;
    let mail = |subject: &str| {
        let id = new_message_id("gm");
        let raw = message(&w.ann.address, &w.me.address, subject, &id, None);
        (id, raw)
    };

    let (filtered, raw) = mail("filtered past the inbox");
    gmail.deliver(&raw, &[], &["Clients"]);
    let inbound = w
        .receiver
        .wait_for("the filtered message", |r| {
            r.data()["message_id"] == filtered.as_str()
        })
        .await;
    assert_eq!(inbound.kind(), "message.inbound");
    assert_eq!(inbound.data()["contact_id"], "c-ann");

    let (in_inbox, raw) = mail("in the inbox");
    gmail.deliver(&raw, &[INBOX], &["\\Inbox", "\\Important"]);
    let (draft, raw) = mail("a draft");
    gmail.deliver(&raw, &["[Gmail]/Drafts"], &["\\Draft"]);
    // All Mail is read in UID order: once this one is in, the two before it
    // were passed over there.
    let (later, raw) = mail("filtered later");
    gmail.deliver(&raw, &[], &["Clients"]);
    w.receiver
        .wait_for("the message in the inbox", |r| {
            r.data()["message_id"] == in_inbox.as_str()
        })
        .await;
    w.receiver
        .wait_for("the later filtered message", |r| {
            r.data()["message_id"] == later.as_str()
        })
        .await;
    let from_all_mail = gmail.bodies_served_from(ALL_MAIL);
    assert!(
        from_all_mail.contains(&filtered) && from_all_mail.contains(&later),
        "{from_all_mail:?}"
    );
    assert!(
        !from_all_mail.contains(&in_inbox) && !from_all_mail.contains(&draft),
        "mail labelled \\Inbox or \\Draft is not downloaded from All Mail: {from_all_mail:?}"
    );

    // Archived: gone from INBOX, still in All Mail.
    gmail.archive(&in_inbox);
    let archived = w
        .receiver
        .wait_for("the archive", |r| {
            r.kind() == "message.updated" && r.data()["message_id"] == in_inbox.as_str()
        })
        .await;
    assert_eq!(archived.data()["folder"], ALL_MAIL);
    assert_eq!(archived.data()["previous_folder"], "INBOX");
    assert_eq!(
        archived.data()["labels"],
        serde_json::json!(["\\Important"])
    );

    // Followed in All Mail: a label change there is message.updated with
    // the labels Gmail now names.
    gmail.relabel(&in_inbox, &["\\Important", "Invoices"]);
    let relabelled = w
        .receiver
        .wait_for("the label change", |r| {
            r.kind() == "message.updated"
                && r.data()["message_id"] == in_inbox.as_str()
                && r.data()["labels"].as_array().is_some_and(|l| l.len() == 2)
        })
        .await;
    assert_eq!(
        relabelled.data()["labels"],
        serde_json::json!(["Invoices", "\\Important"]),
        "as a sorted set"
    );
    assert_eq!(relabelled.data()["folder"], ALL_MAIL);

    assert_eq!(
        w.receiver.distinct(|r| r.kind() == "message.inbound"),
        3,
        "each message once, the draft never"
    );
    assert!(
        w.receiver
            .distinct(|r| r.data()["message_id"] == draft.as_str())
            == 0,
        "the draft never syncs"
    );
    w.daemon.stop().await;
}

/// While INBOX's watcher is down (here: Gmail cannot open INBOX), mail
/// labelled `\Inbox` is taken from All Mail, so a message archived before
/// INBOX's watcher is back is not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r21_gmail_inbox_mail_is_taken_from_all_mail_while_the_inbox_watcher_is_down() {
    let gmail = ScriptedGmail::start().await;
    let w = connected_to(&gmail).await;
    gmail.take_offline(INBOX);
    support::eventually("INBOX's watcher to fail", support::DEADLINE, async || {
        let (_, status) = w
            .api
            .send(
                reqwest::Method::GET,
                "/v1/locations/L1/users/u1/mailbox",
                None,
            )
            .await;
        (status["state"] == "error").then_some(())
    })
    .await;

    let id = new_message_id("gm");
    let raw = message(
        &w.ann.address,
        &w.me.address,
        "while INBOX is down",
        &id,
        None,
    );
    gmail.deliver(&raw, &[INBOX], &["\\Inbox"]);
    let inbound = w
        .receiver
        .wait_for("the message, from All Mail", |r| {
            r.data()["message_id"] == id.as_str()
        })
        .await;
    assert_eq!(inbound.kind(), "message.inbound");
    assert!(gmail.bodies_served_from(ALL_MAIL).contains(&id));
    w.daemon.stop().await;
}
