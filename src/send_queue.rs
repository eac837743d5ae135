//! The durable queue of CRM sends: submits each over SMTP from the user's own
//! mailbox at most once, retries what a retry can fix, files the copy in Sent
//! where the server does not, and reports `message.sent` / `message.failed`.
//!
//! At most once (R21): a send is marked `submitting` (flushed) before the SMTP
//! transaction and `sent` right after the server's 250. A stop between those
//! two leaves it `submitting`; on restart it is settled by looking for it in
//! Sent: found → sent; not found → failed as "interrupted", never submitted
//! again. The window is the time between the server's 250 and the flush
//! (about a millisecond); in it a message that did leave can be reported
//! failed on a server where the bridge files Sent itself, but never sent twice.
//!
//! Every SMTP step has a deadline (`smtp`). A failure before the message was
//! handed over is retried; after it (no verdict), the outcome is unknown.
//! Where the server files Sent itself, the send stays `submitting` and its
//! copy is looked for in Sent now and again later ([`OUTCOME_CHECKS`] times,
//! spaced like retries: a server may file it late, a look-up may fail); found
//! → sent. Otherwise, and where the bridge files Sent itself (nothing can
//! tell), it is reported failed as "outcome unknown", never submitted again.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use chrono::Utc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{Auth, AuthError, SignIn},
    backoff,
    event_data::{self, MessageFailed, MessageSent, SentStatus},
    imap::ConnectError,
    imap::{ImapConnector, checked, connection::ImapSession, folders},
    model::{Event, Login, Mailbox, MailboxState, SendRecord, SendStatus},
    smtp::{SubmitError, Submitter},
    store::{SourceCopy, Store, StoreResult},
    webhook::OutboxSignal,
};

/// A transient failure is retried this long before the send fails for good.
const RETRY_FOR: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// Wakes the send queue when a send was accepted.
pub type SendSignal = crate::wakeup::Wakeup;

#[derive(Clone)]
pub struct SendQueue {
    pub store: Arc<dyn Store>,
    /// Shared with the watchers: bounds the message bytes held at once.
    pub memory: crate::memory_budget::MemoryBudget,
    pub submitter: Submitter,
    pub connector: ImapConnector,
    /// Signs in to the mailbox's servers and records `needs_reauth`.
    pub auth: Arc<Auth>,
    pub outbox: OutboxSignal,
    pub signal: SendSignal,
    pub retry_min: Duration,
    pub retry_max: Duration,
}

/// How often the copy of a send handed over without a verdict is looked for
/// in Sent before the send is reported failed as "outcome unknown".
pub const OUTCOME_CHECKS: u32 = 6;

/// How long a submitted send's outcome is offered to a store that refuses it.
const KNOWN_OUTCOME_PATIENCE: Duration = Duration::from_secs(300);

/// A send's copy found in the Sent folder.
struct SentCopy {
    message_id: Option<String>,
}

/// About the size of a send's source: attachments grow by a third in
/// base64, the text parts may be there twice (plain and HTML), plus headers.
fn source_size_estimate(send: &SendRecord) -> u64 {
    let attachments: u64 = send.data.attachments.iter().map(|a| a.size as u64).sum();
    let text = send.data.text.as_ref().map_or(0, String::len) as u64;
    let html = send.data.html.as_ref().map_or(0, String::len) as u64;
    attachments * 4 / 3 + (text + html) * 2 + 16 * 1024
}

/// The send tasks under way, one at most per mailbox. A task that panics
/// frees its own mailbox only: clearing every mark would let a second send
/// of another mailbox start beside its first (a double APPEND, two
/// `message.sent`).
#[derive(Default)]
struct InFlight {
    tasks: JoinSet<()>,
    mailbox_of: HashMap<tokio::task::Id, String>,
    busy: HashSet<String>,
}

impl InFlight {
    fn is_busy(&self, mailbox: &str) -> bool {
        self.busy.contains(mailbox)
    }

    fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    fn start(&mut self, mailbox: String, task: impl Future<Output = ()> + Send + 'static) {
        let id = self.tasks.spawn(task).id();
        self.busy.insert(mailbox.clone());
        self.mailbox_of.insert(id, mailbox);
    }

    /// Waits for a task to end and frees its mailbox; `None` when none runs.
    async fn next_done(&mut self) -> Option<()> {
        let id = match self.tasks.join_next_with_id().await? {
            Ok((id, ())) => id,
            Err(err) => {
                tracing::error!("a send attempt crashed: {err}");
                err.id()
            }
        };
        if let Some(mailbox) = self.mailbox_of.remove(&id) {
            self.busy.remove(&mailbox);
        }
        Some(())
    }
}

impl SendQueue {
    pub async fn run(self, shutdown: CancellationToken) {
        match self.store.unsettled_sends() {
            Ok(sends) => {
                // Those awaiting a look-up for an unknown outcome are due in
                // their turn (start_due).
                for send in sends
                    .into_iter()
                    .filter(|s| s.status == SendStatus::Submitting && s.outcome_checks == 0)
                {
                    self.settle_interrupted(send).await;
                }
            }
            Err(err) => tracing::error!("reading the send queue failed: {err:#}"),
        }
        let mut in_flight = InFlight::default();
        loop {
            let next_due = match self.start_due(&mut in_flight) {
                Ok(next) => next,
                Err(err) => {
                    tracing::error!("reading the send queue failed: {err:#}");
                    Some(Duration::from_secs(1))
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.signal.notified() => {}
                Some(()) = in_flight.next_done(), if !in_flight.is_empty() => {}
                _ = tokio::time::sleep(next_due.unwrap_or(Duration::from_secs(3600))) => {}
            }
        }
        // A submission under way is finished and recorded, never abandoned midway.
        while in_flight.next_done().await.is_some() {}
    }

    /// Starts due sends, one at a time per mailbox; returns when the next retry is due.
    fn start_due(&self, in_flight: &mut InFlight) -> StoreResult<Option<Duration>> {
        let now = Utc::now().timestamp_millis();
        let mut next_due: Option<i64> = None;
        for send in self.store.unsettled_sends()? {
            if in_flight.is_busy(&send.mailbox) {
                continue;
            }
            let filing = send.awaits_filing();
            let checking = send.status == SendStatus::Submitting && send.outcome_checks > 0;
            // `submitting` with nothing under way for its mailbox: its task
            // ended before recording the outcome (a panic, a store error
            // after the claim), so it is settled as a stop mid-submission is.
            let interrupted = send.status == SendStatus::Submitting && send.outcome_checks == 0;
            if !(send.status == SendStatus::Queued || filing || checking || interrupted) {
                continue;
            }
            if send.next_attempt_ms > now {
                next_due =
                    Some(next_due.map_or(send.next_attempt_ms, |d| d.min(send.next_attempt_ms)));
                continue;
            }
            let queue = self.clone();
            in_flight.start(send.mailbox.clone(), async move {
                let _held = queue.memory.reserve(source_size_estimate(&send)).await;
                if filing {
                    queue.retry_filing(send).await;
                } else if checking {
                    queue.check_outcome(send).await;
                } else if interrupted {
                    queue.settle_interrupted(send).await;
                } else {
                    queue.attempt(send).await;
                }
            });
        }
        Ok(next_due.map(|due| Duration::from_millis(u64::try_from(due - now).unwrap_or(0))))
    }

    fn record(&self, send: &SendRecord, events: &[Event]) {
        if let Err(err) = self.store.update_send(send, events) {
            tracing::error!(send = %send.id, "recording the send's state failed: {err:#}");
        }
        if !events.is_empty() {
            self.outbox.notify();
        }
    }

    /// Records an outcome only this task knows (the server's 250): a store
    /// that refuses it now (a database restarting) is asked again, for up
    /// to [`KNOWN_OUTCOME_PATIENCE`], rather than leaving the send
    /// `submitting`, which a later pass would settle as interrupted (failed
    /// where the bridge files Sent itself) though it was sent. A write that
    /// went through but answered an error is not written twice: the stored
    /// send already has the status.
    async fn record_known_outcome(&self, send: &SendRecord, events: &[Event]) {
        let started = std::time::Instant::now();
        let mut wait = self.retry_min;
        loop {
            let err = match self.store.update_send(send, events) {
                Ok(()) => break,
                Err(err) => err,
            };
            if matches!(self.store.send(&send.id), Ok(Some(stored)) if stored.status == send.status)
            {
                break;
            }
            if started.elapsed() >= KNOWN_OUTCOME_PATIENCE {
                tracing::error!(send = %send.id, "recording the send's outcome failed for {KNOWN_OUTCOME_PATIENCE:?}; a restart settles it from Sent: {err:#}");
                return;
            }
            tracing::warn!(send = %send.id, "recording the send's outcome failed, trying again in {wait:?}: {err:#}");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(self.retry_max);
        }
        if !events.is_empty() {
            self.outbox.notify();
        }
    }

    fn fail(&self, mut send: SendRecord, error: String) {
        tracing::warn!(send = %send.id, mailbox = %send.mailbox, "send failed: {error}");
        metrics::counter!("mailbridge_sends_failed_total").increment(1);
        let event = failed(&mut send, error);
        self.record(&send, &[event]);
    }

    fn sent_event(send: &SendRecord) -> Event {
        let data = MessageSent {
            message: send.data.clone(),
            status: SentStatus::Sent,
            smtp_response: send.smtp_response.clone(),
        };
        event_data::event("message.sent", &send.thread_id, Utc::now(), &data)
    }

    async fn attempt(&self, mut send: SendRecord) {
        let mailbox = match self.store.mailbox(&send.mailbox) {
            Ok(Some(mailbox)) => mailbox,
            Ok(None) => {
                return self.fail(
                    send,
                    "the mailbox was disconnected before the message could be sent".into(),
                );
            }
            Err(err) => {
                tracing::error!(send = %send.id, "loading the mailbox failed: {err:#}");
                return;
            }
        };
        if mailbox.state == MailboxState::NeedsReauth {
            return self.fail(
                send,
                "the mailbox needs new credentials (needs_reauth); nothing was sent".into(),
            );
        }
        let raw = match self.store.message_source(&send.id, SourceCopy::Submission) {
            Ok(Some(raw)) => raw,
            Ok(None) => {
                return self.fail(
                    send,
                    "the queued message is missing from the data folder".into(),
                );
            }
            Err(err) => {
                tracing::error!(send = %send.id, "reading the queued message failed, will retry: {err:#}");
                return;
            }
        };
        let signed = match self.auth.login(&mailbox.address, None).await {
            Ok(signed) => signed,
            Err(AuthError::NeedsReauth(words)) => {
                return self.fail(
                    send,
                    format!("the mailbox needs new credentials (needs_reauth); nothing was sent: {words}"),
                );
            }
            Err(AuthError::Disconnected) => {
                return self.fail(
                    send,
                    "the mailbox was disconnected before the message could be sent".into(),
                );
            }
            // Nothing was submitted: a later try is safe.
            Err(AuthError::Unavailable(words)) => return self.retry_later(send, words, None),
        };
        send.status = SendStatus::Submitting;
        send.attempts += 1;
        match self.store.claim_send(&send) {
            Ok(true) => {}
            // Settled meanwhile (e.g. failed by "update email"): not ours to send.
            Ok(false) => {
                tracing::info!(send = %send.id, "the send was settled meanwhile; not submitting it");
                return;
            }
            Err(err) => {
                // Nothing was submitted. The claim may have been written all
                // the same (a failed flush after the write): put the send back
                // in the queue, or it would wait as `submitting` for a
                // settlement that takes a look-up in Sent.
                send.status = SendStatus::Queued;
                send.attempts = send.attempts.saturating_sub(1);
                return self.retry_later(
                    send,
                    format!("recording the submission failed: {err:#}"),
                    None,
                );
            }
        }
        let started = std::time::Instant::now();
        let (result, signed) = self.submit_signed_in(&mailbox, &send, &raw, signed).await;
        match result {
            Ok(response) => {
                metrics::histogram!("mailbridge_smtp_submit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("mailbridge_sends_total").increment(1);
                self.auth.clear_refusals(&mailbox.address);
                adopt_server_message_id(&mut send, &response);
                send.status = SendStatus::Sent;
                send.error = None;
                send.smtp_response = Some(response);
                send.sent_at = Some(Utc::now());
                send.filed_in_sent = !mailbox.save_sent.bridge_appends(mailbox.provider);
                let event = Self::sent_event(&send);
                self.record_known_outcome(&send, &[event]).await;
                tracing::info!(send = %send.id, mailbox = %send.mailbox, "sent");
                if !send.filed_in_sent {
                    self.file_in_sent(&mailbox, &mut send).await;
                }
            }
            Err(SubmitError::Permanent(words)) => self.fail(
                send,
                format!("the SMTP server refused the message: {words}"),
            ),
            Err(SubmitError::Rejected(words)) => {
                self.smtp_refused(&mailbox, send, &signed, words).await
            }
            Err(SubmitError::Transient(words)) => self.retry_later(send, words, None),
            Err(SubmitError::Unknown(words)) => self.outcome_unknown(&mailbox, send, words).await,
        }
    }

    /// The message was handed over but no verdict came back. Where the server
    /// files Sent itself, its copy there says it was taken; otherwise nothing
    /// can tell, and it is reported failed, never submitted again (at most once).
    async fn outcome_unknown(&self, mailbox: &Mailbox, mut send: SendRecord, words: String) {
        tracing::warn!(send = %send.id, mailbox = %mailbox.address, "no verdict from the SMTP server: {words}");
        send.error = Some(format!("no verdict from the SMTP server: {words}"));
        if mailbox.save_sent.bridge_appends(mailbox.provider) {
            return self.fail_unknown(send);
        }
        self.look_for_outcome(mailbox, send).await;
    }

    /// A send handed over without a verdict, due for another look in Sent.
    async fn check_outcome(&self, send: SendRecord) {
        match self.store.mailbox(&send.mailbox) {
            Ok(Some(mailbox)) => self.look_for_outcome(&mailbox, send).await,
            Ok(None) => self.fail_unknown(send),
            Err(err) => {
                tracing::error!(send = %send.id, "loading the mailbox failed: {err:#}");
            }
        }
    }

    /// Looks for the send's copy in Sent: found → sent; otherwise looked for
    /// again later, until [`OUTCOME_CHECKS`] look-ups found nothing.
    async fn look_for_outcome(&self, mailbox: &Mailbox, mut send: SendRecord) {
        let why = match self.in_sent(mailbox, &send).await {
            Ok(Some(copy)) => {
                tracing::info!(send = %send.id, "the message without a verdict is in Sent: it was sent");
                return self.settle_as_sent(send, copy);
            }
            Ok(None) => "not in Sent yet".to_string(),
            Err(err) => format!("cannot look in Sent: {err}"),
        };
        send.outcome_checks += 1;
        if send.outcome_checks >= OUTCOME_CHECKS {
            return self.fail_unknown(send);
        }
        let wait = backoff::delay(send.outcome_checks - 1, self.retry_min, self.retry_max);
        tracing::info!(send = %send.id, checks = send.outcome_checks, "the message without a verdict is {why}; looking again in {wait:?}");
        send.next_attempt_ms =
            Utc::now().timestamp_millis() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
        self.record(&send, &[]);
    }

    fn fail_unknown(&self, send: SendRecord) {
        let words = send.error.clone().unwrap_or_default();
        self.fail(
            send,
            format!(
                "outcome unknown: {words}; it may have reached the recipients, and was not sent again to avoid a duplicate"
            ),
        );
    }

    /// Submits; a refused access token is renewed and tried once more (a
    /// refused AUTH submitted nothing). Returns the login used last.
    async fn submit_signed_in(
        &self,
        mailbox: &Mailbox,
        send: &SendRecord,
        raw: &[u8],
        signed: SignIn,
    ) -> (Result<String, SubmitError>, SignIn) {
        let result = self.submit(mailbox, send, raw, &signed.login).await;
        let (Err(SubmitError::Rejected(words)), Login::Bearer { .. }) = (&result, &signed.login)
        else {
            return (result, signed);
        };
        tracing::info!(send = %send.id, "the SMTP server refused the access token ({words}); renewing it");
        match self.auth.login(&mailbox.address, Some(&signed.login)).await {
            Ok(fresh) => (self.submit(mailbox, send, raw, &fresh.login).await, fresh),
            Err(AuthError::Unavailable(words)) => (Err(SubmitError::Transient(words)), signed),
            Err(err) => (Err(SubmitError::Permanent(err.to_string())), signed),
        }
    }

    /// The SMTP server refused the login. Whether the account's credentials
    /// are dead or only SMTP refuses them (SMTP AUTH turned off for the
    /// mailbox or the tenant, Exchange's `5.7.139`; a token without the
    /// SMTP.Send scope), an IMAP login with the same credentials tells.
    async fn smtp_refused(
        &self,
        mailbox: &Mailbox,
        send: SendRecord,
        signed: &SignIn,
        words: String,
    ) {
        let auth = &self.auth;
        match self.connector.open(&mailbox.imap, &signed.login).await {
            Ok(mut session) => {
                let _ = self.within("logging out", session.logout()).await;
                self.fail(
                    send,
                    format!(
                        "the SMTP server refuses this account's login while its IMAP server accepts it; \
                         check that SMTP AUTH is enabled for the mailbox (Microsoft 365: \"Authenticated SMTP\") \
                         and that the grant includes sending: {words}"
                    ),
                );
            }
            Err(ConnectError::Rejected(_)) => {
                // A renewed token refused twice is dead; a password is
                // believed refused only when refused again a while later (R20).
                let dead = matches!(signed.login, Login::Bearer { .. })
                    || auth.password_refused(&mailbox.address);
                if !dead {
                    return self.retry_later(send, words, Some(auth.confirm_after()));
                }
                auth.condemn(
                    &mailbox.address,
                    &signed.credentials,
                    &format!("the SMTP server rejected the login: {words}"),
                );
                self.fail(
                    send,
                    format!("the SMTP server refused the credentials: {words}"),
                );
            }
            Err(other) => self.retry_later(
                send,
                format!("{words} (and IMAP could not tell why: {other})"),
                None,
            ),
        }
    }

    async fn submit(
        &self,
        mailbox: &Mailbox,
        send: &SendRecord,
        raw: &[u8],
        login: &Login,
    ) -> Result<String, SubmitError> {
        self.submitter
            .submit(
                &mailbox.smtp,
                login,
                &mailbox.address,
                &send.recipients,
                raw,
            )
            .await
    }

    /// Puts a send back in the queue after a failure a later try may mend;
    /// fails it for good once it has been retried for 24 hours.
    fn retry_later(&self, mut send: SendRecord, words: String, at_least: Option<Duration>) {
        if Utc::now() - send.created_at > RETRY_FOR {
            return self.fail(send, format!("still failing after 24 hours: {words}"));
        }
        let wait = backoff::delay(
            send.attempts.saturating_sub(1),
            self.retry_min,
            self.retry_max,
        )
        .max(at_least.unwrap_or_default());
        tracing::warn!(send = %send.id, attempts = send.attempts, "send failed, retrying in {wait:?}: {words}");
        send.status = SendStatus::Queued;
        send.error = Some(words);
        send.next_attempt_ms =
            Utc::now().timestamp_millis() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
        self.record(&send, &[]);
    }

    /// APPENDs the copy with Bcc, marked \Seen, to the mailbox's Sent folder.
    /// Where the mailbox has no Sent folder, the send stays sent and its copy
    /// is not filed (said in its `error`, and in the mailbox status's
    /// `watched`), without a retry: the folder is not coming back by itself.
    async fn file_in_sent(&self, mailbox: &Mailbox, send: &mut SendRecord) {
        let mut no_sent_folder = false;
        let result = async {
            let raw = self
                .store
                .message_source(&send.id, SourceCopy::Filed)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "the copy to file is missing from the data folder".to_string())?;
            let Some((mut session, sent)) = self.open_sent(mailbox).await? else {
                no_sent_folder = true;
                return Err("the mailbox has no Sent folder".to_string());
            };
            self.within(
                "appending",
                session.append(&sent, Some("(\\Seen)"), None, &raw),
            )
            .await?;
            let _ = self.within("logging out", session.logout()).await;
            Ok::<_, String>(())
        }
        .await;
        match result {
            Ok(()) => {
                send.filed_in_sent = true;
                send.error = None;
            }
            Err(err) if no_sent_folder => {
                send.filing_attempts += 1;
                send.filing_abandoned = true;
                send.error = Some(format!(
                    "sent; its copy was not filed in Sent: {err} (create one to have copies filed)"
                ));
                tracing::warn!(send = %send.id, mailbox = %mailbox.address, "sent; its copy is not filed: {err}");
            }
            Err(err) => {
                // Kept in the queue: filing is tried again with backoff, for a day.
                send.filing_attempts += 1;
                let given_up = send.sent_at.is_some_and(|at| Utc::now() - at > RETRY_FOR);
                if given_up {
                    send.filing_abandoned = true;
                    send.error = Some(format!(
                        "sent, but filing the copy in Sent failed for 24 hours: {err}"
                    ));
                    tracing::error!(send = %send.id, mailbox = %mailbox.address, "giving up filing the copy in Sent: {err}");
                } else {
                    let wait =
                        backoff::delay(send.filing_attempts - 1, self.retry_min, self.retry_max);
                    send.next_attempt_ms = Utc::now().timestamp_millis()
                        + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
                    send.error = Some(format!("sent; filing the copy in Sent failed: {err}"));
                    tracing::warn!(send = %send.id, mailbox = %mailbox.address, "sent, but filing the copy in Sent failed, retrying in {wait:?}: {err}");
                }
            }
        }
        self.record(send, &[]);
    }

    /// Files the copy of a send that left earlier but whose filing failed.
    async fn retry_filing(&self, mut send: SendRecord) {
        match self.store.mailbox(&send.mailbox) {
            Ok(Some(mailbox)) => {
                // An APPEND that timed out may have been stored all the same.
                if let Ok(Some(_)) = self.in_sent(&mailbox, &send).await {
                    send.filed_in_sent = true;
                    send.error = None;
                    return self.record(&send, &[]);
                }
                self.file_in_sent(&mailbox, &mut send).await
            }
            Ok(None) => {
                // Disconnected: there is no mailbox to file it in any more.
                send.filing_abandoned = true;
                self.record(&send, &[]);
            }
            Err(err) => {
                tracing::error!(send = %send.id, "loading the mailbox failed: {err:#}");
            }
        }
    }

    /// Records a send whose copy was found in Sent as sent, under the
    /// Message-ID that copy carries (the server may have replaced ours).
    fn settle_as_sent(&self, mut send: SendRecord, copy: SentCopy) {
        if let Some(message_id) = copy.message_id {
            adopt_server_message_id(&mut send, &message_id);
        }
        send.status = SendStatus::Sent;
        send.error = None;
        send.sent_at = Some(Utc::now());
        send.filed_in_sent = true;
        let event = Self::sent_event(&send);
        self.record(&send, &[event]);
    }

    /// A send left `submitting` by a stop: sent if its Message-ID is in Sent,
    /// otherwise failed as interrupted (never submitted twice).
    async fn settle_interrupted(&self, send: SendRecord) {
        let found = match self.store.mailbox(&send.mailbox) {
            Ok(Some(mailbox)) => self.in_sent(&mailbox, &send).await,
            _ => Ok(None),
        };
        match found {
            Ok(Some(copy)) => {
                tracing::info!(send = %send.id, "interrupted send found in Sent: it was sent");
                self.settle_as_sent(send, copy);
            }
            Ok(None) => self.fail(
                send,
                "the bridge stopped while submitting this message and cannot tell whether the server accepted it; \
                 it was not sent again to avoid a duplicate"
                    .into(),
            ),
            Err(err) => {
                let wait = self.retry_max;
                tracing::warn!(send = %send.id, "cannot settle the interrupted send yet ({err}); looking again in {wait:?}");
                let mut send = send;
                send.error = Some(format!("interrupted; cannot look in Sent yet: {err}"));
                send.next_attempt_ms = Utc::now().timestamp_millis()
                    + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
                self.record(&send, &[]);
            }
        }
    }

    /// The send's copy in Sent, found by its Message-ID or by the bridge's
    /// send-id header (which survives a server replacing the Message-ID).
    async fn in_sent(
        &self,
        mailbox: &Mailbox,
        send: &SendRecord,
    ) -> Result<Option<SentCopy>, String> {
        let Some((mut session, sent)) = self.open_sent(mailbox).await? else {
            return Ok(None);
        };
        self.within("selecting Sent", session.examine(&sent))
            .await?;
        // Both are the bridge's own (`<hex@domain>`, `msg_hex`); stripped of
        // quotes and backslashes anyway, so they stay one quoted string.
        let quoted = |text: &str| format!("\"{}\"", text.replace(['"', '\\'], ""));
        let query = format!(
            "OR HEADER Message-ID {} HEADER {} {}",
            quoted(&send.message_id),
            crate::compose::SEND_ID_HEADER,
            quoted(&send.id)
        );
        let hits = self
            .within("searching Sent", checked::uid_search(&mut session, &query))
            .await?;
        let copy = match hits.iter().min() {
            None => None,
            Some(uid) => {
                let fetched = self
                    .within(
                        "reading the copy's Message-ID",
                        checked::uid_fetch(&mut session, &uid.to_string(), "BODY.PEEK[HEADER]"),
                    )
                    .await?;
                let message_id = fetched
                    .messages
                    .iter()
                    .filter_map(|f| f.header.as_deref())
                    .filter_map(|raw| mailparse::parse_headers(raw).ok())
                    .filter_map(|(headers, _)| {
                        use mailparse::MailHeaderMap as _;
                        headers.get_first_value("Message-ID")
                    })
                    .flat_map(|value| crate::mime::message_ids(&value))
                    .next();
                Some(SentCopy { message_id })
            }
        };
        let _ = self.within("logging out", session.logout()).await;
        Ok(copy)
    }

    /// A logged-in session and the name of the mailbox's Sent folder, if it has one.
    async fn open_sent(&self, mailbox: &Mailbox) -> Result<Option<(ImapSession, String)>, String> {
        let mut session = self
            .auth
            .open_imap(&self.connector, &mailbox.address)
            .await
            .map_err(|e| e.to_string())?;
        let sent = self
            .within("listing folders", folders::find_sent(&mut session))
            .await?;
        match sent {
            Some(name) => Ok(Some((session, name))),
            None => {
                let _ = self.within("logging out", session.logout()).await;
                Ok(None)
            }
        }
    }

    /// One IMAP step, bounded by the connector's step timeout.
    async fn within<T, E: std::fmt::Display>(
        &self,
        what: &str,
        step: impl Future<Output = Result<T, E>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.connector.step_timeout(), step).await {
            Ok(result) => result.map_err(|e| format!("{what}: {e}")),
            Err(_) => Err(format!("timed out {what}")),
        }
    }
}

/// Marks a send failed for good with `error`; its `message.failed` event.
pub fn failed(send: &mut SendRecord, error: String) -> Event {
    send.status = SendStatus::Failed;
    send.error = Some(error.clone());
    let data = MessageFailed {
        id: send.id.clone(),
        location_id: send.location_id.clone(),
        user_id: send.user_id.clone(),
        contact_id: send.contact_id.clone(),
        thread_id: send.thread_id.clone(),
        mailbox: send.mailbox.clone(),
        message_id: send.message_id.clone(),
        error,
    };
    event_data::event("message.failed", &send.thread_id, Utc::now(), &data)
}

/// Exchange Online may replace the Message-ID of a submitted message with its
/// own and names the new one in its reply to DATA, e.g.
/// `250 2.0.0 OK <AM0PR01MB1234.…@AM0PR01MB1234.eurprd01.prod.outlook.com> [Hostname=…]`
/// (recorded transcripts in docs/provider-wire-facts.md; EmailEngine
/// adopts it the same way: postalsys/emailengine#254, "Hotmail message ID").
/// Microsoft documents that SMTP submissions are saved to Sent Items; no
/// Microsoft page describing the rewrite itself was found. The copy in Sent
/// Items and the contact's In-Reply-To carry the new id, so it becomes the
/// send's Message-ID: the thread index learns it and the Sent copy is known as
/// the CRM's own. Other servers' replies (`250 2.0.0 Ok: queued as 4ZxY…`,
/// Gmail's `250 2.0.0 OK 1545926120 … - gsmtp`) name no `<…@…>` and change nothing.
pub fn adopt_server_message_id(send: &mut SendRecord, response: &str) {
    let Some(reported) = reported_message_id(response) else {
        return;
    };
    if reported == send.message_id {
        return;
    }
    tracing::info!(send = %send.id, ours = %send.message_id, server = %reported, "the server replaced the Message-ID");
    send.submitted_message_id = Some(std::mem::replace(&mut send.message_id, reported.clone()));
    send.data.message_id = Some(reported);
}

fn reported_message_id(response: &str) -> Option<String> {
    let (_, after) = response.split_once('<')?;
    let (inner, _) = after.split_once('>')?;
    let id = format!("<{inner}>");
    let plausible = inner.contains('@')
        && inner.len() <= 250
        && inner
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '<' && c != '>');
    plausible.then_some(id)
}

#[cfg(test)]
mod tests {
    use super::{InFlight, reported_message_id};

    /// Issue 21: a send task that panics frees its own mailbox and no other,
    /// so a second send of a busy mailbox never starts beside its first.
    #[tokio::test]
    async fn a_send_task_that_panics_frees_only_its_own_mailbox() {
        let mut in_flight = InFlight::default();
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        in_flight.start("a@example.test".into(), async {
            panic!("on purpose: a bug in a send task");
        });
        in_flight.start("b@example.test".into(), async {
            let _ = finished.await;
        });
        assert_eq!(in_flight.next_done().await, Some(()));
        assert!(!in_flight.is_busy("a@example.test"), "free after its panic");
        assert!(
            in_flight.is_busy("b@example.test"),
            "another mailbox's send is still under way"
        );
        let _ = finish.send(());
        assert_eq!(in_flight.next_done().await, Some(()));
        assert!(!in_flight.is_busy("b@example.test"));
        assert_eq!(in_flight.next_done().await, None);
    }

    #[test]
    fn the_message_id_named_in_the_250_reply_is_read() {
        assert_eq!(
            reported_message_id(
                "250 2.0.0 OK <AM0PR01MB1234A1B2C3@AM0PR01MB1234.eurprd01.prod.outlook.com> [Hostname=AM0PR01MB1234.eurprd01.prod.outlook.com]"
            )
            .as_deref(),
            Some("<AM0PR01MB1234A1B2C3@AM0PR01MB1234.eurprd01.prod.outlook.com>")
        );
        for other in [
            "250 2.0.0 Ok: queued as 4ZxYq51Jz4z9t",
            "250 2.0.0 OK 1545926120 w81sm22057166qkg.43 - gsmtp",
            "250 ok <not an id>",
            "250 ok <",
            "250 ok >x<",
        ] {
            assert_eq!(reported_message_id(other), None, "{other}");
        }
    }
}
