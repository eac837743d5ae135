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
