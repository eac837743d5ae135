//! One budget for the bytes of message sources held in memory at once, across
//! every mailbox: catch-up batches being fetched and handled, and sends being
//! submitted or filed. Thousands of mailboxes waking together then wait their
//! turn instead of exhausting memory.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Accounting is in KiB, so a budget of many GiB fits a semaphore's permits.
const UNIT: u64 = 1024;

#[derive(Clone)]
pub struct MemoryBudget {
    units: Arc<Semaphore>,
    total_units: u32,
}

/// Bytes held until this is dropped.
#[must_use = "the bytes are held only while the reservation lives"]
pub struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
}

impl MemoryBudget {
    pub fn new(bytes: u64) -> Self {
        let total_units = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .max(1);
        Self {
            units: Arc::new(Semaphore::new(total_units as usize)),
            total_units,
        }
    }

    /// Waits until `bytes` fit in what is left. A request larger than the
    /// whole budget takes all of it: that one message goes alone, but it goes.
    pub async fn reserve(&self, bytes: u64) -> Reservation {
        let wanted = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total_units);
        // The semaphore is never closed, so this only waits.
        let permit = self.units.clone().acquire_many_owned(wanted).await.ok();
        Reservation { _permit: permit }
    }

    /// Bytes not reserved right now (for /metrics and tests).
    pub fn available_bytes(&self) -> u64 {
        self.units.available_permits() as u64 * UNIT
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt as _;

    use super::*;

    /// Issue 7 item 12: past the budget, the next reservation waits for
    /// bytes to be given back.
    #[tokio::test]
    async fn a_reservation_past_the_budget_waits_for_one_to_end() {
        let budget = MemoryBudget::new(10 * 1024 * 1024);
        let first = budget.reserve(8 * 1024 * 1024).await;
        let mut second = Box::pin(budget.reserve(8 * 1024 * 1024));
        assert!(
            (&mut second).now_or_never().is_none(),
            "16 MiB do not fit in 10"
        );
        drop(first);
        let _second = second.await;
        assert_eq!(budget.available_bytes(), 2 * 1024 * 1024);
    }

    #[tokio::test]
    async fn a_message_bigger_than_the_budget_goes_alone() {
        let budget = MemoryBudget::new(1024 * 1024);
        let big = budget.reserve(50 * 1024 * 1024).await;
        assert_eq!(budget.available_bytes(), 0);
        let mut small = Box::pin(budget.reserve(1));
        assert!((&mut small).now_or_never().is_none());
        drop(big);
        let _small = small.await;
    }
}
