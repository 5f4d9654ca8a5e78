//! What the scanners' verdicts mean for the client (DESIGN.md §7): the reply each refusal
//! gets at each stage, and how the verdicts of several scanners add up. The texts are
//! Postfix's for milters (`milter8.c`), so operators see what they know.

use crate::content::{OnFailure, Verdict};
use crate::smtp::reply::Reply;

/// Where in the session a milter verdict was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MilterStage {
    /// Before the banner.
    Connect,
    /// HELO/EHLO.
    Helo,
    /// MAIL FROM.
    Mail,
    /// RCPT TO.
    Rcpt,
}

/// What the session does with a milter verdict at a stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StageDecision {
    /// Go on as without milters.
    Proceed,
    /// Go on, but the message is to be discarded: the client gets `250` at its end and
    /// nothing is relayed (as Postfix, a discard before the message is for the whole message).
    Discard,
    /// Answer the command with this reply (the banner: the greeting line); the command is not
    /// relayed.
    Refuse(Reply),
    /// At connect: this `421` and a close.
    Close(Reply),
}

/// The reply to a refused command, or a message's final dot: the scanner's own when it gave
/// one of the right class, else Postfix's.
fn refusal(verdict: &Verdict, stage: Option<MilterStage>) -> Option<Reply> {
    match verdict {
        Verdict::Reject(own) => Some(
            own.clone()
                .filter(|reply| reply.code / 100 == 5)
                .unwrap_or_else(|| match stage {
                    Some(MilterStage::Connect) => Reply::new(
                        554,
                        "5.7.1",
                        "Service unavailable; rejected by content filter",
                    ),
                    Some(_) => Reply::new(550, "5.7.1", "Command rejected"),
                    None => Reply::new(550, "5.7.1", "Message content rejected"),
                }),
        ),
        Verdict::TempFail(own) => Some(
            own.clone()
                .filter(|reply| reply.code / 100 == 4)
                .unwrap_or_else(|| {
                    Reply::new(451, "4.7.1", "Service unavailable - try again later")
                }),
        ),
        Verdict::Continue | Verdict::Accept | Verdict::Discard => None,
    }
}

/// What a milter verdict at `stage` means.
pub fn at_stage(stage: MilterStage, verdict: &Verdict) -> StageDecision {
    match (stage, verdict) {
        (_, Verdict::Continue | Verdict::Accept) => StageDecision::Proceed,
        // Nothing to discard yet: Postfix ignores a discard before MAIL too.
        (MilterStage::Connect | MilterStage::Helo, Verdict::Discard) => StageDecision::Proceed,
        (_, Verdict::Discard) => StageDecision::Discard,
        (MilterStage::Connect, Verdict::TempFail(_)) => StageDecision::Close(Reply::new(
            421,
            "4.7.1",
            "Service unavailable - try again later",
        )),
        (stage, verdict) => match refusal(verdict, Some(stage)) {
            Some(reply) => StageDecision::Refuse(reply),
            None => StageDecision::Proceed,
        },
    }
}

/// The reply to a scanned message's final dot when the scanners did not let it through:
/// `None` for a verdict that relays (or discards: that `250` comes from the session).
pub fn message_refusal(verdict: &Verdict) -> Option<Reply> {
    refusal(verdict, None)
}

/// What a scanner that failed counts as: `None` under `accept` (it is skipped).
pub fn failed(on_failure: OnFailure) -> Option<Verdict> {
    match on_failure {
        OnFailure::TempFail => Some(Verdict::TempFail(None)),
        OnFailure::Accept => None,
    }
}

/// Whether `verdict` ends the scanning of a message or a stage: the scanners after it are not
/// asked (as Postfix stops at the first milter that does not continue).
pub fn is_final(verdict: &Verdict) -> bool {
    matches!(
        verdict,
        Verdict::Reject(_) | Verdict::TempFail(_) | Verdict::Discard
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_verdicts_map_to_postfix_replies() {
        assert_eq!(
            at_stage(MilterStage::Rcpt, &Verdict::Continue),
            StageDecision::Proceed
        );
        assert_eq!(
            at_stage(MilterStage::Rcpt, &Verdict::Reject(None)),
            StageDecision::Refuse(Reply::new(550, "5.7.1", "Command rejected"))
        );
        let own = Reply::new(553, "5.1.1", "No such user here");
        assert_eq!(
            at_stage(MilterStage::Rcpt, &Verdict::Reject(Some(own.clone()))),
            StageDecision::Refuse(own)
        );
        // A reply of the wrong class is not taken: a reject stays a 5xx.
        let wrong = Reply::new(451, "4.0.0", "later");
        assert_eq!(
            at_stage(MilterStage::Mail, &Verdict::Reject(Some(wrong))),
            StageDecision::Refuse(Reply::new(550, "5.7.1", "Command rejected"))
        );
        assert!(matches!(
            at_stage(MilterStage::Connect, &Verdict::Reject(None)),
            StageDecision::Refuse(Reply { code: 554, .. })
        ));
        assert!(matches!(
            at_stage(MilterStage::Connect, &Verdict::TempFail(None)),
            StageDecision::Close(Reply { code: 421, .. })
        ));
        assert_eq!(
            at_stage(MilterStage::Rcpt, &Verdict::Discard),
            StageDecision::Discard
        );
        assert_eq!(
            at_stage(MilterStage::Helo, &Verdict::Discard),
            StageDecision::Proceed
        );
        assert!(matches!(
            at_stage(MilterStage::Helo, &Verdict::TempFail(None)),
            StageDecision::Refuse(Reply { code: 451, .. })
        ));
    }

    #[test]
    fn message_verdicts_and_failures() {
        assert_eq!(message_refusal(&Verdict::Continue), None);
        assert_eq!(message_refusal(&Verdict::Discard), None);
        assert_eq!(
            message_refusal(&Verdict::Reject(None)),
            Some(Reply::new(550, "5.7.1", "Message content rejected"))
        );
        assert_eq!(
            message_refusal(&Verdict::TempFail(None)).map(|r| r.code),
            Some(451)
        );
        assert_eq!(failed(OnFailure::TempFail), Some(Verdict::TempFail(None)));
        assert_eq!(failed(OnFailure::Accept), None);
        assert!(is_final(&Verdict::Discard));
        assert!(!is_final(&Verdict::Accept));
    }
}
