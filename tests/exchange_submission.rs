//! Against a submission server that behaves like Exchange Online: it
//! replaces the Message-ID of what the daemon submits, names the new id in its
//! reply to DATA and files the rewritten message in Sent itself (R5: the
//! contact's reply, In-Reply-To the new id, lands in the send's thread, and the
//! copy in Sent does not come back as message.outbound); and it may refuse
//! SMTP AUTH for a tenant while IMAP works (R20: not needs_reauth).

mod support;

use mailbridge::mime;
use support::{
    scripted_smtp::ScriptedSmtp,
    stack::{Stack, message, new_message_id},
    world::{World, mail},
};

/// me connected as u1 of L1 with the stack's IMAP and an Exchange-like SMTP
/// server that files Sent itself; ann a contact.
async fn exchange_world() -> (World, ScriptedSmtp) {
    let exchange = ScriptedSmtp::start(Stack::get()).await;
    let w = World::connected_with(
        |config| {
            // A transient hiccup is retried within the test's deadline.
            config.sending.retry_min_ms = 100;
            config.sending.retry_max_ms = 1_000;
        },
        serde_json::json!({
            "smtp": exchange.endpoint(),
            // The server files Sent itself, like Outlook.
            "save_sent": "never",
        }),
    )
    .await;
    (w, exchange)
}

/// The user writes from their own client; returns once its message.outbound
/// arrived. Sent is handled in UID order, so everything filed in Sent before
/// it was decided by then.
async fn write_from_client(w: &World) -> String {
    let later = new_message_id("client");
    let raw = message(
        &w.me.address,
        &w.ann.address,
        "from my client",
        &later,
        None,
    );
    w.stack.submit(&w.me, &[&w.ann.address], &raw).await;
    w.stack.append_sent(&w.me, &raw).await;
    w.receiver
        .wait_for("the client's message", |r| {
            r.kind() == "message.outbound" && r.data()["message_id"] == later.as_str()
        })
        .await;
    later
}

fn outbound_ids(w: &World) -> Vec<String> {
    w.receiver
        .all()
        .iter()
        .filter(|r| r.kind() == "message.outbound")
        .map(|r| r.data()["message_id"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r05_a_copy_in_sent_before_the_servers_reply_is_known_by_the_bridges_header() {
    let (w, exchange) = exchange_world().await;
    let release = exchange.hold_next_reply();
    let (status, accepted, _) = w
        .send(serde_json::json!({"contact_id": "c-ann", "subject": "held", "text": "x"}))
        .await;
    assert_eq!(status, 202, "{accepted}");
    // The copy is in Sent (with the server's id) while the bridge still waits for the 250.
    w.stack.wait_count(&w.me, "Sent", 1).await;
    let later = write_from_client(&w).await;
    release.notify_one();
    let sent = w
        .receiver
        .wait_for("message.sent", |r| r.kind() == "message.sent")
        .await;
    assert_eq!(
        sent.data()["message_id"],
        exchange.assigned()[0].assigned.as_str()
    );
    assert_eq!(
        outbound_ids(&w),
        vec![later],
        "the CRM's copy in Sent was not taken for the user's own mail"
    );
    w.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r21_a_reply_lost_after_the_server_took_the_message_is_settled_from_sent_not_sent_twice() {
    let (w, exchange) = exchange_world().await;
    exchange.drop_next_reply();
    let (status, accepted, _) = w
        .send(serde_json::json!({"contact_id": "c-ann", "subject": "dropped", "text": "x"}))
        .await;
    assert_eq!(status, 202, "{accepted}");
    let sent = w
        .receiver
        .wait_for("message.sent", |r| r.kind() == "message.sent")
        .await;
    let assigned = exchange.assigned();
    assert_eq!(
        assigned.len(),
        1,
        "found in Sent before the retry, so never submitted again: {assigned:?}"
    );
    assert_eq!(sent.data()["id"], accepted["id"]);
    assert_eq!(
        sent.data()["message_id"],
        assigned[0].assigned.as_str(),
        "the copy in Sent tells the server's Message-ID"
    );
    // The contact's reply to that id threads.
    let reply_id = mail(
        &w.stack,
        &w.ann,
        &w.me,
        "Re: dropped",
        Some(&assigned[0].assigned),
    )
    .await;
    let inbound = w
        .receiver
        .wait_for("ann's reply", |r| {
            r.data()["message_id"] == reply_id.as_str()
        })
        .await;
    assert_eq!(inbound.data()["thread_id"], accepted["thread_id"]);
    w.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r05_exchange_replaces_the_message_id_the_reply_threads_and_the_sent_copy_is_not_echoed() {
    let (w, exchange) = exchange_world().await;
    let (me, ann) = (&w.me, &w.ann);
    // The CRM sends; the server takes it under an id of its own.
    let (status, accepted, _) = w
        .send(serde_json::json!({"contact_id": "c-ann", "subject": "Angebot", "text": "Hallo Ann"}))
        .await;
    assert_eq!(status, 202, "{accepted}");
    let ours = accepted["message_id"].as_str().unwrap().to_string();
    let thread_id = accepted["thread_id"].as_str().unwrap().to_string();
    let sent = w
        .receiver
        .wait_for("message.sent", |r| r.kind() == "message.sent")
        .await;
    assert!(sent.signature_valid);
    assert_eq!(sent.data()["id"], accepted["id"]);
    assert_eq!(sent.data()["thread_id"], thread_id.as_str());
    assert!(exchange.failures().is_empty(), "{:?}", exchange.failures());
    let assigned = exchange.assigned();
    assert_eq!(assigned.len(), 1, "one submission: {assigned:?}");
    let theirs = assigned[0].assigned.clone();
    assert_eq!(
        assigned[0].original.as_deref(),
        Some(ours.as_str()),
        "the daemon submitted the id it answered the POST with"
    );
    assert_ne!(theirs, ours);
    assert_eq!(
        sent.data()["message_id"],
        theirs.as_str(),
        "message.sent names the id the server gave the message ({})",
        assigned[0].reply
    );

    // The contact got the rewritten message; Sent holds the server's copy
    // only (save_sent never: the daemon filed nothing itself).
    w.stack.wait_count(ann, "INBOX", 1).await;
    let received = mime::parse(&w.stack.fetch_all(ann, "INBOX").await[0]);
    assert_eq!(received.message_id.as_deref(), Some(theirs.as_str()));
    let in_sent: Vec<Option<String>> = w
        .stack
        .fetch_all(me, "Sent")
        .await
        .iter()
        .map(|raw| mime::parse(raw).message_id)
        .collect();
    assert_eq!(in_sent, vec![Some(theirs.clone())]);

    // The contact replies to the id they saw: same thread.
    let reply_id = mail(&w.stack, ann, me, "Re: Angebot", Some(&theirs)).await;
    let inbound = w
        .receiver
        .wait_for("ann's reply", |r| {
            r.kind() == "message.inbound" && r.data()["message_id"] == reply_id.as_str()
        })
        .await;
    assert_eq!(inbound.data()["contact_id"], "c-ann");
    assert_eq!(
        inbound.data()["thread_id"],
        thread_id.as_str(),
        "the reply to the server's Message-ID threads with the send"
    );

    // The user writes from their own client afterwards: by the time it
    // syncs, the server's copy of the CRM send was decided, and it must not
    // have come back as message.outbound.
    let later = write_from_client(&w).await;
    assert_eq!(
        outbound_ids(&w),
        vec![later],
        "only the client's message is outbound; the server's copy of the CRM send ({theirs}) is the CRM's own"
    );
    w.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r20_smtp_auth_turned_off_for_the_tenant_fails_the_send_but_is_not_needs_reauth() {
    let (w, exchange) = exchange_world().await;
    exchange.refuse_logins(
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
    );
    let (status, accepted, _) = w
        .send(serde_json::json!({"contact_id": "c-ann", "subject": "refused", "text": "x"}))
        .await;
    assert_eq!(status, 202, "{accepted}");
    let failed = w
        .receiver
        .wait_for("message.failed", |r| r.kind() == "message.failed")
        .await;
    let error = failed.data()["error"].as_str().unwrap().to_string();
    assert!(error.contains("SMTP AUTH"), "names what to check: {error}");
    assert!(
        error.contains("5.7.139"),
        "with the server's words: {error}"
    );
    // IMAP still syncs; the mailbox is not condemned.
    mail(&w.stack, &w.ann, &w.me, "still syncing", None).await;
    w.receiver
        .wait_for("mail after the refusal", |r| r.subject() == "still syncing")
        .await;
    let (_, mailbox) = w
        .api
        .send(
            reqwest::Method::GET,
            "/v1/locations/L1/users/u1/mailbox",
            None,
        )
        .await;
    assert_eq!(mailbox["state"], "active", "{mailbox}");
    assert!(
        w.receiver
            .all()
            .iter()
            .all(|r| r.kind() != "mailbox.needs_reauth")
    );
    w.daemon.stop().await;
}

/// Issue 7 item 7: "cannot tell yet" is not "not sent". The server took the
/// message but its reply was lost, and its copy reaches Sent only after the
/// bridge first looked: the send stays `submitting`, is looked for again,
/// and is settled as sent, never failed and never submitted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r21_a_send_without_a_verdict_filed_in_sent_late_is_found_by_a_later_look() {
    let (w, exchange) = exchange_world().await;
    let file_now = exchange.drop_next_reply_filing_later();
    let (status, accepted, _) = w
        .send(serde_json::json!({"contact_id": "c-ann", "subject": "filed late", "text": "x"}))
        .await;
    assert_eq!(status, 202, "{accepted}");
    let path = format!("/v1/messages/{}", accepted["id"].as_str().unwrap());
    let pending = support::eventually(
        "the first look in Sent, finding nothing",
        support::DEADLINE,
        async || {
            let (_, body) = w.api.send(reqwest::Method::GET, &path, None).await;
            (body["status"] == "submitting" && body["error"].as_str().is_some()).then_some(body)
        },
    )
    .await;
    assert!(
        pending["error"]
            .as_str()
            .unwrap()
            .starts_with("no verdict from the SMTP server"),
        "{pending}"
    );
    file_now.notify_one();
    let sent = w
        .receiver
        .wait_for("message.sent", |r| r.kind() == "message.sent")
        .await;
    assert_eq!(sent.data()["id"], accepted["id"]);
    assert_eq!(
        w.receiver.distinct(|r| r.kind() == "message.failed"),
        0,
        "never reported failed"
    );
    assert_eq!(exchange.assigned().len(), 1, "submitted once");
    w.daemon.stop().await;
}
