//! The integration's life: disconnect keeps history and stops sync (R19), and
//! refused credentials stop sync until new ones arrive, then resume from the
//! kept cursor (R20).

mod support;

use reqwest::Method;
use support::world::{World, mail};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r19_disconnect_stops_sync_and_mail_from_meanwhile_never_syncs() {
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
    send("connected").await;
    receiver
        .wait_for("the first message", |r| r.subject() == "connected")
        .await;

    let (status, _) = api
        .send(Method::DELETE, "/v1/locations/L1/users/u1/mailbox", None)
        .await;
    assert_eq!(status, 204);
    receiver
        .wait_for("mailbox.disconnected", |r| {
            r.kind() == "mailbox.disconnected"
        })
        .await;
    send("while disconnected").await;
    stack.wait_count(&me, "INBOX", 2).await;

    api.connect("L1", "u1", &stack, &me).await;
    api.wait_active("L1", "u1").await;
    send("reconnected").await;
    receiver
        .wait_for("the message after reconnecting", |r| {
            r.subject() == "reconnected"
        })
        .await;
    assert!(
        receiver
            .all()
            .iter()
            .all(|r| r.subject() != "while disconnected"),
        "R19/R2: never synced"
    );
    let (_, history) = api
        .send(
            Method::GET,
            "/v1/locations/L1/contacts/c-ann/messages",
            None,
        )
        .await;
    assert_eq!(
        history["messages"].as_array().unwrap().len(),
        2,
        "history kept across the disconnect"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r20_refused_credentials_stop_sync_once_and_new_ones_resume_from_the_cursor() {
    let World {
        stack,
        receiver,
        daemon,
        api,
        me,
        ann,
        _data,
    } = World::connected(serde_json::json!({})).await;

    // The password changes on the server, and the sessions end.
    let changed = stack.change_password(&me, "a-new-password");
    support::eventually("the new password to apply", support::DEADLINE, async || {
        let mut session = stack.try_session(&changed).await.ok()?;
        let _ = session.logout().await;
        Some(())
    })
    .await;
    stack.kick(&me);
    receiver
        .wait_for("mailbox.needs_reauth", |r| {
            r.kind() == "mailbox.needs_reauth"
        })
        .await;
    let (_, status) = api
        .send(Method::GET, "/v1/locations/L1/users/u1/mailbox", None)
        .await;
    assert_eq!(status["state"], "needs_reauth");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("AUTHENTICATIONFAILED"),
        "{status}"
    );
    let (code, error, _) = api
        .send_message(
            "L1",
            "u1",
            serde_json::json!({"contact_id": "c-ann", "subject": "s", "text": "x"}),
            None,
        )
        .await;
    assert_eq!(code, 409, "{error}");
    assert_eq!(error["error"]["code"], "needs_reauth");

    // Mail that arrives meanwhile syncs once the new credentials are in.
    mail(&stack, &ann, &me, "during reauth", None).await;
    stack.wait_count(&changed, "INBOX", 1).await;
    api.connect("L1", "u1", &stack, &changed).await;
    api.wait_active("L1", "u1").await;
    receiver
        .wait_for("the message from meanwhile", |r| {
            r.subject() == "during reauth"
        })
        .await;
    let reauth_events = receiver
        .all()
        .iter()
        .filter(|r| r.kind() == "mailbox.needs_reauth")
        .count();
    assert_eq!(reauth_events, 1, "the CRM hears of it once");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r18_update_email_detaches_the_old_threads_and_fails_what_was_queued_from_the_old_address()
{
    // The old mailbox's SMTP server is gone, so a CRM send stays queued.
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let World {
        stack,
        receiver,
        daemon,
        api,
        me,
        ann,
        _data,
    } = World::connected(serde_json::json!({
        "smtp": {"host": "127.0.0.1", "port": closed_port, "security": "plain"}
    }))
    .await;
    mail(&stack, &ann, &me, "to the old address", None).await;
    let first = receiver
        .wait_for("the message to the old address", |r| {
            r.subject() == "to the old address"
        })
        .await;
    let old_thread = first.data()["thread_id"].as_str().unwrap().to_string();
    let (code, queued, _) = api
        .send_message(
            "L1",
            "u1",
            serde_json::json!({"contact_id": "c-ann", "subject": "stuck", "text": "x"}),
            None,
        )
        .await;
    assert_eq!(code, 202, "{queued}");
    support::eventually("the send to be retried", support::DEADLINE, async || {
        let (_, send) = api
            .send(
                Method::GET,
                &format!("/v1/messages/{}", queued["id"].as_str().unwrap()),
                None,
            )
            .await;
        (send["status"] == "queued" && !send["error"].is_null()).then_some(())
    })
    .await;

    let new = stack.new_user("new").await;
    api.connect("L1", "u1", &stack, &new).await;
    let updated = receiver
        .wait_for("mailbox.updated", |r| r.kind() == "mailbox.updated")
        .await;
    assert_eq!(updated.data()["previous_mailbox"], me.address.as_str());
    let failed = receiver
        .wait_for("message.failed", |r| r.kind() == "message.failed")
        .await;
    assert_eq!(failed.data()["id"], queued["id"]);
    assert!(
        failed.data()["error"]
            .as_str()
            .unwrap()
            .contains(&new.address),
        "{}",
        failed.data()
    );
    let detached: Vec<_> = receiver
        .all()
        .into_iter()
        .filter(|r| r.kind() == "thread.detached")
        .map(|r| r.data()["thread_id"].as_str().unwrap().to_string())
        .collect();
    assert!(detached.contains(&old_thread), "{detached:?}");
    assert!(
        detached.contains(&queued["thread_id"].as_str().unwrap().to_string()),
        "{detached:?}"
    );
    let (_, send) = api
        .send(
            Method::GET,
            &format!("/v1/messages/{}", queued["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(send["status"], "failed");

    // New sends leave from the new address.
    api.wait_active("L1", "u1").await;
    let (code, sent, _) = api
        .send_message(
            "L1",
            "u1",
            serde_json::json!({"contact_id": "c-ann", "subject": "from new", "text": "x"}),
            None,
        )
        .await;
    assert_eq!(code, 202, "{sent}");
    assert_eq!(sent["mailbox"], new.address.as_str());
    daemon.stop().await;
}

/// me connected through a proxy that can refuse logins in Dovecot's place.
async fn behind_proxy() -> (World, support::imap_proxy::ImapProxy) {
    let proxy = support::imap_proxy::ImapProxy::start(&support::stack::Stack::get()).await;
    let world = World::connected(serde_json::json!({"imap": proxy.endpoint()})).await;
    (world, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r20_a_server_that_cannot_take_logins_for_now_is_not_needs_reauth() {
    let (world, proxy) = behind_proxy().await;
    proxy.refuse_next(3, support::imap_proxy::UNAVAILABLE);
    world.stack.kick(&world.me);
    mail(
        &world.stack,
        &world.ann,
        &world.me,
        "after the refusals",
        None,
    )
    .await;
    world
        .receiver
        .wait_for("the message after the refusals", |r| {
            r.subject() == "after the refusals"
        })
        .await;
    assert_eq!(proxy.counts().0, 3, "the refusals were met");
    world.api.wait_active("L1", "u1").await;
    assert!(
        world
            .receiver
            .all()
            .iter()
            .all(|r| r.kind() != "mailbox.needs_reauth"),
        "[UNAVAILABLE] is no verdict on the password"
    );
    world.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r20_a_password_refused_once_is_not_believed_until_a_later_try_confirms_it() {
    let (world, proxy) = behind_proxy().await;
    proxy.refuse_next(1, support::imap_proxy::AUTHENTICATION_FAILED);
    world.stack.kick(&world.me);
    mail(
        &world.stack,
        &world.ann,
        &world.me,
        "after one refusal",
        None,
    )
    .await;
    world
        .receiver
        .wait_for("the message after one refusal", |r| {
            r.subject() == "after one refusal"
        })
        .await;
    assert_eq!(proxy.counts().0, 1);
    world.api.wait_active("L1", "u1").await;
    let (code, sent, _) = world
        .send(serde_json::json!({"contact_id": "c-ann", "subject": "still fine", "text": "x"}))
        .await;
    assert_eq!(code, 202, "{sent}");
    assert!(
        world
            .receiver
            .all()
            .iter()
            .all(|r| r.kind() != "mailbox.needs_reauth"),
        "one refusal, then a login that works: not needs_reauth"
    );
    world.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r21_a_uidvalidity_change_while_down_loses_nothing_and_forwards_nothing_twice() {
    let World {
        stack,
        receiver,
        daemon,
        api,
        me,
        ann,
        _data,
    } = World::started().await;
    api.put_contact("L1", "c-ann", &ann.address, &["u1"]).await;
    // In the mailbox before the connect: never synced (R2), not even later.
    mail(&stack, &ann, &me, "before the connect", None).await;
    stack.wait_count(&me, "INBOX", 1).await;
    // INTERNALDATE has whole seconds: connect in a later one.
    let delivered = chrono::Utc::now().timestamp();
    support::eventually("the next second", support::DEADLINE, async || {
        (chrono::Utc::now().timestamp() > delivered).then_some(())
    })
    .await;
    api.connect("L1", "u1", &stack, &me).await;
    api.wait_active("L1", "u1").await;
    mail(&stack, &ann, &me, "synced", None).await;
    receiver
        .wait_for("the first message", |r| r.subject() == "synced")
        .await;
    daemon.stop().await;

    // While the bridge is down, mail arrives and the folder's UIDs are renumbered.
    mail(&stack, &ann, &me, "while down", None).await;
    stack.wait_count(&me, "INBOX", 3).await;
    let uid_validity = {
        let mut session = stack.session(&me).await;
        let selected = session.examine("INBOX").await.expect("EXAMINE");
        let _ = session.logout().await;
        selected.uid_validity.unwrap()
    };
    stack.set_uid_validity(&me, "INBOX", uid_validity + 1000);

    let daemon = support::daemon::Daemon::start(support::daemon::test_config(
        _data.path(),
        &stack,
        &receiver,
    ))
    .await;
    receiver
        .wait_for("the message from while it was down", |r| {
            r.subject() == "while down"
        })
        .await;
    // Later mail still flows, and by then the re-read was complete.
    mail(&stack, &ann, &me, "after", None).await;
    receiver
        .wait_for("the next message", |r| r.subject() == "after")
        .await;
    let count = |subject: &str| receiver.distinct(|r| r.subject() == subject);
    assert_eq!(count("synced"), 1, "forwarded once");
    assert_eq!(count("while down"), 1);
    assert_eq!(
        count("before the connect"),
        0,
        "R2 holds across the renumbering"
    );
    daemon.stop().await;
}

/// Issue 11: the state a mailbox shows is its sessions' now. After a
/// restart it is `connecting` until every watched folder logged in and
/// caught up (it used to show the `active` stored before the restart while
/// no session was up), and operators can list mailboxes by state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_mailbox_is_not_active_until_its_sessions_are() {
    use support::{
        daemon::Daemon,
        imap_proxy::{ImapProxy, UNAVAILABLE},
    };

    let mut world = World::started().await;
    let proxy = ImapProxy::start(&world.stack).await;
    world
        .api
        .connect_with(
            "L1",
            "u1",
            &world.stack,
            &world.me,
            serde_json::json!({"imap": proxy.endpoint()}),
        )
        .await;
    world.api.wait_active("L1", "u1").await;
    let (_, status) = world
        .api
        .send(Method::GET, "/v1/locations/L1/users/u1/mailbox", None)
        .await;
    let watched = status["watched"].as_array().cloned().unwrap_or_default();
    assert_eq!(watched.len(), 2, "INBOX and Sent: {status}");
    for folder in &watched {
        assert_eq!(folder["state"], "active", "{status}");
        assert!(folder["last_synced_at"].is_string(), "{status}");
    }
    let (_, page) = world
        .api
        .send(Method::GET, "/v1/mailboxes?state=active", None)
        .await;
    assert_eq!(page["mailboxes"][0]["email"], world.me.address, "{page}");

    // Restarted while the server refuses logins: nothing is up.
    proxy.refuse_next(10_000, UNAVAILABLE);
    let config = world.daemon.config();
    world.daemon.stop().await;
    world.daemon = Daemon::start(config).await;
    world.api = support::daemon::Api::new(&world.daemon.base);
    let (_, status) = world
        .api
        .send(Method::GET, "/v1/locations/L1/users/u1/mailbox", None)
        .await;
    assert_ne!(status["state"], "active", "{status}");
    let (_, page) = world
        .api
        .send(Method::GET, "/v1/mailboxes?state=active", None)
        .await;
    assert_eq!(page["mailboxes"], serde_json::json!([]), "{page}");
    support::eventually(
        "the refused logins to show as an error",
        support::DEADLINE,
        async || {
            let (_, page) = world
                .api
                .send(Method::GET, "/v1/mailboxes?state=error", None)
                .await;
            let error = page["mailboxes"][0]["last_error"].as_str()?.to_string();
            error
                .contains("Temporary authentication failure")
                .then_some(())
        },
    )
    .await;

    proxy.stop_refusing();
    world.api.wait_active("L1", "u1").await;
    world.daemon.stop().await;
}

/// A session that keeps failing is tried again ever less often (jittered,
/// doubling from `reconnect_min_ms`, 100 ms in the tests, up to
/// `reconnect_max_ms`), not every `reconnect_min_ms` forever; mail flows
/// again once logins pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r21_a_login_refused_again_and_again_is_retried_ever_less_often() {
    let (world, proxy) = behind_proxy().await;
    proxy.refuse_next(4, support::imap_proxy::UNAVAILABLE);
    world.stack.kick(&world.me);
    mail(
        &world.stack,
        &world.ann,
        &world.me,
        "after the backoff",
        None,
    )
    .await;
    world
        .receiver
        .wait_for("the message after the refusals", |r| {
            r.subject() == "after the backoff"
        })
        .await;
    let refused = proxy.refusal_times();
    assert_eq!(refused.len(), 4, "every refusal was met");
    // After the cut and three refusals in a row, the wait before the fourth
    // try is 400 to 800 ms; without growth it would be 50 to 100 ms.
    let last_wait = refused[3].duration_since(refused[2]);
    assert!(
        last_wait >= std::time::Duration::from_millis(400),
        "the fourth try came {last_wait:?} after the third"
    );
    world.daemon.stop().await;
}
