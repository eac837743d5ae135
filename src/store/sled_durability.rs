//! What sled 0.34's `flush` leaves out, done after it: on Linux it ends with
//! `sync_file_range` on its log, which neither flushes the disk's write
//! cache nor writes the file's metadata (the log grows by appending, so its
//! size and new blocks are metadata), and it writes an item too large for
//! its log (over a quarter of a segment, a node with many large values) to
//! a blob file of its own with no sync at all. Only its background thread
//! calls `fsync`, every 500 ms. Until then a commit reported durable can be
//! lost with the power. `sync` here is an `fdatasync` of the log, and of
//! any blob file written since the last sync, with the blob folder.

use std::{collections::HashSet, ffi::OsString, fs::File, path::PathBuf, sync::Mutex};

pub struct SledDurability {
    log: File,
    blobs: PathBuf,
    /// Blob files already synced (and still there at the last look).
    synced: Mutex<HashSet<OsString>>,
}

impl SledDurability {
    /// For the sled database in `folder` (what `sled::Config::path` names),
    /// once sled has opened it.
    pub fn open(folder: PathBuf) -> std::io::Result<Self> {
        Ok(Self {
            log: File::open(folder.join("db"))?,
            blobs: folder.join("blobs"),
            synced: Mutex::default(),
        })
    }

    /// Makes what sled's `flush` wrote durable; call after it. Returns how
    /// many blob files it synced.
    pub fn sync(&self) -> std::io::Result<usize> {
        self.log.sync_data()?;
        let mut already = self
            .synced
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Blobs are rare: the folder is most often empty, and reading it
        // costs a few microseconds.
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(err),
        };
        let mut present = HashSet::new();
        let mut synced = 0;
        for entry in entries {
            let name = entry?.file_name();
            if !already.contains(&name) {
                match File::open(self.blobs.join(&name)) {
                    Ok(blob) => blob.sync_data()?,
                    // Collected by sled meanwhile.
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(err),
                }
                synced += 1;
            }
            present.insert(name);
        }
        if synced > 0 {
            File::open(&self.blobs)?.sync_all()?;
        }
        *already = present;
        Ok(synced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_new_blob_is_synced_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        db.insert("k", "v").unwrap();
        db.flush().unwrap();
        let durability = SledDurability::open(dir.path().join("db")).unwrap();
        assert_eq!(durability.sync().unwrap(), 0, "no blob yet");

        // As sled writes one: a file named by its log sequence number.
        let blobs = dir.path().join("db").join("blobs");
        std::fs::write(blobs.join("4096"), b"blob").unwrap();
        assert_eq!(durability.sync().unwrap(), 1);
        assert_eq!(durability.sync().unwrap(), 0, "already synced");
        std::fs::write(blobs.join("8192"), b"blob").unwrap();
        std::fs::remove_file(blobs.join("4096")).unwrap();
        assert_eq!(durability.sync().unwrap(), 1, "only the new one");
    }
}
