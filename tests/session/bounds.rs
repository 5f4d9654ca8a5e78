//! Abuse bounds (DESIGN.md §6.1): the error and junk-command limits, the command timeout from
//! the reply on, PROXY headers from clients that are not behind a balancer, and the outbox
//! caps, on invented time.

use super::*;

/// The session's `CLIENT_OUTBOX_CAP` (`src/smtp/session/mod.rs`): replies held for a client
/// that does not read before its commands stop being taken.
const CLIENT_OUTBOX_CAP: usize = 1024;

/// The session's `DOWNSTREAM_OUTBOX_CAP`: body bytes held for a downstream that does not read
/// before the client's body stops being taken.
const DOWNSTREAM_OUTBOX_CAP: usize = 32 * 1024;

const TOO_MANY_ERRORS: &str = "421 4.7.0 mx.test Error: too many errors\r\n";

fn max_errors(n: u32) -> Config {
    let mut config = config();
    config.limits.max_errors = n;
    config
}

#[test]
fn errors_up_to_max_errors_get_421_and_a_close() {
    let mut pair = Pair::new(max_errors(3));
    pair.take_output();
    // MAIL before EHLO: 503, an error each; the third reaches the limit.
    pair.send(&b"MAIL FROM:<a@example.org>\r\n".repeat(5));
    assert_eq!(
        pair.take_output(),
        "503 5.5.1 Error: send HELO/EHLO first\r\n".repeat(3) + TOO_MANY_ERRORS
    );
    assert!(pair.closed);
    assert_eq!(pair.session.report().result, "too-many-errors");
}

#[test]
fn a_client_that_waits_after_its_last_error_is_closed_at_once() {
    let mut pair = Pair::new(max_errors(2));
    pair.take_output();
    pair.send(b"EXPN x\r\n");
    assert!(!pair.closed);
    pair.send(b"EXPN x\r\n");
    assert_eq!(
        pair.take_output(),
        "502 5.5.1 Error: EXPN not available\r\n".repeat(2) + TOO_MANY_ERRORS
    );
    assert!(
        pair.closed,
        "no need to wait for its next command or its timeout"
    );
}

#[test]
fn relayed_downstream_errors_count_toward_max_errors() {
    let mut pair = Pair::new(max_errors(2));
    pair.take_output();
    pair.send(
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<unknown@example.org>\r\n\
          RCPT TO:<unknown@example.org>\r\nRCPT TO:<b@example.net>\r\n",
    );
    let unknown = "550 5.1.1 <unknown@example.org>: User unknown\r\n";
    let out = pair.take_output();
    assert!(
        out.ends_with(&(unknown.repeat(2) + TOO_MANY_ERRORS)),
        "{out}"
    );
    assert!(pair.closed);
    let rcpts = pair
        .downstream
        .commands
        .iter()
        .filter(|c| c.starts_with("RCPT"));
    assert_eq!(rcpts.count(), 2, "nothing is relayed after the limit");
    assert!(!pair.ds_open);
}

#[test]
fn greylisting_451_is_not_counted_as_an_error() {
    let mut config = max_errors(1);
    config.greylist.enabled = true;
    let mut pair = Pair::new(config);
    pair.take_output();
    pair.send(
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b1@example.net>\r\n\
          RCPT TO:<b2@example.net>\r\nRCPT TO:<b3@example.net>\r\n",
    );
    let out = pair.take_output();
    assert_eq!(out.matches("451 4.7.1 Greylisted").count(), 3, "{out}");
    assert!(!pair.closed);
}

#[test]
fn a_delivered_message_forgives_earlier_errors() {
    let mut pair = Pair::new(max_errors(3));
    pair.take_output();
    pair.send(
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<unknown@example.org>\r\n\
          RCPT TO:<unknown@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nhi\r\n.\r\n",
    );
    assert!(
        pair.take_output()
            .ends_with("250 2.0.0 Ok: queued as 1\r\n")
    );
    // Two errors before the delivery, two after: under the limit of three since it.
    pair.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<unknown@example.org>\r\nRCPT TO:<unknown@example.org>\r\n");
    assert!(!pair.closed, "{}", pair.take_output());
    pair.send(b"RCPT TO:<unknown@example.org>\r\n");
    assert!(pair.take_output().ends_with(TOO_MANY_ERRORS));
    assert!(pair.closed);
    assert_eq!(pair.session.report().result, "delivered");
}

#[test]
fn max_unknown_commands_still_closes_first() {
    // Unknown commands have their own, lower limit; they count as errors as well.
    let mut pair = Pair::new(max_errors(20));
    pair.take_output();
    pair.send(b"FOO\r\nBAR\r\nBAZ\r\nQUUX\r\n");
    assert_eq!(
        pair.take_output(),
        "500 5.5.1 Command unrecognized\r\n".repeat(3) + TOO_MANY_ERRORS
    );
}

fn junk_limits(junk: u32, errors: u32) -> Config {
    let mut config = max_errors(errors);
    config.limits.max_junk_commands = junk;
    config
}

const OK: &str = "250 2.0.0 Ok\r\n";

#[test]
fn noop_flood_gets_421_after_max_junk_commands() {
    // The defaults: 100 junk commands, then each one more is an error; the 20th error closes.
    let mut pair = Pair::new(config());
    pair.take_output();
    pair.send(b"EHLO c\r\n");
    pair.take_output();
    pair.send(&b"NOOP\r\n".repeat(200));
    assert_eq!(pair.take_output(), OK.repeat(120) + TOO_MANY_ERRORS);
    assert!(pair.closed);
    assert_eq!(pair.session.report().result, "too-many-errors");
}

#[test]
fn noop_every_few_minutes_cannot_hold_a_downstream_connection() {
    let mut pair = Pair::new(junk_limits(3, 2));
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    assert!(pair.ds_open);
    pair.take_output();
    for _ in 0..4 {
        pair.advance(Duration::from_secs(240));
        pair.send(b"NOOP\r\n");
        assert_eq!(pair.take_output(), OK);
    }
    pair.advance(Duration::from_secs(240));
    pair.send(b"NOOP\r\n");
    assert_eq!(pair.take_output(), format!("{OK}{TOO_MANY_ERRORS}"));
    assert!(pair.closed);
    assert!(
        !pair.ds_open,
        "the downstream connection is closed with the session"
    );
}

#[test]
fn rset_vrfy_help_and_repeated_greetings_are_junk_the_first_greeting_is_not() {
    let mut pair = Pair::new(junk_limits(4, 1));
    pair.take_output();
    pair.send(b"HELO c\r\nRSET\r\nVRFY x\r\nHELP\r\nEHLO c\r\n");
    assert!(!pair.closed, "the first HELO is not junk: four so far");
    pair.take_output();
    pair.send(b"HELO c\r\n");
    assert_eq!(
        pair.take_output(),
        format!("250 mx.test\r\n{TOO_MANY_ERRORS}")
    );
}

#[test]
fn a_delivered_message_starts_the_junk_count_over() {
    let mut pair = Pair::new(junk_limits(2, 1));
    pair.take_output();
    pair.send(
        b"EHLO c\r\nNOOP\r\nNOOP\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n\
          DATA\r\nhi\r\n.\r\nRSET\r\nNOOP\r\n",
    );
    assert!(!pair.closed, "{}", pair.take_output());
    pair.send(b"NOOP\r\n");
    assert!(pair.take_output().ends_with(TOO_MANY_ERRORS));
}

const TIMEOUT: &str = "421 4.4.2 mx.test Error: timeout exceeded\r\n";

#[test]
fn silent_client_after_banner_times_out_after_command_timeout() {
    let mut pair = Pair::new(config());
    let t0 = pair.now;
    assert_eq!(pair.take_output(), BANNER);
    assert_eq!(
        pair.session.poll_timeout(),
        Some(t0 + Duration::from_secs(300)),
        "timeouts.command, not idle (600 s)"
    );
    pair.advance(Duration::from_secs(299));
    assert_eq!(pair.take_output(), "");
    pair.advance(Duration::from_secs(1));
    assert_eq!(pair.take_output(), TIMEOUT);
    assert!(pair.closed);
    assert_eq!(pair.session.report().result, "timeout");
}

#[test]
fn bytes_that_do_not_complete_a_line_do_not_restart_the_command_timeout() {
    let mut pair = Pair::new(config());
    pair.take_output();
    pair.advance(Duration::from_secs(200));
    pair.send(b"NO");
    pair.advance(Duration::from_secs(99));
    pair.send(b"O");
    assert_eq!(pair.take_output(), "");
    pair.advance(Duration::from_secs(1));
    assert_eq!(pair.take_output(), TIMEOUT, "300 s after the banner");
}

#[test]
fn the_command_timeout_runs_from_each_reply() {
    let mut pair = Pair::new(config());
    pair.take_output();
    pair.advance(Duration::from_secs(299));
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    assert!(pair.take_output().ends_with("250 2.1.0 Ok\r\n"));
    let replied = pair.now;
    assert_eq!(
        pair.session.poll_timeout(),
        Some(replied + Duration::from_secs(300))
    );
    pair.advance(Duration::from_secs(299));
    assert!(!pair.closed);
    pair.advance(Duration::from_secs(1));
    assert_eq!(pair.take_output(), TIMEOUT);
    assert!(!pair.ds_open, "the downstream is let go with the client");
}

#[test]
fn stress_mode_shortens_the_wait_after_the_banner() {
    let mut pair = Pair::stressed(config());
    pair.take_output();
    pair.advance(Duration::from_secs(10));
    assert_eq!(pair.take_output(), TIMEOUT);
}

const V1_HEADER: &[u8] = b"PROXY TCP4 203.0.113.9 198.51.100.1 4000 25\r\n";
const V2_HEADER: &[u8] =
    b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xcb\x00\x71\x09\xc6\x33\x64\x01\x0f\xa0\x00\x19";

/// A client before its greeting: a greet pause keeps it in the pregreet window.
fn before_the_greeting(pregreet: tarmac::config::Pregreet) -> Pair {
    let mut config = config();
    config.tarpit.greet_pause = Duration::from_secs(6);
    config.tarpit.banner_continuation = false;
    config.tarpit.pregreet = pregreet;
    Pair::new(config)
}

#[test]
fn proxy_header_from_unlisted_address_closes_without_banner() {
    use tarmac::config::Pregreet;
    for pregreet in [Pregreet::Ignore, Pregreet::Reject, Pregreet::Drop] {
        for header in [V1_HEADER, V2_HEADER] {
            let mut pair = before_the_greeting(pregreet);
            assert_eq!(pair.take_output(), "");
            let mut bytes = header.to_vec();
            bytes.extend_from_slice(b"EHLO c\r\n");
            pair.send(&bytes);
            pair.advance(Duration::from_secs(6));
            assert_eq!(pair.take_output(), "", "{pregreet:?} {header:?}");
            assert!(pair.closed);
            let report = pair.session.report();
            assert_eq!(report.result, "bad-proxy");
            assert_eq!(
                report.client,
                peer(false, false).client,
                "the header is not believed"
            );
        }
    }
}

#[test]
fn proxy_header_cut_before_the_greeting_is_still_caught() {
    let mut pair = before_the_greeting(tarmac::config::Pregreet::Drop);
    for piece in V2_HEADER.chunks(3) {
        pair.send(piece);
    }
    assert_eq!(pair.take_output(), "", "no 521: it is a PROXY header");
    assert!(pair.closed);
    assert_eq!(pair.session.report().result, "bad-proxy");
}

#[test]
fn proxy_header_as_the_first_command_closes_without_a_reply() {
    for header in [V1_HEADER, V2_HEADER] {
        // Whole, and one byte per call.
        for split in [false, true] {
            let mut pair = Pair::new(config());
            assert_eq!(pair.take_output(), BANNER);
            let mut bytes = header.to_vec();
            bytes.extend_from_slice(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
            if split {
                for byte in &bytes {
                    pair.send(std::slice::from_ref(byte));
                }
            } else {
                pair.send(&bytes);
            }
            assert_eq!(pair.take_output(), "", "{header:?} split={split}");
            assert!(pair.closed);
            assert_eq!(pair.session.report().result, "bad-proxy");
            assert!(pair.connects.is_empty());
        }
    }
}

#[test]
fn proxy_later_in_the_session_is_only_an_unknown_command() {
    let mut pair = Pair::new(config());
    pair.take_output();
    pair.send(b"EHLO c\r\n");
    pair.take_output();
    pair.send(V1_HEADER);
    assert_eq!(pair.take_output(), "500 5.5.1 Command unrecognized\r\n");
    assert!(!pair.closed);
}

#[test]
fn a_line_exactly_at_the_limit_then_its_lf_in_the_next_read() {
    let mut pair = Pair::new(config());
    pair.take_output();
    pair.send(b"EHLO c\r\n");
    pair.take_output();
    pair.send(&vec![b'x'; 4096]);
    pair.send(b"\nNOOP\r\n");
    assert_eq!(
        pair.take_output(),
        "500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"
    );
}

#[test]
fn client_not_reading_replies_stops_being_read() {
    let mut config = config();
    config.limits.max_junk_commands = u32::MAX;
    let mut pair = Pair::new(config);
    pair.take_output();
    // The driver hands nothing to the client (its outbox is full): the session keeps the
    // replies and, past its cap, takes no more commands.
    let flood = b"NOOP\r\n".repeat(10_000);
    let used = pair.session.handle_client_data(pair.now, &flood);
    assert!(
        used < 1024,
        "took {used} bytes of commands whose replies nobody reads"
    );
    assert!(!pair.session.wants_read());
    // Once the client reads, it gets everything held (no tarpit here) and is read again.
    let mut out = Vec::new();
    pair.session.poll_transmit(pair.now, &mut out);
    let held = out.len();
    assert!(
        (CLIENT_OUTBOX_CAP..CLIENT_OUTBOX_CAP + 64).contains(&held),
        "{held} bytes of replies held"
    );
    assert!(pair.session.wants_read());
    let more = pair.session.handle_client_data(pair.now, &flood[used..]);
    assert!(more > 0 && more < 1024);
}

#[test]
fn a_downstream_not_reading_the_body_stops_the_client_being_read() {
    for mode in [BareNewline::Reject, BareNewline::Normalize] {
        let mut config = config();
        config.limits.bare_newline = mode;
        let mut pair = Pair::new(config);
        pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n");
        assert!(
            pair.take_output()
                .ends_with("354 End data with <CR><LF>.<CR><LF>\r\n")
        );
        // Normalising doubles bare LFs, the worst case for the cap; refused ones would be
        // read and dropped (nothing to hold), so that mode gets proper lines.
        let body = match mode {
            BareNewline::Normalize => b"\n".repeat(256 * 1024),
            BareNewline::Reject => b"body line\r\n".repeat(256 * 1024 / 11),
        };
        let used = pair.session.handle_client_data(pair.now, &body);
        assert!(used < 64 * 1024, "{mode:?}: took {used} body bytes");
        assert!(!pair.session.wants_read());
        // What the downstream would get when it reads again: everything held for it.
        let mut ds = Vec::new();
        pair.session
            .poll_transmit_downstream(pair.now, pair.link, &mut ds);
        let held = ds.len();
        assert!(
            held <= DOWNSTREAM_OUTBOX_CAP + 512,
            "{mode:?}: {held} bytes held"
        );
        assert!(
            pair.session.wants_read(),
            "{mode:?}: read again once drained"
        );
    }
}
