//! The `mailbridge` command: `serve` runs the daemon, `inspect` shows how a
//! message parses and why it would or would not sync.

use std::{fmt::Write as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use mailbridge::{
    config::{Config, LogFormat},
    mime,
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
    /// Print how the bridge parses a message file (.eml).
    Inspect {
        file: PathBuf,
        /// Print JSON (the webhook `data` shape plus the thread keys).
        #[arg(long)]
        json: bool,
    },
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
        Command::Inspect { file, json } => inspect(&file, json),
    }
}

fn serve(config_file: Option<PathBuf>, log_format: Option<LogFormatArg>) -> ExitCode {
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
