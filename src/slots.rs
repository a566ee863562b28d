//! Admission control for agent processes: at most `CLAWDFORGE_MAX_CONCURRENT` at once
//! (runs and turns together), later requests wait first-in first-out — tokio's semaphore is
//! fair — up to `CLAWDFORGE_MAX_QUEUE` waiters and `CLAWDFORGE_QUEUE_TIMEOUT_SECS`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

#[derive(Clone, Debug)]
pub struct Slots {
    sem: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
    timeout: Duration,
    capacity: usize,
}

/// A held slot; the next waiter gets it when this is dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

/// Decrements the waiter count however the wait ends (including the request being dropped).
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Slots {
    pub fn new(capacity: usize, max_queue: usize, timeout: Duration) -> Slots {
        Slots {
            sem: Arc::new(Semaphore::new(capacity)),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_queue,
            timeout,
            capacity,
        }
    }

    /// Agent processes running now.
    pub fn running(&self) -> usize {
        self.capacity - self.sem.available_permits()
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    fn overloaded(&self) -> ApiError {
        // A rough hint: the wait a request would face at the current depth, at least 1 s.
        let secs = self.timeout.as_secs().clamp(1, 30);
        ApiError::Overloaded {
            retry_after_secs: secs,
        }
    }

    pub async fn acquire(&self) -> Result<Slot, ApiError> {
        // Only take a free slot directly when nobody is queued, or we would jump the line.
        if self.queued() == 0 {
            if let Ok(permit) = self.sem.clone().try_acquire_owned() {
                return Ok(Slot { _permit: permit });
            }
        }
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(self.waiting.clone());
        if before >= self.max_queue {
            return Err(self.overloaded());
        }
        match tokio::time::timeout(self.timeout, self.sem.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Slot { _permit: permit }),
            Ok(Err(_closed)) => Err(self.overloaded()),
            Err(_elapsed) => Err(self.overloaded()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_limit_and_timeout() {
        let slots = Slots::new(1, 1, Duration::from_millis(50));
        let held = slots.acquire().await.unwrap();
        assert_eq!(slots.running(), 1);
        // One may wait (and times out); while it waits, a second is refused at once.
        let s2 = slots.clone();
        let waiter = tokio::spawn(async move { s2.acquire().await.map(|_| ()) });
        while slots.queued() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            slots.acquire().await,
            Err(ApiError::Overloaded { .. })
        ));
        assert!(matches!(
            waiter.await.unwrap(),
            Err(ApiError::Overloaded { .. })
        ));
        drop(held);
        assert!(slots.acquire().await.is_ok());
        assert_eq!(slots.queued(), 0);
    }
}
