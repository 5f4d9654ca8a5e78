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

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::greylist::GreylistTimes;
use super::greylist::{Greylist, GreylistOutcome};
use super::pass::PassCache;
use super::redis::RedisHandle;
use super::reputation::ReputationTable;
use crate::policy::reputation::{Event, History};
use crate::policy::{ConnectionRates, RateRefusal};

/// A question about shared state, or a fact to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateOp {
    /// Does this client have a fresh PASS? Answered [`StateAnswer::Pass`].
    CheckPass(IpAddr),
    /// This client passed the greet pause: remember it for `[tarpit] pass_ttl`. No answer.
    RecordPass(IpAddr),
    /// Decide this triplet (recording the attempt) under these times. Answered
    /// [`StateAnswer::Greylist`].
    CheckGreylist {
        /// The triplet key (`greylist::key`).
        key: String,
        /// The client's /24 or /64 (`policy::rates::network_name`), whose quota of new
        /// triplets (`[greylist] max_new_per_subnet`) a new one counts against.
        subnet: String,
        /// The greylist times of the configuration in force.
        times: GreylistTimes,
    },
    /// Take a token from this client's connection-rate buckets (address, then network).
    /// Answered [`StateAnswer::Rate`].
    CheckRate(IpAddr),
    /// This client's history. Answered [`StateAnswer::Reputation`].
    CheckReputation {
        /// The client.
        ip: IpAddr,
        /// `[reputation] half_life` of the configuration in force (Redis decays with it).
        half_life: Duration,
    },
    /// Something this client did, for its history (decayed with `half_life`). No answer.
    RecordReputation {
        /// The client.
        ip: IpAddr,
        /// What it did.
        event: Event,
        /// `[reputation] half_life` of the configuration in force.
        half_life: Duration,
    },
}

/// The answer to a [`StateOp`].
#[derive(Clone, Debug, PartialEq)]
pub enum StateAnswer {
    /// For [`StateOp::CheckPass`]: whether a PASS is fresh.
    Pass(bool),
    /// For [`StateOp::CheckGreylist`].
    Greylist(GreylistOutcome),
    /// For [`StateOp::CheckRate`]: the address asked about, and whether it may connect now.
    Rate {
        /// The client the rate was checked for.
        ip: IpAddr,
        /// `Ok`: a token was taken; else the bucket that was empty.
        verdict: Result<(), RateRefusal>,
    },
    /// For [`StateOp::CheckReputation`]: the client's history, `None` when it has none.
    Reputation(Option<History>),
}

/// Who waits for an answer that comes later: a worker (the index the state thread gave it)
/// and an opaque key that finds the connection (a generation-tagged slab key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiter {
    /// The worker's index.
    pub worker: usize,
    /// The connection's key in that worker.
    pub key: u64,
}

/// Counters for tests, logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Redis backend: the state thread holds a working connection now.
    pub redis_up: bool,
    /// Answers that came from Redis.
    pub redis_answers: u64,
    /// Answers the local fallback gave because Redis was down, slow, failing, or the state
    /// thread was behind.
    pub fallbacks: u64,
}

/// The in-process stores: the local backend itself, and the fallback of the Redis one.
#[derive(Debug)]
pub struct Local {
    passes: Arc<PassCache>,
    greylist: Arc<Greylist>,
    reputation: Arc<ReputationTable>,
    /// Shared with the server's accept path, which checks direct clients itself when the
    /// backend is local.
    rates: Arc<ConnectionRates>,
}

/// The front the workers ask: local, or Redis with the local fallback.
#[derive(Debug)]
pub struct Store {
    local: Arc<Local>,
    redis: Option<RedisHandle>,
}

impl Local {
    /// The stores, empty or as given; the tables are shared with the snapshots
    /// (`server::snapshots`), which save and load them with the local backend.
    pub fn new(
        passes: Arc<PassCache>,
        greylist: Arc<Greylist>,
        reputation: Arc<ReputationTable>,
        rates: Arc<ConnectionRates>,
    ) -> Local {
        Local {
            passes,
            greylist,
            reputation,
            rates,
        }
    }

    /// The local backend's answer (the op's whole meaning, recorded here); `None` for an op
    /// that has no answer.
    pub fn answer(&self, op: &StateOp, now: Instant) -> Option<StateAnswer> {
        Some(match op {
            StateOp::CheckPass(ip) => StateAnswer::Pass(self.passes.is_fresh(*ip, now)),
            StateOp::RecordPass(ip) => {
                self.passes.record(*ip, now);
                return None;
            }
            StateOp::CheckGreylist { key, subnet, times } => {
                StateAnswer::Greylist(self.greylist.check(key, subnet, now, times))
            }
            StateOp::CheckRate(ip) => StateAnswer::Rate {
                ip: *ip,
                verdict: self.rates.check(*ip),
            },
            StateOp::CheckReputation { ip, .. } => {
                StateAnswer::Reputation(self.reputation.history(*ip))
            }
            StateOp::RecordReputation {
                ip,
                event,
                half_life,
            } => {
                self.reputation.record(*ip, *event, now, *half_life);
                return None;
            }
        })
    }

    /// The answer when Redis cannot give one (see the module doc): greylisting passes, the
    /// rest is this host's own state. A PASS to record was recorded locally when asked
    /// ([`Store::ask`]), so nothing happens for it here.
    pub fn fallback(&self, op: &StateOp, now: Instant) -> Option<StateAnswer> {
        match op {
            StateOp::CheckGreylist { .. } => Some(StateAnswer::Greylist(GreylistOutcome::Pass)),
            StateOp::RecordPass(_) | StateOp::RecordReputation { .. } => None,
            StateOp::CheckPass(_) | StateOp::CheckRate(_) | StateOp::CheckReputation { .. } => {
                self.answer(op, now)
            }
        }
    }
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
    use super::*;
    use crate::config::Rate;

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
