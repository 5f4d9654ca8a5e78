//! One held message through the scanners: rspamd first, then each milter's message stages,
//! in configuration order. The first scanner that does not let the message through decides;
//! the changes of the others are applied only when every scanner has answered and none
//! refused, so nothing half-changed is ever relayed.

use super::Shared;
use super::conversation::Milter;
use crate::content::rspamd::{self, Request};
use crate::content::{Edit, Verdict};
use crate::policy::content as policy;
use crate::smtp::question::{ScanJob, Scanned, Tls};

/// Scans `job` within its `[content]` settings, holding one of the `max_scans` slots.
pub(super) async fn scan(
    shared: &Shared,
    job: ScanJob,
    milters: &mut [Milter],
    tls: Option<Tls>,
) -> Scanned {
    let content = &job.content;
    let deadline = tokio::time::Instant::now() + content.timeout;
    if !shared.take_slot(content.max_scans, deadline).await {
        shared.warn("max_scans", &crate::content::Failure::Busy);
        return super::unscanned(job, "busy");
    }
    let mut marks: Vec<String> = Vec::new();
    let mut edits: Vec<Edit> = Vec::new();
    let verdict = run(shared, &job, milters, tls, &mut marks, &mut edits).await;
    shared.free_slot();
    if policy::is_final(&verdict) {
        edits.clear();
    }
    Scanned {
        held: job.held,
        verdict,
        edits,
        marks: marks.join(","),
    }
}

/// The scanners in order; returns the deciding verdict, with `marks` and `edits` filled.
async fn run(
    shared: &Shared,
    job: &ScanJob,
    milters: &mut [Milter],
    tls: Option<Tls>,
    marks: &mut Vec<String>,
    edits: &mut Vec<Edit>,
) -> Verdict {
    let content = &job.content;
    let on_failure = content.on_failure;
    if let Some(url) = &content.rspamd {
        let request = Request {
            ip: job.client,
            helo: &job.helo,
            hostname: job.name.as_deref(),
            from: &job.from,
            rcpts: &job.rcpts,
            queue_id: &job.queue_id,
            tls: job.tls.map(|tls| (tls.version, tls.cipher)),
            mta_name: &job.hostname,
        };
        match rspamd::check(url, &request, &job.held, content.timeout).await {
            Ok(reply) => {
                marks.push(format!(
                    "rspamd:{}:{:.1}",
                    reply.action.as_str().replace(' ', "_"),
                    reply.score
                ));
                let verdict = reply.verdict();
                if policy::is_final(&verdict) {
                    return verdict;
                }
                edits.extend(reply.edits());
            }
            Err(failure) => {
                shared.warn(&format!("rspamd http://{}", url.addr), &failure);
                marks.push("rspamd:failed".to_owned());
                if let Some(verdict) = policy::failed(on_failure) {
                    return verdict;
                }
            }
        }
    }
    let queue_id = job.queue_id.as_str();
    for (n, milter) in milters.iter_mut().enumerate() {
        let name = format!("milter{}", n + 1);
        if milter.done_with_message {
            marks.push(format!("{name}:accept"));
            continue;
        }
        let Some(link) = milter.link.as_mut() else {
            marks.push(format!("{name}:failed"));
            continue;
        };
        let mut macros = vec![("i", queue_id)];
        macros.extend(super::conversation::tls_macros(tls));
        match link.message(&job.held, &macros, content.timeout).await {
            Ok(outcome) => {
                for refused in &outcome.refused {
                    log::warn!("content: milter {}: {refused}", milter.addr);
                }
                marks.push(format!("{name}:{}", word(&outcome.verdict)));
                if policy::is_final(&outcome.verdict) {
                    return outcome.verdict;
                }
                edits.extend(outcome.edits);
            }
            Err(failure) => {
                milter.failed(shared, &failure);
                marks.push(format!("{name}:failed"));
                if let Some(verdict) = policy::failed(on_failure) {
                    return verdict;
                }
            }
        }
    }
    Verdict::Continue
}

/// A milter's verdict in `scan=`.
fn word(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Continue => "continue",
        Verdict::Accept => "accept",
        Verdict::Reject(_) => "reject",
        Verdict::TempFail(_) => "tempfail",
        Verdict::Discard => "discard",
    }
}
