//! Starting and stopping the whole daemon: `run(config, listener, shutdown)`
//! wires the rooms together, so tests start exactly what `mailbridge serve` runs.

use std::{
    sync::{Arc, OnceLock, atomic::AtomicBool},
    time::Duration,
};

use anyhow::Context as _;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::sync_status::SyncStatus;
use crate::{
    api::{self, AppState},
    auth::Auth,
    config::Config,
    imap::{ImapConnector, SyncContext},
    ingest::Ingest,
    mailbox_changes::MailboxChanges,
    memory_budget::MemoryBudget,
    oauth::{TokenHttp, state::StateSigner},
    scheduler::Scheduler,
    send_queue::{SendQueue, SendSignal},
    smart_address::SmartAddresses,
    smtp::Submitter,
    store::{SledStore, Store, secret_box::SecretBox},
    supervise::{Health, supervise},
    tls,
    webhook::{Deliverer, OutboxSignal},
};

const API_KEY_SETTING: &str = "generated_api_key_sha256";
const OAUTH_STATE_KEY_SETTING: &str = "oauth_state_key";
/// Under which the secret of the Auto BCC addresses is kept (sealed).
const AUTO_BCC_KEY_SETTING: &str = "auto_bcc_key";

fn metrics_handle() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|()| handle)
        })
        .clone()
}

/// The accepted API keys' hashes. With no key configured, one is generated on
/// first start, its hash stored and the key itself printed once.
fn api_key_hashes(config: &Config, store: &dyn Store) -> anyhow::Result<Vec<[u8; 32]>> {
    let mut hashes: Vec<[u8; 32]> = config.api.keys.iter().map(|k| api::hash_key(k)).collect();
    match store.setting(API_KEY_SETTING)? {
        Some(stored) => {
            if let Ok(hash) = <[u8; 32]>::try_from(stored.as_slice()) {
                hashes.push(hash);
            }
        }
        None if config.api.keys.is_empty() => {
            let mut raw = [0u8; 32];
            getrandom::fill(&mut raw)
                .map_err(|e| anyhow::anyhow!("no randomness for an API key: {e}"))?;
            let key = format!("mb_{}", URL_SAFE_NO_PAD.encode(raw));
            let hash = api::hash_key(&key);
            store.put_setting(API_KEY_SETTING, &hash)?;
            hashes.push(hash);
            println!(
                "mailbridge: generated an API key (shown only this once; only its hash is stored):\n\n    {key}\n"
            );
            tracing::warn!("generated an API key and printed it on standard output; store it now");
        }
        None => {}
    }
    Ok(hashes)
}

/// The retention sweep, every `every` (issue 21): what the store's rules
/// let go, and expired OAuth sign-in nonces, counted per kind in
/// `mailbridge_retention_removed_total`. A pass that stopped at its batch
/// is followed by the next at once.
async fn sweep_on_timer(
    store: Arc<dyn Store>,
    retention: crate::store::Retention,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let pass_store = store.clone();
        let rules = retention.clone();
        let pass = tokio::task::spawn_blocking(move || {
            let now = chrono::Utc::now();
            let mut report = pass_store.sweep(now.timestamp_millis(), &rules)?;
            let nonces =
                crate::api::oauth::forget_expired_flows(pass_store.as_ref(), now.timestamp())?;
            report.oauth_nonces = nonces;
            Ok::<_, crate::store::StoreError>(report)
        })
        .await;
        let mut again_at_once = false;
        match pass {
            Ok(Ok(report)) => {
                metrics::counter!("mailbridge_retention_sweeps_total").increment(1);
                for (kind, removed) in report.kinds() {
                    metrics::counter!("mailbridge_retention_removed_total", "kind" => kind)
                        .increment(removed as u64);
                }
                if report.removed() > 0 {
                    tracing::info!(removed = report.removed(), ?report, "retention sweep");
                }
                again_at_once = report.more;
            }
            Ok(Err(err)) => tracing::warn!("the retention sweep failed: {err:#}"),
            Err(err) => tracing::warn!("the retention sweep stopped: {err}"),
        }
        let wait = if again_at_once { Duration::ZERO } else { every };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The data folder holds credentials (encrypted) and their key: owner only.
/// Webhook URLs and OAuth endpoints that name an IP address are checked
/// against `[network]` at start: reqwest connects to those without asking
/// the resolver that checks every name.
fn check_configured_urls(config: &Config, egress: crate::egress::Egress) -> anyhow::Result<()> {
    let oauth = [
        crate::model::Provider::Gmail,
        crate::model::Provider::Outlook,
        crate::model::Provider::Imap,
    ]
    .into_iter()
    .flat_map(|provider| {
        let oauth = config.providers.settings(provider).oauth;
        [oauth.token_url, oauth.userinfo_url]
    })
    .flatten();
    for url in config.webhooks.iter().map(|w| w.url.clone()).chain(oauth) {
        // Named by host only: a webhook URL may carry a token.
        let parsed =
            reqwest::Url::parse(&url).context("a configured webhook or OAuth URL is not an URL")?;
        egress.check_url(&parsed).with_context(|| {
            format!(
                "the configured URL on {} is refused by [network]",
                parsed.host_str().unwrap_or_default()
            )
        })?;
    }
    Ok(())
}

fn create_private_dir(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if !path.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .with_context(|| format!("creating the data folder {}", path.display()))?;
    }
    Ok(())
}

/// The store on the configured engine: sled in the data folder, or
/// PostgreSQL (files still in the data folder). For `serve` and for the
/// commands that read a stopped daemon's store.
pub fn open_store(
    config: &Config,
    secrets: SecretBox,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<Arc<dyn Store>> {
    use crate::{
        config::StorageBackend,
        store::{
            engine::postgres::{PostgresEngine, PostgresOptions},
            kv_store::KvStore,
        },
    };
    Ok(match config.storage.backend {
        StorageBackend::Sled => Arc::new(
            SledStore::open(&config.storage.path, secrets).context("opening the data folder")?,
        ),
        StorageBackend::Postgres => {
            let postgres = &config.storage.postgres;
            let engine = crate::offload::blocking(|| {
                PostgresEngine::open(PostgresOptions {
                    url: postgres.connection_url()?,
                    pool_size: postgres.pool_size,
                    schema: postgres.schema.clone(),
                    tls,
                })
            })?;
            Arc::new(
                KvStore::with_engine(engine, &config.storage.path, secrets)
                    .context("opening the store on PostgreSQL")?,
            )
        }
    })
}

/// Runs the daemon on `listener` until `shutdown` is cancelled, then stops
/// within the configured grace period.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::panics::count_from_now_on();
    config.validate()?;
    let tls = tls::client_config(&config.tls.extra_roots)?;
    create_private_dir(&config.storage.path)?;
    let secrets = SecretBox::load(
        config.storage.encryption_key.as_deref(),
        &config.storage.key_file(),
    )?;
    let store = open_store(&config, secrets, tls.clone())?;
    let key_hashes = api_key_hashes(&config, store.as_ref())?;
    let signal = OutboxSignal::default();
    let egress = config.network.egress();
    let connector = ImapConnector::new(
        tls.clone(),
        Duration::from_secs(config.sync.step_timeout_secs),
        egress,
    )
    .with_login_gate(login_gate(&config));
    let auth = Arc::new(Auth::new(
        store.clone(),
        config.providers.clone(),
        TokenHttp::new(
            (*tls).clone(),
            Duration::from_secs(config.sync.step_timeout_secs),
            egress,
        )
        .context("building the OAuth HTTP client")?,
        signal.clone(),
        Duration::from_secs(config.sync.token_refresh_margin_secs),
        Duration::from_secs(config.sync.reauth_confirm_secs),
    ));
    let oauth_state = StateSigner::new(store.secret_key(OAUTH_STATE_KEY_SETTING)?);
    let smart = SmartAddresses::new(
        &config.smart_address_template(),
        store.secret_key(AUTO_BCC_KEY_SETTING)?,
    )?;
    let memory = MemoryBudget::new(config.sync.memory_budget_bytes);
    let ctx = Arc::new(SyncContext {
        store: store.clone(),
        memory: memory.clone(),
        connector: connector.clone(),
        auth: auth.clone(),
        ingest: Ingest::new(
            store.clone(),
            signal.clone(),
            &config.server.public_url,
            smart.clone(),
        ),
        providers: config.providers.clone(),
        sync: config.sync.clone(),
        signal: signal.clone(),
        status: SyncStatus::default(),
    });
    let sync_shutdown = CancellationToken::new();
    let scheduler = Arc::new(Scheduler::new(ctx.clone(), sync_shutdown.clone()));
    let send_signal = SendSignal::default();
    let send_queue = SendQueue {
        store: store.clone(),
        memory,
        submitter: Submitter::new(
            &config.tls.extra_roots,
            Duration::from_secs(config.sending.timeout_secs),
            egress,
        )?,
        connector: connector.clone(),
        auth: ctx.auth.clone(),
        outbox: signal.clone(),
        signal: send_signal.clone(),
        retry_min: Duration::from_millis(config.sending.retry_min_ms),
        retry_max: Duration::from_millis(config.sending.retry_max_ms),
    };
    let health = Health::default();
    let sending_shutdown = CancellationToken::new();
    let sending = tokio::spawn(supervise(
        "send queue",
        health.clone(),
        sending_shutdown.clone(),
        {
            let shutdown = sending_shutdown.clone();
            move || send_queue.clone().run(shutdown.clone())
        },
    ));
    let changes_signal = crate::wakeup::Wakeup::default();
    let mailbox_changes = MailboxChanges {
        store: store.clone(),
        auth: auth.clone(),
        connector: connector.clone(),
        signal: changes_signal.clone(),
        retry_min: Duration::from_millis(config.sending.retry_min_ms),
        retry_max: Duration::from_millis(config.sending.retry_max_ms),
        workers: config.sync.change_workers,
    };
    let changing = tokio::spawn(supervise(
        "mailbox changes",
        health.clone(),
        sending_shutdown.clone(),
        {
            let shutdown = sending_shutdown.clone();
            move || mailbox_changes.clone().run(shutdown.clone())
        },
    ));
    let retention = tokio::spawn(sweep_on_timer(
        store.clone(),
        config.retention(),
        config.retention.sweep_every.0,
        sending_shutdown.clone(),
    ));

    check_configured_urls(&config, egress)?;
    let http = reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        // Every name looked up is checked against [network] (see egress).
        .dns_resolver(egress.resolver())
        // A followed 301/302/303 turns the POST into a body-less GET whose 2xx
        // would count as delivered: a redirect is a failed attempt instead.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("mailbridge/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building the webhook HTTP client")?;
    let deliverer = Deliverer::new(
        store.clone(),
        &config.webhooks,
        http,
        config.delivery.clone(),
        signal.clone(),
    )?;
    let delivery_shutdown = CancellationToken::new();
    let delivery = tokio::spawn(supervise(
        "webhook worker",
        health.clone(),
        delivery_shutdown.clone(),
        {
            let shutdown = delivery_shutdown.clone();
            move || deliverer.clone().run(shutdown.clone())
        },
    ));

    let state = AppState {
        store: store.clone(),
        scheduler: scheduler.clone(),
        connector,
        providers: config.providers.clone(),
        signal: signal.clone(),
        key_hashes: Arc::new(key_hashes),
        ready: Arc::new(AtomicBool::new(false)),
        metrics: metrics_handle(),
        smart,
        ingest: ctx.ingest.clone(),
        changes_signal,
        send_signal,
        public_url: config.server.public_url.trim_end_matches('/').to_string(),
        auth,
        oauth_state,
        health,
        metrics_public: config.server.metrics_public,
        sync_status: ctx.status.clone(),
    };
    let started = scheduler.start_all()?;
    tracing::info!(mailboxes = started, listen = %listener.local_addr()?, "mailbridge running");
    api::mark_ready(&state, true);

    let app = api::router(state.clone());
    let api_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { api_shutdown.cancelled().await })
            .await
    });

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    api::mark_ready(&state, false);
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let stopping = async {
        sync_shutdown.cancel();
        sending_shutdown.cancel();
        scheduler.wait().await;
        let _ = sending.await;
        let _ = changing.await;
        let _ = retention.await;
        delivery_shutdown.cancel();
        let _ = delivery.await;
        let _ = server.await;
    };
    if tokio::time::timeout(grace, stopping).await.is_err() {
        tracing::warn!(
            "shutdown took longer than {grace:?}; stopping anyway (nothing acknowledged is lost)"
        );
    }
    Ok(())
}

/// The login gate: the configured concurrency, each provider's IMAP server
/// at its pace, any other at `[sync] logins_per_second`.
fn login_gate(config: &Config) -> crate::imap::login_gate::LoginGate {
    let paces = crate::model::Provider::ALL
        .into_iter()
        .filter_map(|provider| {
            let settings = config.providers.settings(provider);
            let imap = settings.imap?;
            Some(((imap.host, imap.port), settings.logins_per_second?))
        })
        .collect();
    crate::imap::login_gate::LoginGate::new(
        config.sync.max_concurrent_logins,
        paces,
        config.sync.logins_per_second,
    )
}
