//! Gmail's own wire behaviour, against a server scripted after it (labels and
//! All Mail cannot be shown by the stack's Dovecot): issue 9's folders beyond
//! INBOX and Sent; issue 21's All Mail hidden from IMAP (item 3) and the
//! hand-off of `\Inbox` mail between INBOX and All Mail (item 4).

mod support;

use support::{
    scripted_gmail::{ALL_MAIL, INBOX, SENT, ScriptedGmail},
    stack::{message, new_message_id},
    world::World,
};

/// ann a contact of L1, and me connected as u1's Gmail mailbox at `gmail`.
async fn connected_to(gmail: &ScriptedGmail) -> World {
    connected_with(gmail, |_| {}).await
}

/// As `connected_to`, with the test configuration changed by `configure`.
async fn connected_with(
    gmail: &ScriptedGmail,
    configure: impl FnOnce(&mut mailbridge::config::Config),
) -> World {
    let w = World::started_with(configure).await;
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

/// The mailbox status's entry for the folder of `role` (`"all"`, `"sent"`).
async fn watched(w: &World, role: &str) -> serde_json::Value {
    let (_, status) = w
        .api
        .send(
            reqwest::Method::GET,
            "/v1/locations/L1/users/u1/mailbox",
            None,
        )
        .await;
    status["watched"]
        .as_array()
        .and_then(|folders| folders.iter().find(|f| f["role"] == role))
        .cloned()
        .unwrap_or_default()
}

/// Issue 21 item 3: a Gmail account whose All Mail is hidden from IMAP
/// ("Show in IMAP" unticked) and that has no Sent folder is `active`: INBOX
/// syncs, `watched` shows All Mail and Sent `absent` with why and what to do;
/// shown again, All Mail is picked up (from the present) and mail a filter
/// files past the inbox syncs from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i21_3_gmail_with_all_mail_hidden_and_no_sent_stays_active_and_picks_all_mail_up_again() {
    let gmail = ScriptedGmail::start().await;
    gmail.hide_folder(ALL_MAIL);
    gmail.hide_folder(SENT);
    let w = connected_with(&gmail, |config| config.sync.absent_folder_check_secs = 1).await;
    let all = watched(&w, "all").await;
    assert_eq!(all["state"], "absent", "{all}");
    assert!(
        all["reason"]
            .as_str()
            .is_some_and(|r| r.contains("skips the inbox")),
        "{all}"
    );
    assert!(
        all["action"]
            .as_str()
            .is_some_and(|a| a.contains("Show in IMAP")),
        "{all}"
    );
    assert_eq!(all["last_error"], serde_json::Value::Null);
    let sent = watched(&w, "sent").await;
    assert_eq!(sent["state"], "absent", "{sent}");
    assert!(
        sent["action"].as_str().is_some_and(|a| a.contains("Sent")),
        "{sent}"
    );

    let id = new_message_id("gm");
    let raw = message(
        &w.ann.address,
        &w.me.address,
        "inbox while hidden",
        &id,
        None,
    );
    gmail.deliver(&raw, &[INBOX], &["\\Inbox"]);
    w.receiver
        .wait_for("the message in INBOX", |r| {
            r.data()["message_id"] == id.as_str()
        })
        .await;

    gmail.show_folder(ALL_MAIL);
    support::eventually("All Mail to be picked up", support::DEADLINE, async || {
        (watched(&w, "all").await["state"] == "active").then_some(())
    })
    .await;
    let filtered = new_message_id("gm");
    let raw = message(&w.ann.address, &w.me.address, "filtered", &filtered, None);
    gmail.deliver(&raw, &[], &["Clients"]);
    w.receiver
        .wait_for("the filtered message, from All Mail", |r| {
            r.data()["message_id"] == filtered.as_str()
        })
        .await;
    assert!(gmail.bodies_served_from(ALL_MAIL).contains(&filtered));
    assert_eq!(watched(&w, "sent").await["state"], "absent");
    let (_, status) = w
        .api
        .send(
            reqwest::Method::GET,
            "/v1/locations/L1/users/u1/mailbox",
            None,
        )
        .await;
    assert_eq!(status["state"], "active", "{status}");
    w.daemon.stop().await;
}

/// Issue 21 item 4: All Mail never passes over `\Inbox` mail that INBOX's
/// watcher has not read, whatever state that watcher is in. Here its session
/// is stalled (half-dead in IDLE: it hears nothing, and still counts as up),
/// All Mail has seen the message labelled `\Inbox`, and the user archives it:
/// it is forwarded (from All Mail), once, and not again when INBOX is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i21_4_a_message_archived_while_the_inbox_watcher_is_stalled_is_forwarded_once() {
    let gmail = ScriptedGmail::start().await;
    let w = connected_to(&gmail).await;
    gmail.stall(INBOX);
    let id = new_message_id("gm");
    let raw = message(&w.ann.address, &w.me.address, "archived at once", &id, None);
    gmail.deliver(&raw, &[INBOX], &["\\Inbox"]);
    support::eventually(
        "All Mail to see the message labelled \\Inbox",
        support::DEADLINE,
        async || gmail.labels_served(ALL_MAIL, &id, "\\Inbox").then_some(()),
    )
    .await;
    gmail.archive(&id);
    let inbound = w
        .receiver
        .wait_for("the archived message, from All Mail", |r| {
            r.data()["message_id"] == id.as_str()
        })
        .await;
    assert_eq!(inbound.kind(), "message.inbound");
    assert!(gmail.bodies_served_from(ALL_MAIL).contains(&id));

    // INBOX is back: a later message is read there, so INBOX read past the
    // point where the archived one was; it was forwarded once all the same.
    gmail.resume();
    let later = new_message_id("gm");
    let raw = message(
        &w.ann.address,
        &w.me.address,
        "after the stall",
        &later,
        None,
    );
    gmail.deliver(&raw, &[INBOX], &["\\Inbox"]);
    w.receiver
        .wait_for("the later message", |r| {
            r.data()["message_id"] == later.as_str()
        })
        .await;
    assert_eq!(
        w.receiver
            .distinct(|r| r.kind() == "message.inbound" && r.data()["message_id"] == id.as_str()),
        1
    );
    w.daemon.stop().await;
}

/// Issue 21 item 4: a message labelled `\Inbox` that INBOX's stalled watcher
/// has not read is held by All Mail, not taken: once INBOX reads it, it is
/// forwarded from INBOX and its copy in All Mail is never downloaded; a
/// message only in All Mail after it syncs, so All Mail went past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i21_4_all_mail_holds_inbox_mail_until_inbox_reads_it() {
    let gmail = ScriptedGmail::start().await;
    let w = connected_to(&gmail).await;
    gmail.stall(INBOX);
    let id = new_message_id("gm");
    let raw = message(&w.ann.address, &w.me.address, "held for INBOX", &id, None);
    gmail.deliver(&raw, &[INBOX], &["\\Inbox"]);
    let filtered = new_message_id("gm");
    let raw = message(
        &w.ann.address,
        &w.me.address,
        "filtered behind it",
        &filtered,
        None,
    );
    gmail.deliver(&raw, &[], &["Clients"]);
    support::eventually(
        "All Mail to see the message labelled \\Inbox",
        support::DEADLINE,
        async || gmail.labels_served(ALL_MAIL, &id, "\\Inbox").then_some(()),
    )
    .await;
    gmail.resume();
    w.receiver
        .wait_for("the message, from INBOX", |r| {
            r.data()["message_id"] == id.as_str()
        })
        .await;
    assert!(gmail.bodies_served_from(INBOX).contains(&id));
    w.receiver
        .wait_for("the filtered message behind it", |r| {
            r.data()["message_id"] == filtered.as_str()
        })
        .await;
    assert!(
        !gmail.bodies_served_from(ALL_MAIL).contains(&id),
        "held, not downloaded from All Mail"
    );
    assert_eq!(
        w.receiver
            .distinct(|r| r.kind() == "message.inbound" && r.data()["message_id"] == id.as_str()),
        1
    );
    w.daemon.stop().await;
}

/// Issue 21 item 4: held past `inbox_handoff_secs` (INBOX still stalled,
/// the message still labelled `\Inbox`), All Mail takes the message itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i21_4_all_mail_takes_inbox_mail_inbox_does_not_read_in_time() {
    let gmail = ScriptedGmail::start().await;
    let w = connected_with(&gmail, |config| config.sync.inbox_handoff_secs = 2).await;
    gmail.stall(INBOX);
    let id = new_message_id("gm");
    let raw = message(&w.ann.address, &w.me.address, "INBOX too slow", &id, None);
    gmail.deliver(&raw, &[INBOX], &["\\Inbox"]);
    w.receiver
        .wait_for("the message, from All Mail", |r| {
            r.data()["message_id"] == id.as_str()
        })
        .await;
    assert!(gmail.bodies_served_from(ALL_MAIL).contains(&id));
    assert!(gmail.labels_served(ALL_MAIL, &id, "\\Inbox"));
    gmail.resume();
    w.daemon.stop().await;
}
