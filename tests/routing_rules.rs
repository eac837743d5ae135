//! The routing rules end to end, against the real stack: who a message is
//! forwarded to when several contacts, locations and users are involved
//! (R7, R8, R10, R11, R12, R13).

mod support;

use reqwest::Method;
use support::{
    stack::{message, new_message_id},
    world::{World, mail},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r07_r08_a_ccd_contact_is_named_in_contact_ids_and_nothing_is_created() {
    let w = World::connected(serde_json::json!({})).await;
    let bob = w.stack.new_user("bob").await;
    w.api
        .put_contact("L1", "c-bob", &bob.address, &["u1"])
        .await;
    let raw = format!(
        "From: {ann}\r\nTo: {me}\r\nCc: {bob}, eve@elsewhere.test\r\nSubject: with bob in cc\r\n\
         Message-ID: {id}\r\nDate: {date}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nhi\r\n",
        ann = w.ann.address,
        me = w.me.address,
        bob = bob.address,
        id = new_message_id("cc"),
        date = chrono::Utc::now().to_rfc2822(),
    );
    w.stack
        .deliver(&w.ann.address, &[&w.me.address], raw.as_bytes())
        .await;
    let event = w
        .receiver
        .wait_for("the message", |r| r.subject() == "with bob in cc")
        .await;
    assert_eq!(event.data()["contact_id"], "c-ann");
    assert_eq!(
        event.data()["contact_ids"],
        serde_json::json!(["c-ann", "c-bob"])
    );
    assert_eq!(w.receiver.distinct(|r| r.kind() == "contact.created"), 0);
    w.daemon.stop().await;
}

/// One mailbox in two locations, ann a contact in both: her mail fans out
/// (R11); a CRM reply from L1 pins the thread there and L2 is told (R13);
/// her answer and later changes then reach L1 only; L2 can no longer reply
/// into it (R12).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r11_r12_r13_fan_out_then_a_crm_reply_pins_the_thread_and_the_other_location_is_detached() {
    let w = World::connected(serde_json::json!({})).await;
    w.api
        .put_contact("L2", "c-ann-l2", &w.ann.address, &["u2"])
        .await;
    w.api.connect("L2", "u2", &w.stack, &w.me).await;
    w.api.wait_active("L2", "u2").await;

    let first = mail(&w.stack, &w.ann, &w.me, "to both locations", None).await;
    let arrived = w
        .receiver
        .wait_for_count("the fan-out", 2, |r| r.subject() == "to both locations")
        .await;
    let mut locations: Vec<String> = arrived
        .iter()
        .map(|r| r.data()["location_id"].as_str().unwrap().to_string())
        .collect();
    locations.sort();
    assert_eq!(locations, ["L1", "L2"]);
    let thread_id = arrived[0].data()["thread_id"].as_str().unwrap().to_string();
    assert_eq!(arrived[1].data()["thread_id"], thread_id.as_str());

    let (status, reply, _) = w
        .send(serde_json::json!({"contact_id": "c-ann", "reply_to": thread_id, "text": "from L1"}))
        .await;
    assert_eq!(status, 202, "{reply}");
    let detached = w
        .receiver
        .wait_for("thread.detached", |r| r.kind() == "thread.detached")
        .await;
    assert_eq!(detached.data()["thread_id"], thread_id.as_str());
    assert_eq!(detached.data()["location_id"], "L2");
    assert_eq!(detached.data()["pinned_to_location_id"], "L1");

    // L2 may not take the thread back (R12).
    let (status, refused, _) = w
        .api
        .send_message(
            "L2",
            "u2",
            serde_json::json!({"contact_id": "c-ann-l2", "reply_to": thread_id, "text": "from L2"}),
            None,
        )
        .await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "thread_in_other_location");

    let answer = mail(
        &w.stack,
        &w.ann,
        &w.me,
        "Re: to both locations",
        Some(&first),
    )
    .await;
    let answered = w
        .receiver
        .wait_for("ann's answer", |r| {
            r.data()["message_id"] == answer.as_str()
        })
        .await;
    assert_eq!(answered.data()["location_id"], "L1");
    assert_eq!(answered.data()["thread_id"], thread_id.as_str());
    // A later message through L2's own conversation is decided after it (UID order).
    let marker = mail(&w.stack, &w.ann, &w.me, "a new thread", None).await;
    w.receiver
        .wait_for_count("the marker in both", 2, |r| {
            r.data()["message_id"] == marker.as_str()
        })
        .await;
    assert_eq!(
        w.receiver
            .distinct(|r| r.data()["message_id"] == answer.as_str()),
        1,
        "L2 no longer receives the pinned thread"
    );
    // Nor its changes (issue 21): the first message starred elsewhere is
    // reported to L1 only. The marker, starred after it, is reported to
    // both: once its two updates are in, the first's were decided.
    w.stack
        .store_flags(&w.me, "INBOX", &first, "+FLAGS (\\Flagged)")
        .await;
    w.stack
        .store_flags(&w.me, "INBOX", &marker, "+FLAGS (\\Flagged)")
        .await;
    w.receiver
        .wait_for_count("the marker's change in both", 2, |r| {
            r.kind() == "message.updated" && r.data()["message_id"] == marker.as_str()
        })
        .await;
    let changed: Vec<String> = w
        .receiver
        .accepted()
        .iter()
        .filter(|r| r.kind() == "message.updated" && r.data()["message_id"] == first.as_str())
        .map(|r| r.data()["location_id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(changed, ["L1"], "the pinned thread's changes reach L1 only");
    w.daemon.stop().await;
}

/// R10: the CRM re-upserts the earlier of two duplicates without its
/// creation time (a name change); the conversation stays with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r10_the_first_created_duplicate_keeps_the_conversation_across_a_re_upsert() {
    let w = World::started().await;
    let put = |id: &'static str, body: serde_json::Value| {
        let api = &w.api;
        async move {
            let (status, stored) = api
                .send(
                    Method::PUT,
                    &format!("/v1/locations/L1/contacts/{id}"),
                    Some(body),
                )
                .await;
            assert_eq!(status, 200, "{stored}");
            stored
        }
    };
    put(
        "c-older",
        serde_json::json!({"emails": [w.ann.address], "assigned_user_ids": ["u1"], "created_at": "2026-01-01T00:00:00Z"}),
    )
    .await;
    put(
        "c-newer",
        serde_json::json!({"emails": [w.ann.address], "assigned_user_ids": ["u1"], "created_at": "2026-06-01T00:00:00Z"}),
    )
    .await;
    // A name change that does not repeat created_at.
    let stored = put(
        "c-older",
        serde_json::json!({"emails": [w.ann.address], "name": "Ann Renamed", "assigned_user_ids": ["u1"]}),
    )
    .await;
    assert_eq!(stored["created_at"], "2026-01-01T00:00:00Z");
    w.api.connect("L1", "u1", &w.stack, &w.me).await;
    w.api.wait_active("L1", "u1").await;
    w.stack
        .deliver(
            &w.ann.address,
            &[&w.me.address],
            &message(
                &w.ann.address,
                &w.me.address,
                "which ann",
                &new_message_id("dup"),
                None,
            ),
        )
        .await;
    let event = w
        .receiver
        .wait_for("ann's message", |r| r.subject() == "which ann")
        .await;
    assert_eq!(event.data()["contact_id"], "c-older");
    w.daemon.stop().await;
}
