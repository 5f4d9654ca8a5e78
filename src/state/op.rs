//! The questions workers ask shared state ([`StateOp`]), their answers ([`StateAnswer`]), who
//! waits for one that comes later ([`Waiter`]) and the backend's counters ([`StoreStats`]): the
//! vocabulary both backends speak (`local`, `redis`), with no backend in it.

use std::net::IpAddr;
use std::time::Duration;

use super::greylist::{GreylistOutcome, GreylistTimes};
use crate::policy::RateRefusal;
use crate::policy::reputation::{Event, History};

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
