//! What the benchmark programs share: the mail stack's settings, the release
//! daemon started as a child process, and waiting with a deadline.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::io::{AsyncBufReadExt as _, BufReader};

/// `stack.env` written by scripts/mailstack/start.sh.
pub fn stack_env() -> HashMap<String, String> {
    let runtime = std::env::var("MAILSTACK_RUNTIME").unwrap_or_else(|_| {
        std::env::temp_dir()
            .join("mailbridge-mailstack")
            .display()
            .to_string()
    });
    std::fs::read_to_string(format!("{runtime}/stack.env"))
        .expect("start the stack first: scripts/mailstack/start.sh")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

pub async fn wait_until<T>(what: &str, f: impl AsyncFnMut() -> Option<T>) -> T {
    wait_until_every(what, Duration::from_millis(20), f).await
}

/// As `wait_until`, asking every `interval`: for a question that costs the
/// daemon real work (listing every mailbox), so that asking does not weigh
/// on what is measured.
pub async fn wait_until_every<T>(
    what: &str,
    interval: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(interval).await;
    }
}

/// (current, peak) resident memory of a process, in MiB.
pub fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Ticks per second of the CPU times in /proc (USER_HZ).
fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant of the running system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// CPU seconds a process has used so far, user and system.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces:
    // utime and stime are the 12th and 13th of them.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let ticks: f64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|field| field.parse::<f64>().ok())
        .sum();
    ticks / clock_ticks()
}

/// CPU seconds the whole machine has spent busy so far, all cores together
/// (everything but idle and I/O wait).
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let times: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    let total: f64 = times.iter().take(8).sum();
    let idle: f64 = times.iter().skip(3).take(2).sum();
    (total - idle) / clock_ticks()
}

/// The release binary, serving on a port of its own choosing with API key `bench`.
pub struct BenchDaemon {
    pub base: String,
    pub pid: u32,
    child: tokio::process::Child,
    config_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl BenchDaemon {
    /// `extra` is appended to the generated TOML (e.g. a `[[webhooks]]` table).
    pub async fn start(env: &HashMap<String, String>, extra: &str) -> BenchDaemon {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = \"{}\"\n[api]\nkeys = [\"bench\"]\n[tls]\nextra_roots = [\"{}\"]\n[log]\nlevel = \"warn,mailbridge::daemon=info\"\n{extra}",
            dir.path().join("data").display(),
            env["MAILSTACK_CA_CERT"]
        );
        let config_file = dir.path().join("bench.toml");
        std::fs::write(&config_file, config).unwrap();
        let (child, pid, base) = spawn(&config_file).await;
        BenchDaemon {
            base,
            pid,
            child,
            config_file,
            _dir: dir,
        }
    }

    /// Stops the daemon (SIGTERM, as a service manager does) and starts it
    /// again on the same data folder and config; returns when it listens.
    pub async fn restart(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let _ = self.child.wait().await;
        let (child, pid, base) = spawn(&self.config_file).await;
        (self.child, self.pid, self.base) = (child, pid, base);
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

async fn spawn(config_file: &std::path::Path) -> (tokio::process::Child, u32, String) {
    let binary = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("mailbridge");
    let mut child = tokio::process::Command::new(&binary)
        .args(["serve", "--config"])
        .arg(config_file)
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (cargo build --release first)", binary.display()));
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines.next_line().await.unwrap().expect("daemon exited");
        if let Some(rest) = line.split("listen=").nth(1) {
            break format!("http://{}", rest.split_whitespace().next().unwrap());
        }
    };
    // Kept where BENCH_DAEMON_LOG names a file (why sessions failed, in a
    // run that went wrong); dropped otherwise.
    let mut kept = std::env::var_os("BENCH_DAEMON_LOG").and_then(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
    });
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(file) = kept.as_mut() {
                let _ = std::io::Write::write_all(file, format!("{line}\n").as_bytes());
            }
        }
    });
    (child, pid, base)
}

/// The machine's TCP sockets, from /proc: (local port, remote port, state
/// in the kernel's hex code, inode).
fn tcp_sockets() -> Vec<(u16, u16, String, String)> {
    let port = |address: &str| {
        address
            .rsplit(':')
            .next()
            .and_then(|hex| u16::from_str_radix(hex, 16).ok())
    };
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let (Some(local), Some(remote), Some(state), Some(inode)) = (
                fields.get(1).and_then(|a| port(a)),
                fields.get(2).and_then(|a| port(a)),
                fields.get(3),
                fields.get(9),
            ) {
                sockets.push((local, remote, state.to_string(), inode.to_string()));
            }
        }
    }
    sockets
}

/// Established TCP connections from process `pid` to `port` (its IMAP
/// sessions, with the server's port), read from /proc.
pub fn connections_to(pid: u32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = tcp_sockets()
        .into_iter()
        .filter(|(_, remote, state, _)| *remote == port && state == "01")
        .map(|(_, _, _, inode)| format!("socket:[{inode}]"))
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
                .filter(|link| inodes.contains(&link.display().to_string()))
                .count()
        })
        .unwrap_or(0)
}

/// Mailboxes `active` by the operators' listing (`GET /v1/mailboxes?state=active`,
/// page by page): every folder's session logged in and caught up.
pub async fn count_active(http: &reqwest::Client, base: &str) -> Option<usize> {
    let mut active = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/mailboxes?state=active&limit=1000");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let page: serde_json::Value = http
            .get(url)
            .bearer_auth("bench")
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        active += page["mailboxes"].as_array()?.len();
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return Some(active),
        }
    }
}

/// TCP connections the server on `port` still holds, closing ones included
/// (any state but LISTEN and TIME_WAIT, which no process holds), read from
/// /proc: zero once it has let go of every session.
pub fn server_connections(port: u16) -> usize {
    tcp_sockets()
        .iter()
        .filter(|(local, _, state, _)| *local == port && state != "0A" && state != "06")
        .count()
}
