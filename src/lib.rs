//! mailbridge: two-way sync between users' own mailboxes and a CRM.
//!
//! Data flows inward: `imap` fetches, `mime` parses, `routing` (pure) decides,
//! `ingest` commits to `store`, `webhook` delivers. `api` serves the CRM.

pub mod backoff;
pub mod config;
pub mod mime;
pub mod model;
pub mod routing;
pub mod store;
pub mod webhook;
