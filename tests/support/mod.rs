//! What the integration tests share: the real mail stack (users created per
//! test), a webhook receiver on port 0 that records and verifies what arrives,
//! and the real daemon started in-process or as a child process.
#![allow(dead_code)]

pub mod child;
pub mod cutting_proxy;
pub mod daemon;
pub mod imap_proxy;
pub mod oauth;
pub mod receiver;
pub mod scripted_gmail;
pub mod scripted_smtp;
pub mod stack;
pub mod world;

use std::time::Duration;

/// How long a test waits for an event before it fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Waits until `check` returns `Some`, polling a cheap local condition; fails
/// the test with `what` after `deadline`.
pub async fn eventually<T>(
    what: &str,
    deadline: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
