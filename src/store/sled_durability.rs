//! What sled 0.34's `flush` leaves out, done after it: on Linux it ends with
//! `sync_file_range` on its log, which neither flushes the disk's write
//! cache nor writes the file's metadata (the log grows by appending, so its
//! size and new blocks are metadata), and it writes an item too large for
//! its log (over a quarter of a segment, a node with many large values) to
//! a blob file of its own with no sync at all. Only its background thread
//! calls `fsync`, on a timer (every 20 ms as the store opens it). Until then
//! a commit reported durable can be lost with the power. `sync` here is an
//! `fdatasync` of the log, and of any blob file written since the last
//! sync, with the blob folder.
//!
//! A failed `fdatasync` is final: Linux may mark the pages it could not
//! write clean, so a later one succeeds without them. Every sync after a
//! failure fails too (`SyncError::Lost`), and the store ends the process, so
//! that its restart reads back what sled's log holds.

use std::{collections::HashMap, ffi::OsString, fs::File, path::PathBuf, sync::Mutex};

pub struct SledDurability {
    log: File,
    blobs: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// An `fsync` failed: what it covered may never reach the disk, and a
    /// later one can succeed without it.
    #[error("{0}")]
    Lost(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Default)]
struct State {
    /// Blob files synced, with their length then (a blob sled was still
    /// writing is synced again once it has grown), still there at the last look.
    synced: HashMap<OsString, u64>,
    /// Why an earlier sync failed.
    failed: Option<String>,
    #[cfg(test)]
    fail_next: bool,
    #[cfg(test)]
    fail_next_without_loss: bool,
    /// How many times the log was synced.
    #[cfg(test)]
    log_syncs: u64,
}

impl SledDurability {
    /// For the sled database in `folder` (what `sled::Config::path` names),
    /// once sled has opened it.
    pub fn open(folder: PathBuf) -> std::io::Result<Self> {
        Ok(Self {
            log: File::open(folder.join("db"))?,
            blobs: folder.join("blobs"),
            state: Mutex::default(),
        })
    }

    /// Makes what sled's `flush` wrote durable; call after it. Returns how
    /// many blob files it synced. `Lost` when an `fsync` failed, now or
    /// before: nothing written since can be counted durable.
    pub fn sync(&self) -> Result<usize, SyncError> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(failed) = &state.failed {
            return Err(SyncError::Lost(format!(
                "an earlier fsync of the database failed ({failed})"
            )));
        }
        let synced = Self::sync_all(&self.log, &self.blobs, &mut state);
        if let Err(SyncError::Lost(words)) = &synced {
            state.failed = Some(words.clone());
        }
        synced
    }

    /// Makes the next sync fail as a failed fsync does.
    #[cfg(test)]
    pub(super) fn fail_next_with_loss(&self) {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .fail_next = true;
    }

    /// Makes the next sync fail with an error that loses nothing (as
    /// failing to list the blob folder does).
    #[cfg(test)]
    pub(super) fn fail_next_without_loss(&self) {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .fail_next_without_loss = true;
    }

    #[cfg(test)]
    pub(super) fn log_syncs(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .log_syncs
    }

    fn sync_all(
        log: &File,
        blobs: &std::path::Path,
        state: &mut State,
    ) -> Result<usize, SyncError> {
        // Only a failed sync is final; failing to list or open a file (too
        // many open files, say) leaves what is on disk as it was.
        let lost = |err: std::io::Error| SyncError::Lost(err.to_string());
        #[cfg(test)]
        if std::mem::take(&mut state.fail_next) {
            return Err(SyncError::Lost("injected: the disk went away".into()));
        }
        #[cfg(test)]
        if std::mem::take(&mut state.fail_next_without_loss) {
            return Err(SyncError::Io(std::io::Error::other(
                "injected: too many open files",
            )));
        }
        log.sync_data().map_err(lost)?;
        #[cfg(test)]
        {
            state.log_syncs += 1;
        }
        // Blobs are rare: the folder is most often empty, and reading it
        // costs a few microseconds.
        let entries = match std::fs::read_dir(blobs) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(err.into()),
        };
        let mut present = HashMap::new();
        let mut synced = 0;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            // Read before the sync: should sled still be writing it, the
            // next sync sees it longer and syncs it again.
            let length = match entry.metadata() {
                Ok(metadata) => metadata.len(),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err.into()),
            };
            if state.synced.get(&name) != Some(&length) {
                match File::open(blobs.join(&name)) {
                    Ok(blob) => blob.sync_data().map_err(lost)?,
                    // Collected by sled meanwhile.
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(err.into()),
                }
                synced += 1;
            }
            present.insert(name, length);
        }
        if synced > 0 {
            File::open(blobs)?.sync_all().map_err(lost)?;
        }
        state.synced = present;
        Ok(synced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sled database with something flushed, and its durability.
    fn opened() -> (tempfile::TempDir, sled::Db, SledDurability) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        db.insert("k", "v").unwrap();
        db.flush().unwrap();
        let durability = SledDurability::open(dir.path().join("db")).unwrap();
        (dir, db, durability)
    }

    #[test]
    fn each_new_blob_is_synced_once() {
        let (dir, _db, durability) = opened();
        assert_eq!(durability.sync().unwrap(), 0, "no blob yet");

        // As sled writes one: a file named by its log sequence number.
        let blobs = dir.path().join("db").join("blobs");
        std::fs::write(blobs.join("4096"), b"blob").unwrap();
        assert_eq!(durability.sync().unwrap(), 1);
        assert_eq!(durability.sync().unwrap(), 0, "already synced");
        std::fs::write(blobs.join("8192"), b"blob").unwrap();
        std::fs::remove_file(blobs.join("4096")).unwrap();
        assert_eq!(durability.sync().unwrap(), 1, "only the new one");
        std::fs::write(blobs.join("8192"), b"blob, written on").unwrap();
        assert_eq!(durability.sync().unwrap(), 1, "one that grew since");
    }

    /// Failing to read the blob folder (too many open files, say) is no
    /// failed sync: the next one goes on.
    #[test]
    fn an_error_that_is_no_failed_sync_is_not_final() {
        let (dir, _db, durability) = opened();
        let blobs = dir.path().join("db").join("blobs");
        std::fs::remove_dir_all(&blobs).unwrap();
        std::fs::write(&blobs, b"not a folder").unwrap();
        assert!(matches!(durability.sync(), Err(SyncError::Io(_))));
        std::fs::remove_file(&blobs).unwrap();
        std::fs::create_dir(&blobs).unwrap();
        assert_eq!(durability.sync().unwrap(), 0);
    }

    #[test]
    fn after_a_failed_sync_every_sync_fails() {
        let (_dir, _db, durability) = opened();
        durability.state.lock().unwrap().fail_next = true;
        assert!(matches!(durability.sync(), Err(SyncError::Lost(_))));
        let err = durability.sync().unwrap_err();
        assert!(matches!(err, SyncError::Lost(_)), "{err}");
        assert!(err.to_string().contains("earlier fsync"), "{err}");
    }
}
