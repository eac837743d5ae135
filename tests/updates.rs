//! Two-way updates (issue 9), mailbox → CRM: what another client does to a
//! synced message (read, star, answer) reaches the CRM as `message.updated`.

mod support;

use support::world::{World, mail};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_and_starring_a_synced_message_elsewhere_is_reported_as_message_updated() {
    let w = World::connected(serde_json::json!({})).await;
    let (id, synced) = w.mail_synced("to be read").await;
    // Mail nobody synced changes nothing in the CRM.
    let stranger = mail(&w.stack, &w.me, &w.me, "not synced", None).await;
    w.stack.wait_count(&w.me, "INBOX", 2).await;
    w.stack
        .store_flags(&w.me, "INBOX", &stranger, "+FLAGS (\\Seen)")
        .await;

    w.stack
        .store_flags(&w.me, "INBOX", &id, "+FLAGS (\\Seen)")
        .await;
    let read = w
        .receiver
        .wait_for("message.updated: seen", |r| {
            r.kind() == "message.updated" && r.data()["seen"] == true
        })
        .await;
    let data = read.data();
    assert_eq!(data["id"], synced.data()["id"]);
    assert_eq!(data["thread_id"], synced.data()["thread_id"]);
    assert_eq!(data["message_id"], id.as_str());
    assert_eq!(data["location_id"], "L1");
    assert_eq!(data["user_id"], "u1");
    assert_eq!(data["contact_id"], "c-ann");
    assert_eq!(data["mailbox"], w.me.address.as_str());
    assert_eq!(data["folder"], "INBOX");
    assert_eq!(data["flagged"], false);
    assert_eq!(data["answered"], false);

    w.stack
        .store_flags(&w.me, "INBOX", &id, "+FLAGS (\\Flagged)")
        .await;
    let starred = w
        .receiver
        .wait_for("message.updated: flagged", |r| {
            r.kind() == "message.updated" && r.data()["flagged"] == true
        })
        .await;
    assert_eq!(starred.data()["seen"], true);
    assert_eq!(
        w.receiver.distinct(|r| r.kind() == "message.updated"),
        2,
        "one event per change, none for the unsynced message"
    );
    w.daemon.stop().await;
}

/// Changes made while the bridge was stopped arrive after its restart, each
/// once (HIGHESTMODSEQ is kept in the folder's cursor).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_the_bridge_was_stopped_arrives_after_restart_once() {
    let w = World::connected(serde_json::json!({})).await;
    let id = mail(&w.stack, &w.ann, &w.me, "read while away", None).await;
    w.receiver
        .wait_for("the message", |r| r.subject() == "read while away")
        .await;
    w.daemon.stop().await;
    w.stack
        .store_flags(&w.me, "INBOX", &id, "+FLAGS (\\Seen \\Answered)")
        .await;
    let again = support::daemon::Daemon::start(support::daemon::test_config(
        w._data.path(),
        &w.stack,
        &w.receiver,
    ))
    .await;
    let updated = w
        .receiver
        .wait_for("the change made while away", |r| {
            r.kind() == "message.updated" && r.data()["message_id"] == id.as_str()
        })
        .await;
    assert_eq!(updated.data()["seen"], true);
    assert_eq!(updated.data()["answered"], true);
    // A later change is the next event; the one from while away came once.
    w.stack
        .store_flags(&w.me, "INBOX", &id, "+FLAGS (\\Flagged)")
        .await;
    w.receiver
        .wait_for("the later change", |r| {
            r.kind() == "message.updated" && r.data()["flagged"] == true
        })
        .await;
    assert_eq!(w.receiver.distinct(|r| r.kind() == "message.updated"), 2);
    again.stop().await;
}

/// A synced message archived elsewhere is `message.updated` with its new
/// folder; one moved to Trash, or deleted for good, is `message.deleted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_trashing_and_expunging_a_synced_message_are_reported() {
    let w = World::connected(serde_json::json!({})).await;
    let archived = mail(&w.stack, &w.ann, &w.me, "to archive", None).await;
    let trashed = mail(&w.stack, &w.ann, &w.me, "to trash", None).await;
    let expunged = mail(&w.stack, &w.ann, &w.me, "to expunge", None).await;
    w.receiver
        .wait_for_count("the three messages", 3, |r| r.kind() == "message.inbound")
        .await;

    w.stack
        .move_message(&w.me, "INBOX", &archived, Some("Archive"))
        .await;
    let moved = w
        .receiver
        .wait_for("the archived one", |r| {
            r.data()["message_id"] == archived.as_str() && r.kind() == "message.updated"
        })
        .await;
    assert_eq!(moved.data()["folder"], "Archive");
    assert_eq!(moved.data()["previous_folder"], "INBOX");

    w.stack
        .move_message(&w.me, "INBOX", &trashed, Some("Trash"))
        .await;
    let binned = w
        .receiver
        .wait_for("the trashed one", |r| {
            r.data()["message_id"] == trashed.as_str() && r.kind() == "message.deleted"
        })
        .await;
    assert_eq!(binned.data()["folder"], "Trash");
    assert_eq!(binned.data()["contact_id"], "c-ann");

    w.stack.move_message(&w.me, "INBOX", &expunged, None).await;
    let gone = w
        .receiver
        .wait_for("the expunged one", |r| {
            r.data()["message_id"] == expunged.as_str() && r.kind() == "message.deleted"
        })
        .await;
    assert!(gone.data()["folder"].is_null(), "{}", gone.data());
    assert_eq!(
        w.receiver
            .distinct(|r| matches!(r.kind(), "message.updated" | "message.deleted")),
        3,
        "one event each"
    );
    w.daemon.stop().await;
}

/// CRM → mailbox: PATCH sets the flags and DELETE moves the message to
/// Trash, as another client sees over IMAP; neither comes back as an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crm_reads_stars_and_deletes_a_message_in_the_mailbox_without_an_echo() {
    let w = World::connected(serde_json::json!({})).await;
    let (id, synced) = w.mail_synced("read me from the crm").await;
    let record = synced.data()["id"].as_str().unwrap().to_string();
    let path = format!("/v1/messages/{record}");

    let (status, body) = w
        .api
        .send(
            reqwest::Method::PATCH,
            &path,
            Some(serde_json::json!({"seen": true, "flagged": true})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    support::eventually(
        "\\Seen and \\Flagged over IMAP",
        support::DEADLINE,
        async || {
            let flags = w
                .stack
                .flags_of(&w.me, "INBOX", &id)
                .await
                .unwrap_or_default();
            (flags.iter().any(|f| f == "Seen") && flags.iter().any(|f| f == "Flagged"))
                .then_some(())
        },
    )
    .await;

    let (status, body) = w.api.send(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 202, "{body}");
    support::eventually("the message in Trash", support::DEADLINE, async || {
        w.stack.flags_of(&w.me, "Trash", &id).await.map(|_| ())
    })
    .await;
    assert!(w.stack.flags_of(&w.me, "INBOX", &id).await.is_none());

    // A later change of another message is reported; the CRM's own were not.
    let other = mail(&w.stack, &w.ann, &w.me, "read elsewhere", None).await;
    w.receiver
        .wait_for("the other message", |r| r.subject() == "read elsewhere")
        .await;
    w.stack
        .store_flags(&w.me, "INBOX", &other, "+FLAGS (\\Seen)")
        .await;
    w.receiver
        .wait_for("the other's update", |r| {
            r.kind() == "message.updated" && r.data()["message_id"] == other.as_str()
        })
        .await;
    assert_eq!(
        w.receiver.distinct(|r| {
            matches!(r.kind(), "message.updated" | "message.deleted")
                && r.data()["message_id"] == id.as_str()
        }),
        0,
        "no echo of the CRM's own changes"
    );

    // Gone from INBOX: nothing more to change there.
    let (status, _) = w.api.send(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 404);
    let (status, _) = w
        .api
        .send(
            reqwest::Method::PATCH,
            "/v1/messages/msg_unknown",
            Some(serde_json::json!({"seen": true})),
        )
        .await;
    assert_eq!(status, 404);
    w.daemon.stop().await;
}

/// A change the CRM asked for waits out a mailbox that cannot take logins,
/// and a restart of the bridge: it is made once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crm_change_survives_an_unavailable_server_and_a_restart() {
    let proxy = support::imap_proxy::ImapProxy::start(&support::stack::Stack::get()).await;
    let w = World::connected_with(
        |config| {
            config.sending.retry_min_ms = 100;
            config.sending.retry_max_ms = 500;
        },
        serde_json::json!({"imap": proxy.endpoint()}),
    )
    .await;
    let (id, synced) = w.mail_synced("star me later").await;
    let (anchor, _) = w.mail_synced("changed elsewhere later").await;
    proxy.refuse_next(10_000, support::imap_proxy::UNAVAILABLE);
    let (refused_before, _) = proxy.counts();
    let (status, body) = w
        .api
        .send(
            reqwest::Method::PATCH,
            &format!("/v1/messages/{}", synced.data()["id"].as_str().unwrap()),
            Some(serde_json::json!({"flagged": true})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    // The bridge tried, and was turned away.
    support::eventually("a refused try", support::DEADLINE, async || {
        (proxy.counts().0 > refused_before + 2).then_some(())
    })
    .await;
    w.daemon.stop().await;
    assert!(
        !w.stack
            .flags_of(&w.me, "INBOX", &id)
            .await
            .unwrap_or_default()
            .iter()
            .any(|f| f == "Flagged"),
        "not made while the server refused"
    );

    proxy.stop_refusing();
    let mut config = support::daemon::test_config(w._data.path(), &w.stack, &w.receiver);
    config.sending.retry_min_ms = 100;
    config.sending.retry_max_ms = 500;
    let again = support::daemon::Daemon::start(config).await;
    support::eventually(
        "\\Flagged over IMAP after the restart",
        support::DEADLINE,
        async || {
            let flags = w
                .stack
                .flags_of(&w.me, "INBOX", &id)
                .await
                .unwrap_or_default();
            flags.iter().any(|f| f == "Flagged").then_some(())
        },
    )
    .await;
    // Changes are read in the order the server made them: once a later one
    // made elsewhere is reported, the CRM's own has been read too.
    w.stack
        .store_flags(&w.me, "INBOX", &anchor, "+FLAGS (\\Seen)")
        .await;
    w.receiver
        .wait_for("the later change made elsewhere", |r| {
            r.kind() == "message.updated" && r.data()["message_id"] == anchor.as_str()
        })
        .await;
    again.stop().await;
    assert_eq!(
        w.receiver.distinct(|r| r.kind() == "message.updated"),
        1,
        "the CRM's own change is not echoed; the one made elsewhere is reported"
    );
}

/// Archived and brought back: not forwarded again (R21), reported back in
/// its folder, and followed from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_archived_and_brought_back_is_followed_again_not_forwarded_again() {
    let w = World::connected(serde_json::json!({})).await;
    let (id, synced) = w.mail_synced("out and back").await;
    w.stack
        .move_message(&w.me, "INBOX", &id, Some("Archive"))
        .await;
    w.receiver
        .wait_for("archived", |r| {
            r.kind() == "message.updated" && r.data()["folder"] == "Archive"
        })
        .await;
    w.stack
        .move_message(&w.me, "Archive", &id, Some("INBOX"))
        .await;
    let back = w
        .receiver
        .wait_for("back in INBOX", |r| {
            r.kind() == "message.updated" && r.data()["folder"] == "INBOX"
        })
        .await;
    assert_eq!(back.data()["id"], synced.data()["id"]);
    assert_eq!(back.data()["thread_id"], synced.data()["thread_id"]);
    w.stack
        .store_flags(&w.me, "INBOX", &id, "+FLAGS (\\Flagged)")
        .await;
    w.receiver
        .wait_for("a change after its return", |r| {
            r.kind() == "message.updated" && r.data()["flagged"] == true
        })
        .await;
    assert_eq!(
        w.receiver.distinct(|r| r.kind() == "message.inbound"),
        1,
        "never forwarded again"
    );
    w.daemon.stop().await;
}

/// Moved out and straight back while the bridge was not looking (here:
/// stopped): it is back, not deleted, and followed from its new UID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_moved_out_and_straight_back_is_not_reported_deleted() {
    let w = World::connected(serde_json::json!({})).await;
    let id = mail(&w.stack, &w.ann, &w.me, "undo archive", None).await;
    w.receiver
        .wait_for("the message", |r| r.subject() == "undo archive")
        .await;
    w.daemon.stop().await;
    w.stack
        .move_message(&w.me, "INBOX", &id, Some("Archive"))
        .await;
    w.stack
        .move_message(&w.me, "Archive", &id, Some("INBOX"))
        .await;
    let again = support::daemon::Daemon::start(support::daemon::test_config(
        w._data.path(),
        &w.stack,
        &w.receiver,
    ))
    .await;
    w.stack
        .store_flags(&w.me, "INBOX", &id, "+FLAGS (\\Flagged)")
        .await;
    w.receiver
        .wait_for("a change at its new UID", |r| {
            r.kind() == "message.updated" && r.data()["flagged"] == true
        })
        .await;
    assert_eq!(
        w.receiver.distinct(|r| r.kind() == "message.deleted"),
        0,
        "back, not deleted"
    );
    assert_eq!(w.receiver.distinct(|r| r.kind() == "message.inbound"), 1);
    again.stop().await;
}

/// Issue 9, folders beyond INBOX and Sent: mail a server rule files in a
/// folder the operator listed is new mail of the mailbox (R3); a synced
/// message moved between watched folders keeps its ids, is reported once as
/// `message.updated` with its new folder and followed there, and is never
/// forwarded again (R21).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r03_mail_filed_in_a_listed_folder_syncs_and_a_move_between_watched_folders_is_followed() {
    let w = World::started().await;
    w.stack.create_folder(&w.me, "Clients").await;
    w.api
        .put_contact("L1", "c-ann", &w.ann.address, &["u1"])
        .await;
    let connect = |folders: serde_json::Value| {
        serde_json::json!({
            "email": w.me.address,
            "provider": "imap",
            "auth": {"type": "password", "username": w.me.address, "password": w.me.password},
            "imap": w.stack.imap_endpoint(),
            "smtp": w.stack.smtp_endpoint(),
            "folders": folders,
        })
    };
    let path = "/v1/locations/L1/users/u1/mailbox";
    let (status, refused) = w
        .api
        .send(
            reqwest::Method::PUT,
            path,
            Some(connect(serde_json::json!(["Clients", "No such folder"]))),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("folders[1]")),
        "the error names the field: {refused}"
    );
    // Trash is where a message is deleted, not filed: listing it would
    // report one delete twice.
    let (status, refused) = w
        .api
        .send(
            reqwest::Method::PUT,
            path,
            Some(connect(serde_json::json!(["Trash"]))),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("folders[0]") && m.contains("Trash")),
        "{refused}"
    );
    let (status, connected) = w
        .api
        .send(
            reqwest::Method::PUT,
            path,
            Some(connect(serde_json::json!(["Clients"]))),
        )
        .await;
    assert_eq!(status, 200, "{connected}");
    assert_eq!(connected["folders"], serde_json::json!(["Clients"]));
    w.api.wait_active("L1", "u1").await;

    let filed = support::stack::new_message_id("rule");
    w.stack
        .file_into(
            &w.me,
            "Clients",
            &support::stack::message(
                &w.ann.address,
                &w.me.address,
                "filed by a rule",
                &filed,
                None,
            ),
        )
        .await;
    let inbound = w
        .receiver
        .wait_for("the message filed by a rule", |r| {
            r.subject() == "filed by a rule"
        })
        .await;
    assert_eq!(inbound.kind(), "message.inbound");
    assert_eq!(inbound.data()["contact_id"], "c-ann");

    let (moved, synced) = w.mail_synced("moved to Clients").await;
    w.stack
        .move_message(&w.me, "INBOX", &moved, Some("Clients"))
        .await;
    let relocated = w
        .receiver
        .wait_for("the move to Clients", |r| {
            r.kind() == "message.updated"
                && r.data()["message_id"] == moved.as_str()
                && r.data()["folder"] == "Clients"
        })
        .await;
    assert_eq!(relocated.data()["id"], synced.data()["id"]);
    assert_eq!(relocated.data()["previous_folder"], "INBOX");

    // Followed in its new folder: a later change there is reported.
    w.stack
        .store_flags(&w.me, "Clients", &moved, "+FLAGS (\\Flagged)")
        .await;
    let starred = w
        .receiver
        .wait_for("the star in Clients", |r| {
            r.kind() == "message.updated"
                && r.data()["message_id"] == moved.as_str()
                && r.data()["flagged"] == true
        })
        .await;
    assert_eq!(starred.data()["folder"], "Clients");
    w.stack
        .store_flags(&w.me, "Clients", &filed, "+FLAGS (\\Seen)")
        .await;
    w.receiver
        .wait_for("the filed one read", |r| {
            r.kind() == "message.updated"
                && r.data()["message_id"] == filed.as_str()
                && r.data()["seen"] == true
        })
        .await;

    assert_eq!(
        w.receiver.distinct(|r| r.kind() == "message.inbound"),
        2,
        "the moved message was not forwarded again"
    );
    assert_eq!(
        w.receiver.distinct(|r| {
            r.kind() == "message.updated" && r.data()["message_id"] == moved.as_str()
        }),
        2,
        "the move was reported once, not by both folders"
    );
    w.daemon.stop().await;
}

/// What a server without some RFC 7162 extension reports, as `hidden`.
async fn reads_stars_archives_and_expunges_on_a_server_without(hidden: &[&str]) {
    let proxy = support::imap_proxy::ImapProxy::start(&support::stack::Stack::get()).await;
    proxy.hide_capabilities(hidden);
    let w = World::connected(serde_json::json!({"imap": proxy.endpoint()})).await;
    let (read, _) = w.mail_synced("read elsewhere").await;
    let (archived, _) = w.mail_synced("archived elsewhere").await;
    let (expunged, _) = w.mail_synced("expunged elsewhere").await;

    w.stack
        .store_flags(&w.me, "INBOX", &read, "+FLAGS (\\Seen \\Flagged)")
        .await;
    let updated = w
        .receiver
        .wait_for("the read one", |r| {
            r.kind() == "message.updated" && r.data()["message_id"] == read.as_str()
        })
        .await;
    assert_eq!(updated.data()["seen"], true);
    assert_eq!(updated.data()["flagged"], true);

    w.stack
        .move_message(&w.me, "INBOX", &archived, Some("Archive"))
        .await;
    let moved = w
        .receiver
        .wait_for("the archived one", |r| {
            r.kind() == "message.updated" && r.data()["message_id"] == archived.as_str()
        })
        .await;
    assert_eq!(moved.data()["folder"], "Archive");

    w.stack.move_message(&w.me, "INBOX", &expunged, None).await;
    let gone = w
        .receiver
        .wait_for("the expunged one", |r| {
            r.kind() == "message.deleted" && r.data()["message_id"] == expunged.as_str()
        })
        .await;
    assert!(gone.data()["folder"].is_null());

    // CRM → mailbox: a PATCH is not echoed back by the re-read flags, and a
    // DELETE without MOVE copies to Trash and expunges the original.
    let (crm, synced) = w.mail_synced("changed by the crm").await;
    let path = format!("/v1/messages/{}", synced.data()["id"].as_str().unwrap());
    let (status, body) = w
        .api
        .send(
            reqwest::Method::PATCH,
            &path,
            Some(serde_json::json!({"seen": true})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    support::eventually("\\Seen over IMAP", support::DEADLINE, async || {
        let flags = w.stack.flags_of(&w.me, "INBOX", &crm).await?;
        flags.iter().any(|f| f == "Seen").then_some(())
    })
    .await;
    let (status, body) = w.api.send(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 202, "{body}");
    support::eventually("the message in Trash only", support::DEADLINE, async || {
        let in_trash = w.stack.flags_of(&w.me, "Trash", &crm).await.is_some();
        let in_inbox = w.stack.flags_of(&w.me, "INBOX", &crm).await.is_some();
        (in_trash && !in_inbox).then_some(())
    })
    .await;
    // A later change is the next event: none came for the CRM's own.
    w.stack
        .store_flags(&w.me, "INBOX", &read, "-FLAGS (\\Flagged)")
        .await;
    w.receiver
        .wait_for("the later change", |r| {
            r.kind() == "message.updated"
                && r.data()["message_id"] == read.as_str()
                && r.data()["flagged"] == false
        })
        .await;
    assert_eq!(
        w.receiver
            .distinct(|r| matches!(r.kind(), "message.updated" | "message.deleted")),
        4,
        "one event per change, none for the CRM's"
    );
    w.daemon.stop().await;
}

/// Issue 9: a server with neither CONDSTORE nor QRESYNC nor MOVE still has
/// its changes reported (the latest synced messages' flags are read again
/// at each wake-up) and takes the CRM's DELETE (COPY, then UID EXPUNGE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_condstore_or_move_still_reports_and_takes_changes() {
    reads_stars_archives_and_expunges_on_a_server_without(&["CONDSTORE", "QRESYNC", "MOVE"]).await;
}

/// Issue 9: CONDSTORE without QRESYNC, as Gmail offers: flag changes by
/// HIGHESTMODSEQ, and messages gone from the folder found by asking whether
/// the latest synced ones are still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_condstore_but_no_qresync_still_reports_moves_and_deletes() {
    reads_stars_archives_and_expunges_on_a_server_without(&["QRESYNC"]).await;
}

/// Issue 9: a CRM send is followed in Sent once its copy is there: the CRM
/// can PATCH and DELETE it by the `data.id` of its `message.sent`, and a
/// change made in the mailbox is `message.updated` (never a message event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crm_send_is_followed_in_sent_both_ways() {
    let w = World::connected(serde_json::json!({})).await;
    let (status, accepted, _) = w
        .send(serde_json::json!({"contact_id": "c-ann", "subject": "sent by the crm", "text": "x"}))
        .await;
    assert_eq!(status, 202, "{accepted}");
    let record = accepted["id"].as_str().unwrap().to_string();
    let message_id = accepted["message_id"].as_str().unwrap().to_string();
    w.receiver
        .wait_for("message.sent", |r| r.kind() == "message.sent")
        .await;
    w.stack.wait_count(&w.me, "Sent", 1).await;
    // A second send, changed elsewhere at the end: the mark that the Sent
    // watcher has read everything before it.
    let (status, anchor, _) = w
        .send(serde_json::json!({"contact_id": "c-ann", "subject": "the later one", "text": "y"}))
        .await;
    assert_eq!(status, 202, "{anchor}");
    let anchor_record = anchor["id"].as_str().unwrap().to_string();
    let anchor_message_id = anchor["message_id"].as_str().unwrap().to_string();
    w.stack.wait_count(&w.me, "Sent", 2).await;

    // Followed once the Sent watcher has met its copy: until then the
    // CRM's PATCH finds nothing to change (404).
    let path = format!("/v1/messages/{record}");
    support::eventually(
        "the CRM send followed in Sent",
        support::DEADLINE,
        async || {
            let (status, _) = w
                .api
                .send(
                    reqwest::Method::PATCH,
                    &path,
                    Some(serde_json::json!({"seen": false})),
                )
                .await;
            (status == 202).then_some(())
        },
    )
    .await;
    support::eventually("\\Seen cleared over IMAP", support::DEADLINE, async || {
        let flags = w.stack.flags_of(&w.me, "Sent", &message_id).await?;
        (!flags.iter().any(|f| f == "Seen")).then_some(())
    })
    .await;

    // Another client stars it in Sent.
    w.stack
        .store_flags(&w.me, "Sent", &message_id, "+FLAGS (\\Flagged)")
        .await;
    let starred = w
        .receiver
        .wait_for("the star on the CRM send", |r| {
            r.kind() == "message.updated" && r.data()["id"] == record.as_str()
        })
        .await;
    assert_eq!(starred.data()["flagged"], true);
    assert_eq!(starred.data()["seen"], false);
    assert_eq!(starred.data()["folder"], "Sent");
    assert_eq!(starred.data()["contact_id"], "c-ann");
    assert_eq!(starred.data()["thread_id"], accepted["thread_id"]);

    let (status, body) = w.api.send(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 202, "{body}");
    support::eventually("the send in Trash", support::DEADLINE, async || {
        w.stack
            .flags_of(&w.me, "Trash", &message_id)
            .await
            .map(|_| ())
    })
    .await;
    assert!(w.stack.flags_of(&w.me, "Sent", &message_id).await.is_none());
    // Once a later change made elsewhere is reported, the move the CRM
    // asked for has been read too.
    support::eventually(
        "the later send followed in Sent",
        support::DEADLINE,
        async || {
            // Already \Seen: a change that changes nothing, answered 202
            // only once the watcher has met the copy.
            let (status, _) = w
                .api
                .send(
                    reqwest::Method::PATCH,
                    &format!("/v1/messages/{anchor_record}"),
                    Some(serde_json::json!({"seen": true})),
                )
                .await;
            (status == 202).then_some(())
        },
    )
    .await;
    w.stack
        .store_flags(&w.me, "Sent", &anchor_message_id, "+FLAGS (\\Flagged)")
        .await;
    w.receiver
        .wait_for("the star on the later send", |r| {
            r.kind() == "message.updated" && r.data()["id"] == anchor_record.as_str()
        })
        .await;
    assert_eq!(
        w.receiver.distinct(|r| r.data()["id"] == record.as_str()),
        2,
        "message.sent and the one change made elsewhere; nothing for the CRM's own, no message.outbound"
    );
    w.daemon.stop().await;
}

/// A flag change the server announces in its answer to another command (here
/// the check that synced messages are still there, on a server without
/// QRESYNC) is not lost: the watcher looks again before it goes back to IDLE,
/// where the server would not repeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_announced_in_the_answer_to_another_command_is_reported_at_once() {
    let proxy = support::imap_proxy::ImapProxy::start(&support::stack::Stack::get()).await;
    proxy.hide_capabilities(&["QRESYNC"]);
    read_while_held(&proxy, support::imap_proxy::ImapProxy::hold_next_search).await;
}

/// Another client reads a synced message while the watcher's next command
/// (the one `hold` names, in the look woken by new mail) is held: Dovecot
/// announces the change once, in its answer to that command, and the read
/// must be reported without waiting for IDLE's renewal.
async fn read_while_held(
    proxy: &support::imap_proxy::ImapProxy,
    hold: fn(&support::imap_proxy::ImapProxy) -> std::sync::Arc<tokio::sync::Notify>,
) {
    let w = World::connected(serde_json::json!({"imap": proxy.endpoint()})).await;
    let (read, _) = w.mail_synced("read while the bridge is busy").await;
    let release = hold(proxy);
    mail(&w.stack, &w.ann, &w.me, "wakes the watcher", None).await;
    support::eventually("the command to be held", support::DEADLINE, async || {
        proxy.holding().then_some(())
    })
    .await;
    w.stack
        .store_flags(&w.me, "INBOX", &read, "+FLAGS (\\Seen)")
        .await;
    release.notify_one();
    let updated = w
        .receiver
        .wait_for(
            "the read reported without waiting for IDLE's renewal",
            |r| r.kind() == "message.updated" && r.data()["message_id"] == read.as_str(),
        )
        .await;
    assert_eq!(updated.data()["seen"], true);
    w.daemon.stop().await;
}

/// Messages deleted together are looked for over one second session, not
/// one login each (a provider throttles bursts of logins).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_deleted_together_are_looked_for_over_one_session() {
    let proxy = support::imap_proxy::ImapProxy::start(&support::stack::Stack::get()).await;
    let w = World::connected(serde_json::json!({"imap": proxy.endpoint()})).await;
    for n in 0..5 {
        w.mail_synced(&format!("deleted together #{n}")).await;
    }
    let (_, logins_before) = proxy.counts();
    w.stack.delete_all(&w.me, "INBOX").await;
    w.receiver
        .wait_for_count("five message.deleted", 5, |r| r.kind() == "message.deleted")
        .await;
    let (_, logins_after) = proxy.counts();
    assert!(
        logins_after - logins_before <= 2,
        "{} logins to look for 5 messages",
        logins_after - logins_before
    );
    w.daemon.stop().await;
}

/// A flag change the server announces in its answer to the listing of new
/// mail (a FETCH with FLAGS the listing did not ask for) is read before the
/// session goes back to IDLE, where the server would not repeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_announced_in_the_listing_of_new_mail_is_reported_at_once() {
    let proxy = support::imap_proxy::ImapProxy::start(&support::stack::Stack::get()).await;
    read_while_held(&proxy, support::imap_proxy::ImapProxy::hold_next_listing).await;
}

/// Issue 21 item 5: CRM → mailbox changes are queued per mailbox. 200
/// changes for a mailbox whose server took the connection and went silent
/// (a black-holed host) do not hold up another mailbox's change: it is made
/// within 5 s, though each of those sessions hangs for the step timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_for_a_silent_server_do_not_hold_up_another_mailboxs() {
    let w = World::connected(serde_json::json!({})).await;
    let proxy = support::cutting_proxy::CuttingProxy::start(w.stack.imaps_port).await;
    let far = w.stack.new_user("far").await;
    w.api
        .put_contact("L1", "c-ann", &w.ann.address, &["u1", "u2"])
        .await;
    w.api
        .connect_with(
            "L1",
            "u2",
            &w.stack,
            &far,
            serde_json::json!({"imap": proxy.tls_endpoint()}),
        )
        .await;
    w.api.wait_active("L1", "u2").await;
    mail(&w.stack, &w.ann, &far, "behind a black hole", None).await;
    let far_record = w
        .receiver
        .wait_for("the far mailbox's message", |r| {
            r.subject() == "behind a black hole"
        })
        .await
        .data()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (near_id, near) = w.mail_synced("on a healthy server").await;
    let near_record = near.data()["id"].as_str().unwrap().to_string();

    proxy.go_silent();
    for i in 0..200 {
        let (status, body) = w
            .api
            .send(
                reqwest::Method::PATCH,
                &format!("/v1/messages/{far_record}"),
                Some(serde_json::json!({"flagged": i % 2 == 0})),
            )
            .await;
        assert_eq!(status, 202, "{body}");
    }
    // The far mailbox's change pass is stuck on the silent server.
    support::eventually(
        "a session taken by the silent server",
        support::DEADLINE,
        async || (proxy.held() > 0).then_some(()),
    )
    .await;

    let (status, body) = w
        .api
        .send(
            reqwest::Method::PATCH,
            &format!("/v1/messages/{near_record}"),
            Some(serde_json::json!({"seen": true})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let asked = std::time::Instant::now();
    support::eventually(
        "the healthy mailbox's change, within 5 s",
        std::time::Duration::from_secs(5),
        async || {
            let flags = w
                .stack
                .flags_of(&w.me, "INBOX", &near_id)
                .await
                .unwrap_or_default();
            flags.iter().any(|f| f == "Seen").then_some(())
        },
    )
    .await;
    eprintln!(
        "the healthy mailbox's change was made {:?} after it was asked for",
        asked.elapsed()
    );
    w.daemon.stop().await;
}
