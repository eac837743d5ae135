//! The Dovecot + Postfix stack started by scripts/mailstack/start.sh.

use std::{
    collections::HashMap,
    io::Write as _,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use lettre::{
    AsyncSmtpTransport, AsyncTransport, Tokio1Executor,
    address::Envelope,
    transport::smtp::{
        authentication::Credentials as SmtpCredentials,
        client::{Certificate, CertificateStore, Tls, TlsParameters},
    },
};
use mailbridge::{
    imap::{ImapConnector, connection::ImapSession},
    model::{Endpoint, Login, Security},
};

pub struct Stack {
    pub domain: String,
    pub imaps_port: u16,
    pub imap_port: u16,
    pub submissions_port: u16,
    pub mx_port: u16,
    pub ca_cert: PathBuf,
    pub users_file: PathBuf,
    pub runtime: PathBuf,
}

#[derive(Clone, Debug)]
pub struct User {
    pub address: String,
    pub password: String,
}

static NEXT_USER: AtomicU32 = AtomicU32::new(0);

impl Stack {
    pub fn get() -> Stack {
        let runtime = std::env::var("MAILSTACK_RUNTIME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir().join("mailbridge-mailstack"));
        let env_file = runtime.join("stack.env");
        let text = std::fs::read_to_string(&env_file).unwrap_or_else(|e| {
            panic!(
                "the mail stack is not running ({}: {e}); start it with `sudo scripts/mailstack/start.sh` or run scripts/test.sh",
                env_file.display()
            )
        });
        let vars: HashMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        let var = |k: &str| {
            vars.get(k)
                .cloned()
                .unwrap_or_else(|| panic!("{k} missing in {}", env_file.display()))
        };
        let port = |k: &str| var(k).parse::<u16>().unwrap_or_else(|e| panic!("{k}: {e}"));
        Stack {
            domain: var("MAILSTACK_DOMAIN"),
            imaps_port: port("MAILSTACK_IMAPS_PORT"),
            imap_port: port("MAILSTACK_IMAP_PORT"),
            submissions_port: port("MAILSTACK_SUBMISSIONS_PORT"),
            mx_port: port("MAILSTACK_SMTP_PORT"),
            ca_cert: PathBuf::from(var("MAILSTACK_CA_CERT")),
            users_file: PathBuf::from(var("MAILSTACK_USERS_FILE")),
            runtime,
        }
    }

    /// A fresh mailbox no other test touches. Dovecot re-reads its passwd-file
    /// when it changes (checked about once a second), so this waits until the
    /// new user can log in; a login also proves the userdb (used by LMTP
    /// delivery) knows the user.
    pub async fn new_user(&self, prefix: &str) -> User {
        let n = NEXT_USER.fetch_add(1, Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let local = format!("{prefix}{}x{n}x{nanos:x}", std::process::id());
        let address = format!("{local}@{}", self.domain);
        let password = format!("pw-{local}");
        {
            let _lock = self.lock_users();
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&self.users_file)
                .unwrap_or_else(|e| {
                    panic!("cannot add a user to {}: {e}", self.users_file.display())
                });
            file.write_all(format!("{address}:{{PLAIN}}{password}::::::\n").as_bytes())
                .expect("append user");
        }
        let user = User { address, password };
        let credentials = Login::Password {
            username: user.address.clone(),
            password: user.password.clone(),
        };
        let tls = mailbridge::tls::client_config(std::slice::from_ref(&self.ca_cert))
            .expect("tls config");
        let connector = ImapConnector::new(
            tls,
            Duration::from_secs(20),
            mailbridge::egress::Egress {
                allow_private: true,
            },
        );
        super::eventually(
            &format!("Dovecot to know {}", user.address),
            super::DEADLINE,
            async || {
                let mut session = connector
                    .open(&self.imap_endpoint(), &credentials)
                    .await
                    .ok()?;
                let _ = session.logout().await;
                Some(())
            },
        )
        .await;
        user
    }

    /// Test processes edit the users file one at a time (an exclusive lock on
    /// a file beside it), so a rewrite never drops a line another test appended.
    fn lock_users(&self) -> std::fs::File {
        use std::os::fd::AsRawFd as _;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.users_file.with_extension("lock"))
            .expect("users lock file");
        // SAFETY: flock(2) on a descriptor we own; released when `lock` is dropped.
        let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(locked, 0, "flock users.lock");
        lock
    }

    /// Gives a user a new password (Dovecot notices within about a second).
    pub fn change_password(&self, user: &User, new_password: &str) -> User {
        let _lock = self.lock_users();
        let text = std::fs::read_to_string(&self.users_file).expect("users file");
        let prefix = format!("{}:", user.address);
        let replaced: String = text
            .lines()
            .map(|line| {
                if line.starts_with(&prefix) {
                    format!("{}:{{PLAIN}}{new_password}::::::\n", user.address)
                } else {
                    format!("{line}\n")
                }
            })
            .collect();
        // Written whole through a rename, so Dovecot never reads half a file.
        let temporary = self.users_file.with_extension("new");
        std::fs::write(&temporary, replaced).expect("write users");
        std::fs::rename(&temporary, &self.users_file).expect("replace users");
        User {
            address: user.address.clone(),
            password: new_password.to_string(),
        }
    }

    /// Ends every IMAP session of a user, as a server restart or an admin would.
    pub fn kick(&self, user: &User) {
        let status = std::process::Command::new("doveadm")
            .arg("-c")
            .arg(self.runtime.join("etc/dovecot/dovecot.conf"))
            .args(["kick", &user.address])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("doveadm kick");
        assert!(status.success(), "doveadm kick: {status}");
    }

    /// Gives a folder a new UIDVALIDITY, as Dovecot does when it rebuilds
    /// its index: every UID a client remembers for it is void.
    pub fn set_uid_validity(&self, user: &User, folder: &str, uid_validity: u32) {
        let status = std::process::Command::new("doveadm")
            .arg("-c")
            .arg(self.runtime.join("etc/dovecot/dovecot.conf"))
            .args(["mailbox", "update", "-u", &user.address])
            .args(["--uid-validity", &uid_validity.to_string(), folder])
            .status()
            .expect("doveadm mailbox update");
        assert!(status.success(), "doveadm mailbox update: {status}");
    }

    pub fn imap_endpoint(&self) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port: self.imaps_port,
            security: Security::Tls,
        }
    }

    pub fn smtp_endpoint(&self) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port: self.submissions_port,
            security: Security::Tls,
        }
    }

    /// Delivers a message as the outside world does: through the MX port.
    pub async fn deliver(&self, from: &str, to: &[&str], raw: &[u8]) {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(self.mx_port)
            .timeout(Some(Duration::from_secs(20)))
            .build();
        let envelope = Envelope::new(
            Some(from.parse().expect("from address")),
            to.iter().map(|t| t.parse().expect("to address")).collect(),
        )
        .expect("envelope");
        transport
            .send_raw(&envelope, raw)
            .await
            .expect("MX accepts the message");
    }

    /// Submits a message as `user` on the submission port, as a mail client does.
    pub async fn submit(&self, user: &User, to: &[&str], raw: &[u8]) {
        let pem = std::fs::read(&self.ca_cert).expect("CA cert");
        let tls = TlsParameters::builder("localhost".into())
            .certificate_store(CertificateStore::None)
            .add_root_certificate(Certificate::from_pem(&pem).expect("CA pem"))
            .build_rustls()
            .expect("tls parameters");
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(self.submissions_port)
            .tls(Tls::Wrapper(tls))
            .credentials(SmtpCredentials::new(
                user.address.clone(),
                user.password.clone(),
            ))
            .timeout(Some(Duration::from_secs(20)))
            .build();
        let envelope = Envelope::new(
            Some(user.address.parse().expect("from")),
            to.iter().map(|t| t.parse().expect("to address")).collect(),
        )
        .expect("envelope");
        transport
            .send_raw(&envelope, raw)
            .await
            .expect("submission accepted");
    }

    pub async fn session(&self, user: &User) -> ImapSession {
        self.try_session(user).await.expect("IMAP login")
    }

    pub async fn try_session(
        &self,
        user: &User,
    ) -> Result<ImapSession, mailbridge::imap::ConnectError> {
        let tls = mailbridge::tls::client_config(std::slice::from_ref(&self.ca_cert))
            .expect("tls config");
        ImapConnector::new(
            tls,
            Duration::from_secs(20),
            mailbridge::egress::Egress {
                allow_private: true,
            },
        )
        .open(
            &self.imap_endpoint(),
            &Login::Password {
                username: user.address.clone(),
                password: user.password.clone(),
            },
        )
        .await
    }

    /// Files a copy in the user's Sent folder, marked \Seen, as a mail client does after sending.
    pub async fn append_sent(&self, user: &User, raw: &[u8]) {
        let mut session = self.session(user).await;
        session
            .append("Sent", Some("(\\Seen)"), None, raw)
            .await
            .expect("APPEND to Sent");
        let _ = session.logout().await;
    }

    /// As a server rule (Sieve `fileinto`) does: files a message straight
    /// into `folder`, creating the folder first if asked.
    pub async fn file_into(&self, user: &User, folder: &str, raw: &[u8]) {
        let mut session = self.session(user).await;
        session
            .append(folder, None, None, raw)
            .await
            .expect("APPEND");
        let _ = session.logout().await;
    }

    /// Creates a folder in the user's mailbox.
    pub async fn create_folder(&self, user: &User, folder: &str) {
        let mut session = self.session(user).await;
        session.create(folder).await.expect("CREATE");
        let _ = session.logout().await;
    }

    /// As another mail client does: changes the flags (`"+FLAGS (\\Seen)"`,
    /// `"-FLAGS (\\Flagged)"`) of the message with this Message-ID.
    pub async fn store_flags(&self, user: &User, folder: &str, message_id: &str, change: &str) {
        use futures_util::TryStreamExt as _;
        let mut session = self.session(user).await;
        session.select(folder).await.expect("SELECT");
        let uid = uid_of(&mut session, message_id)
            .await
            .expect("the message is in the folder");
        let _: Vec<_> = session
            .uid_store(uid.to_string(), change)
            .await
            .expect("STORE")
            .try_collect()
            .await
            .expect("STORE responses");
        let _ = session.logout().await;
    }

    /// As another mail client does: moves the message with this Message-ID
    /// to `to` (UID MOVE), or with `to` None deletes it for good (\\Deleted
    /// and EXPUNGE).
    pub async fn move_message(
        &self,
        user: &User,
        folder: &str,
        message_id: &str,
        to: Option<&str>,
    ) {
        use futures_util::TryStreamExt as _;
        let mut session = self.session(user).await;
        session.select(folder).await.expect("SELECT");
        let uid = uid_of(&mut session, message_id)
            .await
            .expect("the message is in the folder");
        match to {
            Some(to) => session.uid_mv(uid.to_string(), to).await.expect("MOVE"),
            None => {
                let _: Vec<_> = session
                    .uid_store(uid.to_string(), "+FLAGS (\\Deleted)")
                    .await
                    .expect("STORE")
                    .try_collect()
                    .await
                    .expect("STORE responses");
                let _: Vec<_> = session
                    .expunge()
                    .await
                    .expect("EXPUNGE")
                    .try_collect()
                    .await
                    .expect("EXPUNGE responses");
            }
        }
        let _ = session.logout().await;
    }

    /// As another mail client does: deletes every message of `folder` for
    /// good in one EXPUNGE.
    pub async fn delete_all(&self, user: &User, folder: &str) {
        use futures_util::TryStreamExt as _;
        let mut session = self.session(user).await;
        session.select(folder).await.expect("SELECT");
        let _: Vec<_> = session
            .store("1:*", "+FLAGS.SILENT (\\Deleted)")
            .await
            .expect("STORE")
            .try_collect()
            .await
            .expect("STORE responses");
        let _: Vec<_> = session
            .expunge()
            .await
            .expect("EXPUNGE")
            .try_collect()
            .await
            .expect("EXPUNGE responses");
        let _ = session.logout().await;
    }

    /// The flags of the message with this Message-ID in a folder, or None if
    /// it is not there.
    pub async fn flags_of(
        &self,
        user: &User,
        folder: &str,
        message_id: &str,
    ) -> Option<Vec<String>> {
        use futures_util::TryStreamExt as _;
        let mut session = self.session(user).await;
        session.examine(folder).await.expect("EXAMINE");
        let uid = uid_of(&mut session, message_id).await;
        let flags = match uid {
            None => None,
            Some(uid) => {
                let fetched: Vec<_> = session
                    .uid_fetch(uid.to_string(), "(UID FLAGS)")
                    .await
                    .expect("FETCH")
                    .try_collect()
                    .await
                    .expect("FETCH responses");
                Some(
                    fetched
                        .iter()
                        .flat_map(|f| {
                            f.flags()
                                .map(|flag| format!("{flag:?}"))
                                .collect::<Vec<_>>()
                        })
                        .collect(),
                )
            }
        };
        let _ = session.logout().await;
        flags
    }

    /// Every message in a folder, in UID order.
    pub async fn fetch_all(&self, user: &User, folder: &str) -> Vec<Vec<u8>> {
        use futures_util::TryStreamExt as _;
        let mut session = self.session(user).await;
        let selected = session.examine(folder).await.expect("EXAMINE");
        let mut all = Vec::new();
        if selected.exists > 0 {
            let fetched: Vec<_> = session
                .uid_fetch("1:*", "(UID BODY.PEEK[])")
                .await
                .expect("FETCH")
                .try_collect()
                .await
                .expect("FETCH responses");
            let mut with_uid: Vec<(u32, Vec<u8>)> = fetched
                .iter()
                .filter_map(|f| Some((f.uid?, f.body()?.to_vec())))
                .collect();
            with_uid.sort_by_key(|(uid, _)| *uid);
            all = with_uid.into_iter().map(|(_, body)| body).collect();
        }
        let _ = session.logout().await;
        all
    }

    /// Number of messages in a folder.
    pub async fn count(&self, user: &User, folder: &str) -> u32 {
        let mut session = self.session(user).await;
        let status = session.status(folder, "(MESSAGES)").await.expect("STATUS");
        let _ = session.logout().await;
        status.exists
    }

    /// Waits until a folder holds `n` messages (delivery through LMTP is asynchronous).
    pub async fn wait_count(&self, user: &User, folder: &str, n: u32) {
        super::eventually(
            &format!("{n} messages in {folder} of {}", user.address),
            super::DEADLINE,
            async || (self.count(user, folder).await >= n).then_some(()),
        )
        .await;
    }
}

/// A small RFC 5322 message.
pub fn message(
    from: &str,
    to: &str,
    subject: &str,
    message_id: &str,
    in_reply_to: Option<&str>,
) -> Vec<u8> {
    let mut raw = format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\nDate: {}\r\n",
        chrono::Utc::now().to_rfc2822()
    );
    if let Some(parent) = in_reply_to {
        raw.push_str(&format!(
            "In-Reply-To: {parent}\r\nReferences: {parent}\r\n"
        ));
    }
    raw.push_str(&format!(
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nBody of {subject}\r\n"
    ));
    raw.into_bytes()
}

/// The UID of the message with this Message-ID in the selected folder.
async fn uid_of(session: &mut ImapSession, message_id: &str) -> Option<u32> {
    session
        .uid_search(format!("HEADER Message-ID \"{message_id}\""))
        .await
        .expect("SEARCH")
        .into_iter()
        .next()
}

pub fn new_message_id(tag: &str) -> String {
    format!("<{tag}.{}@test.example>", uuid::Uuid::now_v7().simple())
}
