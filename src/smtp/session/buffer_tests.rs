//! Bounds only the session's private state shows: the capacity of its line buffer
//! (DESIGN.md §6.1 "Memory"), which no public figure reports. The session is driven directly,
//! without the testkit's doubles (which the product's unit tests cannot use); every other
//! session test is in the integration binary, `tests/session.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use super::{Peer, Session};
use crate::config::Config;

/// A session past its banner: no lookups, no greet pause, no state to ask, so `new` queues
/// the banner at once.
fn session() -> (Session, Instant) {
    let mut config = Config::default();
    config.server.hostname = "mx.test".to_owned();
    config.downstream.servers = vec![SocketAddr::from(([127, 0, 0, 1], 10025))];
    config.dns.rdns = false;
    config.tarpit.greet_pause = Duration::ZERO;
    config.greylist.enabled = false;
    config.reputation.enabled = false;
    let peer = Peer {
        conn: 1,
        client: SocketAddr::from(([192, 0, 2, 7], 53211)),
        local: SocketAddr::from(([198, 51, 100, 1], 25)),
        accepted_at: UNIX_EPOCH,
        stressed: false,
        starttls: false,
        transparent: false,
        spoof_source: false,
    };
    let now = Instant::now();
    let mut session = Session::new(Arc::new(config), peer, now);
    let mut banner = Vec::new();
    session.poll_transmit(now, &mut banner);
    assert!(
        banner.starts_with(b"220 mx.test "),
        "{}",
        banner.escape_ascii()
    );
    (session, now)
}

/// What the client gets now.
fn replies(session: &mut Session, now: Instant) -> String {
    let mut out = Vec::new();
    session.poll_transmit(now, &mut out);
    String::from_utf8(out).unwrap()
}

#[test]
fn twenty_megabytes_without_newline_stay_bounded() {
    let (mut session, now) = session();
    let chunk = vec![b'x'; 16 * 1024];
    for _ in 0..(20 * 1024 / 16) {
        let used = session.handle_client_data(now, &chunk);
        assert_eq!(used, chunk.len());
        assert!(session.lines.capacity() <= 8192);
    }
    let input = b"\r\nNOOP\r\n";
    assert_eq!(session.handle_client_data(now, input), input.len());
    assert_eq!(
        replies(&mut session, now),
        "500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"
    );
}

#[test]
fn the_line_buffer_never_grows_past_max_line_length() {
    let (mut session, now) = session();
    let mut line = b"NOOP ".to_vec();
    line.resize(4094, b'x');
    line.extend_from_slice(b"\r\n");
    for piece in line.chunks(1000) {
        assert_eq!(session.handle_client_data(now, piece), piece.len());
        assert!(session.lines.capacity() <= 4096);
    }
    assert_eq!(replies(&mut session, now), "250 2.0.0 Ok\r\n");
}

/// Without scanners a session keeps no content-inspection state (DESIGN.md §7: "no cost
/// added to that path"): a transaction up to its body, a timeout in the body, RSET and the
/// close leave `scan` unmade.
#[test]
fn a_session_without_scanners_makes_no_scanning_state() {
    let (mut session, now) = session();
    session.handle_client_data(now, b"EHLO c\r\nMAIL FROM:<a@b>\r\nRSET\r\nNOOP\r\n");
    replies(&mut session, now);
    session.handle_timeout(now + Duration::from_secs(3600));
    session.handle_client_eof(now);
    assert!(session.is_closed());
    assert!(session.scan.is_none());
}
