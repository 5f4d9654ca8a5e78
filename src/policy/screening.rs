//! The session's screening decisions (DESIGN.md §1 steps 2–3): one client's checks (the
//! lookups it needs, the answers as they arrive, the local lists, and the verdict they add up
//! to), whether its recipients are greylisted, and which of its deeds go to its reputation.
//!
//! Sans-IO like the session that owns it: lookups go out as [`Query`] values, answers come back
//! through `Checks::answer`, and the decisions themselves are `policy` calls. What a verdict
//! means for the dialog (a `554` greeting, `550` on RCPT) is the session's business.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{Config, Dnsbl};
use crate::policy::dnsbl::{self, ZoneOutcome};
use crate::policy::reputation::Event;
use crate::policy::{ListMatch, Standing, Verdict};
use crate::smtp::question::{LookupAnswer, Query, RdnsAnswer};

/// Whether greylisting applies to a client's recipients: a `greylist` rule matched (`forced`),
/// or greylisting is `enabled` and the verdict is pass or tarpit with a score not below zero
/// (DNSWL-listed and allowed clients are never greylisted).
pub(crate) fn greylist_applies(enabled: bool, verdict: Verdict, score: i32, forced: bool) -> bool {
    forced || (enabled && matches!(verdict, Verdict::Pass | Verdict::Tarpit) && score >= 0)
}

/// Which of a session's events went to the client's reputation: one bad mark per session
/// however many errors it made (a pregreet, a reject, protocol abuse: the first), one greylist
/// pass, and every delivery.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ReputationMarks {
    bad: bool,
    greylist_pass: bool,
}

impl ReputationMarks {
    /// Whether `event` goes to the reputation now; notes it as sent.
    pub(crate) fn admit(&mut self, event: Event) -> bool {
        let seen = match event {
            Event::Pregreet | Event::Rejected | Event::ProtocolAbuse => &mut self.bad,
            Event::GreylistPass => &mut self.greylist_pass,
            Event::Delivered => return true,
        };
        !std::mem::replace(seen, true)
    }
}

/// The checks' state for one client.
#[derive(Debug)]
pub(crate) struct Checks {
    /// One slot per `[[dnsbl]]` zone, in config order; `None` while its answer is awaited.
    zones: Box<[Option<ZoneOutcome>]>,
    rdns: Rdns,
    /// The local list that matched, and what it matched.
    list: Option<(ListMatch, ListedBy)>,
    score: i32,
    verdict: Verdict,
    /// The client's reputation, once the driver answered (`None`: not asked).
    reputation: Option<Standing>,
    /// What the reputation adds to the score (`[reputation] weight` for a bad one, else 0).
    reputation_weight: i32,
    /// The verdict was tarpit, but no tarpit place was free: rejected for the server's load,
    /// not for anything more the client did.
    tarpit_refused: bool,
    /// The config the checks started with: `zones` is parallel to its `[[dnsbl]]` list (a
    /// reload may change the session's config later; the answers stay those zones'). Shared,
    /// not copied: a connection costs one reference count here.
    started_with: Option<Arc<Config>>,
}

/// Where the rDNS lookup stands.
#[derive(Debug)]
enum Rdns {
    /// `[dns] rdns = false`, or the client was decided by a list before any lookup.
    NotAsked,
    Awaiting,
    Answered(RdnsAnswer),
}

/// What a local list entry matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListedBy {
    /// The client's address.
    Address,
    /// Its forward-confirmed rDNS name.
    Rdns,
    /// Its HELO/EHLO name.
    Helo,
    /// The domain of a MAIL FROM address.
    Sender,
}

impl Checks {
    /// No lookups asked yet; the verdict is `pass` until they are answered.
    pub(crate) fn new() -> Checks {
        Checks {
            zones: Box::default(),
            rdns: Rdns::NotAsked,
            list: None,
            score: 0,
            verdict: Verdict::Pass,
            reputation: None,
            reputation_weight: 0,
            tarpit_refused: false,
            started_with: None,
        }
    }

    /// Starts the checks for the client at `ip`: a list entry for the address decides at once
    /// (an allowed client waits for no lookup, a denied one gets no more of our attention), else
    /// the lookups to make come back: one per zone, plus rDNS when configured. An empty result
    /// means the verdict is already known.
    pub(crate) fn start(&mut self, config: &Arc<Config>, ip: IpAddr) -> Vec<Query> {
        let ip = ip.to_canonical();
        if let Some(found) = config.lists.entries.check_ip(ip) {
            self.list_matched(found, ListedBy::Address);
            return Vec::new();
        }
        let mut queries: Vec<Query> = config
            .dnsbl
            .iter()
            .map(|zone| Query::Dnsbl {
                zone: Arc::clone(&zone.zone),
                ip,
            })
            .collect();
        self.zones = vec![None; config.dnsbl.len()].into_boxed_slice();
        self.started_with = Some(Arc::clone(config));
        if config.dns.rdns {
            self.rdns = Rdns::Awaiting;
            queries.push(Query::Rdns(ip));
        }
        queries
    }

    /// Records an answer; returns whether every awaited answer is in. Answers nobody waits
    /// for (a zone removed by a reload, a late duplicate) are ignored.
    pub(crate) fn answer(&mut self, query: &Query, answer: LookupAnswer) -> bool {
        match (query, answer) {
            (Query::Dnsbl { zone, .. }, LookupAnswer::Dnsbl(answer)) => {
                let zones = self
                    .started_with
                    .as_deref()
                    .map_or(&[][..], |config| config.dnsbl.as_slice());
                let slot = zones
                    .iter()
                    .zip(self.zones.iter_mut())
                    .find(|(cfg, slot)| cfg.zone == *zone && slot.is_none());
                if let Some((cfg, slot)) = slot {
                    *slot = Some(dnsbl::classify(cfg, &answer));
                }
            }
            (Query::Rdns(_), LookupAnswer::Rdns(answer)) => {
                if matches!(self.rdns, Rdns::Awaiting) {
                    self.rdns = Rdns::Answered(answer);
                }
            }
            // A mismatched pair is a driver bug; waiting on is the safe reaction (the lookup
            // timer still bounds it).
            _ => {}
        }
        self.is_complete()
    }

    /// `[dns] timeout` passed: whatever has not answered counts as a temporary failure, which
    /// scores as not listed (DNS trouble never rejects anyone).
    pub(crate) fn give_up(&mut self) {
        for slot in self.zones.iter_mut().filter(|slot| slot.is_none()) {
            *slot = Some(ZoneOutcome::TempFail);
        }
        if matches!(self.rdns, Rdns::Awaiting) {
            self.rdns = Rdns::Answered(RdnsAnswer::TempFail);
        }
    }

    /// The client's reputation and what it adds to the score (counted by `decide`).
    pub(crate) fn set_reputation(&mut self, standing: Standing, weight: i32) {
        self.reputation = Some(standing);
        self.reputation_weight = weight;
    }

    /// Every answer is in (or given up on): scores the zones plus the reputation weight,
    /// consults the lists for the verified rDNS name, and returns the verdict.
    pub(crate) fn decide(&mut self, config: &Config) -> Verdict {
        if self.list.is_some() {
            return self.verdict;
        }
        let outcomes: Vec<ZoneOutcome> = self.outcomes().collect();
        self.score = dnsbl::score(&outcomes).saturating_add(self.reputation_weight);
        self.verdict = Verdict::from_score(self.score, &config.scoring);
        if let Some(name) = self.rdns_name()
            && let Some(found) = config.lists.entries.check_domain(name)
        {
            self.list_matched(found, ListedBy::Rdns);
        }
        self.verdict
    }

    /// A later name the lists may know (HELO, sender domain). Allow lifts every restriction
    /// but an immediate reject already given; deny is for the caller to answer. Returns the
    /// match, if any. Ignored once a list has decided.
    pub(crate) fn check_name(
        &mut self,
        config: &Config,
        name: &str,
        by: ListedBy,
    ) -> Option<ListMatch> {
        if self.list.is_some() || name.is_empty() {
            return None;
        }
        let found = config.lists.entries.check_domain(name)?;
        self.list_matched(found, by);
        Some(found)
    }

    /// Whether every awaited answer is in.
    pub(crate) fn is_complete(&self) -> bool {
        self.zones.iter().all(Option::is_some) && !matches!(self.rdns, Rdns::Awaiting)
    }

    /// The verdict so far.
    pub(crate) fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// The score so far: listed zones' weights, the reputation weight, score rules' points.
    pub(crate) fn score(&self) -> i32 {
        self.score
    }

    /// The zone a DNSBL reject names (its `reply` text or its name).
    pub(crate) fn blocking_zone(&self) -> Option<&str> {
        let outcomes: Vec<ZoneOutcome> = self.outcomes().collect();
        dnsbl::blocking_zone(self.zone_list(), &outcomes)
    }

    /// The close log's `dnsbl=` field.
    pub(crate) fn dnsbl_field(&self) -> String {
        let outcomes: Vec<ZoneOutcome> = self.outcomes().collect();
        dnsbl::log_field(self.zone_list(), &outcomes)
    }

    /// The forward-confirmed rDNS name, if one was found.
    pub(crate) fn rdns_name(&self) -> Option<&str> {
        match &self.rdns {
            Rdns::Answered(RdnsAnswer::Verified(name)) => Some(name),
            _ => None,
        }
    }

    /// The close log's `rdns=` field: the verified name, `unverified` (PTR names that do not
    /// resolve back), `unknown` (no PTR; Postfix's word), `tempfail`, or `-` (not looked up).
    pub(crate) fn rdns_field(&self) -> &str {
        match &self.rdns {
            Rdns::NotAsked | Rdns::Awaiting => "-",
            Rdns::Answered(RdnsAnswer::Verified(name)) => name,
            Rdns::Answered(RdnsAnswer::Unverified) => "unverified",
            Rdns::Answered(RdnsAnswer::NoName) => "unknown",
            Rdns::Answered(RdnsAnswer::TempFail) => "tempfail",
        }
    }

    /// XCLIENT's NAME (Postfix's values): the verified name, `[TEMPUNAVAIL]` when the lookup
    /// failed, else `[UNAVAILABLE]`.
    pub(crate) fn xclient_name(&self) -> &str {
        match &self.rdns {
            Rdns::Answered(RdnsAnswer::Verified(name)) => name,
            Rdns::Answered(RdnsAnswer::TempFail) => "[TEMPUNAVAIL]",
            _ => "[UNAVAILABLE]",
        }
    }

    /// The close log's `list=` field: `-`, or `allow:`/`deny:` and what matched
    /// (`address`, `rdns`, `helo`, `sender`).
    pub(crate) fn list_field(&self) -> &'static str {
        let Some((found, by)) = self.list else {
            return "-";
        };
        match (found, by) {
            (ListMatch::Allow, ListedBy::Address) => "allow:address",
            (ListMatch::Allow, ListedBy::Rdns) => "allow:rdns",
            (ListMatch::Allow, ListedBy::Helo) => "allow:helo",
            (ListMatch::Allow, ListedBy::Sender) => "allow:sender",
            (ListMatch::Deny, ListedBy::Address) => "deny:address",
            (ListMatch::Deny, ListedBy::Rdns) => "deny:rdns",
            (ListMatch::Deny, ListedBy::Helo) => "deny:helo",
            (ListMatch::Deny, ListedBy::Sender) => "deny:sender",
        }
    }

    /// The verdict was tarpit but no tarpit place is left (`max_tarpitted`): reject instead.
    pub(crate) fn reject_instead_of_tarpit(&mut self) {
        if self.verdict == Verdict::Tarpit {
            self.verdict = Verdict::Reject;
            self.tarpit_refused = true;
        }
    }

    /// Whether the reject is one a full tarpit forced (see `reject_instead_of_tarpit`).
    pub(crate) fn is_tarpit_refused(&self) -> bool {
        self.tarpit_refused
    }

    /// The close log's `rep=` field: the standing, or `-` when reputation was not asked.
    pub(crate) fn reputation_field(&self) -> &'static str {
        self.reputation.map_or("-", Standing::as_str)
    }

    /// The zones listing the client (weight counted), for rules' `dnsbl` condition.
    pub(crate) fn listed_zones(&self) -> Vec<&str> {
        let zones = self.zone_list();
        zones
            .iter()
            .zip(self.zones.iter())
            .filter(|(_, outcome)| matches!(outcome, Some(ZoneOutcome::Listed(_))))
            .map(|(zone, _)| &*zone.zone)
            .collect()
    }

    /// Rules added `points` to the score. At connect, before a rule or a list decided, the
    /// verdict follows the new score.
    pub(crate) fn add_score(&mut self, config: &Config, points: i32, recompute: bool) {
        self.score = self.score.saturating_add(points);
        if recompute && self.list.is_none() {
            self.verdict = Verdict::from_score(self.score, &config.scoring);
        }
    }

    /// A rule decided the verdict (allow, tarpit, reject).
    pub(crate) fn rule_decided(&mut self, verdict: Verdict) {
        if self.list.is_none() {
            self.verdict = verdict;
        }
    }

    /// What the lists decided, if they did.
    pub(crate) fn list_match(&self) -> Option<ListMatch> {
        self.list.map(|(found, _)| found)
    }

    fn list_matched(&mut self, found: ListMatch, by: ListedBy) {
        self.list = Some((found, by));
        self.verdict = match found {
            ListMatch::Allow => Verdict::Allow,
            ListMatch::Deny => Verdict::Reject,
        };
    }

    /// The zones the answers belong to.
    fn zone_list(&self) -> &[Dnsbl] {
        self.started_with
            .as_deref()
            .map_or(&[], |config| config.dnsbl.as_slice())
    }

    fn outcomes(&self) -> impl Iterator<Item = ZoneOutcome> + '_ {
        self.zones
            .iter()
            .map(|slot| slot.unwrap_or(ZoneOutcome::TempFail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bad_mark_and_one_greylist_pass_per_session_every_delivery() {
        let mut marks = ReputationMarks::default();
        assert!(marks.admit(Event::Pregreet));
        assert!(!marks.admit(Event::Rejected));
        assert!(!marks.admit(Event::ProtocolAbuse));
        assert!(marks.admit(Event::GreylistPass));
        assert!(!marks.admit(Event::GreylistPass));
        assert!(marks.admit(Event::Delivered));
        assert!(marks.admit(Event::Delivered));
    }

    #[test]
    fn greylisting_spares_allowed_and_whitelisted_clients_unless_a_rule_forces_it() {
        assert!(greylist_applies(true, Verdict::Pass, 0, false));
        assert!(greylist_applies(true, Verdict::Tarpit, 3, false));
        assert!(!greylist_applies(true, Verdict::Pass, -1, false));
        assert!(!greylist_applies(true, Verdict::Allow, 0, false));
        assert!(!greylist_applies(false, Verdict::Pass, 0, false));
        assert!(greylist_applies(false, Verdict::Allow, -5, true));
    }
}
