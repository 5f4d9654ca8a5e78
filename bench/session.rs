//! In-memory benchmarks of the sans-IO core: commands per second through `Session`, MB/s
//! through the DATA codec, and whole relayed transactions per second with a scripted
//! downstream. The session runs on the testkit's `Pair`, the driver and Postfix-like
//! downstream the session's tests and the fuzz target use, made with `Pair::for_bench`: it
//! plays the same actions and gives the same replies, but keeps no logs and skips the checks
//! that read every write, so the timed loops measure the session. Each figure first runs
//! its script once on a checking `Pair` and then asserts every timed round against that
//! outcome (the replies, the delivery), outside the session's work. No sockets, no clock
//! reads inside the timed loops except the stopwatch.
//!
//! `cargo bench --bench session` runs the full size; without `--bench` (as `cargo test
//! --all-targets` runs it) it does one quick pass, so CI keeps it from rotting.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use tarmac::config::{AnnounceClient, BareNewline, Config};
use tarmac::smtp::Peer;
use tarmac::smtp::data::DataDecoder;
use tarmac_testkit::session::{Pair, peer as testkit_peer};

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full { 1 } else { 100 };
    commands(200_000 / scale);
    data_codec(if full { 512 } else { 4 });
    transactions(20_000 / scale);
}

fn config() -> Arc<Config> {
    let mut config = Config::default();
    config.server.hostname = "mx.bench".to_owned();
    config.downstream.servers = vec!["127.0.0.1:10025".parse().unwrap()];
    config.downstream.announce_client = AnnounceClient::None;
    config.limits.max_unknown_commands = 1000;
    // DNS costs are measured in bench/dns.rs; here the session goes straight to its banner.
    config.dns.rdns = false;
    config.tarpit.greet_pause = Duration::ZERO;
    config.greylist.enabled = false;
    // No state to ask: the banner goes out at once (the driver answers `CheckReputation` in the
    // same turn anyway).
    config.reputation.enabled = false;
    Arc::new(config)
}

fn peer() -> Peer {
    Peer {
        accepted_at: UNIX_EPOCH,
        ..testkit_peer(false, false)
    }
}

/// A session on the testkit's driver, which plays its actions, answers its questions and
/// scripts its downstream (with `config()` it asks only for admission), without its logs and
/// per-write checks.
fn pair(config: &Arc<Config>) -> Pair {
    Pair::for_bench(Arc::clone(config), peer())
}

/// The same session on a driver that logs and checks everything it drives.
fn checked_pair(config: &Arc<Config>) -> Pair {
    let mut pair = Pair::sharing(Arc::clone(config), Vec::new(), peer());
    pair.pump();
    pair
}

/// Sessions are renewed after this many batches of junk commands (below
/// `max_junk_commands`, 100 by default, as a new client would be).
const BATCHES_PER_SESSION: usize = 19;

/// Local commands, pipelined 5 per write: parse, dispatch, reply.
fn commands(n: usize) {
    let config = config();
    let batch = b"NOOP\r\nRSET\r\nVRFY postmaster\r\nHELP\r\nEHLO client.example\r\n";
    let per_batch = 5;
    // One session's worth on the checking driver: the answers every timed batch must get.
    let mut checked = checked_pair(&config);
    checked.take_output();
    let mut expected = Vec::new();
    for _ in 0..BATCHES_PER_SESSION {
        checked.send(batch);
        expected.push(checked.take_output().into_bytes());
    }
    assert!(!checked.closed, "under the junk limit");
    let mut pair = pair(&config);
    pair.take_output();
    let started = Instant::now();
    let mut replies = 0usize;
    for i in 0..n / per_batch {
        let round = i % BATCHES_PER_SESSION;
        if round == 0 && i > 0 {
            pair = self::pair(&config);
            pair.take_output();
        }
        pair.send(batch);
        assert!(pair.client_pending.is_empty(), "every command read");
        assert!(
            pair.client_out == expected[round],
            "answered as on the checking driver"
        );
        replies += pair.client_out.iter().filter(|&&b| b == b'\n').count();
        pair.client_out.clear();
    }
    let elapsed = started.elapsed();
    let commands = n / per_batch * per_batch;
    assert!(replies >= commands, "every command answered");
    println!(
        "session/commands: {:.0} commands/s ({commands} pipelined local commands in {:.3}s)",
        commands as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
}

/// A 1 MiB body of 78-byte lines, one in ten dot-stuffed, decoded and re-encoded.
fn data_codec(rounds: usize) {
    let mut body = Vec::with_capacity(1 << 20);
    let mut i = 0;
    while body.len() < (1 << 20) {
        if i % 10 == 0 {
            body.extend_from_slice(b"..");
        }
        body.extend_from_slice(&[b'a' + (i % 26) as u8; 76]);
        body.extend_from_slice(b"\r\n");
        i += 1;
    }
    body.extend_from_slice(b".\r\n");
    let mut out = Vec::with_capacity(body.len() + 4096);
    let started = Instant::now();
    for _ in 0..rounds {
        out.clear();
        let mut decoder = DataDecoder::new(BareNewline::Reject, u64::MAX);
        let mut consumed = 0;
        // 16 KiB reads, as the server does.
        for chunk in body.chunks(16 * 1024) {
            let d = decoder.decode(chunk, &mut out);
            consumed += d.consumed;
        }
        assert_eq!(consumed, body.len());
        assert!(decoder.violation().is_none());
        assert_eq!(out.len(), body.len() - 3, "stuffing round-trips");
        black_box(&out);
    }
    let elapsed = started.elapsed();
    let mb = (body.len() * rounds) as f64 / 1e6;
    println!(
        "session/data-codec: {:.0} MB/s ({rounds} x {:.2} MB bodies in {:.3}s)",
        mb / elapsed.as_secs_f64(),
        body.len() as f64 / 1e6,
        elapsed.as_secs_f64()
    );
}

/// Whole transactions (banner to QUIT, 4 KB body) relayed to the testkit's scripted
/// downstream. The checking driver's run gives the replies every timed one must get; its
/// downstream checked the relayed commands and body.
fn transactions(n: usize) {
    let config = config();
    let client_script: Vec<u8> = [
        &b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
            [..],
        &b"Subject: bench\r\n\r\n"[..],
        &[b'z'; 4000][..],
        &b"\r\n.\r\nQUIT\r\n"[..],
    ]
    .concat();
    let mut checked = checked_pair(&config);
    checked.send(&client_script);
    assert!(checked.closed, "transaction completed");
    assert_eq!(checked.downstream.delivered.len(), 1);
    let expected = checked.take_output().into_bytes();
    assert!(expected.ends_with(b"250 2.0.0 Ok: queued as 1\r\n221 2.0.0 Bye\r\n"));
    let started = Instant::now();
    for _ in 0..n {
        let mut pair = pair(&config);
        pair.send(&client_script);
        assert!(pair.closed, "transaction completed");
        assert_eq!(pair.session.report().msgs, 1);
        assert_eq!(
            pair.downstream.totals.dots_acked, 1,
            "one message delivered"
        );
        assert!(
            pair.client_out == expected,
            "answered as on the checking driver"
        );
    }
    let elapsed = started.elapsed();
    println!(
        "session/transactions: {:.0} transactions/s ({n} in-memory relayed 4 KB messages in {:.3}s)",
        n as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
}
