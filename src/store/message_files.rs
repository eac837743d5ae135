//! Message sources, kept as files beside the database: too big for sled's
//! pages, read whole or not at all. The store writes them before the commit
//! that makes them reachable, removes them when nothing can reach them any
//! more, and prunes them by age; nothing outside the store touches the folder.
//! These are the CRM's sends; synced messages go to `source_segments`
//! (older databases have theirs here, still read and pruned).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

/// Which copy of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceCopy {
    /// The message as the mailbox holds it: synced from it, or (a CRM send)
    /// as filed in Sent. Served by `/raw` and the attachment links.
    Filed,
    /// A CRM send as it goes to the SMTP server (Bcc stripped). Kept while
    /// the send may still be submitted; never pruned by age.
    Submission,
}

#[derive(Clone)]
pub struct MessageFiles {
    folder: PathBuf,
}

impl MessageFiles {
    pub fn open(folder: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&folder)?;
        Ok(Self { folder })
    }

    fn path(&self, record_id: &str, copy: SourceCopy) -> PathBuf {
        // Record ids are minted by the bridge; keep the name safe anyway.
        let safe: String = record_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .collect();
        match copy {
            SourceCopy::Filed => self.folder.join(format!("{safe}.eml")),
            SourceCopy::Submission => self.folder.join(format!("{safe}.submit.eml")),
        }
    }

    /// Writes a copy so that it survives a crash once this returns.
    pub fn write(&self, record_id: &str, copy: SourceCopy, bytes: &[u8]) -> std::io::Result<()> {
        write_durably(&self.path(record_id, copy), bytes)
    }

    pub fn read(&self, record_id: &str, copy: SourceCopy) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(record_id, copy)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Removes a copy nothing refers to (any more); a missing one is fine.
    pub fn remove(&self, record_id: &str, copy: SourceCopy) {
        if let Err(err) = std::fs::remove_file(self.path(record_id, copy))
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(
                record = record_id,
                "removing a message source failed: {err}"
            );
        }
    }

    /// The send ids of the submission copies on disk, with when each was written.
    pub fn submission_copies(&self) -> Vec<(String, std::time::SystemTime)> {
        let Ok(entries) = std::fs::read_dir(&self.folder) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let send_id = name.strip_suffix(".submit.eml")?.to_string();
                let written = entry.metadata().and_then(|m| m.modified()).ok()?;
                Some((send_id, written))
            })
            .collect()
    }

    /// Removes filed copies last written more than `older_than` ago; returns
    /// how many. Submission copies stay: their send is not settled.
    pub fn prune(&self, older_than: Duration) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.folder) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.to_string_lossy().ends_with(".submit.eml") {
                continue;
            }
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > older_than);
            if old && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// Writes a file so that it survives a crash once this returns: the file's
/// bytes and its directory entry are both synced (a synced file whose new
/// name is not is lost with the name).
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::offload::blocking(|| write_and_sync(path, bytes))
}

fn write_and_sync(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    if let Some(directory) = path.parent() {
        std::fs::File::open(directory)?.sync_all()?;
    }
    Ok(())
}
