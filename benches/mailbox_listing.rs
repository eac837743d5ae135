//! `GET /v1/mailboxes` on a store of 10,000 mailboxes: a page of 1,000, and a
//! state filter that reads them all (their public fields; the credentials
//! stay sealed).
//!
//!     cargo bench --bench mailbox_listing

use chrono::Utc;
use mailbridge::{
    model::{
        Credentials, Endpoint, FolderCursor, FolderRole, Integration, Mailbox, MailboxState,
        Provider, Security,
    },
    store::{SledStore, Store, secret_box::SecretBox},
};

fn main() {
    divan::main();
}

const MAILBOXES: usize = 10_000;

fn store() -> (tempfile::TempDir, SledStore) {
    let dir = tempfile::tempdir().expect("a scratch folder");
    let store = SledStore::open(dir.path(), SecretBox::from_key(&[7; 32])).expect("the store");
    let endpoint = Endpoint {
        host: "imap.example.test".into(),
        port: 993,
        security: Security::Tls,
    };
    for n in 0..MAILBOXES {
        let address = format!("user{n:05}@example.test");
        let mailbox = Mailbox {
            address: address.clone(),
            provider: Provider::Imap,
            credentials: Credentials::Password {
                username: address.clone(),
                password: format!("password-{n}"),
            },
            imap: endpoint.clone(),
            smtp: endpoint.clone(),
            daily_send_limit: None,
            save_sent: Default::default(),
            state: MailboxState::Connecting,
            last_error: None,
            connected_at: Utc::now(),
            generation: 0,
            folders: Vec::new(),
        };
        let cursor = FolderCursor::new(1, 1);
        let integration = Integration {
            location_id: format!("L{}", n % 100),
            user_id: format!("u{n}"),
            mailbox: address,
            connected_at: Utc::now(),
            baseline: vec![(FolderRole::Inbox, cursor)],
            smart_bcc_address: "bcc@example.test".into(),
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
    }
    (dir, store)
}

#[divan::bench(sample_count = 20)]
fn a_page_of_1000(bencher: divan::Bencher) {
    let (_dir, store) = store();
    bencher.bench_local(|| {
        let page = store
            .mailbox_summaries_after(Some("user04999@example.test"), 1_000, &mut |_| true)
            .expect("a page");
        assert_eq!(page.len(), 1_000);
    });
}

#[divan::bench(sample_count = 20)]
fn a_filter_over_all_10000(bencher: divan::Bencher) {
    let (_dir, store) = store();
    bencher.bench_local(|| {
        let mut seen = 0;
        let page = store
            .mailbox_summaries_after(None, 1_000, &mut |_| {
                seen += 1;
                false
            })
            .expect("a page");
        assert!(page.is_empty());
        assert_eq!(seen, MAILBOXES);
    });
}
