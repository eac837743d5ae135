//! Soak (issue 7): 10 mailboxes whose IMAP and SMTP connections are all cut
//! every few seconds, 1,000 messages in and 100 sends out, against the real
//! stack and the daemon as a child process. Afterwards every message arrived
//! exactly once (by `webhook-id`), every send left once or was reported
//! failed (never twice), and the daemon's memory stayed flat.
//!
//! Ignored by default: `scripts/test.sh --soak` runs it (about two minutes).

mod support;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use support::{
    child::ChildDaemon,
    cutting_proxy::CuttingProxy,
    daemon::{Api, test_config},
    receiver::Receiver,
    stack::{Stack, message, new_message_id},
};

const MAILBOXES: usize = 10;
const MESSAGES_IN: usize = 1_000;
const SENDS_OUT: usize = 100;
/// One message in every this long.
const PACE: Duration = Duration::from_millis(100);
/// How long the whole flow may take to settle once everything was handed in.
const SETTLE: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "soak: run by scripts/test.sh --soak"]
async fn soak_cuts_every_few_seconds_lose_nothing_double_nothing() {
    let stack = Stack::get();
    let receiver = Receiver::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path(), &stack, &receiver);
    config.sync.reconnect_max_ms = 2_000;
    config.sending.retry_max_ms = 2_000;
    let daemon =
        ChildDaemon::start_logging(&config, data.path(), "warn,mailbridge::daemon=info").await;
    let api = Api::new(&daemon.base);
    let imap = CuttingProxy::start(stack.imaps_port).await;
    let smtp = CuttingProxy::start(stack.submissions_port).await;

    let ann = stack.new_user("soak-ann").await;
    let mut mailboxes = Vec::new();
    for i in 0..MAILBOXES {
        let me = stack.new_user(&format!("soak{i}")).await;
        let location = format!("L{i}");
        api.put_contact(&location, "c-ann", &ann.address, &["u1"])
            .await;
        let (status, body) = api
            .send(
                reqwest::Method::PUT,
                &format!("/v1/locations/{location}/users/u1/mailbox"),
                Some(serde_json::json!({
                    "email": me.address,
                    "provider": "imap",
                    "auth": {"type": "password", "username": me.address, "password": me.password},
                    "imap": imap.tls_endpoint(),
                    "smtp": smtp.tls_endpoint(),
                })),
            )
            .await;
        assert_eq!(status, 200, "connect {}: {body}", me.address);
        mailboxes.push((location, me));
    }
    for (location, _) in &mailboxes {
        api.wait_active(location, "u1").await;
    }
    let warm_rss = daemon.rss_kib();

    // Cuts every 1 to 4 seconds, at whatever point each conversation is.
    let cutting = Arc::new(AtomicBool::new(true));
    let cutter = {
        let cutting = cutting.clone();
        let (imap, smtp) = (Arc::new(imap), Arc::new(smtp));
        let proxies = (imap.clone(), smtp.clone());
        let task = tokio::spawn(async move {
            while cutting.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(1_000..4_000))).await;
                imap.cut_all();
                smtp.cut_all();
            }
        });
        (task, proxies)
    };

    let started = Instant::now();
    let mut rss_samples = vec![(0u64, warm_rss)];
    let inbound: Vec<(usize, String)> = (0..MESSAGES_IN)
        .map(|n| (n % MAILBOXES, format!("soak in {n}")))
        .collect();
    // Paced at about ten a second, so the flow spans dozens of cuts.
    let pace = Arc::new(tokio::sync::Mutex::new(tokio::time::interval(PACE)));
    let deliveries = futures_util::stream::iter(inbound.iter().cloned())
        .map(|(i, subject)| {
            let (stack, ann, me) = (&stack, &ann, &mailboxes[i].1);
            let pace = pace.clone();
            async move {
                pace.lock().await.tick().await;
                let raw = message(
                    &ann.address,
                    &me.address,
                    &subject,
                    &new_message_id("soak"),
                    None,
                );
                stack.deliver(&ann.address, &[&me.address], &raw).await;
            }
        })
        .buffer_unordered(8);
    let mut send_ids: HashMap<String, String> = HashMap::new();
    tokio::pin!(deliveries);
    let mut delivered = 0usize;
    while deliveries.next().await.is_some() {
        delivered += 1;
        // One send for every ten messages in, spread over the mailboxes.
        if delivered.is_multiple_of(MESSAGES_IN / SENDS_OUT) {
            let n = send_ids.len();
            let (location, _) = &mailboxes[n % MAILBOXES];
            let subject = format!("soak out {n}");
            let key = format!("soak-{n}");
            let (status, body, _) = api
                .send_message(
                    location,
                    "u1",
                    serde_json::json!({"contact_id": "c-ann", "subject": subject, "text": "soak"}),
                    Some(&key),
                )
                .await;
            assert_eq!(status, 202, "send {n}: {body}");
            send_ids.insert(body["id"].as_str().unwrap().to_string(), subject);
        }
        if delivered.is_multiple_of(100) {
            rss_samples.push((started.elapsed().as_secs(), daemon.rss_kib()));
        }
    }

    // Everything arrives, with the cuts still going on.
    let deadline = Instant::now() + SETTLE;
    loop {
        let all = receiver.accepted();
        let inbound_done = all
            .iter()
            .filter(|r| r.kind() == "message.inbound")
            .map(|r| r.subject().to_string())
            .collect::<HashSet<_>>()
            .len();
        let settled = all
            .iter()
            .filter(|r| matches!(r.kind(), "message.sent" | "message.failed"))
            .filter_map(|r| r.data()["id"].as_str().map(str::to_string))
            .collect::<HashSet<_>>()
            .len();
        if inbound_done == MESSAGES_IN && settled == SENDS_OUT {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {SETTLE:?}: {inbound_done}/{MESSAGES_IN} messages in, {settled}/{SENDS_OUT} sends settled\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cutting.store(false, Ordering::SeqCst);
    let _ = cutter.0.await;
    let cuts = cutter.1.0.cuts() + cutter.1.1.cuts();
    rss_samples.push((started.elapsed().as_secs(), daemon.rss_kib()));

    // Exactly once: one event (one webhook-id) per message in.
    let all = receiver.all();
    let mut ids_by_subject: HashMap<String, HashSet<String>> = HashMap::new();
    for r in all.iter().filter(|r| r.kind() == "message.inbound") {
        ids_by_subject
            .entry(r.subject().to_string())
            .or_default()
            .insert(r.webhook_id.clone());
    }
    let doubled: Vec<_> = ids_by_subject
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .collect();
    assert!(doubled.is_empty(), "forwarded more than once: {doubled:?}");
    for (_, subject) in &inbound {
        assert!(ids_by_subject.contains_key(subject), "lost: {subject}");
    }
    assert!(
        !all.iter()
            .any(|r| r.kind() == "message.outbound" && r.subject().starts_with("soak out")),
        "a CRM send's copy in Sent came back as the user's own mail"
    );

    // Sends: one verdict each; a sent one reached the contact exactly once,
    // none reached them twice.
    let mut verdicts: HashMap<String, HashSet<(String, String)>> = HashMap::new();
    for r in all
        .iter()
        .filter(|r| matches!(r.kind(), "message.sent" | "message.failed"))
    {
        let id = r.data()["id"].as_str().unwrap_or("").to_string();
        verdicts
            .entry(id)
            .or_default()
            .insert((r.kind().to_string(), r.webhook_id.clone()));
    }
    let sent: HashSet<&String> = send_ids
        .keys()
        .filter(|id| {
            let verdict = &verdicts[*id];
            assert_eq!(verdict.len(), 1, "send {id}: one verdict, got {verdict:?}");
            verdict.iter().any(|(kind, _)| kind == "message.sent")
        })
        .collect();
    let mut copies: HashMap<String, usize> = HashMap::new();
    support::eventually("the contact's copies", support::DEADLINE, async || {
        copies.clear();
        for raw in stack.fetch_all(&ann, "INBOX").await {
            let subject = mailbridge::mime::parse(&raw).subject.unwrap_or_default();
            *copies.entry(subject).or_default() += 1;
        }
        sent.iter()
            .all(|id| copies.contains_key(&send_ids[*id]))
            .then_some(())
    })
    .await;
    let twice: Vec<_> = copies.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");

    let final_rss = daemon.rss_kib();
    eprintln!(
        "soak: {MESSAGES_IN} in, {SENDS_OUT} out ({} sent, {} failed), {cuts} connections cut, {:.0} s; RSS KiB (s, KiB): {rss_samples:?}, final {final_rss}",
        sent.len(),
        SENDS_OUT - sent.len(),
        started.elapsed().as_secs_f64()
    );
    // Flat: what the flow costs is buffers, not a leak per message.
    let peak_after_warm = rss_samples.iter().map(|(_, kib)| *kib).max().unwrap_or(0);
    assert!(
        final_rss <= warm_rss + 32 * 1024 && peak_after_warm <= warm_rss + 64 * 1024,
        "memory grew: warm {warm_rss} KiB, peak {peak_after_warm} KiB, final {final_rss} KiB"
    );
    daemon.terminate().await;
}
