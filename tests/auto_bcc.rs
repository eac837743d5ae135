//! Auto BCC (R15) against the real stack: mail the user sends from any
//! client with the integration's smart address on it is logged in the CRM,
//! its To recipients created as contacts.

mod support;

use reqwest::Method;
use support::{stack::new_message_id, world::World};

/// A message as the user's own client files it in Sent (Gmail keeps Bcc there).
fn sent_copy(from: &str, to: &str, to_name: &str, bcc: &str, subject: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: \"{to_name}\" <{to}>\r\nBcc: {bcc}\r\nSubject: {subject}\r\n\
         Message-ID: {id}\r\nDate: {date}\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\nHello {to_name}\r\n",
        id = new_message_id("bcc"),
        date = chrono::Utc::now().to_rfc2822(),
    )
    .into_bytes()
}

async fn smart_address(w: &World) -> String {
    let (status, body) = w
        .api
        .send(Method::GET, "/v1/locations/L1/users/u1/mailbox", None)
        .await;
    assert_eq!(status, 200, "{body}");
    body["smart_bcc_address"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r15_door_1_mail_sent_from_the_mailbox_with_the_smart_address_creates_the_contact_and_logs_it()
 {
    let w = World::connected(serde_json::json!({})).await;
    let smart = smart_address(&w).await;
    let stranger = "nora.new@elsewhere.test";
    w.stack
        .append_sent(
            &w.me,
            &sent_copy(&w.me.address, stranger, "Nora New", &smart, "first contact"),
        )
        .await;
    let logged = w
        .receiver
        .wait_for("the logged message", |r| r.subject() == "first contact")
        .await;
    assert_eq!(logged.kind(), "message.outbound");
    assert_eq!(logged.data()["origin"], "auto_bcc");
    let contact_id = logged.data()["contact_id"].as_str().unwrap().to_string();

    let created: Vec<_> = w
        .receiver
        .accepted()
        .into_iter()
        .filter(|r| r.kind() == "contact.created")
        .collect();
    assert_eq!(created.len(), 1, "one contact created: {created:?}");
    let data = created[0].data();
    assert_eq!(data["id"], contact_id.as_str());
    assert_eq!(data["location_id"], "L1");
    assert_eq!(data["emails"], serde_json::json!([stranger]));
    assert_eq!(data["name"], "Nora New");
    assert_eq!(data["assigned_user_ids"], serde_json::json!(["u1"]));
    assert_eq!(data["origin"], "auto_bcc");
    assert!(data["created_at"].is_string());
    let order: Vec<String> = w
        .receiver
        .accepted()
        .iter()
        .map(|r| r.kind().to_string())
        .collect();
    let created_at = order.iter().position(|k| k == "contact.created").unwrap();
    let logged_at = order.iter().position(|k| k == "message.outbound").unwrap();
    assert!(
        created_at < logged_at,
        "the contact arrives first: {order:?}"
    );

    // The CRM's directory has the contact, and its replies now sync (R3).
    let (status, stored) = w
        .api
        .send(
            Method::GET,
            &format!("/v1/locations/L1/contacts/{contact_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!(stored["emails"], serde_json::json!([stranger]));

    // The smart address is the same on every look, and after a restart.
    assert_eq!(smart_address(&w).await, smart);
    w.daemon.stop().await;
}

/// The operator's catch-all, connected through the API; its address's
/// `+detail` carries the tokens (the stack's Postfix keeps it in the
/// envelope, Dovecot files it in INBOX).
async fn with_catch_all() -> (World, support::stack::User) {
    let stack = support::stack::Stack::get();
    let catch_all = stack.new_user("catchall").await;
    let (local, domain) = catch_all.address.split_once('@').unwrap();
    let template = format!("{local}+{{token}}@{domain}");
    let w = World::started_with(|config| config.auto_bcc.address = Some(template)).await;
    w.api
        .put_contact("L1", "c-ann", &w.ann.address, &["u1"])
        .await;
    let (status, body) = w
        .api
        .send(
            Method::PUT,
            "/v1/auto-bcc/mailbox",
            Some(serde_json::json!({
                "email": catch_all.address,
                "provider": "imap",
                "auth": {"type": "password", "username": catch_all.address, "password": catch_all.password},
                "imap": w.stack.imap_endpoint(),
                "smtp": w.stack.smtp_endpoint(),
            })),
        )
        .await;
    assert_eq!(status, 200, "connect the catch-all: {body}");
    support::eventually("the catch-all active", support::DEADLINE, async || {
        let (_, body) = w.api.send(Method::GET, "/v1/auto-bcc/mailbox", None).await;
        (body["state"] == "active").then_some(())
    })
    .await;
    (w, catch_all)
}

/// Mail the user sends from their own client (not connected here), Bcc'd
/// to the smart address: only the catch-all sees it.
async fn send_from_client(w: &World, to: &str, bcc: &str, subject: &str) {
    let raw = format!(
        "From: {me}\r\nTo: \"Nora New\" <{to}>\r\nSubject: {subject}\r\nMessage-ID: {id}\r\n\
         Date: {date}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nHi\r\n",
        me = w.me.address,
        id = new_message_id("door2"),
        date = chrono::Utc::now().to_rfc2822(),
    );
    w.stack.submit(&w.me, &[to, bcc], raw.as_bytes()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r15_door_2_the_catch_all_logs_mail_bcc_to_a_smart_address_and_a_forged_one_logs_nothing() {
    let (w, catch_all) = with_catch_all().await;
    let (status, body) = w
        .api
        .send(Method::GET, "/v1/locations/L1/users/u1/auto-bcc", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let smart = body["address"].as_str().unwrap().to_string();
    let (local, domain) = catch_all.address.split_once('@').unwrap();
    assert!(
        smart.starts_with(&format!("{local}+")) && smart.ends_with(domain),
        "{smart}"
    );
    // The user's own address, so the catch-all knows their mail from a
    // contact's reply-all that kept the smart address in Cc.
    let (status, body) = w
        .api
        .send(
            Method::PUT,
            "/v1/locations/L1/users/u1/auto-bcc",
            Some(serde_json::json!({"senders": [w.me.address]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["senders"], serde_json::json!([w.me.address]));
    let reply_all = format!(
        "From: {ann}\r\nTo: {me}\r\nCc: {smart}\r\nSubject: reply-all\r\nMessage-ID: {id}\r\n\
         Date: {date}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nthanks\r\n",
        ann = w.ann.address,
        me = w.me.address,
        id = new_message_id("reply-all"),
        date = chrono::Utc::now().to_rfc2822(),
    );
    w.stack
        .submit(&w.ann, &[&w.me.address, &smart], reply_all.as_bytes())
        .await;
    w.stack.wait_count(&catch_all, "INBOX", 1).await;

    // A token of the right shape that the bridge never handed out.
    let forged = format!("{local}+aaaaaaaaaaaaaaaa@{domain}");
    send_from_client(&w, "nora.new@elsewhere.test", &forged, "forged").await;
    w.stack.wait_count(&catch_all, "INBOX", 2).await;
    send_from_client(
        &w,
        "nora.new@elsewhere.test",
        &smart,
        "logged by the catch-all",
    )
    .await;
    let logged = w
        .receiver
        .wait_for("the logged message", |r| {
            r.subject() == "logged by the catch-all"
        })
        .await;
    assert_eq!(logged.kind(), "message.outbound");
    assert_eq!(logged.data()["origin"], "auto_bcc");
    assert_eq!(logged.data()["location_id"], "L1");
    assert_eq!(logged.data()["user_id"], "u1");
    let created = w
        .receiver
        .wait_for("contact.created", |r| r.kind() == "contact.created")
        .await;
    assert_eq!(created.data()["id"], logged.data()["contact_id"]);
    assert_eq!(
        created.data()["emails"],
        serde_json::json!(["nora.new@elsewhere.test"])
    );
    assert_eq!(
        created.data()["assigned_user_ids"],
        serde_json::json!(["u1"])
    );
    // The reply-all and the forged one came first (UID order) and were decided by now.
    assert_eq!(w.receiver.distinct(|r| r.subject() == "forged"), 0);
    assert_eq!(w.receiver.distinct(|r| r.subject() == "reply-all"), 0);
    assert_eq!(w.receiver.distinct(|r| r.kind() == "contact.created"), 1);
    w.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r15_one_message_seen_by_both_doors_is_logged_once() {
    let (w, _catch_all) = with_catch_all().await;
    w.api.connect("L1", "u1", &w.stack, &w.me).await;
    w.api.wait_active("L1", "u1").await;
    let smart = smart_address(&w).await;
    // The user's client submits it (the catch-all gets its copy) and files
    // it in Sent with the Bcc (door 1 sees it there).
    let raw = sent_copy(
        &w.me.address,
        "nora.new@elsewhere.test",
        "Nora New",
        &smart,
        "both doors",
    );
    w.stack
        .submit(&w.me, &["nora.new@elsewhere.test", &smart], &raw)
        .await;
    w.stack.append_sent(&w.me, &raw).await;
    w.receiver
        .wait_for("the logged message", |r| r.subject() == "both doors")
        .await;
    // Each door reads its mail in order: once a later message through each
    // door alone is in, both have decided their copy of the first.
    let through_sent = sent_copy(
        &w.me.address,
        "nora.new@elsewhere.test",
        "Nora New",
        &smart,
        "marker through Sent",
    );
    w.stack.append_sent(&w.me, &through_sent).await;
    let through_catch_all = sent_copy(
        &w.me.address,
        "nora.new@elsewhere.test",
        "Nora New",
        &smart,
        "marker through the catch-all",
    );
    w.stack
        .submit(
            &w.me,
            &["nora.new@elsewhere.test", &smart],
            &through_catch_all,
        )
        .await;
    for marker in ["marker through Sent", "marker through the catch-all"] {
        w.receiver.wait_for(marker, |r| r.subject() == marker).await;
    }
    assert_eq!(
        w.receiver.distinct(|r| r.subject() == "both doors"),
        1,
        "logged once"
    );
    assert_eq!(
        w.receiver.distinct(|r| r.kind() == "contact.created"),
        1,
        "the contact is created once"
    );
    w.daemon.stop().await;
}
