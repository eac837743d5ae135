//! Every panic in the process, counted and kept: a panic is a bug even when a
//! supervisor starts the worker again or a `catch_unwind` turns it into an
//! error, so none may pass unseen. `/metrics` reports the count
//! (`mailbridge_panics_total`), and the test harness fails a test during
//! which the daemon panicked, reading the places kept here.

use std::{
    collections::VecDeque,
    sync::{
        Mutex, Once,
        atomic::{AtomicU64, Ordering},
    },
};

/// How many of the latest panics are kept with their place and words.
const KEPT: usize = 64;

static COUNT: AtomicU64 = AtomicU64::new(0);
static LATEST: Mutex<VecDeque<Panic>> = Mutex::new(VecDeque::new());

/// One panic: its number in the process, where it happened and what it said.
#[derive(Clone, Debug)]
pub struct Panic {
    pub number: u64,
    /// `file:line:column`, as the panic reported it.
    pub place: String,
    pub message: String,
}

/// Counts every later panic of the process, then lets the hook that was
/// there before (the standard one prints the panic) run as usual. Installing
/// it again does nothing.
pub fn count_from_now_on() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            record(info);
            previous(info);
        }));
    });
}

fn record(info: &std::panic::PanicHookInfo<'_>) {
    let number = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    let place = info
        .location()
        .map(|at| format!("{}:{}:{}", at.file(), at.line(), at.column()))
        .unwrap_or_default();
    let message = payload_text(info.payload()).unwrap_or_default();
    // A panic while another thread panics with the lock held must not make
    // this one wait or panic again.
    keep(Panic {
        number,
        place,
        message,
    });
}

fn keep(panic: Panic) {
    // Poisoned only by a panic inside this very function; what it holds is
    // still a list.
    let mut latest = LATEST
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if latest.len() == KEPT {
        latest.pop_front();
    }
    latest.push_back(panic);
}

/// Counts a long-running worker that ended without being asked to (a bug,
/// like a panic, though nothing unwound) beside the panics.
pub fn note_unexpected_end(worker: &str) {
    let number = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    keep(Panic {
        number,
        place: format!("the {worker}"),
        message: "stopped by itself".into(),
    });
}

/// What a panic said, where it said it in words (`panic!` with a literal
/// or a formatted message).
pub fn payload_text(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload
        .downcast_ref::<&str>()
        .map(|text| (*text).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
}

/// How many panics (and unexpected ends) the process has had since the
/// count began.
pub fn count() -> u64 {
    COUNT.load(Ordering::SeqCst)
}

/// The kept panics numbered after `number` (the latest `KEPT` at most).
pub fn after(number: u64) -> Vec<Panic> {
    let latest = LATEST
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    latest
        .iter()
        .filter(|panic| panic.number > number)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_panic_is_still_counted_with_its_place() {
        count_from_now_on();
        let before = count();
        let caught = std::panic::catch_unwind(|| panic!("on purpose: {}", 42));
        assert!(caught.is_err());
        assert!(count() > before);
        let ours = after(before)
            .into_iter()
            .find(|panic| panic.message == "on purpose: 42")
            .expect("the panic is kept");
        assert!(ours.place.starts_with("src/panics.rs:"), "{}", ours.place);
    }
}
