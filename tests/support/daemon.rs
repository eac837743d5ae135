//! The real daemon, started in-process (`mailbridge::run` on port 0) or as a
//! child process of the built binary (for crash tests).

use std::{path::Path, time::Duration};

use mailbridge::config::{Config, WebhookConfig};
use tokio_util::sync::CancellationToken;

use super::{
    receiver::{Receiver, SECRET},
    stack::{Stack, User},
};

pub const API_KEY: &str = "test-api-key-0123456789";

/// A test configuration: its own data folder, the stack's CA, the receiver,
/// and short retry delays so tests do not wait minutes.
pub fn test_config(data: &Path, stack: &Stack, receiver: &Receiver) -> Config {
    let mut config = Config::default();
    config.storage.path = data.to_path_buf();
    config.api.keys = vec![API_KEY.into()];
    config.webhooks = vec![WebhookConfig {
        url: receiver.url.clone(),
        secret: SECRET.into(),
    }];
    config.tls.extra_roots = vec![stack.ca_cert.clone()];
    config.delivery.retry_min_ms = 100;
    config.delivery.retry_max_ms = 1_000;
    config.sync.reconnect_min_ms = 100;
    config.sync.reconnect_max_ms = 1_000;
    config.sync.step_timeout_secs = 20;
    config.sync.reauth_confirm_secs = 1;
    config.sync.token_refresh_margin_secs = 2;
    config.server.shutdown_grace_secs = 5;
    on_the_chosen_engine(&mut config, data);
    config
}

/// `TEST_STORE_BACKEND=postgres` (scripts/test.sh's second pass) puts
/// the daemon's store on the test PostgreSQL, in a schema of its own, so
/// every integration test runs on both engines. Files (sources, event
/// bodies) stay in the data folder either way. The schema is named after
/// the data folder, so a test that starts the daemon again on the same
/// folder finds the same store.
pub fn on_the_chosen_engine(config: &mut Config, data: &Path) {
    if std::env::var("TEST_STORE_BACKEND").as_deref() != Ok("postgres") {
        return;
    }
    config.storage.backend = mailbridge::config::StorageBackend::Postgres;
    config.storage.postgres.url = Some(test_postgres_url());
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(data.as_os_str().as_encoded_bytes());
    config.storage.postgres.schema = format!(
        "t_{}",
        digest
            .iter()
            .take(12)
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    );
    config.storage.postgres.pool_size = 4;
}

/// The URL scripts/postgres/start.sh wrote, or `TEST_POSTGRES_URL`.
pub fn test_postgres_url() -> String {
    std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| postgres_env("TEST_POSTGRES_URL"))
}

/// A value scripts/postgres/start.sh wrote into its env file.
pub fn postgres_env(name: &str) -> String {
    let runtime = std::env::var("TEST_POSTGRES_RUNTIME").unwrap_or_else(|_| {
        format!(
            "{}/mailbridge-postgres",
            std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into())
        )
    });
    let env = std::fs::read_to_string(format!("{runtime}/postgres.env"))
        .expect("the test PostgreSQL needs scripts/postgres/start.sh to have run");
    env.lines()
        .find_map(|line| line.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} in postgres.env"))
        .to_string()
}

pub struct Daemon {
    pub base: String,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    config: Config,
    panics: PanicWatch,
}

/// Fails the test, when the daemon is stopped or dropped, if anything in
/// the process panicked meanwhile outside the tests' own code: a panic is a
/// bug even when a supervisor starts the task again and the test's mail
/// still arrives. Tests in one binary share the process, so a panic during
/// another test's run fails this one too; either way the run is red.
struct PanicWatch {
    since: u64,
    allowed: bool,
}

impl PanicWatch {
    fn start() -> PanicWatch {
        mailbridge::panics::count_from_now_on();
        PanicWatch {
            since: mailbridge::panics::count(),
            allowed: false,
        }
    }
}

impl Drop for PanicWatch {
    fn drop(&mut self) {
        if self.allowed || std::thread::panicking() {
            return;
        }
        // A test's own failed assertion is its own failure, not the daemon's.
        let panics: Vec<String> = mailbridge::panics::after(self.since)
            .into_iter()
            .filter(|panic| !panic.place.starts_with("tests/"))
            .map(|panic| format!("{}: {}", panic.place, panic.message))
            .collect();
        assert!(
            panics.is_empty(),
            "the daemon panicked (or a worker stopped by itself) during this test:\n{}",
            panics.join("\n")
        );
    }
}

impl Daemon {
    pub async fn start(config: Config) -> Daemon {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .try_init();
        let panics = PanicWatch::start();
        let started = std::time::Instant::now();
        loop {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let shutdown = CancellationToken::new();
            let mut task =
                tokio::spawn(mailbridge::run(config.clone(), listener, shutdown.clone()));
            let ready = Daemon::ready_at(&base);
            let ended = tokio::select! {
                () = ready => None,
                ended = &mut task => Some(ended),
            };
            match ended {
                None => {
                    return Daemon {
                        base,
                        http: reqwest::Client::new(),
                        shutdown,
                        task,
                        config,
                        panics,
                    };
                }
                // Started again in this process on the same data right after
                // a stop: sled lets go of its lock file a moment after the
                // last handle is dropped (its own tests block on it instead).
                Some(Ok(Err(err)))
                    if format!("{err:#}").contains("could not acquire lock")
                        && started.elapsed() < super::DEADLINE =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some(ended) => panic!("the daemon ended before it was ready: {ended:?}"),
            }
        }
    }

    async fn ready_at(base: &str) {
        let http = reqwest::Client::new();
        let url = format!("{base}/readyz");
        super::eventually(
            "the daemon to be ready",
            super::DEADLINE,
            async || match http.get(&url).send().await {
                Ok(r) if r.status().is_success() => Some(()),
                _ => None,
            },
        )
        .await;
    }

    /// For a test that makes the daemon panic on purpose: its panics do not
    /// fail it.
    pub fn allow_panics(&mut self) {
        self.panics.allowed = true;
    }

    /// What it was started with, to start it again on the same data.
    pub fn config(&self) -> Config {
        self.config.clone()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("daemon stops within its grace period")
            .expect("daemon task");
        result.expect("daemon ran cleanly");
    }
}

/// Calls the API with the test key.
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api {
            base: base.to_string(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(API_KEY)
            .timeout(Duration::from_secs(120));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("API reachable");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    pub async fn put_contact(&self, location: &str, id: &str, email: &str, users: &[&str]) {
        let (status, body) = self
            .send(
                reqwest::Method::PUT,
                &format!("/v1/locations/{location}/contacts/{id}"),
                Some(
                    serde_json::json!({"emails": [email], "name": id, "assigned_user_ids": users}),
                ),
            )
            .await;
        assert_eq!(status, 200, "put contact: {body}");
    }

    pub async fn connect(
        &self,
        location: &str,
        user_id: &str,
        stack: &Stack,
        user: &User,
    ) -> serde_json::Value {
        self.connect_with(location, user_id, stack, user, serde_json::json!({}))
            .await
    }

    /// Connects with extra fields (e.g. `daily_send_limit`) merged into the body.
    pub async fn connect_with(
        &self,
        location: &str,
        user_id: &str,
        stack: &Stack,
        user: &User,
        extra: serde_json::Value,
    ) -> serde_json::Value {
        let mut request = serde_json::json!({
            "email": user.address,
            "provider": "imap",
            "auth": {"type": "password", "username": user.address, "password": user.password},
            "imap": stack.imap_endpoint(),
            "smtp": stack.smtp_endpoint(),
        });
        if let (Some(body), serde_json::Value::Object(extra)) = (request.as_object_mut(), extra) {
            body.extend(extra);
        }
        let (status, body) = self
            .send(
                reqwest::Method::PUT,
                &format!("/v1/locations/{location}/users/{user_id}/mailbox"),
                Some(request),
            )
            .await;
        assert_eq!(status, 200, "connect mailbox: {body}");
        body
    }

    /// Waits until the mailbox's sync sessions are up (state `active`).
    pub async fn wait_active(&self, location: &str, user_id: &str) {
        super::eventually(
            "the mailbox to become active",
            super::DEADLINE,
            async || {
                let (_, body) = self
                    .send(
                        reqwest::Method::GET,
                        &format!("/v1/locations/{location}/users/{user_id}/mailbox"),
                        None,
                    )
                    .await;
                (body["state"] == "active").then_some(())
            },
        )
        .await;
    }
}

impl Api {
    /// POST a CRM send; returns status, body and the Retry-After header.
    pub async fn send_message(
        &self,
        location: &str,
        user_id: &str,
        body: serde_json::Value,
        idempotency_key: Option<&str>,
    ) -> (u16, serde_json::Value, Option<String>) {
        let mut request = self
            .http
            .post(format!(
                "{}/v1/locations/{location}/users/{user_id}/messages",
                self.base
            ))
            .bearer_auth(API_KEY)
            .timeout(Duration::from_secs(120))
            .json(&body);
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let response = request.send().await.expect("API reachable");
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let json = response.json().await.unwrap_or(serde_json::Value::Null);
        (status, json, retry_after)
    }
}
