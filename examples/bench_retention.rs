//! Whether the data folder stops growing (issue 21 item 1): N messages
//! through one mailbox's store by the real ingest path, the CRM taking
//! every event, the user keeping the latest `kept` in INBOX (older ones
//! move out), and the retention sweep on a 1-second timer with every rule
//! at a few seconds. Prints the data folder's size at 10%, 50% and 100%
//! (every `BENCH_CHECKPOINTS` messages when set), split by part, with what
//! sled holds (keys and bytes per tree) beside its files.
//!
//!     [BENCH_CHECKPOINTS=10000] cargo run --release --example bench_retention -- [messages] [kept] [retention_secs]

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use mailbridge::{
    ingest::{Found, Ingest, Outcome},
    model::{
        Contact, Credentials, Endpoint, FlagState, FolderCursor, FolderRole, Integration, Mailbox,
        MailboxState, Provider, Security,
    },
    smart_address::SmartAddresses,
    store::{LocatedChange, Retention, SledStore, Store, secret_box::SecretBox},
    webhook::OutboxSignal,
};

const ME: &str = "me@bench.test";
const ANN: &str = "ann@customer.test";
const UID_VALIDITY: u32 = 7;

/// About 3 KB: text and HTML, as an ordinary reply.
fn message(uid: u32) -> String {
    let line = "The figures for the quarter are attached, with the notes from Monday.\r\n";
    let text = line.repeat(20);
    format!(
        "From: Ann Customer <{ANN}>\r\nTo: Me <{ME}>\r\nSubject: Quarterly figures {uid}\r\n\
         Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <m{uid}@customer.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b\"\r\n\r\n\
         --b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n\
         --b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>{text}</p></body></html>\r\n\
         --b--\r\n"
    )
}

/// (apparent bytes, bytes on disk) of every file under `path`.
fn folder_size(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    let mut total = (0, 0);
    let Ok(entries) = std::fs::read_dir(path) else {
        return total;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            let (apparent, on_disk) = folder_size(&entry.path());
            total.0 += apparent;
            total.1 += on_disk;
        } else {
            total.0 += meta.len();
            total.1 += meta.blocks() * 512;
        }
    }
    total
}

/// What sled holds (keys and bytes per tree, its own `size_on_disk`)
/// beside its files: live data flat while the files grow is space sled
/// does not reclaim; a tree growing is data the sweep leaves.
fn print_live_data(store: &SledStore, db: &Path) {
    let (trees, size_on_disk) = store.engine().live_data().expect("the trees");
    let live: u64 = trees.iter().map(|tree| tree.bytes).sum();
    let keys: usize = trees.iter().map(|tree| tree.keys).sum();
    println!(
        "          live data: {:.2} MB in {keys} keys; sled size_on_disk {:.1} MB",
        live as f64 / 1e6,
        size_on_disk as f64 / 1e6
    );
    let mut trees = trees;
    trees.sort_by_key(|tree| std::cmp::Reverse(tree.bytes));
    let listed: Vec<String> = trees
        .iter()
        .filter(|tree| tree.keys > 0)
        .map(|tree| {
            format!(
                "{} {}/{:.0}kB",
                tree.name,
                tree.keys,
                tree.bytes as f64 / 1e3
            )
        })
        .collect();
    println!("          trees: {}", listed.join(", "));
    let mut files: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(db).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if path.is_dir() {
            let count = std::fs::read_dir(&path).map_or(0, |entries| entries.count());
            files.push(format!(
                "{name}/ {count} files {:.1} MB",
                folder_size(&path).0 as f64 / 1e6
            ));
        } else {
            let len = entry.metadata().map_or(0, |meta| meta.len());
            files.push(format!("{name} {:.1} MB", len as f64 / 1e6));
        }
    }
    files.sort();
    println!("          db/: {}", files.join(", "));
}

fn connect(store: &dyn Store) {
    let endpoint = Endpoint {
        host: "127.0.0.1".into(),
        port: 993,
        security: Security::Tls,
    };
    let cursor = FolderCursor::new(UID_VALIDITY, 1);
    let mailbox = Mailbox {
        address: ME.into(),
        provider: Provider::Imap,
        credentials: Credentials::Password {
            username: ME.into(),
            password: "bench".into(),
        },
        imap: endpoint.clone(),
        smtp: endpoint,
        daily_send_limit: None,
        save_sent: Default::default(),
        state: MailboxState::Connecting,
        last_error: None,
        connected_at: Utc::now(),
        generation: 0,
        folders: Vec::new(),
    };
    let integration = Integration {
        location_id: "L1".into(),
        user_id: "u1".into(),
        mailbox: ME.into(),
        connected_at: Utc::now(),
        baseline: vec![(FolderRole::Inbox, cursor)],
        smart_bcc_address: "bcc@bench.test".into(),
    };
    store
        .connect(
            &mailbox,
            &integration,
            &[(FolderRole::Inbox, cursor)],
            &[],
            &[],
        )
        .expect("connect");
    store
        .put_contacts(&[mailbridge::store::ContactUpsert {
            created_at_given: true,
            contact: Contact {
                location_id: "L1".into(),
                id: "c-ann".into(),
                emails: vec![ANN.into()],
                name: Some("Ann".into()),
                assigned_user_ids: vec!["u1".into()],
                created_at: Utc::now(),
            },
        }])
        .expect("contact");
}

/// The CRM acknowledges every event due.
fn deliver_all(store: &dyn Store) {
    let none = |_: u64| false;
    loop {
        let due = store
            .outbox_due(i64::MAX, 1_000, &none)
            .expect("the outbox");
        if due.entries.is_empty() {
            return;
        }
        for (sequence, _) in due.entries {
            store.complete_outbox(sequence).expect("delivered");
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let total: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let kept: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let secs: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let dir = tempfile::tempdir().expect("a scratch folder");
    let sled =
        Arc::new(SledStore::open(dir.path(), SecretBox::from_key(&[7; 32])).expect("the store"));
    let store: Arc<dyn Store> = sled.clone();
    connect(store.as_ref());
    let smart = SmartAddresses::new("bcc-{token}@bench.test", [3; 32]).expect("smart addresses");
    let ingest = Ingest::new(
        store.clone(),
        OutboxSignal::default(),
        "http://127.0.0.1:8787",
        smart,
    );
    let keep = Some(Duration::from_secs(secs));
    let rules = Retention {
        messages: keep,
        history: keep,
        sends: keep,
        dead_letters: keep,
        ..Retention::default()
    };

    // The daemon's timer, at 1 s.
    let stop = Arc::new(AtomicBool::new(false));
    let swept = Arc::new(AtomicUsize::new(0));
    let sweeper = {
        let (store, stop, swept) = (store.clone(), stop.clone(), swept.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let report = store
                    .sweep(Utc::now().timestamp_millis(), &rules)
                    .expect("a sweep");
                swept.fetch_add(report.removed(), Ordering::Relaxed);
                if !report.more {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        })
    };

    println!(
        "{total} messages through {ME}, {kept} kept in INBOX, every retention {secs} s, sweep every 1 s"
    );
    println!("messages  elapsed_s  msg_per_s  folder_mb  on_disk_mb  removed_by_sweeps");
    let checkpoints: Vec<u32> = match std::env::var("BENCH_CHECKPOINTS") {
        Ok(every) => {
            let every: u32 = every
                .parse()
                .expect("BENCH_CHECKPOINTS: a number of messages");
            (1..=total / every).map(|n| n * every).collect()
        }
        Err(_) => vec![total / 10, total / 2, total],
    };
    let started = Instant::now();
    for uid in 1..=total {
        let raw = message(uid);
        let found = Found {
            mailbox: ME,
            folder: FolderRole::Inbox,
            uid_validity: UID_VALIDITY,
            uid,
            cursor: FolderCursor::new(UID_VALIDITY, uid),
            flags: None,
            labels: None,
            folder_name: "INBOX",
            received_at: None,
        };
        match ingest.handle(found, raw.as_bytes()) {
            Ok(Outcome::Queued { .. }) => {}
            other => panic!("message {uid} was not queued: {other:?}"),
        }
        // The user files an older message away (out of the watched folders).
        if uid > kept {
            let gone = LocatedChange {
                uid_validity: UID_VALIDITY,
                uid: uid - kept,
                flags_before: FlagState::default(),
                flags_after: None,
                labels_after: None,
                moved_to: None,
                events: Vec::new(),
            };
            store
                .commit_flag_changes(
                    ME,
                    FolderRole::Inbox,
                    FolderCursor::new(UID_VALIDITY, uid + 1),
                    None,
                    &[gone],
                )
                .expect("moved out");
        }
        if uid % 1_000 == 0 {
            deliver_all(store.as_ref());
        }
        if checkpoints.contains(&uid) {
            let elapsed = started.elapsed().as_secs_f64();
            let (apparent, on_disk) = folder_size(dir.path());
            println!(
                "{uid:>8}  {elapsed:>9.1}  {:>9.0}  {:>9.1}  {:>10.1}  {:>17}",
                f64::from(uid) / elapsed,
                apparent as f64 / 1e6,
                on_disk as f64 / 1e6,
                swept.load(Ordering::Relaxed),
            );
            for part in ["db", "source-segments", "messages", "event-bodies"] {
                let (apparent, _) = folder_size(&dir.path().join(part));
                println!("          {part}: {:.1} MB", apparent as f64 / 1e6);
            }
            print_live_data(&sled, &dir.path().join("db"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    sweeper.join().expect("the sweeper");
}
