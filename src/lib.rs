//! mailbridge: two-way sync between users' own mailboxes and a CRM.
//!
//! Data flows inward: `imap` fetches, `mime` parses, `routing` (pure) decides,
//! `ingest` commits to `store`, `webhook` delivers. `api` serves the CRM;
//! `daemon::run` wires it all together.

pub mod api;
pub mod auth;
pub mod backoff;
pub mod compose;
pub mod config;
pub mod daemon;
pub mod egress;
pub mod event_data;
pub mod imap;
pub mod ingest;
pub mod mailbox_changes;
pub mod memory_budget;
pub mod mime;
pub mod model;
#[cfg(test)]
mod mutation;
pub mod oauth;
pub mod offload;
pub mod panics;
pub mod routing;
pub mod scheduler;
pub mod send_queue;
pub mod smart_address;
pub mod smtp;
pub mod store;
pub mod supervise;
pub mod sync_status;
pub mod tls;
pub mod wakeup;
pub mod webhook;

pub use daemon::run;
