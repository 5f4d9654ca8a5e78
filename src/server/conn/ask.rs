//! A [`Conn`]'s service questions: each `Action::Ask` goes to the service that answers it (the
//! resolver, the state front, the worker's tarpit places, admission), and each answer, at once
//! or later through the worker's inboxes, goes back to the session as an `Answer`. The
//! decisions are policy's (`policy::admission`); this carries them out.

use std::time::Instant;

use super::{Conn, Io};
use crate::content::scanner::Waiter as ScanWaiter;
use crate::dns::Waiter;
use crate::metrics::Refused;
use crate::policy::admission::{self, StartTls};
use crate::server::slab::ConnKey;
use crate::server::tls_failures::log_withheld;
use crate::smtp::question::{LookupAnswer, Query};
use crate::smtp::{Answer, Question};
use crate::state::{StateAnswer, StateOp, Waiter as StateWaiter};

impl Conn {
    /// A DNS answer the connection waited for.
    pub(crate) fn handle_lookup(&mut self, now: Instant, query: Query, answer: LookupAnswer) {
        if let Some(metrics) = &self.metrics {
            metrics.lookup(&query, &answer, false);
        }
        self.session
            .handle_answer(now, Answer::Lookup(query, answer));
    }

    /// A scanner answer the connection waited for (`Question::Milter`, `Question::Scan`).
    pub(crate) fn handle_answer(&mut self, now: Instant, answer: Answer) {
        self.session.handle_answer(now, answer);
    }

    /// A state answer the connection waited for (the Redis backend's, or its fallback's).
    pub(crate) fn handle_state(&mut self, now: Instant, answer: StateAnswer) {
        let metrics = self.metrics.as_deref();
        let answer = match answer {
            StateAnswer::Pass(fresh) => Answer::Pass(fresh),
            StateAnswer::Greylist(outcome) => {
                if let Some(metrics) = metrics {
                    metrics.greylist(&outcome);
                }
                Answer::Greylist(outcome)
            }
            StateAnswer::Reputation(history) => Answer::Reputation(history),
            StateAnswer::Rate { ip, verdict } => {
                let guard = &mut self.guard;
                let admitted = admission::admit_named(verdict, || guard.rekey(ip));
                if let Err(refusal) = &admitted {
                    let client = self.session.report().client;
                    log::info!("refused connection from {client}: {refusal}");
                    if let Some(metrics) = metrics {
                        metrics.refused(Refused::from(refusal));
                    }
                }
                Answer::Admission(admitted.is_ok())
            }
        };
        self.session.handle_answer(now, answer);
    }

    /// Puts the session's question to the service that answers it: the resolver, the state
    /// front, the worker's tarpit places or, for admission, the rates then the per-IP cap. An
    /// answer at hand goes to the session at once; a later one comes through the worker's
    /// inboxes. Every question is carried out as asked: nothing here decides.
    pub(super) fn ask(&mut self, question: Question, key: ConnKey, now: Instant, io: &mut Io<'_>) {
        match question {
            Question::Lookup(query) => {
                let waiter = Waiter {
                    worker: io.worker,
                    key: key.to_u64(),
                };
                // A cache hit answers at once; otherwise the answer comes through the
                // worker's inbox (`Worker::take_answers`).
                let answer = match io.resolver {
                    Some(resolver) => resolver.lookup(&query, waiter),
                    None => Some(LookupAnswer::temp_fail(&query)),
                };
                if let Some(answer) = answer {
                    if let Some(metrics) = &self.metrics {
                        metrics.lookup(&query, &answer, true);
                    }
                    self.session
                        .handle_answer(now, Answer::Lookup(query, answer));
                }
            }
            Question::CheckPass(ip) => self.ask_state(StateOp::CheckPass(ip), key, now, io),
            Question::RecordPass(ip) => self.ask_state(StateOp::RecordPass(ip), key, now, io),
            Question::CheckReputation(ip, half_life) => {
                self.ask_state(StateOp::CheckReputation { ip, half_life }, key, now, io);
            }
            Question::RecordReputation(ip, event, half_life) => {
                let op = StateOp::RecordReputation {
                    ip,
                    event,
                    half_life,
                };
                self.ask_state(op, key, now, io);
            }
            Question::CheckGreylist {
                key: triplet,
                subnet,
                times,
            } => {
                let op = StateOp::CheckGreylist {
                    key: triplet,
                    subnet,
                    times,
                };
                self.ask_state(op, key, now, io);
            }
            Question::EnterTarpit => {
                self.tarpit_place = io.shared.load.try_tarpit();
                let granted = self.tarpit_place.is_some();
                self.session.handle_answer(now, Answer::TarpitSlot(granted));
            }
            // The scanner thread; without one (it could not start) a scanner is a failed one.
            Question::Milter(_) | Question::Scan(_) => {
                let waiter = ScanWaiter {
                    worker: io.scan_worker,
                    key: key.to_u64(),
                };
                let answer = match io.scanner {
                    Some(scanner) => scanner.ask(waiter, question),
                    None => crate::content::scanner::unavailable(question),
                };
                if let Some(answer) = answer {
                    self.session.handle_answer(now, answer);
                }
            }
            // The STARTTLS offer, then the rate (`handle_state`), then the per-IP cap.
            Question::Admit(client) => {
                // A balancer's connection was checked at accept under the balancer's address;
                // the client its PROXY header named is known now. A client known at accept
                // (its rate asked of the shared store) had its offer decided then: asking
                // again would only log the same withheld line twice.
                if !self.guard.is_keyed() {
                    let failures = &io.shared.tls_failures;
                    let offer = admission::starttls(io.config, client.ip(), |ip| {
                        failures.failed_recently(ip, now)
                    });
                    if offer == StartTls::Withhold {
                        log_withheld(client);
                        self.session.handle_starttls_withheld();
                    }
                }
                self.ask_state(StateOp::CheckRate(client.ip()), key, now, io);
            }
        }
    }

    /// Asks the state front; an answer now goes to the session at once, a later one comes
    /// through the worker's inbox (`Worker::take_answers`).
    fn ask_state(&mut self, op: StateOp, key: ConnKey, now: Instant, io: &Io<'_>) {
        let waiter = StateWaiter {
            worker: io.state_worker,
            key: key.to_u64(),
        };
        if let Some(answer) = io.shared.store.ask(op, now, waiter) {
            self.handle_state(now, answer);
        }
    }
}
