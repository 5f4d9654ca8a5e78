//! The in-process stores ([`Local`]): the local backend itself, and the answers the Redis
//! backend falls back on when Redis cannot give one (see `store`'s module doc).

use std::sync::Arc;
use std::time::Instant;

use super::greylist::{Greylist, GreylistOutcome};
use super::op::{StateAnswer, StateOp};
use super::pass::PassCache;
use super::reputation::ReputationTable;
use crate::policy::ConnectionRates;

/// The in-process stores: the local backend itself, and the fallback of the Redis one.
#[derive(Debug)]
pub struct Local {
    pub(super) passes: Arc<PassCache>,
    greylist: Arc<Greylist>,
    reputation: Arc<ReputationTable>,
    /// Shared with the server's accept path, which checks direct clients itself when the
    /// backend is local.
    rates: Arc<ConnectionRates>,
}

impl Local {
    /// The stores, empty or as given; the tables are shared with the snapshots
    /// (`state::snapshots`), which save and load them with the local backend.
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
    /// ([`Store::ask`](super::Store::ask)), so nothing happens for it here.
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
