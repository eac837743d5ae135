//! The daemon as a child process of the built binary, for tests that kill it.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use mailbridge::config::Config;
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
};

pub struct ChildDaemon {
    pub base: String,
    child: Child,
    /// Everything the daemon logged so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ChildDaemon {
    /// Starts `mailbridge serve` on port 0 and learns the port from its log.
    pub async fn start(config: &Config, dir: &Path) -> ChildDaemon {
        ChildDaemon::start_logging(config, dir, "info").await
    }

    /// As `start`, with `RUST_LOG` set to `filter`.
    pub async fn start_logging(config: &Config, dir: &Path, filter: &str) -> ChildDaemon {
        let mut config = config.clone();
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        let file: PathBuf = dir.join("mailbridge.toml");
        std::fs::write(&file, toml::to_string(&config).expect("config as TOML")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_mailbridge"))
            .args(["serve", "--config"])
            .arg(&file)
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the mailbridge binary");
        let stderr = child.stderr.take().unwrap();
        let (found, port) = tokio::sync::oneshot::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = log.clone();
        tokio::spawn(async move {
            let mut found = Some(found);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[daemon] {line}");
                kept.lock().unwrap().push(line.clone());
                if let Some(rest) = line.split("listen=").nth(1)
                    && let Some(tx) = found.take()
                {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
            }
        });
        let address = tokio::time::timeout(super::DEADLINE, port)
            .await
            .expect("the daemon logs its address")
            .expect("the daemon started");
        ChildDaemon {
            base: format!("http://{address}"),
            child,
            log,
        }
    }

    /// Resident memory of the daemon process now, from /proc (KiB).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("running");
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("/proc status of the daemon")
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .expect("VmRSS in /proc status")
    }

    /// Everything the daemon logged so far, one line each.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Fails the test if the daemon panicked so far (the standard hook's
    /// words on its stderr) or restarted a worker: either is a bug, even
    /// when the test's mail still arrived.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        let faults: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("panicked at") || line.contains("restarting it in"))
            .collect();
        assert!(
            faults.is_empty(),
            "the daemon panicked or restarted a worker:\n{}",
            faults.join("\n")
        );
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(mut self) {
        self.assert_no_panic();
        self.child.kill().await.expect("SIGKILL the daemon");
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        self.assert_no_panic();
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        tokio::time::timeout(super::DEADLINE, self.child.wait())
            .await
            .expect("the daemon exits after SIGTERM")
            .expect("wait")
    }
}
