//! Jittered, capped exponential backoff shared by reconnects and webhook retries.

use std::time::Duration;

/// The delay before retry number `attempt` (0 = first retry): doubling from
/// `min`, capped at `max`, then jittered to between half and all of it so that
/// many mailboxes or events failing together do not retry in lockstep.
pub fn delay(attempt: u32, min: Duration, max: Duration) -> Duration {
    let factor = 1u64 << attempt.min(20);
    let base = min
        .saturating_mul(u32::try_from(factor).unwrap_or(u32::MAX))
        .min(max);
    let half = base / 2;
    let jitter_ms = fastrand::u64(0..=half.as_millis().min(u128::from(u64::MAX)) as u64);
    half + Duration::from_millis(jitter_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_and_stays_within_jitter_bounds() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for attempt in 0..40 {
            let base = (min * 2u32.pow(attempt.min(20))).min(max);
            for _ in 0..50 {
                let d = delay(attempt, min, max);
                assert!(
                    d >= base / 2 && d <= base,
                    "attempt {attempt}: {d:?} outside [{:?}, {base:?}]",
                    base / 2
                );
            }
        }
    }
}
