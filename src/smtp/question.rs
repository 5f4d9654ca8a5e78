//! What a session asks the shared services, and what they answer (STYLE.md §1.4: questions are
//! one variant, answers one method).
//!
//! The session asks through `Action::Ask(`[`Question`]`)`; each question carries every
//! parameter its service needs, so the driver decides nothing and looks nothing up in a
//! configuration of its own. The driver answers through `Session::handle_answer(now,
//! `[`Answer`]`)`, at once (a cache hit, a local table) or when the answer arrives. Questions
//! that only record something (`RecordPass`, `RecordReputation`) have no answer.
//!
//! The DNS question and its classified answers ([`Query`], [`LookupAnswer`], [`DnsblAnswer`],
//! [`RdnsAnswer`]) are defined here, in the core that asks them: the resolver (`crate::dns`)
//! and the DNSBL policy (`crate::policy::dnsbl`) both import them from here, so neither
//! depends on the other through them, and no hickory type reaches the core.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::content::held::Held;
use crate::content::{Edit, Settings, Verdict};
use crate::policy::reputation::{Event, History};
use crate::state::greylist::{GreylistOutcome, GreylistTimes};

/// A question for a shared service (`Action::Ask`).
#[derive(Debug)]
pub enum Question {
    /// Look this up (through the resolver's cache) and answer [`Answer::Lookup`], now or when
    /// it arrives. The banner waits for the answers.
    Lookup(Query),
    /// Is there a fresh PASS for this client (it passed the greet pause within `pass_ttl`)?
    /// Answer [`Answer::Pass`]; the greet pause waits for the answer.
    CheckPass(IpAddr),
    /// The client passed the greet pause: cache a PASS for it for `pass_ttl`. No answer.
    RecordPass(IpAddr),
    /// What does this client's history hold (`[reputation]`)? Carries the client and the
    /// session's `[reputation] half_life` (Redis decays with it). Answer
    /// [`Answer::Reputation`]; the verdict waits for the answer.
    CheckReputation(IpAddr, Duration),
    /// Add this event to the client's history, decayed with the session's `[reputation]
    /// half_life`: the client, what it did, the half-life. No answer.
    RecordReputation(IpAddr, Event, Duration),
    /// Is this RCPT's triplet deferred or passed? Answer [`Answer::Greylist`]; the RCPT
    /// waits for the answer.
    CheckGreylist {
        /// The triplet, built from `[greylist] key`.
        key: String,
        /// The client's network (`192.0.2.0/24`, `2001:db8::/64`), for its quota of new
        /// triplets (`max_new_per_subnet`).
        subnet: String,
        /// The `[greylist]` times and bounds of the session's configuration.
        times: GreylistTimes,
    },
    /// The verdict is tarpit: take one of the `max_tarpitted` places (held until the
    /// connection is gone) and answer [`Answer::TarpitSlot`].
    EnterTarpit,
    /// A balancer's PROXY header (or a driver that could not decide at accept) named this
    /// client: count it against the per-IP cap and the connection rates and answer
    /// [`Answer::Admission`]. The banner waits for the answer.
    Admit(SocketAddr),
    /// Pass a stage of the session to its milters (`[content] milters`, DESIGN.md §7), in
    /// order; answer [`Answer::Milter`], except for [`MilterStep::Abort`] and
    /// [`MilterStep::Quit`]. The command (or the banner) waits for the answer.
    Milter(MilterStep),
    /// Scan the held message (rspamd, then the milters' message stages) and answer
    /// [`Answer::Scanned`], with the message handed back. The final dot's reply waits.
    Scan(Box<ScanJob>),
}

/// A stage of the session for its milters. The conversation with the milters lives as long as
/// the session: `Connect` opens it, `Quit` ends it.
#[derive(Debug)]
pub enum MilterStep {
    /// The client was greeted (its verdict lets it talk): open a connection to each milter
    /// and pass the connect stage. Carries the configuration the conversation keeps.
    Connect {
        /// The session's `[content]`, which the conversation keeps to its end.
        content: Box<Settings>,
        /// tarmac's hostname (macro `j`).
        hostname: String,
        /// How long the conversation may go without a step before it ends by itself: a
        /// session that vanished without `Quit` (longer than any session waits).
        linger: Duration,
        /// The client.
        client: SocketAddr,
        /// Its verified rDNS name (`{client_name}`; `unknown` without one).
        name: Option<Arc<str>>,
    },
    /// HELO/EHLO, with the TLS in force (`{tls_version}`, `{cipher}`).
    Helo {
        /// The name the client gave.
        name: String,
        /// The TLS version and cipher, or `None` in plain text.
        tls: Option<Tls>,
    },
    /// MAIL FROM, with its parameters as the client sent them (`SIZE=…`, `BODY=…`).
    Mail {
        /// The sender (`{mail_addr}`); empty for the null sender.
        from: String,
        /// ESMTP parameters.
        args: Vec<String>,
    },
    /// RCPT TO (`{rcpt_addr}`).
    Rcpt {
        /// The recipient.
        to: String,
    },
    /// The transaction ended before its message was scanned (RSET, a refusal, a new MAIL).
    Abort,
    /// The session is over.
    Quit,
}

/// A held message to scan, with what the scanners are told about it (DESIGN.md §7).
#[derive(Debug)]
pub struct ScanJob {
    /// The session's `[content]`.
    pub content: Settings,
    /// tarmac's hostname (`MTA-Name`).
    pub hostname: String,
    /// The message: tarmac's `Received:` first.
    pub held: Held,
    /// The client.
    pub client: IpAddr,
    /// Its HELO name.
    pub helo: String,
    /// Its verified rDNS name, if any.
    pub name: Option<Arc<str>>,
    /// The sender.
    pub from: String,
    /// The recipients the downstream accepted.
    pub rcpts: Vec<String>,
    /// `<conn>.<n>`: the close line's connection id and the message's number on it
    /// (rspamd's `Queue-Id`, the milters' `i`).
    pub queue_id: String,
    /// The TLS in force, if any.
    pub tls: Option<Tls>,
}

/// The client's TLS, as the scanners are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tls {
    /// `TLSv1.3`, `TLSv1.2`.
    pub version: &'static str,
    /// The cipher suite's IANA name (`TLS13_AES_128_GCM_SHA256`); empty when unknown.
    pub cipher: &'static str,
}

/// What the scanners made of a message ([`Answer::Scanned`]).
#[derive(Debug)]
pub struct Scanned {
    /// The message, handed back.
    pub held: Held,
    /// What the scanners decided together: `Continue` (relay, with `edits`), or the first
    /// refusal, tempfail or discard. A failed scanner under `on_failure = "tempfail"` is a
    /// `TempFail(None)`; under `"accept"` it is skipped.
    pub verdict: Verdict,
    /// Every relaying scanner's changes, in scanner order; empty unless the verdict relays.
    pub edits: Vec<Edit>,
    /// `scan=` for the close line: `rspamd:reject:15.2,milter1:accept` (DESIGN.md §7).
    pub marks: String,
}

/// A service's answer to a [`Question`] (`Session::handle_answer`).
#[derive(Debug)]
pub enum Answer {
    /// For [`Question::Lookup`]: the query asked and its answer. Late answers, after
    /// `[dns] timeout`, are ignored.
    Lookup(Query, LookupAnswer),
    /// For [`Question::CheckPass`]: whether a fresh PASS is cached for the client.
    Pass(bool),
    /// For [`Question::CheckReputation`]: the client's history (`None`: none kept).
    Reputation(Option<History>),
    /// For [`Question::CheckGreylist`]: the triplet's outcome.
    Greylist(GreylistOutcome),
    /// For [`Question::EnterTarpit`]: whether a place was granted.
    TarpitSlot(bool),
    /// For [`Question::Admit`]: whether the client may stay (under its caps and rates).
    Admission(bool),
    /// For [`Question::Milter`]: what the milters said together (the first that did not
    /// continue). A milter that failed counts as `on_failure` says: `TempFail(None)`, or
    /// skipped.
    Milter(Verdict),
    /// For [`Question::Scan`].
    Scanned(Box<Scanned>),
}

/// What a session asks the resolver.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Query {
    /// The client's address in a DNSBL/DNSWL zone: an A lookup of the reversed octets (IPv4)
    /// or nibbles (IPv6) under `zone`.
    Dnsbl {
        /// The zone, as configured (`zen.spamhaus.org`).
        zone: Arc<str>,
        /// The client's address.
        ip: IpAddr,
    },
    /// The client's PTR names, forward-confirmed (FCrDNS).
    Rdns(IpAddr),
}

/// A classified answer to a [`Query`]; no hickory type leaves `crate::dns`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupAnswer {
    /// For [`Query::Dnsbl`].
    Dnsbl(DnsblAnswer),
    /// For [`Query::Rdns`].
    Rdns(RdnsAnswer),
}

/// A zone's answer for one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsblAnswer {
    /// Listed: the A records returned, every one inside 127.0.0.0/8 and none an error code.
    Listed(Vec<Ipv4Addr>),
    /// NXDOMAIN or NODATA.
    NotListed,
    /// The zone answered with an error code (127.255.255.x, e.g. "public resolver blocked")
    /// or an address outside 127.0.0.0/8: not a listing. Carries the first such address.
    Error(Ipv4Addr),
    /// Timeout, SERVFAIL, REFUSED, unreachable server, or too many lookups in flight.
    TempFail,
    /// The zone is set aside by the resolver's health check (it answered its test points
    /// wrongly) and was not queried.
    SetAside,
}

/// The forward-confirmed reverse name of an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RdnsAnswer {
    /// A PTR name whose A/AAAA records include the address: lowercase, no trailing dot.
    Verified(Arc<str>),
    /// PTR names exist but none resolves back to the address.
    Unverified,
    /// No PTR record (NXDOMAIN or NODATA).
    NoName,
    /// Timeout or server failure.
    TempFail,
}

impl LookupAnswer {
    /// `TempFail` in the shape of `query`'s answers: what a lookup gets when it cannot be made
    /// (overload, the resolver stopped, or no resolver at all).
    pub fn temp_fail(query: &Query) -> LookupAnswer {
        match query {
            Query::Dnsbl { .. } => LookupAnswer::Dnsbl(DnsblAnswer::TempFail),
            Query::Rdns(_) => LookupAnswer::Rdns(RdnsAnswer::TempFail),
        }
    }
}
