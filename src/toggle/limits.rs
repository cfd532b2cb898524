//! What keeps one client of a toggle listener from hurting the others: a command rate
//! per connection, a budget of wrong secrets shared by every connection of a listener,
//! and slots that a client who has not proven itself cannot keep from one who has.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// A token bucket: `per_second` tokens a second, at most `per_second` saved up.
pub(super) struct RateLimit {
    pub(super) per_second: u32,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub(super) fn new(per_second: u32) -> Self {
        Self {
            per_second,
            tokens: f64::from(per_second),
            last: Instant::now(),
        }
    }

    /// Take a token; `false` when there is none (0 per second = no limit).
    pub(super) fn take(&mut self) -> bool {
        if self.per_second == 0 {
            return true;
        }
        let now = Instant::now();
        let cap = f64::from(self.per_second);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * cap).min(cap);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How many wrong secrets a listener takes, from all its connections together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthBudget {
    /// Wrong secrets allowed in a burst.
    pub burst: u32,
    /// One more wrong secret is allowed after each such interval.
    pub refill_every: Duration,
}

impl Default for AuthBudget {
    /// 10 at once, then one every 30 s: under 3,000 guesses a day.
    fn default() -> Self {
        Self {
            burst: 10,
            refill_every: Duration::from_secs(30),
        }
    }
}

/// The listener's shared count of wrong secrets. While it is spent, every `auth` is
/// refused unchecked, the right secret too: a guesser learns nothing, whatever the
/// number of connections it spreads its guesses over.
pub(super) struct AuthThrottle {
    budget: AuthBudget,
    spent: u32,
    since: Instant,
}

impl AuthThrottle {
    pub(super) fn new(budget: AuthBudget) -> Self {
        Self {
            budget,
            spent: 0,
            since: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let every = self.budget.refill_every.max(Duration::from_millis(1));
        let earned = self.since.elapsed().as_nanos() / every.as_nanos();
        let earned = u32::try_from(earned).unwrap_or(u32::MAX);
        if earned > 0 {
            self.spent = self.spent.saturating_sub(earned);
            self.since = Instant::now();
        }
    }

    /// May a secret be checked now?
    pub(super) fn may_check(&mut self) -> bool {
        self.refill();
        self.spent < self.budget.burst
    }

    /// A wrong secret was given.
    pub(super) fn wrong(&mut self) {
        self.refill();
        if self.spent == 0 {
            self.since = Instant::now();
        }
        self.spent = self.spent.saturating_add(1);
    }
}

/// The connection slots of one listener. A connection that has not proven itself yet
/// (no `auth` on a listener with a secret) can be evicted, oldest first, to make room,
/// so idle strangers cannot keep the real client out.
pub(super) struct Slots {
    permits: Arc<Semaphore>,
    unproven: Mutex<BTreeMap<u64, Arc<Notify>>>,
    next_id: Mutex<u64>,
}

/// A connection's hold on a slot; gives it back on drop.
pub(super) struct Slot {
    slots: Arc<Slots>,
    id: u64,
    /// Notified when the slot is taken away from this unproven connection.
    pub(super) evicted: Arc<Notify>,
    _permit: OwnedSemaphorePermit,
}

impl Slots {
    pub(super) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(max)),
            unproven: Mutex::new(BTreeMap::new()),
            next_id: Mutex::new(0),
        })
    }

    /// A slot for a new connection, evicting the oldest unproven one when all are
    /// taken; `None` when every slot is held by a proven connection. `proven` says
    /// whether the new connection needs no `auth`.
    pub(super) async fn acquire(self: &Arc<Self>, proven: bool) -> Option<Slot> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let oldest = lock(&self.unproven).pop_first()?;
                oldest.1.notify_one();
                // The evicted connection gives its permit back as soon as it runs.
                tokio::time::timeout(Duration::from_secs(2), self.permits.clone().acquire_owned())
                    .await
                    .ok()?
                    .ok()?
            }
        };
        let id = {
            let mut next = lock(&self.next_id);
            *next += 1;
            *next
        };
        let evicted = Arc::new(Notify::new());
        if !proven {
            lock(&self.unproven).insert(id, evicted.clone());
        }
        Some(Slot {
            slots: self.clone(),
            id,
            evicted,
            _permit: permit,
        })
    }
}

impl Slot {
    /// The connection proved itself: it can no longer be evicted.
    pub(super) fn proven(&self) {
        lock(&self.slots.unproven).remove(&self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.proven();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_auth_budget_is_spent_by_wrong_secrets_and_comes_back_slowly() {
        let mut t = AuthThrottle::new(AuthBudget {
            burst: 2,
            refill_every: Duration::from_secs(3600),
        });

        let before = t.may_check();
        t.wrong();
        let after_one = t.may_check();
        t.wrong();
        let after_two = t.may_check();

        assert_eq!((before, after_one, after_two), (true, true, false));
    }

    #[tokio::test]
    async fn a_full_listener_evicts_its_oldest_unproven_connection_only() {
        let slots = Slots::new(2);
        let _proven = slots.acquire(true).await.unwrap();
        let stranger = slots.acquire(false).await.unwrap();
        // What a connection's task does when its slot is taken away.
        let stranger_task = tokio::spawn(async move {
            stranger.evicted.clone().notified().await;
            drop(stranger);
        });

        let newcomer = slots.acquire(false).await.unwrap();
        newcomer.proven();
        let when_all_are_proven = slots.acquire(false).await;

        assert!(stranger_task.await.is_ok());
        assert!(when_all_are_proven.is_none());
    }
}
