//! How the sink misbehaves on purpose, so tests can check tarmac's handling of a failing
//! downstream. The session script (`session`, `tls`) asks the configured [`Behaviour`] at each
//! step where one applies.

/// Ways the sink misbehaves, so tests can check tarmac's handling of a failing downstream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Behaviour {
    /// A well-behaved MTA.
    #[default]
    Normal,
    /// Accept the connection and never send anything (a downstream that stalls at connect).
    NoBanner,
    /// Send the banner, then close on the first command without answering it.
    CloseAfterBanner,
    /// A RCPT whose address contains this substring gets
    /// `550 5.1.1 <addr>: Recipient address rejected: User unknown`.
    RejectRcpt(String),
    /// Every valid MAIL gets `451 4.3.0 Try again later`.
    TempFailMail,
    /// After the final dot: `554 5.7.1 Message rejected` (the message is not kept).
    RejectData,
    /// Read the whole message including the final dot, then never answer anything again.
    StallAfterData,
    /// Read the whole message including the final dot, then close without a reply.
    CloseAfterDataDot,
    /// Answer an accepted RCPT with three lines:
    /// `250-2.1.5 first`, `250-2.1.5 second`, `250 2.1.5 Ok`.
    MultilineRcpt,
    /// Offer STARTTLS (even without [`SinkConfig::tls`](super::SinkConfig::tls)) and answer it with
    /// `454 4.7.0 TLS not available due to local problem` (Postfix's text when its certificate
    /// cannot be loaded); the session goes on in plain text.
    RefuseStartTls,
    /// Offer STARTTLS (even without [`SinkConfig::tls`](super::SinkConfig::tls)), answer it `220`,
    /// then close instead of handshaking: the client's TLS handshake fails.
    CloseAfterStartTls,
    /// Answer STARTTLS with `220` followed, in the same write and before the handshake, by
    /// [`INJECTED_AFTER_STARTTLS`], as a man in the middle would (CVE-2011-0411's mirror image): a
    /// client that reads that line as the reply to its next command trusted plain text after
    /// STARTTLS. Then the handshake goes on as usual; needs
    /// [`SinkConfig::tls`](super::SinkConfig::tls).
    InjectAfterStartTls,
}

/// The plain-text reply [`Behaviour::InjectAfterStartTls`] sends right after its `220`: a
/// rejection, so a client fooled into taking it as the reply to its EHLO inside TLS fails
/// visibly instead of going on by luck.
pub const INJECTED_AFTER_STARTTLS: &str = "554 5.7.0 injected before the TLS handshake\r\n";
