//! Filed copies of synced messages, appended to segment files: one file
//! per message cost a file creation, a write-back and two fsyncs each (file
//! and folder), which was most of the ingest's CPU (issue 11 item 7). Here
//! a catch-up batch appends its sources to the open segment and the disk
//! sees one `fdatasync`, shared by every writer that asks meanwhile.
//!
//! A source is found by its `SourcePlace` (segment, offset, length,
//! checksum), which the store keeps under the message's record id. Segments
//! are never rewritten: a new one opens after `SEGMENT_BYTES` or
//! `SEGMENT_SPAN`, and retention drops whole segments, oldest first. Bytes
//! no commit refers to (a refused commit, a batch cut short) stay until
//! their segment goes.

use std::{
    collections::HashSet,
    fs::File,
    io::Write as _,
    os::unix::fs::FileExt as _,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use super::group_flush::GroupFlush;

/// A segment takes no more appends past this size...
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// ...or this long after it opened, so retention frees a quiet bridge's
/// disk within an hour of a source's time.
const SEGMENT_SPAN: Duration = Duration::from_secs(3600);

/// Where one source lies, and the checksum it was written with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourcePlace {
    segment: u64,
    offset: u64,
    length: u32,
    checksum: u32,
}

impl SourcePlace {
    const ENCODED: usize = 24;

    pub fn segment(&self) -> u64 {
        self.segment
    }

    pub fn encode(&self) -> [u8; Self::ENCODED] {
        let mut bytes = [0; Self::ENCODED];
        bytes[..8].copy_from_slice(&self.segment.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.offset.to_be_bytes());
        bytes[16..20].copy_from_slice(&self.length.to_be_bytes());
        bytes[20..].copy_from_slice(&self.checksum.to_be_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::ENCODED] = bytes.try_into().ok()?;
        let (segment, rest) = bytes.split_first_chunk::<8>()?;
        let (offset, rest) = rest.split_first_chunk::<8>()?;
        let (length, rest) = rest.split_first_chunk::<4>()?;
        let checksum: &[u8; 4] = rest.try_into().ok()?;
        Some(Self {
            segment: u64::from_be_bytes(*segment),
            offset: u64::from_be_bytes(*offset),
            length: u32::from_be_bytes(*length),
            checksum: u32::from_be_bytes(*checksum),
        })
    }
}

pub struct SourceSegments {
    folder: PathBuf,
    appending: Mutex<Appending>,
    sync_group: GroupFlush,
    max_bytes: u64,
    span: Duration,
    #[cfg(test)]
    fail_next_sync: std::sync::atomic::AtomicBool,
    #[cfg(test)]
    fail_next_folder_sync: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Appending {
    current: Option<Segment>,
    /// The highest segment number in use or used before.
    last_number: u64,
    /// Segments that took their last append since the last sync.
    closed_unsynced: Vec<(u64, Arc<File>)>,
    /// Segments whose sync failed. A later `fdatasync` of the same file can
    /// succeed without the lost pages ever reaching the disk (Linux marks
    /// them clean), so whatever was appended to them is never durable.
    failed: HashSet<u64>,
    /// Segments created since the last sync: their names are not durable yet.
    created_unsynced: Vec<u64>,
}

struct Segment {
    number: u64,
    file: Arc<File>,
    length: u64,
    opened: Instant,
    /// By the monotonic clock: retention must not take a segment still
    /// written to because the wall clock jumped.
    last_append: Instant,
}

impl SourceSegments {
    pub fn open(folder: PathBuf) -> std::io::Result<Self> {
        Self::open_with(folder, SEGMENT_BYTES, SEGMENT_SPAN)
    }

    fn open_with(folder: PathBuf, max_bytes: u64, span: Duration) -> std::io::Result<Self> {
        std::fs::create_dir_all(&folder)?;
        let segments = Self {
            folder,
            appending: Mutex::default(),
            sync_group: GroupFlush::default(),
            max_bytes,
            span,
            #[cfg(test)]
            fail_next_sync: Default::default(),
            #[cfg(test)]
            fail_next_folder_sync: Default::default(),
        };
        // Never append after a restart to a segment a crash may have cut:
        // new appends go to a new one.
        segments.lock().last_number = segments.numbers()?.last().copied().unwrap_or(0);
        Ok(segments)
    }

    fn path(&self, number: u64) -> PathBuf {
        self.folder.join(format!("{number:016}.sources"))
    }

    /// Segment numbers on disk, oldest first.
    fn numbers(&self) -> std::io::Result<Vec<u64>> {
        let mut numbers: Vec<u64> = std::fs::read_dir(&self.folder)?
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name();
                name.to_str()?.strip_suffix(".sources")?.parse().ok()
            })
            .collect();
        numbers.sort_unstable();
        Ok(numbers)
    }

    fn lock(&self) -> MutexGuard<'_, Appending> {
        self.appending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends the sources and returns once they survive a crash, with
    /// where each lies, in order.
    pub fn append_durably(&self, sources: &[&[u8]]) -> std::io::Result<Vec<SourcePlace>> {
        if sources.is_empty() {
            return Ok(Vec::new());
        }
        crate::offload::blocking(|| {
            let places = self.append(sources)?;
            self.sync_group.flush(|| self.sync())?;
            self.refuse_failed(&places)?;
            Ok(places)
        })
    }

    fn append(&self, sources: &[&[u8]]) -> std::io::Result<Vec<SourcePlace>> {
        let mut appending = self.lock();
        let mut places = Vec::with_capacity(sources.len());
        for bytes in sources {
            let length = u32::try_from(bytes.len()).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a message source over 4 GiB",
                )
            })?;
            let segment = self.segment_for(&mut appending, bytes.len() as u64)?;
            let place = SourcePlace {
                segment: segment.number,
                offset: segment.length,
                length,
                checksum: crc32fast::hash(bytes),
            };
            if let Err(err) = (&*segment.file).write_all(bytes) {
                // Part of it may be written: the length no longer says where
                // the next source would start. Close it; the next append
                // opens a new segment.
                if let Some(broken) = appending.current.take() {
                    appending.closed_unsynced.push((broken.number, broken.file));
                }
                return Err(err);
            }
            segment.length += u64::from(length);
            segment.last_append = Instant::now();
            places.push(place);
        }
        Ok(places)
    }

    /// The segment to append `length` bytes to: the open one, or a new one
    /// when it is full or old.
    fn segment_for<'a>(
        &self,
        appending: &'a mut Appending,
        length: u64,
    ) -> std::io::Result<&'a mut Segment> {
        let full = appending.current.as_ref().is_some_and(|segment| {
            segment.length > 0
                && (segment.length + length > self.max_bytes
                    || segment.opened.elapsed() >= self.span)
        });
        if full && let Some(closed) = appending.current.take() {
            appending.closed_unsynced.push((closed.number, closed.file));
        }
        if appending.current.is_none() {
            let number = appending.last_number + 1;
            let file = std::fs::OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(self.path(number))?;
            appending.last_number = number;
            appending.created_unsynced.push(number);
            appending.current = Some(Segment {
                number,
                file: Arc::new(file),
                length: 0,
                opened: Instant::now(),
                last_append: Instant::now(),
            });
        }
        appending
            .current
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no segment open right after opening one"))
    }

    /// An error if any of `places` lies in a segment whose sync failed,
    /// whoever's flush met the failure.
    fn refuse_failed(&self, places: &[SourcePlace]) -> std::io::Result<()> {
        let appending = self.lock();
        match places
            .iter()
            .find(|place| appending.failed.contains(&place.segment))
        {
            Some(place) => Err(std::io::Error::other(format!(
                "syncing source segment {} failed earlier: its sources are not durable",
                place.segment
            ))),
            None => Ok(()),
        }
    }

    /// Makes every append so far durable: the segments written since the
    /// last sync, and the names of those created since. A segment whose
    /// sync fails takes no more appends and is never counted durable.
    fn sync(&self) -> std::io::Result<()> {
        let (files, created) = {
            let mut appending = self.lock();
            let mut files = std::mem::take(&mut appending.closed_unsynced);
            if let Some(segment) = &appending.current {
                files.push((segment.number, segment.file.clone()));
            }
            (files, std::mem::take(&mut appending.created_unsynced))
        };
        let mut failed = None;
        for (number, file) in &files {
            if let Err(err) = self.sync_data(file) {
                failed = Some((*number, err));
                break;
            }
        }
        if failed.is_none()
            && !created.is_empty()
            && let Err(err) = self.sync_folder()
        {
            // The new segments' names may be lost: their sources with them.
            failed = created.first().map(|number| (*number, err));
        }
        if let Some((number, err)) = failed {
            let mut appending = self.lock();
            // The rest of this round may be fine, but is not known to be.
            appending
                .failed
                .extend(files.iter().map(|(number, _)| *number).chain(created));
            if appending
                .current
                .as_ref()
                .is_some_and(|segment| appending.failed.contains(&segment.number))
            {
                appending.current = None;
            }
            tracing::error!("syncing source segment {number} failed: {err}");
            return Err(err);
        }
        Ok(())
    }

    fn sync_folder(&self) -> std::io::Result<()> {
        #[cfg(test)]
        if self
            .fail_next_folder_sync
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(std::io::Error::other("injected: the folder's sync failed"));
        }
        File::open(&self.folder)?.sync_all()
    }

    fn sync_data(&self, file: &File) -> std::io::Result<()> {
        #[cfg(test)]
        if self
            .fail_next_sync
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(std::io::Error::other("injected: the disk went away"));
        }
        file.sync_data()
    }

    /// The source at `place`; None when its segment is gone (retention).
    /// Bytes that do not match their checksum are an error, not a source.
    pub fn read(&self, place: SourcePlace) -> std::io::Result<Option<Vec<u8>>> {
        let file = match File::open(self.path(place.segment)) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err),
        };
        let corrupt = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the source at {} of segment {} {what}",
                    place.offset, place.segment
                ),
            )
        };
        let segment_length = file.metadata()?.len();
        if segment_length == 0 {
            // Emptied by retention.
            return Ok(None);
        }
        let end = place.offset.checked_add(u64::from(place.length));
        if end.is_none_or(|end| end > segment_length) {
            return Err(corrupt("lies past the segment's end"));
        }
        let mut bytes = vec![0; place.length as usize];
        file.read_exact_at(&mut bytes, place.offset)?;
        if crc32fast::hash(&bytes) != place.checksum {
            return Err(corrupt("does not match its checksum"));
        }
        Ok(Some(bytes))
    }

    /// Removes the segments last written more than `older_than` ago, oldest
    /// first, the open one too (the next append opens a new one). When any
    /// went, returns the lowest segment number left: every place below it
    /// is gone.
    pub fn prune(&self, older_than: Duration) -> std::io::Result<Option<u64>> {
        let mut appending = self.lock();
        let old = |appending: &Appending, number: u64| {
            // Bytes still to be synced are someone's commit under way.
            if appending
                .closed_unsynced
                .iter()
                .any(|(closed, _)| *closed == number)
            {
                return false;
            }
            if let Some(current) = appending.current.as_ref().filter(|c| c.number == number) {
                return current.last_append.elapsed() > older_than;
            }
            std::fs::metadata(self.path(number))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .is_some_and(|age| age > older_than)
        };
        // Segments fill one after another, so the old ones come first; stop
        // at the first young one.
        let mut removed_any = false;
        let numbers = self.numbers()?;
        let highest = numbers.last().copied();
        for number in numbers {
            if !old(&appending, number) {
                appending.failed.retain(|failed| *failed >= number);
                return Ok(removed_any.then_some(number));
            }
            if appending
                .current
                .as_ref()
                .is_some_and(|segment| segment.number == number)
            {
                appending.current = None;
            }
            let path = self.path(number);
            if Some(number) == highest {
                // Emptied, not removed: its number tells the next start where
                // to go on, so no number is ever given twice (places of a
                // removed segment may outlive it in the index by a crash).
                let file = std::fs::OpenOptions::new().write(true).open(&path)?;
                if file.metadata()?.len() == 0 {
                    break;
                }
                file.set_len(0)?;
            } else {
                std::fs::remove_file(path)?;
            }
            removed_any = true;
        }
        let first_kept = appending.last_number + 1;
        appending.failed.retain(|number| *number >= first_kept);
        Ok(removed_any.then_some(first_kept))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(max_bytes: u64) -> (tempfile::TempDir, SourceSegments) {
        let dir = tempfile::tempdir().unwrap();
        let segments =
            SourceSegments::open_with(dir.path().join("s"), max_bytes, SEGMENT_SPAN).unwrap();
        (dir, segments)
    }

    #[test]
    fn sources_read_back_as_appended_across_segments() {
        let (_dir, segments) = segments(10);
        let sources: [&[u8]; 4] = [b"first", b"second", b"a source over the limit", b"last"];
        let places = segments.append_durably(&sources).unwrap();
        for (place, source) in places.iter().zip(sources) {
            assert_eq!(segments.read(*place).unwrap().as_deref(), Some(source));
            assert_eq!(SourcePlace::decode(&place.encode()), Some(*place));
        }
        // 5 + 6 bytes do not fit in 10; an oversized source gets a segment
        // of its own, and nothing after it.
        let numbers: Vec<u64> = places.iter().map(SourcePlace::segment).collect();
        assert_eq!(numbers, [1, 2, 3, 4]);
    }

    #[test]
    fn a_reopened_folder_appends_to_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("s");
        let first = SourceSegments::open(folder.clone()).unwrap();
        let before = first.append_durably(&[b"before"]).unwrap();
        drop(first);
        let again = SourceSegments::open(folder).unwrap();
        let after = again.append_durably(&[b"after"]).unwrap();
        assert_eq!(before[0].segment(), 1);
        assert_eq!(after[0].segment(), 2);
        assert_eq!(
            again.read(before[0]).unwrap().as_deref(),
            Some(&b"before"[..])
        );
    }

    #[test]
    fn damaged_bytes_are_an_error_and_a_pruned_segment_reads_as_gone() {
        let (dir, segments) = segments(SEGMENT_BYTES);
        let place = segments.append_durably(&[b"From: a\r\n\r\nbody"]).unwrap()[0];
        let path = dir
            .path()
            .join("s")
            .join(format!("{:016}.sources", place.segment()));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = segments.read(place).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
        std::fs::write(&path, &bytes[..4]).unwrap();
        assert_eq!(
            segments.read(place).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );

        assert_eq!(segments.prune(Duration::ZERO).unwrap(), Some(2));
        assert_eq!(segments.read(place).unwrap(), None);
        let next = segments.append_durably(&[b"next"]).unwrap()[0];
        assert_eq!(next.segment(), 2, "the pruned open segment is not reused");
    }

    /// Retention that empties every segment still leaves the last number
    /// behind: a restart never hands out a number whose places may linger.
    #[test]
    fn a_restart_after_everything_was_pruned_goes_on_numbering() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("s");
        let before = {
            let segments = SourceSegments::open(folder.clone()).unwrap();
            let place = segments.append_durably(&[b"kept a while"]).unwrap()[0];
            assert_eq!(segments.prune(Duration::ZERO).unwrap(), Some(2));
            assert_eq!(
                segments.prune(Duration::ZERO).unwrap(),
                None,
                "nothing left"
            );
            place
        };
        let again = SourceSegments::open(folder).unwrap();
        assert_eq!(again.read(before).unwrap(), None);
        let after = again.append_durably(&[b"new"]).unwrap()[0];
        assert_eq!(after.segment(), 2);
    }

    /// After a failed `fdatasync`, a later one of the same file may succeed
    /// with the pages lost: no source in that segment is ever reported
    /// durable, whoever's flush met the failure, and appends go on in a new
    /// segment.
    #[test]
    fn a_failed_sync_is_never_followed_by_a_false_durable() {
        let (_dir, segments) = segments(SEGMENT_BYTES);
        let first = segments.append(&[b"first"]).unwrap();
        segments
            .fail_next_sync
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(segments.append_durably(&[b"second"]).is_err());
        // `first` was appended before the failed sync; its writer's flush
        // comes after and finds nothing left to sync.
        segments.sync_group.flush(|| segments.sync()).unwrap();
        assert!(segments.refuse_failed(&first).is_err());
        let next = segments.append_durably(&[b"next"]).unwrap();
        assert_eq!(next[0].segment(), 2, "a new segment");
        assert_eq!(
            segments.read(next[0]).unwrap().as_deref(),
            Some(&b"next"[..])
        );
    }

    /// A new segment whose name could not be synced may vanish with a
    /// crash: its sources are refused, and it takes no more appends.
    #[test]
    fn a_failed_sync_of_a_new_segments_name_is_never_followed_by_a_false_durable() {
        let (_dir, segments) = segments(4);
        segments.append_durably(&[b"aaaa"]).unwrap();
        segments
            .fail_next_folder_sync
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(segments.append_durably(&[b"bbbb"]).is_err());
        let after = segments.append_durably(&[b"cc"]).unwrap();
        assert_eq!(after[0].segment(), 3, "segment 2 takes no more appends");
        assert!(segments.lock().failed.contains(&2));
    }

    #[test]
    fn pruning_keeps_young_segments_and_reports_the_first_kept() {
        let (_dir, segments) = segments(4);
        let places = segments.append_durably(&[b"aaaa", b"bbbb"]).unwrap();
        assert_eq!(segments.prune(Duration::from_secs(3600)).unwrap(), None);
        for place in places {
            assert!(segments.read(place).unwrap().is_some());
        }
    }
}
