//! Inbound and mailbox-side sync against the real Dovecot + Postfix stack, the
//! real daemon, and a real webhook receiver.

mod support;

use support::{
    daemon::{Api, Daemon},
    stack::{Stack, User, message, new_message_id},
    world::{World, mail},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r03_contact_mail_arrives_signed_and_strangers_are_ignored() {
    let w = World::connected(serde_json::json!({})).await;
    let (me, ann) = (&w.me, &w.ann);

    // A stranger first, then the contact: the INBOX is handled in UID order,
    // so once the contact's message is in, the stranger's was already decided.
    // The MX may hand two messages to the mailbox in either order, so the
    // contact's is sent only once the stranger's is filed.
    let stranger = "eve@elsewhere.test";
    w.stack
        .deliver(
            stranger,
            &[&me.address],
            &message(
                stranger,
                &me.address,
                "from a stranger",
                &new_message_id("s"),
                None,
            ),
        )
        .await;
    w.stack.wait_count(me, "INBOX", 1).await;
    let id = new_message_id("ann");
    w.stack
        .deliver(
            &ann.address,
            &[&me.address],
            &message(&ann.address, &me.address, "hello from ann", &id, None),
        )
        .await;

    let event = w
        .receiver
        .wait_for("ann's message", |r| r.subject() == "hello from ann")
        .await;
    assert!(event.signature_valid, "webhook signature must verify");
    assert!(event.webhook_id.starts_with("evt_"));
    assert_eq!(event.kind(), "message.inbound");
    let data = event.data();
    assert_eq!(data["location_id"], "L1");
    assert_eq!(data["user_id"], "u1");
    assert_eq!(data["contact_id"], "c-ann");
    assert_eq!(data["direction"], "inbound");
    assert_eq!(data["origin"], "mailbox");
    assert_eq!(data["mailbox"], me.address.as_str());
    assert_eq!(data["message_id"], id.as_str());
    assert_eq!(data["from"]["email"], ann.address.as_str());
    assert!(data["thread_id"].as_str().unwrap().starts_with("thr_"));
    assert!(
        data["text"]
            .as_str()
            .unwrap()
            .contains("Body of hello from ann")
    );
    assert!(
        w.receiver
            .all()
            .iter()
            .all(|r| r.subject() != "from a stranger"),
        "a stranger's mail must not reach the CRM"
    );
    w.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r02_mail_already_in_the_mailbox_before_connect_never_syncs() {
    let w = World::started().await;
    let (me, ann) = (&w.me, &w.ann);
    w.api
        .put_contact("L1", "c-ann", &ann.address, &["u1"])
        .await;
    w.stack
        .deliver(
            &ann.address,
            &[&me.address],
            &message(
                &ann.address,
                &me.address,
                "before connect",
                &new_message_id("old"),
                None,
            ),
        )
        .await;
    w.stack.wait_count(me, "INBOX", 1).await;

    w.api.connect("L1", "u1", &w.stack, me).await;
    w.api.wait_active("L1", "u1").await;
    w.stack
        .deliver(
            &ann.address,
            &[&me.address],
            &message(
                &ann.address,
                &me.address,
                "after connect",
                &new_message_id("new"),
                None,
            ),
        )
        .await;
    w.receiver
        .wait_for("the new message", |r| r.subject() == "after connect")
        .await;
    assert!(
        w.receiver
            .all()
            .iter()
            .all(|r| r.subject() != "before connect"),
        "R2: no backfill"
    );
    w.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r04_r06_mail_sent_from_the_mailbox_is_outbound_and_the_reply_keeps_the_thread() {
    let w = World::connected(serde_json::json!({})).await;
    let (me, ann) = (&w.me, &w.ann);

    // The user writes from their own mail client: submit, then file in Sent.
    let first = new_message_id("me");
    let raw = message(&me.address, &ann.address, "offer", &first, None);
    w.stack.submit(me, &[&ann.address], &raw).await;
    w.stack.append_sent(me, &raw).await;
    let outbound = w
        .receiver
        .wait_for("the outbound message", |r| r.subject() == "offer")
        .await;
    assert_eq!(outbound.kind(), "message.outbound");
    assert_eq!(outbound.data()["direction"], "outbound");
    assert_eq!(outbound.data()["contact_id"], "c-ann");
    let thread_id = outbound.data()["thread_id"].as_str().unwrap().to_string();

    // The contact replies; it lands in the same thread.
    w.stack.wait_count(ann, "INBOX", 1).await;
    let reply = message(
        &ann.address,
        &me.address,
        "Re: offer",
        &new_message_id("ann"),
        Some(&first),
    );
    w.stack.deliver(&ann.address, &[&me.address], &reply).await;
    let inbound = w
        .receiver
        .wait_for("the reply", |r| r.subject() == "Re: offer")
        .await;
    assert_eq!(inbound.kind(), "message.inbound");
    assert_eq!(
        inbound.data()["thread_id"],
        thread_id.as_str(),
        "R6: same thread"
    );

    // A colleague who is no contact answers in the thread: it syncs too (R6).
    let colleague = "colleague@elsewhere.test";
    let later = message(
        colleague,
        &me.address,
        "Re: Re: offer",
        &new_message_id("col"),
        Some(&first),
    );
    w.stack.deliver(colleague, &[&me.address], &later).await;
    let in_thread = w
        .receiver
        .wait_for("the colleague's message", |r| {
            r.subject() == "Re: Re: offer"
        })
        .await;
    assert_eq!(in_thread.data()["thread_id"], thread_id.as_str());
    assert_eq!(in_thread.data()["contact_id"], "c-ann");
    w.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r21_receiver_outage_everything_arrives_after_recovery_in_order_per_thread() {
    let w = World::started().await;
    let (me, ann) = (&w.me, &w.ann);
    let bob = w.stack.new_user("bob").await;
    w.api
        .put_contact("L1", "c-ann", &ann.address, &["u1"])
        .await;
    w.api
        .put_contact("L1", "c-bob", &bob.address, &["u1"])
        .await;
    w.api.connect("L1", "u1", &w.stack, me).await;
    w.api.wait_active("L1", "u1").await;
    w.receiver.set_failing(true);

    // Two threads, three messages each, each reply referencing the one before.
    for contact in [ann, &bob] {
        let mut parent: Option<String> = None;
        for n in 0..3 {
            let id = new_message_id("m");
            let subject = format!("{} #{n}", contact.address);
            w.stack
                .deliver(
                    &contact.address,
                    &[&me.address],
                    &message(
                        &contact.address,
                        &me.address,
                        &subject,
                        &id,
                        parent.as_deref(),
                    ),
                )
                .await;
            parent = Some(id);
        }
    }
    // The receiver must have refused attempts before it recovers.
    support::eventually("failed attempts", support::DEADLINE, async || {
        (w.receiver.all().iter().filter(|r| !r.accepted).count() >= 2).then_some(())
    })
    .await;
    w.receiver.set_failing(false);
    let delivered = w
        .receiver
        .wait_for_count("all six messages", 6, |r| r.kind() == "message.inbound")
        .await;
    for contact in [ann, &bob] {
        let subjects: Vec<String> = delivered
            .iter()
            .filter(|r| r.data()["from"]["email"] == contact.address.as_str())
            .map(|r| r.subject().to_string())
            .collect();
        let expected: Vec<String> = (0..3)
            .map(|n| format!("{} #{n}", contact.address))
            .collect();
        // At least once: a repeat may occur, but first deliveries are in order.
        let mut firsts = subjects.clone();
        firsts.dedup();
        assert_eq!(firsts, expected, "in order per thread");
    }
    // Every repeat carries the id of its first delivery.
    let mut by_subject = std::collections::HashMap::new();
    for r in w.receiver.all() {
        let id = by_subject
            .entry(r.subject().to_string())
            .or_insert_with(|| r.webhook_id.clone());
        assert_eq!(id, &r.webhook_id, "retries keep their webhook-id");
    }
    w.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r21_an_endpoint_answering_with_a_redirect_has_not_received_the_event() {
    let w = World::connected(serde_json::json!({})).await;
    w.receiver.set_redirecting(true);
    mail(&w.stack, &w.ann, &w.me, "while redirected", None).await;
    support::eventually(
        "attempts answered with 302",
        support::DEADLINE,
        async || (w.receiver.all().iter().filter(|r| !r.accepted).count() >= 2).then_some(()),
    )
    .await;
    w.receiver.set_redirecting(false);
    let event = w
        .receiver
        .wait_for("the event, by POST, once the endpoint is fixed", |r| {
            r.subject() == "while redirected"
        })
        .await;
    assert!(event.signature_valid);
    assert_eq!(
        w.receiver.redirected_gets(),
        0,
        "a redirect is not followed: the POST would arrive as a body-less GET"
    );
    w.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r21_a_message_moved_out_of_the_inbox_and_back_is_not_forwarded_again() {
    let w = World::connected(serde_json::json!({})).await;
    mail(&w.stack, &w.ann, &w.me, "moved around", None).await;
    w.receiver
        .wait_for("the message", |r| r.subject() == "moved around")
        .await;
    // The user archives it and changes their mind: back in INBOX under a new UID.
    let mut session = w.stack.session(&w.me).await;
    session.select("INBOX").await.expect("SELECT INBOX");
    session
        .uid_mv("1:*", "Archive")
        .await
        .expect("MOVE to Archive");
    session.select("Archive").await.expect("SELECT Archive");
    session.uid_mv("1:*", "INBOX").await.expect("MOVE back");
    let _ = session.logout().await;
    // A later message syncs, so the moved one (a lower UID) was handled by then.
    mail(&w.stack, &w.ann, &w.me, "after the move", None).await;
    w.receiver
        .wait_for("the later message", |r| r.subject() == "after the move")
        .await;
    assert_eq!(
        w.receiver.distinct(|r| r.subject() == "moved around"),
        1,
        "forwarded once"
    );
    w.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r21_a_fetch_the_server_refuses_is_retried_not_taken_for_a_removed_message() {
    let proxy = support::imap_proxy::ImapProxy::start(&Stack::get()).await;
    let w = World::connected(serde_json::json!({"imap": proxy.endpoint()})).await;
    proxy.refuse_next_fetches(2);
    mail(&w.stack, &w.ann, &w.me, "fetched at the third try", None).await;
    w.receiver
        .wait_for("the message the server refused twice", |r| {
            r.subject() == "fetched at the third try"
        })
        .await;
    assert_eq!(proxy.fetches_refused(), 2);
    w.daemon.stop().await;
}

/// A message the server never returns (Gmail keeps refusing some broken
/// ones) must not stop the folder for good, nor vanish silently (issue 21
/// item 6): after `UNFETCHABLE_AFTER_SESSIONS` sessions it is set aside,
/// reported once as `message.unprocessable` and listed at
/// `GET …/mailbox/skipped`, and the mail after it flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r01_a_message_the_server_never_returns_does_not_stop_the_folder() {
    let proxy = support::imap_proxy::ImapProxy::start(&Stack::get()).await;
    let w = World::connected(serde_json::json!({"imap": proxy.endpoint()})).await;
    let refusals = mailbridge::imap::UNFETCHABLE_AFTER_SESSIONS as usize;
    proxy.refuse_next_fetches(refusals);
    let broken = mail(&w.stack, &w.ann, &w.me, "never returned", None).await;
    let reported = w
        .receiver
        .wait_for("message.unprocessable", |r| {
            r.kind() == "message.unprocessable"
        })
        .await;
    assert_eq!(proxy.fetches_refused(), refusals);
    let data = reported.data();
    assert_eq!(data["folder"], "INBOX");
    assert_eq!(data["message_id"], broken.as_str());
    assert_eq!(data["reason"], "not_returned");
    assert_eq!(data["location_id"], "L1");
    assert_eq!(data["user_id"], "u1");
    assert_eq!(data["attempts"], refusals);
    let uid = data["uid"].as_u64().unwrap();

    mail(&w.stack, &w.ann, &w.me, "after the broken one", None).await;
    w.receiver
        .wait_for("the message after the broken one", |r| {
            r.subject() == "after the broken one"
        })
        .await;
    assert_eq!(w.receiver.distinct(|r| r.subject() == "never returned"), 0);
    assert_eq!(
        w.receiver.distinct(|r| r.kind() == "message.unprocessable"),
        1,
        "reported once"
    );
    let (status, listed) = w
        .api
        .send(
            reqwest::Method::GET,
            "/v1/locations/L1/users/u1/mailbox/skipped",
            None,
        )
        .await;
    assert_eq!(status, 200, "{listed}");
    let skipped = listed["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{listed}");
    assert_eq!(skipped[0]["uid"].as_u64(), Some(uid));
    assert_eq!(skipped[0]["message_id"], broken.as_str());
    assert_eq!(skipped[0]["reason"], "not_returned");
    let (status, _) = w
        .api
        .send(
            reqwest::Method::GET,
            "/v1/locations/L1/users/nobody/mailbox/skipped",
            None,
        )
        .await;
    assert_eq!(status, 404);
    w.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r16_a_forward_to_a_contact_is_a_sent_message_of_that_conversation() {
    let w = World::connected(serde_json::json!({})).await;
    let (me, ann) = (&w.me, &w.ann);
    // Something a stranger sent, forwarded by the user to the contact.
    let forward = format!(
        "From: {me}\r\nTo: {ann}\r\nSubject: Fwd: invoice\r\nMessage-ID: {id}\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain\r\n\r\n---------- Forwarded message ---------\r\nFrom: eve@elsewhere.test\r\n\r\nthe invoice\r\n",
        me = me.address,
        ann = ann.address,
        id = new_message_id("fwd")
    );
    w.stack
        .submit(me, &[&ann.address], forward.as_bytes())
        .await;
    w.stack.append_sent(me, forward.as_bytes()).await;
    let event = w
        .receiver
        .wait_for("the forward", |r| r.subject() == "Fwd: invoice")
        .await;
    assert_eq!(event.kind(), "message.outbound");
    assert_eq!(event.data()["contact_id"], "c-ann");
    w.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r21_an_event_set_aside_is_listed_and_replayed_under_its_own_id() {
    let w = World::started_with(|config| config.delivery.give_up_after_hours = 0).await;
    w.api
        .put_contact("L1", "c-ann", &w.ann.address, &["u1"])
        .await;
    w.api.connect("L1", "u1", &w.stack, &w.me).await;
    w.api.wait_active("L1", "u1").await;
    w.receiver.set_failing(true);
    mail(&w.stack, &w.ann, &w.me, "set aside", None).await;
    // Set aside at its first failure (give_up_after_hours = 0).
    let letter = support::eventually("the dead letter", support::DEADLINE, async || {
        let (_, body) = w
            .api
            .send(reqwest::Method::GET, "/v1/dead-letters", None)
            .await;
        body["dead_letters"]
            .as_array()?
            .iter()
            .find(|d| d["event"]["data"]["subject"] == "set aside")
            .cloned()
    })
    .await;
    assert!(
        letter["last_error"].as_str().unwrap().contains("500"),
        "{letter}"
    );
    let refused = w
        .receiver
        .all()
        .into_iter()
        .find(|r| r.subject() == "set aside")
        .unwrap();

    w.receiver.set_failing(false);
    let (status, body) = w
        .api
        .send(
            reqwest::Method::POST,
            &format!("/v1/dead-letters/{}/retry", letter["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let delivered = w
        .receiver
        .wait_for("the replayed event", |r| r.subject() == "set aside")
        .await;
    assert_eq!(
        delivered.webhook_id, refused.webhook_id,
        "the CRM can drop a repeat"
    );
    let (_, body) = w
        .api
        .send(reqwest::Method::GET, "/v1/dead-letters", None)
        .await;
    assert_eq!(body["dead_letters"].as_array().unwrap().len(), 0);
    let (status, _) = w
        .api
        .send(reqwest::Method::POST, "/v1/dead-letters/999999/retry", None)
        .await;
    assert_eq!(status, 404);
    w.daemon.stop().await;
}

/// Issue 21 item 1: `DELETE /v1/dead-letters/{id}` removes one (404 for an
/// unknown id), and the retention sweep, on its own timer, removes one
/// older than `[retention] dead_letters`, counted in `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_deleted_on_request_and_swept_after_its_retention() {
    let w = World::started_with(|config| {
        config.delivery.give_up_after_hours = 0;
        config.retention.dead_letters = "5s".parse().unwrap();
        config.retention.sweep_every = "1s".parse().unwrap();
    })
    .await;
    w.api
        .put_contact("L1", "c-ann", &w.ann.address, &["u1"])
        .await;
    w.api.connect("L1", "u1", &w.stack, &w.me).await;
    w.api.wait_active("L1", "u1").await;
    w.receiver.set_failing(true);
    let letter_of = async |subject: &str| {
        support::eventually("the dead letter", support::DEADLINE, async || {
            let (_, body) = w
                .api
                .send(reqwest::Method::GET, "/v1/dead-letters", None)
                .await;
            body["dead_letters"]
                .as_array()?
                .iter()
                .find(|d| d["event"]["data"]["subject"] == subject)
                .map(|d| d["id"].as_str().unwrap().to_string())
        })
        .await
    };
    let listed = async || {
        let (_, body) = w
            .api
            .send(reqwest::Method::GET, "/v1/dead-letters", None)
            .await;
        body["dead_letters"].as_array().unwrap().len()
    };

    mail(&w.stack, &w.ann, &w.me, "deleted by hand", None).await;
    let deleted = letter_of("deleted by hand").await;
    let path = format!("/v1/dead-letters/{deleted}");
    let (status, body) = w.api.send(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(listed().await, 0);
    let (status, body) = w.api.send(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 404, "already gone: {body}");
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    for unknown in ["999999", "not-a-number", "-1"] {
        let (status, _) = w
            .api
            .send(
                reqwest::Method::DELETE,
                &format!("/v1/dead-letters/{unknown}"),
                None,
            )
            .await;
        assert_eq!(status, 404, "{unknown}");
    }

    mail(&w.stack, &w.ann, &w.me, "swept by retention", None).await;
    letter_of("swept by retention").await;
    support::eventually(
        "the sweep to remove the dead letter",
        support::DEADLINE,
        async || (listed().await == 0).then_some(()),
    )
    .await;
    let metrics = reqwest::get(format!("{}/metrics", w.daemon.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let swept: u64 = metrics
        .lines()
        .find(|line| {
            line.starts_with("mailbridge_retention_removed_total")
                && line.contains("kind=\"dead_letters\"")
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(swept >= 1, "counted in /metrics:\n{metrics}");
    w.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r01_mail_announced_while_catching_up_is_fetched_at_once_not_at_the_next_idle() {
    let proxy = support::imap_proxy::ImapProxy::start(&Stack::get()).await;
    let w = World::connected(serde_json::json!({"imap": proxy.endpoint()})).await;
    // The first message's FETCH is held while a second one arrives: Dovecot
    // announces it in its answer to that FETCH, once, and not again in IDLE
    // (which here would be renewed only after 25 minutes).
    let release = proxy.hold_next_fetch();
    mail(&w.stack, &w.ann, &w.me, "first", None).await;
    support::eventually("the FETCH to be held", support::DEADLINE, async || {
        proxy.holding().then_some(())
    })
    .await;
    mail(&w.stack, &w.ann, &w.me, "second", None).await;
    w.stack.wait_count(&w.me, "INBOX", 2).await;
    release.notify_one();
    w.receiver
        .wait_for("the second message", |r| r.subject() == "second")
        .await;
    w.daemon.stop().await;
}

/// An IDLE the server refuses, with a BAD or a NO, with or without text,
/// ends the session at once (upstream async-imap panicked on the bare BAD
/// and waited past the NO until the step timeout, 60 s); the session starts
/// again and mail is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r01_an_idle_the_server_refuses_ends_the_session_and_it_starts_again() {
    let proxy = support::imap_proxy::ImapProxy::start(&Stack::get()).await;
    proxy.refuse_next_idles(&["BAD", "NO", "NO [UNAVAILABLE] Not now", "BAD Not now"]);
    let w = World::connected(serde_json::json!({"imap": proxy.endpoint()})).await;
    support::eventually("every refusal to be given", support::DEADLINE, async || {
        (proxy.idle_refusals_left() == 0).then_some(())
    })
    .await;
    mail(&w.stack, &w.ann, &w.me, "after the refusals", None).await;
    w.receiver
        .wait_for("the message after the sessions started again", |r| {
            r.subject() == "after the refusals"
        })
        .await;
    w.daemon.stop().await;
}

/// A server that ends IDLE on its own (a tagged answer while the session
/// waits) is not waited on until the IDLE period is over: the session starts
/// again, and mail that arrives next is seen at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r01_an_idle_the_server_ends_is_not_waited_on() {
    let proxy = support::imap_proxy::ImapProxy::start(&Stack::get()).await;
    proxy.end_next_idles(1);
    let w = World::connected(serde_json::json!({"imap": proxy.endpoint()})).await;
    support::eventually(
        "the first IDLE to be ended",
        support::DEADLINE,
        async || (proxy.idles_to_end() == 0).then_some(()),
    )
    .await;
    mail(&w.stack, &w.ann, &w.me, "after the server ended IDLE", None).await;
    w.receiver
        .wait_for("the message after IDLE ended", |r| {
            r.subject() == "after the server ended IDLE"
        })
        .await;
    w.daemon.stop().await;
}

/// Issue 11: where the server has NOTIFY (Dovecot does), one session watches
/// INBOX and Sent: new mail in either and a flag change in Sent arrive while
/// it IDLEs on INBOX. A server without NOTIFY gets one session per folder.
/// The connect check's session goes on as the sync's first: with NOTIFY, the
/// connect costs one login in all; without, one per folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r01_r04_one_session_watches_inbox_and_sent_where_the_server_has_notify() {
    // (NOTIFY, sessions, logins: the check's, then without NOTIFY one per folder)
    for (notify, sessions, logins) in [(true, 1, 1), (false, 2, 2)] {
        let proxy = support::imap_proxy::ImapProxy::start(&Stack::get()).await;
        if !notify {
            proxy.hide_capabilities(&["NOTIFY"]);
        }
        let w = World::connected(serde_json::json!({"imap": proxy.endpoint()})).await;
        support::eventually("the mailbox's sessions", support::DEADLINE, async || {
            (proxy.open_sessions() == sessions).then_some(())
        })
        .await;

        let sent_id = new_message_id("me");
        let raw = message(&w.me.address, &w.ann.address, "offer", &sent_id, None);
        w.stack.append_sent(&w.me, &raw).await;
        w.receiver
            .wait_for("the message filed in Sent", |r| {
                r.subject() == "offer" && r.kind() == "message.outbound"
            })
            .await;
        mail(&w.stack, &w.ann, &w.me, "question", None).await;
        w.receiver
            .wait_for("the message in INBOX", |r| r.subject() == "question")
            .await;
        w.stack
            .store_flags(&w.me, "Sent", &sent_id, "+FLAGS (\\Flagged)")
            .await;
        w.receiver
            .wait_for("the flag change in Sent", |r| {
                r.kind() == "message.updated" && r.data()["flagged"] == true
            })
            .await;
        assert_eq!(
            proxy.open_sessions(),
            sessions,
            "IMAP sessions with NOTIFY {notify}"
        );
        assert_eq!(proxy.counts().1, logins, "logins with NOTIFY {notify}");
        w.daemon.stop().await;
    }
}

/// Issue 11 (warm-up), R1, R4: a session that starts again visits only the
/// folders that changed while it was away. Under NOTIFY, a restart with
/// nothing new selects INBOX alone (Sent's STATUS matches its stored cursor),
/// and so does the first session after the connect check;
/// a flag change and new mail in Sent while the bridge was down are still
/// read after the next restart, which visits Sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r01_r04_a_restart_visits_only_the_folders_that_changed_while_it_was_away() {
    let proxy = support::imap_proxy::ImapProxy::start(&Stack::get()).await;
    let mut w = World::connected(serde_json::json!({"imap": proxy.endpoint()})).await;
    // The first session after the connect check, too: the check's baseline
    // holds each folder's HIGHESTMODSEQ, so Sent is found caught up.
    support::eventually("the first session in IDLE", support::DEADLINE, async || {
        (proxy.commands("IDLE") >= 1).then_some(())
    })
    .await;
    assert_eq!(
        proxy.commands("SELECT"),
        1,
        "folders selected after connect"
    );
    let sent_id = new_message_id("me");
    let raw = message(&w.me.address, &w.ann.address, "offer", &sent_id, None);
    w.stack.append_sent(&w.me, &raw).await;
    w.receiver
        .wait_for("the message filed in Sent", |r| {
            r.subject() == "offer" && r.kind() == "message.outbound"
        })
        .await;
    let config = w.daemon.config();
    // Starts the daemon again; also returns the folders selected until IDLE.
    let start_again = async || -> (Daemon, usize) {
        let (selects, idles) = (proxy.commands("SELECT"), proxy.commands("IDLE"));
        let daemon = Daemon::start(config.clone()).await;
        support::eventually("the session in IDLE again", support::DEADLINE, async || {
            (proxy.commands("IDLE") > idles).then_some(())
        })
        .await;
        (daemon, proxy.commands("SELECT") - selects)
    };

    // Restarted with nothing new: INBOX is selected, Sent only asked its STATUS.
    w.daemon.stop().await;
    let selected;
    (w.daemon, selected) = start_again().await;
    assert_eq!(selected, 1, "folders selected, nothing new");
    w.api = Api::new(&w.daemon.base);
    w.api.wait_active("L1", "u1").await;

    // A flag changed while away: Sent is visited, and the change read.
    w.daemon.stop().await;
    w.stack
        .store_flags(&w.me, "Sent", &sent_id, "+FLAGS (\\Flagged)")
        .await;
    let selected;
    (w.daemon, selected) = start_again().await;
    assert_eq!(selected, 3, "flag change: INBOX, Sent, and INBOX again");
    w.receiver
        .wait_for("the flag change in Sent", |r| {
            r.kind() == "message.updated" && r.data()["flagged"] == true
        })
        .await;

    // New mail while away: the same.
    w.daemon.stop().await;
    let later = message(
        &w.me.address,
        &w.ann.address,
        "offer, again",
        &new_message_id("me"),
        None,
    );
    w.stack.append_sent(&w.me, &later).await;
    let selected;
    (w.daemon, selected) = start_again().await;
    assert_eq!(selected, 3, "new mail: INBOX, Sent, and INBOX again");
    w.receiver
        .wait_for("the new message in Sent", |r| r.subject() == "offer, again")
        .await;

    // Expunged while away: the same (with QRESYNC, an expunge raises
    // HIGHESTMODSEQ too).
    w.daemon.stop().await;
    w.stack.move_message(&w.me, "Sent", &sent_id, None).await;
    let selected;
    (w.daemon, selected) = start_again().await;
    assert_eq!(selected, 3, "expunge: INBOX, Sent, and INBOX again");
    w.receiver
        .wait_for("the expunge in Sent", |r| {
            r.data()["message_id"] == sent_id.as_str() && r.kind() == "message.deleted"
        })
        .await;

    // Once read, the expunge is behind the cursor: nothing new again.
    w.daemon.stop().await;
    let selected;
    (w.daemon, selected) = start_again().await;
    assert_eq!(selected, 1, "after the expunge was read: INBOX alone");
    w.daemon.stop().await;
}

/// As above, on a server with NOTIFY and CONDSTORE but no QRESYNC: there an
/// expunge need not raise HIGHESTMODSEQ, so STATUS cannot show that nothing
/// changed, and every folder is visited after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r01_without_qresync_a_restart_visits_every_folder() {
    let proxy = support::imap_proxy::ImapProxy::start(&Stack::get()).await;
    proxy.hide_capabilities(&["QRESYNC"]);
    let mut w = World::connected(serde_json::json!({"imap": proxy.endpoint()})).await;
    support::eventually("the first session in IDLE", support::DEADLINE, async || {
        (proxy.commands("IDLE") >= 1).then_some(())
    })
    .await;
    let config = w.daemon.config();
    w.daemon.stop().await;
    let (selects, idles) = (proxy.commands("SELECT"), proxy.commands("IDLE"));
    w.daemon = Daemon::start(config).await;
    support::eventually("the session in IDLE again", support::DEADLINE, async || {
        (proxy.commands("IDLE") > idles).then_some(())
    })
    .await;
    assert_eq!(
        proxy.commands("SELECT") - selects,
        3,
        "INBOX, Sent, and INBOX again"
    );
    w.daemon.stop().await;
}

/// R6, the other way round: two replies from a contact to a message the user
/// sent, read before that message (Sent held back). The second reply finds
/// the first one's thread by the message both answer, and the user's message,
/// read last, joins them: one conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r06_two_replies_read_before_their_original_share_its_thread() {
    let (proxy, mut w) = one_session_per_folder().await;
    let config = w.daemon.config();
    w.daemon.stop().await;

    let offer_id = new_message_id("offer");
    let offer = message(
        &w.me.address,
        &w.ann.address,
        "two replies: the offer",
        &offer_id,
        None,
    );
    w.stack.append_sent(&w.me, &offer).await;
    for (count, subject) in ["Re: two replies: the offer", "Re: two replies: again"]
        .iter()
        .enumerate()
    {
        let reply = message(
            &w.ann.address,
            &w.me.address,
            subject,
            &new_message_id("reply"),
            Some(&offer_id),
        );
        w.stack
            .deliver(&w.ann.address, &[&w.me.address], &reply)
            .await;
        w.stack.wait_count(&w.me, "INBOX", count as u32 + 1).await;
    }

    let sent = proxy.hold_next_fetch_in("Sent");
    w.daemon = Daemon::start(config).await;
    let first = w
        .receiver
        .wait_for("the first reply", |r| {
            r.subject() == "Re: two replies: the offer"
        })
        .await;
    let second = w
        .receiver
        .wait_for("the second reply", |r| {
            r.subject() == "Re: two replies: again"
        })
        .await;
    assert_eq!(
        w.receiver
            .distinct(|r| r.subject() == "two replies: the offer"),
        0,
        "the offer is held back"
    );
    assert_eq!(
        first.data()["thread_id"],
        second.data()["thread_id"],
        "the replies share a thread"
    );
    sent.notify_one();
    let original = w
        .receiver
        .wait_for("the offer, read last", |r| {
            r.subject() == "two replies: the offer"
        })
        .await;
    assert_eq!(original.kind(), "message.outbound");
    assert_eq!(
        original.data()["thread_id"],
        first.data()["thread_id"],
        "one conversation"
    );
    w.daemon.stop().await;
}

/// Issue 11 item 5 (R6, R21): mail that arrived while the bridge was down is
/// caught up as one batch, made durable together. Each message is still
/// routed over the ones before it: a stranger's reply to a message of the
/// same batch continues its thread (R6), a second copy of a message is not
/// forwarded again, and the source of every synced message is kept, and no
/// other (the batch writes sources ahead for the messages it expects to
/// sync, and drops the ones it guessed wrong).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r06_r21_a_catch_up_batch_routes_each_message_over_the_ones_before_it() {
    let mut w = World::connected(serde_json::json!({})).await;
    let config = w.daemon.config();
    w.daemon.stop().await;

    let stranger = "eve@elsewhere.test";
    let original_id = new_message_id("orig");
    let original = message(
        &w.ann.address,
        &w.me.address,
        "batch: the original",
        &original_id,
        None,
    );
    let batch: Vec<(&str, Vec<u8>)> = vec![
        (w.ann.address.as_str(), original.clone()),
        // The same message filed twice.
        (w.ann.address.as_str(), original),
        (
            stranger,
            message(
                stranger,
                &w.me.address,
                "batch: a stranger's reply",
                &new_message_id("reply"),
                Some(&original_id),
            ),
        ),
        (
            stranger,
            message(
                stranger,
                &w.me.address,
                "batch: a stranger alone",
                &new_message_id("alone"),
                None,
            ),
        ),
        (
            w.ann.address.as_str(),
            message(
                &w.ann.address,
                &w.me.address,
                "batch: ann again",
                &new_message_id("again"),
                None,
            ),
        ),
    ];
    for (count, (from, raw)) in batch.iter().enumerate() {
        w.stack.deliver(from, &[&w.me.address], raw).await;
        // Filed in this order, so the reply comes after its original.
        w.stack.wait_count(&w.me, "INBOX", count as u32 + 1).await;
    }

    w.daemon = Daemon::start(config).await;
    w.api = Api::new(&w.daemon.base);
    let subjects = [
        "batch: the original",
        "batch: a stranger's reply",
        "batch: ann again",
    ];
    let mut synced = Vec::new();
    for subject in subjects {
        synced.push(
            w.receiver
                .wait_for(subject, |r| r.subject() == subject)
                .await,
        );
    }
    assert_eq!(
        synced[1].data()["thread_id"],
        synced[0].data()["thread_id"],
        "the reply continues the thread its original opened in the same batch"
    );
    assert_ne!(synced[2].data()["thread_id"], synced[0].data()["thread_id"]);
    let inbound: Vec<String> = w
        .receiver
        .all()
        .iter()
        .filter(|r| r.kind() == "message.inbound")
        .map(|r| r.subject().to_string())
        .collect();
    assert_eq!(
        inbound
            .iter()
            .filter(|s| *s == "batch: the original")
            .count(),
        1,
        "the second copy is not forwarded again: {inbound:?}"
    );
    assert!(!inbound.iter().any(|s| s == "batch: a stranger alone"));

    for event in &synced {
        let id = event.data()["id"].as_str().unwrap().to_string();
        let response = w
            .api
            .http
            .get(format!("{}/v1/messages/{id}/raw", w.api.base))
            .bearer_auth(support::daemon::API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "the source of {}", event.subject());
        let raw = response.text().await.unwrap();
        assert!(
            raw.contains(&format!("Body of {}", event.subject())),
            "{raw}"
        );
    }
    // Sources are appended to segment files; only those the rules expect
    // to sync are written (a duplicate's bytes stay, unreferenced, until
    // their segment goes with retention).
    let on_disk: Vec<u8> =
        std::fs::read_dir(w.daemon.config().storage.path.join("source-segments"))
            .unwrap()
            .filter_map(Result::ok)
            .flat_map(|entry| std::fs::read(entry.path()).unwrap())
            .collect();
    let held = |subject: &str| {
        let body = format!("Body of {subject}");
        on_disk
            .windows(body.len())
            .filter(|window| *window == body.as_bytes())
            .count()
    };
    assert_eq!(held("batch: a stranger's reply"), 1);
    assert_eq!(held("batch: ann again"), 1);
    assert_eq!(
        held("batch: a stranger alone"),
        0,
        "a message not synced is not kept"
    );
    w.daemon.stop().await;
}

/// A contact's question in INBOX and the user's reply to it in Sent, both
/// filed while the bridge is down.
async fn question_and_reply_while_down(stack: &Stack, me: &User, ann: &User, subject: &str) {
    let question_id = new_message_id("question");
    let question = message(&ann.address, &me.address, subject, &question_id, None);
    stack.deliver(&ann.address, &[&me.address], &question).await;
    stack.wait_count(me, "INBOX", 1).await;
    let reply = message(
        &me.address,
        &ann.address,
        &format!("Re: {subject}"),
        &new_message_id("answer"),
        Some(&question_id),
    );
    stack.append_sent(me, &reply).await;
}

/// The world connected through a proxy that hides NOTIFY: one session per
/// folder, as on Gmail, both open.
async fn one_session_per_folder() -> (support::imap_proxy::ImapProxy, World) {
    let proxy = support::imap_proxy::ImapProxy::start(&Stack::get()).await;
    proxy.hide_capabilities(&["NOTIFY"]);
    let w = World::connected(serde_json::json!({"imap": proxy.endpoint()})).await;
    support::eventually("a session per folder", support::DEADLINE, async || {
        (proxy.open_sessions() == 2).then_some(())
    })
    .await;
    (proxy, w)
}

/// R6 across a restart: a contact wrote and the user replied while the bridge
/// was down. Caught up after the restart, the reply joins its original's
/// thread (one session reads INBOX before Sent; the next test reads them the
/// other way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r06_a_reply_sent_while_the_bridge_was_down_joins_its_originals_thread() {
    let mut w = World::connected(serde_json::json!({})).await;
    let config = w.daemon.config();
    w.daemon.stop().await;

    question_and_reply_while_down(&w.stack, &w.me, &w.ann, "while down: a question").await;

    w.daemon = Daemon::start(config).await;
    w.api = Api::new(&w.daemon.base);
    let question = w
        .receiver
        .wait_for("the question", |r| r.subject() == "while down: a question")
        .await;
    let answer = w
        .receiver
        .wait_for("the reply", |r| r.subject() == "Re: while down: a question")
        .await;
    assert_eq!(answer.kind(), "message.outbound");
    assert_eq!(
        answer.data()["thread_id"],
        question.data()["thread_id"],
        "one conversation, not two"
    );
    w.daemon.stop().await;
}

/// R6 whatever the order folders are read in: as above, on a server without
/// NOTIFY (one session per folder, as on Gmail), with INBOX held back so that
/// the reply in Sent is read first. The reply files the question it answers
/// under its thread; the question, read after it, joins that thread as
/// inbound mail from the contact, and is forwarded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r06_an_original_read_after_its_reply_joins_the_replys_thread() {
    let (proxy, mut w) = one_session_per_folder().await;
    let config = w.daemon.config();
    w.daemon.stop().await;

    question_and_reply_while_down(&w.stack, &w.me, &w.ann, "read late: a question").await;

    let inbox = proxy.hold_next_fetch_in("INBOX");
    w.daemon = Daemon::start(config).await;
    let answer = w
        .receiver
        .wait_for("the reply, read first", |r| {
            r.subject() == "Re: read late: a question"
        })
        .await;
    assert_eq!(answer.kind(), "message.outbound");
    assert_eq!(
        w.receiver
            .distinct(|r| r.subject() == "read late: a question"),
        0,
        "the question is held back"
    );
    inbox.notify_one();
    let question = w
        .receiver
        .wait_for("the question, read after its reply", |r| {
            r.subject() == "read late: a question"
        })
        .await;
    assert_eq!(question.kind(), "message.inbound");
    assert_eq!(question.data()["contact_id"], "c-ann");
    assert_eq!(
        question.data()["thread_id"],
        answer.data()["thread_id"],
        "one conversation, not two"
    );
    assert_eq!(
        w.receiver
            .distinct(|r| r.subject() == "read late: a question"),
        1
    );
    w.daemon.stop().await;
}
