//! The `mailbridge` command: `serve` runs the daemon, `inspect` shows how a
//! message parses and why it would or would not sync.

use std::{fmt::Write as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use mailbridge::{
    config::{Config, LogFormat},
    mime,
    model::FolderRole,
};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "mailbridge",
    version,
    about = "Two-way sync between users' own mailboxes and a CRM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (API, IMAP sync, webhook delivery).
    Serve {
        /// TOML config file; every key can also be set as MAILBRIDGE_SECTION__KEY.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log format, overriding [log] format.
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// Print how the bridge parses a message file (.eml) and, with
    /// --mailbox, what the sync rules decide for it and why.
    Inspect {
        file: PathBuf,
        /// Print JSON (the webhook `data` shape plus the thread keys).
        #[arg(long)]
        json: bool,
        /// Route the message as if it arrived now in this connected mailbox:
        /// for each of its integrations, the decision and the rule behind it.
        #[arg(long)]
        mailbox: Option<String>,
        /// The folder it arrives in.
        #[arg(long, value_enum, default_value = "inbox")]
        folder: FolderArg,
        /// TOML config file (the data folder to read, when the daemon is stopped).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Ask the running daemon at this base URL instead (its data folder is
        /// locked while it runs), with the first of the config's [api] keys.
        #[arg(long)]
        api: Option<String>,
    },
    /// Print the HTTP API's OpenAPI 3.1 document (what `GET /openapi.json`
    /// serves), for generating a client without a running daemon.
    Openapi,
    /// Copy a stopped install's sled store into an empty PostgreSQL schema
    /// (run again after a crash midway to finish it). Message sources and
    /// the encryption key stay where they are: start the daemon on
    /// PostgreSQL with the same storage.path and key.
    Migrate {
        /// The data folder of the stopped sled install (storage.path).
        #[arg(long)]
        from: PathBuf,
        /// The target database: postgres://user@host:port/database.
        #[arg(
            long,
            env = "MAILBRIDGE_STORAGE__POSTGRES__URL",
            hide_env_values = true
        )]
        to: String,
        /// The schema to fill (created when missing; must hold no data).
        #[arg(long, default_value = "mailbridge")]
        schema: String,
        /// TOML config file, for [tls] extra_roots to trust the database's certificate.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FolderArg {
    Inbox,
    Sent,
}

impl From<FolderArg> for FolderRole {
    fn from(folder: FolderArg) -> Self {
        match folder {
            FolderArg::Inbox => FolderRole::Inbox,
            FolderArg::Sent => FolderRole::Sent,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Human,
    Json,
}

/// Targets whose debug and trace output carries credentials: lettre logs
/// every SMTP line it writes (`AUTH XOAUTH2 <token>`, `AUTH PLAIN <password>`,
/// the message itself) at debug, async-imap every command (`LOGIN user
/// password`) at trace. They stay at info whatever the filter asks for.
const SECRET_BEARING_TARGETS: [&str; 2] = ["lettre::transport::smtp=info", "async_imap=info"];

fn init_logging(format: LogFormat, level: &str) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    for directive in SECRET_BEARING_TARGETS {
        if let Ok(directive) = directive.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, log_format } => serve(config, log_format),
        Command::Inspect {
            file,
            json,
            mailbox: None,
            ..
        } => inspect(&file, json),
        Command::Inspect {
            file,
            json,
            mailbox: Some(mailbox),
            folder,
            config,
            api,
        } => inspect_routing(&file, json, &mailbox, folder.into(), config, api),
        Command::Openapi => print_openapi(),
        Command::Migrate {
            from,
            to,
            schema,
            config,
        } => match migrate(&from, to, schema, config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("mailbridge migrate: {err:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Shows the copy's progress on a terminal (indicatif draws nothing when
/// stderr is not one).
struct ProgressBar(indicatif::ProgressBar);

impl mailbridge::store::migrate::Progress for ProgressBar {
    fn total(&self, entries: u64) {
        self.0.set_length(entries);
    }
    fn tree(&self, tree: mailbridge::store::engine::Tree) {
        self.0.set_message(tree.name());
    }
    fn copied(&self, entries: u64) {
        self.0.inc(entries);
    }
}

fn migrate(
    from: &std::path::Path,
    url: String,
    schema: String,
    config_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use mailbridge::store::engine::{
        postgres::{PostgresEngine, PostgresOptions},
        sled::SledEngine,
    };
    let config = Config::load(config_file.as_deref())?;
    let database = from.join("db");
    anyhow::ensure!(
        database.join("conf").exists(),
        "{} holds no mailbridge sled database (no db/ folder): name the data folder (storage.path)",
        from.display()
    );
    let source = SledEngine::open(&database).map_err(|err| {
        if format!("{err:#}").contains("could not acquire lock") {
            anyhow::anyhow!(
                "the data folder {} is in use: stop the daemon before migrating",
                from.display()
            )
        } else {
            err
        }
    })?;
    let target = PostgresEngine::open(PostgresOptions {
        url,
        pool_size: 2,
        schema: schema.clone(),
        tls: mailbridge::tls::client_config(&config.tls.extra_roots)?,
    })?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>20} [{bar:40}] {pos}/{len} entries ({eta} left)",
        )
        .context("the progress bar's template")?,
    );
    let progress = ProgressBar(bar);
    let migrated = mailbridge::store::migrate::copy_store(&source, &target, &progress)?;
    progress.0.finish_and_clear();
    if migrated.resumed {
        println!("an unfinished earlier migration into schema {schema} was completed");
    }
    let total: usize = migrated.trees.iter().map(|(_, n)| n).sum();
    println!("copied {total} entries into schema {schema}; counts checked:");
    for (tree, copied) in &migrated.trees {
        if *copied > 0 {
            println!("  {:<22} {copied}", tree.name());
        }
    }
    println!(
        "next: start the daemon with [storage] backend = \"postgres\", the same storage.path \
         ({}, which keeps message sources and event bodies) and the same encryption key",
        from.display()
    );
    Ok(())
}

fn print_openapi() -> ExitCode {
    match serde_json::to_string_pretty(&mailbridge::api::openapi::document()) {
        Ok(document) => {
            println!("{document}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("mailbridge: the OpenAPI document could not be written: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Every mailbox holds an IMAP connection per watched folder (two or more
/// sockets each): the soft limit on open files (often 1,024) would stop the
/// daemon near 500 mailboxes. It is raised to the hard limit, which only the
/// administrator sets.
fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        tracing::info!(
            open_files = ?limit.current,
            "open-file limit already at the hard limit"
        );
        return;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::info!(
            from = ?limit.current,
            to = ?limit.maximum,
            "open-file limit raised to the hard limit"
        ),
        Err(err) => tracing::warn!(
            open_files = ?limit.current,
            "could not raise the open-file limit ({err}); about one mailbox per 2 open files"
        ),
    }
}

fn serve(config_file: Option<PathBuf>, log_format: Option<LogFormatArg>) -> ExitCode {
    // Everything the daemon creates (sled's files, message sources, the
    // key) is its owner's alone, whatever the umask it was started with.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let config = match Config::load(config_file.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("mailbridge: {err:#}");
            return ExitCode::from(2);
        }
    };
    let format = match log_format {
        Some(LogFormatArg::Json) => LogFormat::Json,
        Some(LogFormatArg::Human) => LogFormat::Human,
        None => config.log.format,
    };
    init_logging(format, &config.log.level);
    raise_open_file_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("mailbridge: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen))?;
        let shutdown = CancellationToken::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            on_signal.cancel();
        });
        mailbridge::run(config, listener, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("mailbridge: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut interrupt), Ok(mut terminate)) => {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn inspect(file: &std::path::Path, json: bool) -> ExitCode {
    let raw = match std::fs::read(file) {
        Ok(raw) => raw,
        Err(err) => {
            eprintln!("mailbridge: cannot read {}: {err}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let message = mime::parse(&raw);
    let mut out = String::new();
    let view = serde_json::json!({
        "message_id": message.message_id,
        "in_reply_to": message.in_reply_to,
        "references": message.references,
        "from": message.from,
        "to": message.to,
        "cc": message.cc,
        "bcc": message.bcc,
        "subject": message.subject,
        "date": message.date,
        "text": message.text,
        "html": message.html,
        "attachments": message.attachments,
        "thread_keys": message.thread_keys(),
        "parse_warnings": message.parse_warnings,
    });
    if json {
        match serde_json::to_string_pretty(&view) {
            Ok(text) => out = text + "\n",
            Err(err) => {
                eprintln!("mailbridge: {err}");
                return ExitCode::FAILURE;
            }
        }
        return emit(&out);
    }
    let list = |addresses: &[mailbridge::model::EmailAddress]| {
        addresses
            .iter()
            .map(|a| match &a.name {
                Some(name) => format!("{name} <{}>", a.email),
                None => a.email.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "From:        {}",
        message
            .from
            .as_ref()
            .map(|f| list(std::slice::from_ref(f)))
            .unwrap_or_else(|| "(none)".into())
    );
    let _ = writeln!(out, "To:          {}", list(&message.to));
    let _ = writeln!(out, "Cc:          {}", list(&message.cc));
    let _ = writeln!(out, "Bcc:         {}", list(&message.bcc));
    let _ = writeln!(
        out,
        "Subject:     {}",
        message.subject.as_deref().unwrap_or("(none)")
    );
    let _ = writeln!(
        out,
        "Date:        {}",
        message
            .date
            .map(|d| d.to_rfc3339())
            .unwrap_or_else(|| "(none)".into())
    );
    let _ = writeln!(
        out,
        "Message-ID:  {}",
        message.message_id.as_deref().unwrap_or("(none)")
    );
    let _ = writeln!(
        out,
        "In-Reply-To: {}",
        message.in_reply_to.as_deref().unwrap_or("(none)")
    );
    let _ = writeln!(out, "References:  {}", message.references.join(" "));
    let _ = writeln!(out, "Thread keys: {}", message.thread_keys().join(" "));
    let _ = writeln!(
        out,
        "Text:        {} characters",
        message.text.as_ref().map_or(0, |t| t.chars().count())
    );
    let _ = writeln!(
        out,
        "HTML:        {} characters",
        message.html.as_ref().map_or(0, |t| t.chars().count())
    );
    for a in &message.attachments {
        let _ = writeln!(
            out,
            "Attachment {}: {} ({}, {} bytes)",
            a.index, a.filename, a.content_type, a.size
        );
    }
    for w in &message.parse_warnings {
        let _ = writeln!(out, "Warning:     {w}");
    }
    emit(&out)
}

/// `inspect --mailbox`: the rules' verdicts, from the running daemon (--api)
/// or from the data folder of a stopped one.
fn inspect_routing(
    file: &std::path::Path,
    json: bool,
    mailbox: &str,
    folder: FolderRole,
    config_file: Option<PathBuf>,
    api: Option<String>,
) -> ExitCode {
    let result = (|| -> anyhow::Result<serde_json::Value> {
        use anyhow::Context as _;
        let raw = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let config = Config::load(config_file.as_deref())?;
        match api {
            Some(base) => verdicts_from_daemon(&config, &base, mailbox, folder, raw),
            None => verdicts_from_data_folder(&config, mailbox, folder, &raw),
        }
    })();
    let described = match result {
        Ok(described) => described,
        Err(err) => {
            eprintln!("mailbridge: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        return match serde_json::to_string_pretty(&described) {
            Ok(text) => emit(&(text + "\n")),
            Err(err) => {
                eprintln!("mailbridge: {err}");
                ExitCode::FAILURE
            }
        };
    }
    emit(&render_verdicts(&described))
}

fn verdicts_from_daemon(
    config: &Config,
    base: &str,
    mailbox: &str,
    folder: FolderRole,
    raw: Vec<u8>,
) -> anyhow::Result<serde_json::Value> {
    let key = config.api.keys.first().ok_or_else(|| {
        anyhow::anyhow!("no API key to ask the daemon with: give one in the config's [api] keys")
    })?;
    let tls = mailbridge::tls::client_config(&config.tls.extra_roots)?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(60))
        .build()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/v1/inspect", base.trim_end_matches('/')),
            &[("mailbox", mailbox), ("folder", &folder.key())],
        )?;
        let response = client
            .post(url)
            .bearer_auth(key)
            .header("content-type", "message/rfc822")
            .body(raw)
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        if !status.is_success() {
            anyhow::bail!("the daemon answered {status}: {body}");
        }
        Ok(body)
    })
}

fn verdicts_from_data_folder(
    config: &Config,
    mailbox: &str,
    folder: FolderRole,
    raw: &[u8],
) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context as _;
    use mailbridge::store::secret_box::SecretBox;
    let path = &config.storage.path;
    anyhow::ensure!(path.exists(), "no data folder at {}", path.display());
    let secrets = SecretBox::load(
        config.storage.encryption_key.as_deref(),
        &config.storage.key_file(),
    )?;
    let tls = mailbridge::tls::client_config(&config.tls.extra_roots)?;
    let store = mailbridge::daemon::open_store(config, secrets, tls).with_context(|| {
        format!(
            "opening {} (while the daemon runs it holds the data folder: pass --api http://{})",
            path.display(),
            config.server.listen
        )
    })?;
    let smart = mailbridge::smart_address::SmartAddresses::new(
        &config.smart_address_template(),
        store.secret_key("auto_bcc_key")?,
    )?;
    let ingest = mailbridge::ingest::Ingest::new(
        store,
        mailbridge::webhook::OutboxSignal::default(),
        &config.server.public_url,
        smart,
    );
    let address = mailbridge::model::normalize_email(mailbox);
    let verdicts = ingest.explain(&address, folder, raw)?;
    let report = mailbridge::api::inspect::describe(&address, folder, &mime::parse(raw), &verdicts);
    Ok(serde_json::to_value(report)?)
}

/// One line per integration: what happens to the message there, and why.
fn render_verdicts(described: &serde_json::Value) -> String {
    let text = |value: &serde_json::Value| value.as_str().unwrap_or("").to_string();
    let message = &described["message"];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Message {} \"{}\" in {} of {}:",
        text(&message["message_id"]),
        text(&message["subject"]),
        text(&described["folder"]),
        text(&described["mailbox"])
    );
    for verdict in described["verdicts"].as_array().into_iter().flatten() {
        let who = match (verdict["location_id"].as_str(), verdict["user_id"].as_str()) {
            (Some(location), Some(user)) => format!("{location}/{user}"),
            _ => "(no integration)".into(),
        };
        if verdict["synced"] != true {
            let _ = writeln!(out, "  {who}: ignored: {}", text(&verdict["reason"]));
            continue;
        }
        for created in verdict["contacts_created"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  {who}: creates contact {} <{}> (R15)",
                text(&created["id"]),
                text(&created["email"])
            );
        }
        let thread = match text(&verdict["thread"]).as_str() {
            "new" => "a new thread".to_string(),
            id => format!("thread {id}"),
        };
        for delivery in verdict["deliveries"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  {who}: → {}/{} as {} ({}), {thread}, by {}",
                text(&delivery["location_id"]),
                text(&delivery["contact_id"]),
                text(&delivery["direction"]),
                text(&delivery["origin"]),
                text(&delivery["rule"])
            );
        }
    }
    out
}

/// Writes to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn emit(text: &str) -> ExitCode {
    use std::io::Write as _;
    match std::io::stdout().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mailbridge: {err}");
            ExitCode::FAILURE
        }
    }
}
