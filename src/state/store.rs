//! The front of shared state (DESIGN.md §5): the one place a connection asks about state that
//! outlives it (a PASS, a greylist triplet, its connection rate), whichever backend keeps it.
//!
//! A question is a [`StateOp`]; [`Store::ask`] answers it, like `ResolverHandle::lookup`:
//!
//! ```text
//! local backend:  ask ──▶ Local (dashmap / governor, in process) ──▶ Some(answer), at once
//! redis backend:  ask ──▶ state thread queue ──▶ None; the answer comes later through the
//!                  │       worker's Inbox + mio::Waker (state::redis)
//!                  └─ queue full or thread gone ──▶ Some(local fallback), at once
//! ```
//!
//! The **local fallback** is what Redis being down, slow or failing means for each question:
//! greylisting fails open (the recipient passes: a deferral nobody can lift would lose mail),
//! the PASS question is answered from this host's own cache (every PASS is recorded locally as
//! well, so it knows the passes it saw), and a connection rate from this host's own buckets.
//!
//! Reputation (record an event, read a score) joins as two more [`StateOp`] variants with their
//! [`StateAnswer`]s, a local answer and a fallback here, and a Redis encoding in
//! `redis/scripts.rs`.

use std::sync::Arc;
use std::time::Instant;

use super::local::Local;
use super::op::{StateAnswer, StateOp, StoreStats, Waiter};
use super::redis::RedisHandle;

/// The front the workers ask: local, or Redis with the local fallback.
#[derive(Debug)]
pub struct Store {
    local: Arc<Local>,
    redis: Option<RedisHandle>,
}

impl Store {
    /// A front over `local`, and over Redis when `redis` is given (`[state] backend =
    /// "redis"`).
    pub fn new(local: Arc<Local>, redis: Option<RedisHandle>) -> Store {
        Store { local, redis }
    }

    /// Answers `op` at once (`Some`), or queues it for the state thread and returns `None`:
    /// the answer then reaches `waiter`'s inbox, always, within `[state] timeout` of now
    /// (Redis's, or the local fallback's). An op without an answer ([`StateOp::RecordPass`])
    /// returns `None` and nothing comes later.
    pub fn ask(&self, op: StateOp, now: Instant, waiter: Waiter) -> Option<StateAnswer> {
        let Some(redis) = &self.redis else {
            return self.local.answer(&op, now);
        };
        match &op {
            // Locally too, so the fallback knows what this host saw.
            StateOp::RecordPass(ip) => self.local.passes.record(*ip, now),
            StateOp::RecordReputation { .. } => {
                self.local.answer(&op, now);
            }
            _ => {}
        }
        redis.ask(op, now, waiter)
    }

    /// Whether answers come from another thread (Redis): then the accept path cannot check a
    /// client's rate on the spot and lets its session ask (`Action::Admit`).
    pub fn is_shared(&self) -> bool {
        self.redis.is_some()
    }

    /// The counters; all zero for the local backend.
    pub fn stats(&self) -> StoreStats {
        self.redis
            .as_ref()
            .map_or_else(StoreStats::default, RedisHandle::stats)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::Duration;

    use super::*;
    use crate::config::Rate;
    use crate::policy::{ConnectionRates, RateRefusal};
    use crate::state::greylist::{Greylist, GreylistOutcome, GreylistTimes};
    use crate::state::pass::PassCache;
    use crate::state::reputation::ReputationTable;

    fn local(now: Instant, per_ip: u32) -> Local {
        let rate = |count| Rate {
            count,
            per: Duration::from_secs(60),
        };
        Local::new(
            Arc::new(PassCache::new(Duration::from_secs(60))),
            Arc::new(Greylist::new(now)),
            Arc::new(ReputationTable::new()),
            Arc::new(ConnectionRates::new(rate(per_ip), rate(1000))),
        )
    }

    const TIMES: GreylistTimes = GreylistTimes {
        delay: Duration::from_secs(300),
        retry_window: Duration::from_secs(3600),
        pass_ttl: Duration::from_secs(86_400),
        max_entries: 1000,
        max_new_per_subnet: 1000,
    };

    fn greylist(key: &str) -> StateOp {
        StateOp::CheckGreylist {
            key: key.to_owned(),
            subnet: "192.0.2.0/24".to_owned(),
            times: TIMES,
        }
    }

    const WAITER: Waiter = Waiter { worker: 0, key: 1 };

    #[test]
    fn the_local_backend_answers_at_once_and_records() {
        let t0 = Instant::now();
        let store = Store::new(Arc::new(local(t0, 1)), None);
        assert!(!store.is_shared());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(
            store.ask(StateOp::CheckPass(ip), t0, WAITER),
            Some(StateAnswer::Pass(false))
        );
        assert_eq!(store.ask(StateOp::RecordPass(ip), t0, WAITER), None);
        assert_eq!(
            store.ask(StateOp::CheckPass(ip), t0, WAITER),
            Some(StateAnswer::Pass(true))
        );
        assert_eq!(
            store.ask(greylist("k"), t0, WAITER),
            Some(StateAnswer::Greylist(GreylistOutcome::New))
        );
        assert_eq!(
            store.ask(greylist("k"), t0 + Duration::from_secs(100), WAITER),
            Some(StateAnswer::Greylist(GreylistOutcome::Early(
                Duration::from_secs(200)
            )))
        );
        assert_eq!(
            store.ask(StateOp::CheckRate(ip), t0, WAITER),
            Some(StateAnswer::Rate {
                ip,
                verdict: Ok(())
            })
        );
        assert_eq!(
            store.ask(StateOp::CheckRate(ip), t0, WAITER),
            Some(StateAnswer::Rate {
                ip,
                verdict: Err(RateRefusal::PerIp)
            })
        );
        assert_eq!(store.stats(), StoreStats::default());
    }

    #[test]
    fn the_fallback_passes_greylisting_and_keeps_the_rest_local() {
        let t0 = Instant::now();
        let local = local(t0, 1);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..2 {
            assert_eq!(
                local.fallback(&greylist("k"), t0),
                Some(StateAnswer::Greylist(GreylistOutcome::Pass)),
                "fails open, and records no attempt"
            );
        }
        assert_eq!(local.fallback(&StateOp::RecordPass(ip), t0), None);
        assert_eq!(
            local.fallback(&StateOp::CheckPass(ip), t0),
            Some(StateAnswer::Pass(false)),
            "recording is the caller's business"
        );
        local.answer(&StateOp::RecordPass(ip), t0);
        assert_eq!(
            local.fallback(&StateOp::CheckPass(ip), t0),
            Some(StateAnswer::Pass(true))
        );
        assert_eq!(
            local.fallback(&StateOp::CheckRate(ip), t0),
            Some(StateAnswer::Rate {
                ip,
                verdict: Ok(())
            })
        );
        assert_eq!(
            local.fallback(&StateOp::CheckRate(ip), t0),
            Some(StateAnswer::Rate {
                ip,
                verdict: Err(RateRefusal::PerIp)
            }),
            "this host's own buckets"
        );
    }
}
