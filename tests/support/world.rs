//! The usual test setting: the real daemon on port 0 with its own data folder,
//! a webhook receiver, and (for `connected`) two fresh mailboxes — the user's
//! `me`, connected as user u1 of location L1, and `ann`, a contact (c-ann)
//! assigned to u1.

use super::{
    daemon::{Api, Daemon, test_config},
    receiver::Receiver,
    stack::{Stack, User, message, new_message_id},
};

pub struct World {
    pub stack: Stack,
    pub receiver: Receiver,
    pub daemon: Daemon,
    pub api: Api,
    pub me: User,
    pub ann: User,
    pub _data: tempfile::TempDir,
}

impl World {
    /// The daemon and two fresh mailboxes; nothing connected yet.
    pub async fn started() -> World {
        World::started_with(|_| {}).await
    }

    /// As `started`, with the test configuration changed by `configure` first.
    pub async fn started_with(configure: impl FnOnce(&mut mailbridge::config::Config)) -> World {
        let stack = Stack::get();
        let receiver = Receiver::start().await;
        let data = tempfile::tempdir().unwrap();
        let mut config = test_config(data.path(), &stack, &receiver);
        configure(&mut config);
        let daemon = Daemon::start(config).await;
        let api = Api::new(&daemon.base);
        let me = stack.new_user("me").await;
        let ann = stack.new_user("ann").await;
        World {
            stack,
            receiver,
            daemon,
            api,
            me,
            ann,
            _data: data,
        }
    }

    /// As `started`, with ann a contact of L1 assigned to u1 and me connected
    /// as u1's mailbox (`extra` is merged into the connect request).
    pub async fn connected(extra: serde_json::Value) -> World {
        World::connected_with(|_| {}, extra).await
    }

    /// As `connected`, with the test configuration changed by `configure` first.
    pub async fn connected_with(
        configure: impl FnOnce(&mut mailbridge::config::Config),
        extra: serde_json::Value,
    ) -> World {
        let world = World::started_with(configure).await;
        world
            .api
            .put_contact("L1", "c-ann", &world.ann.address, &["u1"])
            .await;
        world
            .api
            .connect_with("L1", "u1", &world.stack, &world.me, extra)
            .await;
        world.api.wait_active("L1", "u1").await;
        world
    }
}

impl World {
    /// A CRM send as u1 of L1: status, body and Retry-After.
    pub async fn send(&self, body: serde_json::Value) -> (u16, serde_json::Value, Option<String>) {
        self.api.send_message("L1", "u1", body, None).await
    }

    pub async fn send_with_key(
        &self,
        body: serde_json::Value,
        key: &str,
    ) -> (u16, serde_json::Value, Option<String>) {
        self.api.send_message("L1", "u1", body, Some(key)).await
    }

    /// Ann mails me; returns the Message-ID and the event it was forwarded as.
    pub async fn mail_synced(&self, subject: &str) -> (String, super::receiver::Received) {
        let id = mail(&self.stack, &self.ann, &self.me, subject, None).await;
        let event = self
            .receiver
            .wait_for(subject, |r| r.subject() == subject)
            .await;
        (id, event)
    }
}

/// Delivers a message from `from` to `to` through the MX; returns its Message-ID.
pub async fn mail(
    stack: &Stack,
    from: &User,
    to: &User,
    subject: &str,
    in_reply_to: Option<&str>,
) -> String {
    let id = new_message_id("t");
    stack
        .deliver(
            &from.address,
            &[&to.address],
            &message(&from.address, &to.address, subject, &id, in_reply_to),
        )
        .await;
    id
}
