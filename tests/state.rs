//! State across restarts (`[state] backend = "local"`): a restart on the same `state_dir`
//! keeps a greylisted triplet, a PASS and a reputation; damaged, cut-short or foreign files
//! are logged and ignored and tarmac serves with empty tables; expired entries are dropped;
//! an unusable `state_dir` is a warning, not a refusal to start.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use tarmac::config::Config;
use tarmac::state::snapshot::{Clocks, Kind, Writer};
use tarmac_testkit::sink::Behaviour;

use crate::util::tarmac;
use tarmac_testkit::{
    Client, Running, Server, WAIT, free_port, sink, temp_dir, test_config, wait_for_log,
};

const PAUSE: Duration = Duration::from_millis(200);
const DELAY: Duration = Duration::from_millis(300);
const TEASER: &str = "220-mx.test ESMTP tarmac\r\n";
const BANNER: &str = "220 mx.test ESMTP tarmac\r\n";
const NEW: &str = "451 4.7.1 Greylisted, please try again in 1 seconds\r\n";

fn from(addr: &str) -> IpAddr {
    addr.parse().unwrap()
}

/// Greylisting, a greet pause (so a PASS means something), reputation on, state in `dir`.
fn keeping(downstream: std::net::SocketAddr, dir: &Path) -> Config {
    let mut config = test_config(downstream);
    config.server.state_dir = dir.to_path_buf();
    config.greylist.enabled = true;
    config.greylist.delay = DELAY;
    config.tarpit.greet_pause = PAUSE;
    config.reputation.enabled = true;
    // A weighted client is refused at the greeting: easy to see.
    config.scoring.reject_at = 2;
    config
}

/// The first attempt of the triplet saved under `key` (escaped, as in the file) in `dir`'s
/// greylist file, in Unix milliseconds: what a restart restores it from.
#[track_caller]
fn saved_first_attempt(dir: &Path, key: &str) -> u64 {
    let file = std::fs::read_to_string(dir.join(Kind::Greylist.file_name())).unwrap();
    let line = file
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{key:?} not saved: {file}"));
    line.split(' ').next().unwrap().parse().unwrap()
}

/// Waits (bounded by [`WAIT`]) until [`DELAY`] has passed since `first_attempt` (Unix ms) on
/// the wall clock, the one a restart restores the attempt through, plus the millisecond the
/// restart's own reading of it is truncated to: from then on the restarted server sees the
/// delay over. The wait is the scenario's condition, not a guess at when something settles.
#[track_caller]
fn wait_out_the_delay(first_attempt: u64) {
    let delay = u64::try_from(DELAY.as_millis()).unwrap();
    let over = SystemTime::UNIX_EPOCH + Duration::from_millis(first_attempt + delay + 1);
    let give_up = Instant::now() + WAIT;
    while SystemTime::now() < over {
        assert!(Instant::now() < give_up, "the delay never ended");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// EHLO, MAIL, and the reply to one RCPT.
#[track_caller]
fn rcpt_reply(client: &mut Client) -> String {
    assert!(client.command("EHLO client.example").starts_with("250-"));
    assert_eq!(
        client.command("MAIL FROM:<a@example.org>"),
        "250 2.1.0 Ok\r\n"
    );
    client.command("RCPT TO:<b@example.net>")
}

#[test]
fn a_restart_keeps_a_greylisted_triplet_a_pass_and_a_reputation() {
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("state-restart").join("state");
    let (sender, talker) = (from("127.0.0.60"), from("127.0.0.61"));

    let server = Server::start(keeping(sink.local_addr(), &dir));
    let mut client = Client::connect_from(server.addr, sender);
    assert_eq!(client.line(), TEASER);
    assert_eq!(client.line(), BANNER, "waited out: a PASS");
    assert_eq!(rcpt_reply(&mut client), NEW);
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    for _ in 0..3 {
        let mut early = Client::connect_from(server.addr, talker);
        assert_eq!(early.line(), TEASER);
        early.send("EHLO early.example\r\n");
        assert_eq!(early.line(), BANNER);
        assert_eq!(
            early.line(),
            "554 5.5.1 Error: you talked before the greeting; no mail accepted\r\n"
        );
        assert_eq!(early.command("QUIT"), "221 2.0.0 Bye\r\n");
    }
    server.stop_within(WAIT);
    for kind in Kind::ALL {
        let file = std::fs::read_to_string(dir.join(kind.file_name())).unwrap();
        assert!(file.starts_with("tarmac-state 1 "), "{file}");
    }

    // The retry comes after the delay, to a new process on the same state_dir.
    let first_attempt = saved_first_attempt(&dir, "127.0.0.0/24%1fa@example.org%1fb@example.net");
    let server = Server::start(keeping(sink.local_addr(), &dir));
    wait_out_the_delay(first_attempt);
    let mut client = Client::connect_from(server.addr, sender);
    assert_eq!(client.line(), BANNER, "the PASS survived: no pause");
    assert_eq!(
        rcpt_reply(&mut client),
        "250 2.1.5 Ok\r\n",
        "the retry passes, it is not new again"
    );
    assert!(client.command("DATA").starts_with("354 "));
    client.send("hi\r\n.\r\n");
    assert!(client.reply().starts_with("250 "));

    let mut weighted = Client::connect_from(server.addr, talker);
    assert_eq!(weighted.line(), TEASER);
    assert_eq!(
        weighted.line(),
        "554 5.7.1 Service unavailable; client [127.0.0.61] blocked by local policy\r\n",
        "its three pregreets were remembered"
    );
    // A newcomer still gets the pause and greylisting: nothing else was invented.
    let mut newcomer = Client::connect_from(server.addr, from("127.0.1.62"));
    assert_eq!(newcomer.line(), TEASER);
    assert_eq!(newcomer.line(), BANNER);
    assert_eq!(rcpt_reply(&mut newcomer), NEW);
}

#[test]
fn expired_entries_are_dropped_at_load() {
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("state-expired").join("state");
    std::fs::create_dir_all(&dir).unwrap();
    // Written as an earlier tarmac would have, with real wall-clock times.
    let clocks = Clocks::new(Instant::now(), SystemTime::now());
    let now_ms = clocks.to_unix_ms(clocks.now());
    let mut passes = Writer::new(Kind::Pass);
    passes.entry(format_args!("127.0.0.70 {}", now_ms - 1_000));
    passes.entry(format_args!("127.0.0.71 {}", now_ms + 3_600_000));
    std::fs::write(dir.join(Kind::Pass.file_name()), passes.finish()).unwrap();
    let mut greylist = Writer::new(Kind::Greylist);
    let key = |ip: &str| format!("{ip}/24%1fa@example.org%1fb@example.net");
    // Seen five hours ago (past the 4 h retry window), and ten seconds ago.
    greylist.entry(format_args!(
        "{} {} -",
        key("127.0.0.0"),
        now_ms - 5 * 3_600_000
    ));
    greylist.entry(format_args!("{} {} -", key("127.0.2.0"), now_ms - 10_000));
    std::fs::write(dir.join(Kind::Greylist.file_name()), greylist.finish()).unwrap();

    let server = Server::start(keeping(sink.local_addr(), &dir));
    let mut expired = Client::connect_from(server.addr, from("127.0.0.70"));
    assert_eq!(expired.line(), TEASER, "an expired PASS was dropped");
    assert_eq!(expired.line(), BANNER);
    assert_eq!(
        rcpt_reply(&mut expired),
        NEW,
        "an attempt past the retry window was dropped: this one is new"
    );
    let mut fresh = Client::connect_from(server.addr, from("127.0.0.71"));
    assert_eq!(fresh.line(), BANNER, "a fresh PASS was kept");
    let mut retry = Client::connect_from(server.addr, from("127.0.2.72"));
    assert_eq!(retry.line(), TEASER);
    assert_eq!(retry.line(), BANNER);
    assert_eq!(
        rcpt_reply(&mut retry),
        "250 2.1.5 Ok\r\n",
        "a recent first attempt was kept: the retry passes"
    );
}

/// A `tarmac run` child with its state in `dir/state`, greylisting and the pause off, and
/// its address; the state is loaded (and logged) before `listening on`.
fn run_in(dir: &Path, sink: std::net::SocketAddr) -> (Running, std::net::SocketAddr) {
    let port = free_port();
    let path = dir.join("tarmac.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"mx.test\"\nworkers = 1\n\
             state_dir = \"state\"\n[downstream]\nservers = [\"{sink}\"]\n[timeouts]\n\
             drain = \"5s\"\n[dns]\nrdns = false\n[tarpit]\ngreet_pause = \"0s\"\n\
             [greylist]\nenabled = false\n",
        ),
    )
    .unwrap();
    (
        Running::start(tarmac(), &path),
        format!("127.0.0.1:{port}").parse().unwrap(),
    )
}

#[test]
fn damaged_truncated_and_foreign_files_are_logged_and_ignored() {
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("state-damaged");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut passes = Writer::new(Kind::Pass);
    passes.entry(format_args!("127.0.0.1 {}", u64::MAX / 4));
    let mut damaged = passes.finish();
    damaged[20] ^= 0x20;
    std::fs::write(state.join("pass.state"), damaged).unwrap();
    let mut triplets = Writer::new(Kind::Greylist);
    triplets.entry(format_args!("k 1 -"));
    let whole = triplets.finish();
    std::fs::write(state.join("greylist.state"), &whole[..whole.len() - 5]).unwrap();
    std::fs::write(state.join("reputation.state"), "[server]\nlisten = []\n").unwrap();

    let (child, addr) = run_in(&dir, sink.local_addr());
    let warnings: Vec<String> = (0..3)
        .map(|_| wait_for_log(&child.lines, "starts empty"))
        .collect();
    wait_for_log(&child.lines, &format!("listening on {addr}"));
    let all = warnings.join("\n");
    for expected in [
        "pass.state: checksum mismatch (damaged); ignored, the pass table starts empty",
        "greylist.state: cut short (no end line); ignored, the greylist table starts empty",
        "reputation.state: not a tarmac state snapshot; ignored, the reputation table starts empty",
    ] {
        assert!(all.contains(expected), "{expected}\n{all}");
    }
    let mut client = Client::connect(addr);
    assert!(client.send_message().starts_with("250 "), "serves");
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    child.signal("TERM");
    let (code, stderr) = child.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("state: saved to "), "{stderr}");
    // The shutdown save replaced them with good ones.
    let reputation = std::fs::read_to_string(state.join("reputation.state")).unwrap();
    assert!(
        reputation.starts_with("tarmac-state 1 reputation\n127.0.0.1 "),
        "{reputation}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unusable_state_dir_is_a_warning_not_a_refusal() {
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("state-unusable");
    // `state` is a file: no directory can be made there, whoever runs the test.
    std::fs::write(dir.join("state"), "not a directory").unwrap();
    let (child, addr) = run_in(&dir, sink.local_addr());
    let warning = wait_for_log(&child.lines, "running without snapshots");
    assert!(warning.contains("cannot use state_dir"), "{warning}");
    wait_for_log(&child.lines, &format!("listening on {addr}"));
    let mut client = Client::connect(addr);
    assert!(client.send_message().starts_with("250 "), "serves");
    child.signal("TERM");
    let (code, stderr) = child.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
