//! One session's conversation with its milters: a task that owns one connection to each
//! milter from the connect stage to `Quit`, and passes each stage to them in configuration
//! order, as Postfix chains `smtpd_milters`.
//!
//! The first milter that does not continue decides the stage (the later ones are not
//! asked). A milter that accepts is done: for the connection at connect or HELO, for the
//! message at MAIL or RCPT. A milter that fails (down, slow, garbage) is dropped for the rest
//! of the session, as Postfix does; `on_failure` says whether that fails the stage
//! (`tempfail`) or is skipped (`accept`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Shared, Step, Waiter, answer};
use crate::content::milter::{ConnectInfo, MilterLink};
use crate::content::{Failure, MilterAddr, Settings, Verdict};
use crate::policy::content as policy;
use crate::smtp::question::{Answer, MilterStep, Tls};

/// The daemon name milters see (`{daemon_name}`).
const DAEMON_NAME: &str = "tarmac";

/// What the conversation is about.
pub(super) struct Context {
    pub(super) shared: Arc<Shared>,
    pub(super) waiter: Waiter,
    /// The session's `[content]` when it connected: the conversation keeps its milters.
    pub(super) content: Settings,
    /// tarmac's hostname (`j`).
    pub(super) hostname: String,
    /// No step for this long ends the conversation.
    pub(super) linger: Duration,
    pub(super) client: SocketAddr,
    pub(super) name: Option<Arc<str>>,
}

/// One milter of the conversation.
pub(super) struct Milter {
    pub(super) addr: MilterAddr,
    /// `None` once it failed or accepted the whole connection.
    pub(super) link: Option<MilterLink>,
    /// It accepted the current message: not asked again until the next one.
    pub(super) done_with_message: bool,
}

impl Milter {
    /// It failed (down, slow, garbage): the failure is logged and it is dropped for the rest
    /// of the session.
    pub(super) fn failed(&mut self, shared: &Shared, failure: &Failure) {
        shared.warn(&format!("milter {}", self.addr), failure);
        self.link = None;
    }
}

/// A stage's facts.
enum Stage<'a> {
    Connect(ConnectInfo<'a>),
    Helo(&'a str),
    Mail(&'a str, &'a [&'a str]),
    Rcpt(&'a str),
}

/// Runs the conversation: the connect stage, then each step until `Quit`, the channel's end,
/// or no step for longer than a session can wait (a session that vanished without `Quit`).
pub(super) async fn run(context: Context, mut steps: mpsc::UnboundedReceiver<Step>) {
    let content = &context.content;
    let idle_limit = context.linger;
    let mut milters = open(&context).await;
    let client_addr = context.client.ip().to_canonical().to_string();
    let client_name = context.name.as_deref().unwrap_or("unknown").to_owned();
    let hostname = context.hostname.as_str();
    let connect_macros = [
        ("j", hostname),
        ("{daemon_name}", DAEMON_NAME),
        ("{client_addr}", client_addr.as_str()),
        ("{client_name}", client_name.as_str()),
    ];
    // libmilter's contract: the verified name, else the address in brackets.
    let connect_name = match &context.name {
        Some(name) => name.to_string(),
        None => format!("[{client_addr}]"),
    };
    let info = ConnectInfo {
        hostname: &connect_name,
        addr: context.client,
    };
    let verdict = pass(
        &context,
        &mut milters,
        &Stage::Connect(info),
        &connect_macros,
        content.timeout,
    )
    .await;
    answer(&context.shared, context.waiter, Answer::Milter(verdict));
    let mut tls: Option<Tls> = None;
    loop {
        let Ok(Some(step)) = tokio::time::timeout(idle_limit, steps.recv()).await else {
            break;
        };
        match step {
            Step::Stage(MilterStep::Helo { name, tls: version }) => {
                tls = version;
                let macros = tls_macros(version);
                let verdict = pass(
                    &context,
                    &mut milters,
                    &Stage::Helo(&name),
                    &macros,
                    content.timeout,
                )
                .await;
                answer(&context.shared, context.waiter, Answer::Milter(verdict));
            }
            Step::Stage(MilterStep::Mail { from, args }) => {
                for milter in &mut milters {
                    milter.done_with_message = false;
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let macros = [("{mail_addr}", from.as_str())];
                let stage = Stage::Mail(&from, &args);
                let verdict = pass(&context, &mut milters, &stage, &macros, content.timeout).await;
                answer(&context.shared, context.waiter, Answer::Milter(verdict));
            }
            Step::Stage(MilterStep::Rcpt { to }) => {
                let macros = [("{rcpt_addr}", to.as_str())];
                let stage = Stage::Rcpt(&to);
                let verdict = pass(&context, &mut milters, &stage, &macros, content.timeout).await;
                answer(&context.shared, context.waiter, Answer::Milter(verdict));
            }
            Step::Stage(MilterStep::Abort) => {
                for milter in &mut milters {
                    milter.done_with_message = false;
                    if let Some(link) = milter.link.as_mut()
                        && let Err(failure) = link.abort(content.timeout).await
                    {
                        milter.failed(&context.shared, &failure);
                    }
                }
            }
            Step::Scan(job) => {
                let scanned = super::message::scan(&context.shared, *job, &mut milters, tls).await;
                for milter in &mut milters {
                    milter.done_with_message = false;
                }
                answer(
                    &context.shared,
                    context.waiter,
                    Answer::Scanned(Box::new(scanned)),
                );
            }
            Step::Stage(MilterStep::Connect { .. }) => {}
            Step::Stage(MilterStep::Quit) | Step::Quit => break,
        }
    }
    for milter in milters {
        if let Some(link) = milter.link {
            link.quit().await;
        }
    }
}

/// Connects to every milter of the configuration, in order; one that cannot be reached is
/// logged and left out (the connect stage then fails as `on_failure` says).
async fn open(context: &Context) -> Vec<Milter> {
    let content = &context.content;
    let mut milters = Vec::with_capacity(content.milters.len());
    for addr in &content.milters {
        let link = match MilterLink::open(addr, content.timeout).await {
            Ok(link) => Some(link),
            Err(failure) => {
                context.shared.warn(&format!("milter {addr}"), &failure);
                None
            }
        };
        milters.push(Milter {
            addr: addr.clone(),
            link,
            done_with_message: false,
        });
    }
    milters
}

/// Passes `stage` to each milter still in the conversation; the first verdict that does
/// not continue decides. A milter that could not be opened fails the connect stage.
async fn pass(
    context: &Context,
    milters: &mut [Milter],
    stage: &Stage<'_>,
    macros: &[(&str, &str)],
    timeout: Duration,
) -> Verdict {
    let on_failure = context.content.on_failure;
    for milter in milters.iter_mut() {
        if milter.done_with_message && matches!(stage, Stage::Mail(..) | Stage::Rcpt(_)) {
            continue;
        }
        let Some(link) = milter.link.as_mut() else {
            if matches!(stage, Stage::Connect(_))
                && let Some(verdict) = policy::failed(on_failure)
            {
                return verdict;
            }
            continue;
        };
        let result = match stage {
            Stage::Connect(info) => link.connect(info, macros, timeout).await,
            Stage::Helo(name) => link.helo(name, macros, timeout).await,
            Stage::Mail(from, args) => link.mail(from, args, macros, timeout).await,
            Stage::Rcpt(to) => link.rcpt(to, &[], macros, timeout).await,
        };
        for note in link.take_notes() {
            log::info!("content: milter {}: {note}", milter.addr);
        }
        match result {
            Ok(Verdict::Accept) => match stage {
                Stage::Connect(_) | Stage::Helo(_) => {
                    if let Some(link) = milter.link.take() {
                        link.quit().await;
                    }
                }
                Stage::Mail(..) | Stage::Rcpt(_) => milter.done_with_message = true,
            },
            Ok(verdict) if policy::is_final(&verdict) => return verdict,
            Ok(_) => {}
            Err(failure) => {
                milter.failed(&context.shared, &failure);
                if let Some(verdict) = policy::failed(on_failure) {
                    return verdict;
                }
            }
        }
    }
    Verdict::Continue
}

/// `{tls_version}` and `{cipher}` for a session over TLS; nothing in plain text.
pub(super) fn tls_macros(tls: Option<Tls>) -> Vec<(&'static str, &'static str)> {
    match tls {
        Some(tls) if tls.cipher.is_empty() => vec![("{tls_version}", tls.version)],
        Some(tls) => vec![("{tls_version}", tls.version), ("{cipher}", tls.cipher)],
        None => Vec::new(),
    }
}
