//! Issue 21 item 3: a folder the server does not have (a listed folder
//! deleted or renamed after the connect, no Sent folder) is a warning of its
//! own in `watched`, not an error of the mailbox: the rest syncs, and the
//! folder is picked up again when it is back. Against the stack's Dovecot
//! (with NOTIFY, and without it through a proxy that hides it; the proxy also
//! hides Sent, which Dovecot here creates by itself).

mod support;

use support::{
    imap_proxy::ImapProxy,
    stack::{Stack, message, new_message_id},
    world::{World, mail},
};

/// The mailbox status of u1 of L1.
async fn status(w: &World) -> serde_json::Value {
    w.api
        .send(
            reqwest::Method::GET,
            "/v1/locations/L1/users/u1/mailbox",
            None,
        )
        .await
        .1
}

/// The status's `watched` entry for `role`.
fn entry(status: &serde_json::Value, role: &str) -> serde_json::Value {
    status["watched"]
        .as_array()
        .and_then(|folders| folders.iter().find(|f| f["role"] == role))
        .cloned()
        .unwrap_or_default()
}

/// Waits until the mailbox is `active` with its `role` folder in `state`.
async fn wait_folder(w: &World, role: &str, state: &str) -> serde_json::Value {
    support::eventually(
        &format!("the {role} folder to be {state}, the mailbox active"),
        support::DEADLINE,
        async || {
            let status = status(w).await;
            (status["state"] == "active" && entry(&status, role)["state"] == state)
                .then_some(status)
        },
    )
    .await
}

/// A listed folder renamed, then deleted, after the connect: with NOTIFY
/// (one session for every folder) and without (one session per folder),
/// the mailbox stays `active`, INBOX goes on syncing, the folder shows
/// `absent` with why and what to do; renamed back or created again, it is
/// picked up and mail filed in it syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i21_3_a_listed_folder_deleted_or_renamed_later_is_absent_until_it_is_back() {
    for notify in [true, false] {
        let proxy = ImapProxy::start(&Stack::get()).await;
        if !notify {
            proxy.hide_capabilities(&["NOTIFY"]);
        }
        let w = World::started_with(|config| config.sync.absent_folder_check_secs = 1).await;
        w.api
            .put_contact("L1", "c-ann", &w.ann.address, &["u1"])
            .await;
        w.stack.create_folder(&w.me, "Clients").await;
        w.api
            .connect_with(
                "L1",
                "u1",
                &w.stack,
                &w.me,
                serde_json::json!({"imap": proxy.endpoint(), "folders": ["Clients"]}),
            )
            .await;
        w.api.wait_active("L1", "u1").await;

        for (step, gone) in [("renamed", true), ("deleted", false)] {
            let mut session = w.stack.session(&w.me).await;
            match gone {
                true => session.rename("Clients", "Customers").await,
                false => session.delete("Clients").await,
            }
            .unwrap_or_else(|err| panic!("{step}: {err}"));
            let _ = session.logout().await;

            // INBOX syncs meanwhile (and, under NOTIFY, wakes the session
            // that finds the folder gone).
            let subject = format!("while Clients is {step} (NOTIFY {notify})");
            mail(&w.stack, &w.ann, &w.me, &subject, None).await;
            w.receiver
                .wait_for(&subject, |r| r.subject() == subject)
                .await;
            let status = wait_folder(&w, "listed", "absent").await;
            let listed = entry(&status, "listed");
            assert_eq!(listed["name"], "Clients", "{listed}");
            assert!(
                listed["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("Clients") && r.contains("not synced")),
                "{listed}"
            );
            assert!(
                listed["action"]
                    .as_str()
                    .is_some_and(|a| a.contains("folders")),
                "{listed}"
            );
            assert_eq!(entry(&status, "inbox")["state"], "active");

            let mut session = w.stack.session(&w.me).await;
            match gone {
                true => session.rename("Customers", "Clients").await,
                false => session.create("Clients").await,
            }
            .unwrap_or_else(|err| panic!("{step}, back: {err}"));
            let _ = session.logout().await;
            wait_folder(&w, "listed", "active").await;
            let subject = format!("filed in Clients once {step} back (NOTIFY {notify})");
            let id = new_message_id("filed");
            w.stack
                .file_into(
                    &w.me,
                    "Clients",
                    &message(&w.ann.address, &w.me.address, &subject, &id, None),
                )
                .await;
            w.receiver
                .wait_for(&subject, |r| r.subject() == subject)
                .await;
        }
        w.daemon.stop().await;
    }
}

/// No Sent folder, where the bridge files CRM sends in Sent itself (a plain
/// IMAP server): the mailbox is `active`, Sent shows `absent` saying copies
/// are not filed; a CRM send still goes (the contact has it, `message.sent`),
/// and the send says its copy was not filed. Once there, Sent is picked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i21_3_without_a_sent_folder_sends_still_go_and_the_status_says_copies_are_not_filed() {
    let proxy = ImapProxy::start(&Stack::get()).await;
    proxy.hide_folders(&["Sent"]);
    let w = World::connected_with(
        |config| config.sync.absent_folder_check_secs = 1,
        serde_json::json!({"imap": proxy.endpoint()}),
    )
    .await;
    let status = wait_folder(&w, "sent", "absent").await;
    let sent = entry(&status, "sent");
    assert!(
        sent["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not filed")),
        "{sent}"
    );

    let (code, accepted, _) = w
        .send(serde_json::json!({"contact_id": "c-ann", "subject": "no Sent folder", "text": "x"}))
        .await;
    assert_eq!(code, 202, "{accepted}");
    let id = accepted["id"].as_str().unwrap_or_default().to_string();
    w.receiver
        .wait_for("message.sent", |r| {
            r.kind() == "message.sent" && r.data()["id"] == id.as_str()
        })
        .await;
    w.stack.wait_count(&w.ann, "INBOX", 1).await;
    let send = support::eventually("the send to settle", support::DEADLINE, async || {
        let (_, send) = w
            .api
            .send(reqwest::Method::GET, &format!("/v1/messages/{id}"), None)
            .await;
        send["error"]
            .as_str()
            .is_some_and(|e| e.contains("not filed"))
            .then_some(send)
    })
    .await;
    assert_eq!(send["status"], "sent", "{send}");

    proxy.hide_folders(&[]);
    wait_folder(&w, "sent", "active").await;
    mail(&w.stack, &w.ann, &w.me, "after Sent is back", None).await;
    w.receiver
        .wait_for("mail after Sent is back", |r| {
            r.subject() == "after Sent is back"
        })
        .await;
    w.daemon.stop().await;
}
