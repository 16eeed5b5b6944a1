//! Slot leases: who may use which ring slot, and back-pressure.
//!
//! A task must hold a [`Lease`] from before its request is sent until its
//! worker has been reaped. The lease is what keeps a slot from being handed to
//! a second task while a first worker could still write into it, and its
//! permit is what bounds the number of workers alive at once: callers beyond
//! the limit wait in [`Slots::acquire`] rather than fail.

use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The pool of ring slots.
pub(crate) struct Slots {
    /// One permit per slot; a permit is held exactly as long as a slot is leased.
    permits: Arc<Semaphore>,
    /// Slots not leased. Never empty while a permit is available: a lease
    /// returns its slot here before it releases its permit.
    free: Mutex<Vec<u32>>,
    total: u32,
    /// Woken whenever a lease ends, for [`Slots::wait_idle`].
    released: Notify,
}

impl Slots {
    pub(crate) fn new(total: u32) -> Slots {
        Slots {
            permits: Arc::new(Semaphore::new(total as usize)),
            // Reversed so that slot 0 is handed out first.
            free: Mutex::new((0..total).rev().collect()),
            total,
            released: Notify::new(),
        }
    }

    /// Waits for a free slot and leases it.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future before it completes leases nothing.
    pub(crate) async fn acquire(self: &Arc<Self>) -> Lease {
        // The semaphore is never closed, so `acquire_owned` cannot fail.
        let permit = match self.permits.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => unreachable!("the slot semaphore is never closed"),
        };
        let slot = lock(&self.free).pop();
        // A permit guarantees a free slot (see `free`).
        let slot = slot.unwrap_or_else(|| unreachable!("permit held without a free slot"));
        Lease {
            slots: Arc::clone(self),
            slot,
            permit: Some(permit),
        }
    }

    /// Number of leases currently held.
    pub(crate) fn in_use(&self) -> usize {
        self.total as usize - self.permits.available_permits()
    }

    /// Waits until no lease is held, that is until every worker started so far
    /// has been reaped.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let released = self.released.notified();
            if self.in_use() == 0 {
                return;
            }
            released.await;
        }
    }
}

/// The right to use one ring slot. Dropping it returns the slot.
pub(crate) struct Lease {
    slots: Arc<Slots>,
    slot: u32,
    permit: Option<OwnedSemaphorePermit>,
}

impl Lease {
    pub(crate) fn slot(&self) -> u32 {
        self.slot
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        lock(&self.slots.free).push(self.slot);
        // Only now may another task take a permit: it will find this slot.
        drop(self.permit.take());
        self.slots.released.notify_waiters();
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every
/// critical section here is a single push or pop).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn leases_are_exclusive_and_returned_on_drop() {
        let slots = Arc::new(Slots::new(2));
        let a = slots.acquire().await;
        let b = slots.acquire().await;
        assert_ne!(a.slot(), b.slot());
        assert_eq!(slots.in_use(), 2);
        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire().await.slot() }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let freed = a.slot();
        drop(a);
        assert_eq!(waiting.await.unwrap(), freed);
        drop(b);
        slots.wait_idle().await;
        assert_eq!(slots.in_use(), 0);
    }
}
