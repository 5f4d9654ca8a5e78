//! `[state] backend = "redis"` (issue 6): two tarmac instances on one real `redis-server`
//! (started by the test on loopback, no persistence) share greylisting and connection rates,
//! keep serving on local state while Redis is gone (logging it once), and share again when it
//! is back. Plus the GCRA script's semantics against the real Redis, the keys' TTLs, and a bad
//! `redis` URL in `tarmac check`.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token, Waker};
use tarmac::config::{Config, Rate, StateBackend};
use tarmac::policy::{ConnectionRates, RateRefusal};
use tarmac::state::redis::{Inbox, RedisState};
use tarmac::state::{
    Greylist, GreylistOutcome, GreylistTimes, Local, PassCache, ReputationTable, StateAnswer,
    StateOp, Store, Waiter,
};
use tarmac_testkit::sink::Behaviour;

use crate::util::{tarmac, tarmac_check};
use tarmac_testkit::redis_server::RedisServer;
use tarmac_testkit::{Client, Running, Server, WAIT, sink, temp_dir, test_config};

const DEFERRED: &str = "451 4.7.1 Greylisted, please try again in 1 seconds\r\n";

const TOO_MANY: &str = "421 4.7.0 mx.test Too many connections, try again later\r\n";

/// The greylist delay of these tests: short, so a test waits it out.
const DELAY: Duration = Duration::from_millis(300);

/// `test_config` with its state in `redis` and greylisting on with [`DELAY`].
fn shared_config(redis: &RedisServer, downstream: std::net::SocketAddr) -> Config {
    let mut config = test_config(downstream);
    config.state.backend = StateBackend::Redis;
    config.state.redis = redis.url();
    config.greylist.enabled = true;
    config.greylist.delay = DELAY;
    config
}

/// Banner, EHLO and MAIL from `a@example.org` on a new connection to `addr`.
#[track_caller]
fn mail(addr: std::net::SocketAddr) -> Client {
    let mut client = Client::connect(addr);
    assert_eq!(client.reply(), "220 mx.test ESMTP tarmac\r\n");
    assert!(client.command("EHLO client.example").starts_with("250-"));
    assert_eq!(
        client.command("MAIL FROM:<a@example.org>"),
        "250 2.1.0 Ok\r\n"
    );
    client
}

/// The reply to `RCPT TO:<to>` in a new session with `addr`.
#[track_caller]
fn rcpt(addr: std::net::SocketAddr, to: &str) -> String {
    mail(addr).command(&format!("RCPT TO:<{to}>"))
}

/// The Redis key of the triplet of `a@example.org` to `to` from 127.0.0.0/24.
fn grey_key(to: &str) -> String {
    format!("tarmac:grey:127.0.0.0/24\u{1f}a@example.org\u{1f}{to}")
}

/// Waits (bounded by [`WAIT`]) until the greylist delay of the triplet under `key` is over on
/// Redis's own clock, the one the script counts it on: `TIME` at least [`DELAY`] past the
/// first attempt's time stored in the key. The script's own condition, so no margin is
/// guessed and no other host's clock is involved.
#[track_caller]
fn wait_out_the_delay(redis: &RedisServer, key: &str) {
    let mut connection = redis.connection();
    let first: u64 = redis::cmd("GET")
        .arg(key)
        .query(&mut connection)
        .unwrap_or_else(|e| panic!("first attempt of {key:?}: {e}"));
    let delay = u64::try_from(DELAY.as_millis()).unwrap();
    let give_up = Instant::now() + WAIT;
    loop {
        let (seconds, micros): (u64, u64) = redis::cmd("TIME").query(&mut connection).unwrap();
        if seconds * 1000 + micros / 1000 >= first + delay {
            return;
        }
        assert!(
            Instant::now() < give_up,
            "the delay never ended on Redis's clock"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Milliseconds `key` has left in Redis (-2: no such key, -1: no TTL).
fn pttl(redis: &RedisServer, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query(&mut redis.connection())
        .unwrap()
}

#[test]
fn a_triplet_greylisted_on_one_host_passes_on_the_other_after_the_delay() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let sink = sink(Behaviour::Normal);
    let a = Server::start(shared_config(&redis, sink.local_addr()));
    let b = Server::start(shared_config(&redis, sink.local_addr()));
    assert_eq!(rcpt(a.addr, "b@example.net"), DEFERRED, "new on A");
    // The triplet is in Redis, expiring at the end of the retry window (4 h by default).
    let key = &grey_key("b@example.net");
    let left = pttl(&redis, key);
    assert!(
        left > 0 && left <= 4 * 3600 * 1000,
        "TTL of the attempt: {left}"
    );
    wait_out_the_delay(&redis, key);
    // B never saw this triplet itself: only the shared attempt lets it pass at once.
    let mut client = mail(b.addr);
    assert_eq!(
        client.command("RCPT TO:<b@example.net>"),
        "250 2.1.5 Ok\r\n",
        "B passes the triplet A deferred"
    );
    assert!(client.command("DATA").starts_with("354 "));
    client.send("hi\r\n.\r\n");
    assert!(client.reply().starts_with("250 "));
    assert_eq!(
        sink.wait_for_messages(1, WAIT)[0].rcpt_to,
        ["b@example.net"]
    );
    // Passed: it keeps passing on A, for pass_ttl (36 d by default) from its last use.
    assert_eq!(rcpt(a.addr, "b@example.net"), "250 2.1.5 Ok\r\n");
    let left = pttl(&redis, key);
    assert!(
        left > 4 * 3600 * 1000 && left <= 36 * 86_400 * 1000,
        "TTL of the pass: {left}"
    );
    // Another recipient is a triplet of its own, on either host.
    assert_eq!(rcpt(b.addr, "c@example.net"), DEFERRED);
    let stats = a.handle().store_stats();
    assert!(stats.redis_up && stats.redis_answers > 0, "{stats:?}");
    assert_eq!(stats.fallbacks, 0, "{stats:?}");
}

#[test]
fn a_per_ip_rate_is_shared_by_both_hosts() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let sink = sink(Behaviour::Normal);
    let config = |redis: &RedisServer| {
        let mut config = shared_config(redis, sink.local_addr());
        config.limits.connection_rate_per_ip = Rate {
            count: 3,
            per: Duration::from_secs(60),
        };
        config.limits.connection_rate_per_subnet = Rate {
            count: 1000,
            per: Duration::from_secs(60),
        };
        config
    };
    let a = Server::start(config(&redis));
    let b = Server::start(config(&redis));
    let source: IpAddr = "127.0.0.21".parse().unwrap();
    for server in [&a, &b, &a] {
        let mut client = Client::connect_from(server.addr, source);
        assert_eq!(client.reply(), "220 mx.test ESMTP tarmac\r\n");
    }
    // Three connections in all used the address's three tokens: each host refuses the next,
    // although each saw fewer than three itself.
    for server in [&b, &a] {
        let mut client = Client::connect_from(server.addr, source);
        assert_eq!(client.line(), TOO_MANY);
        client.expect_eof();
    }
    // Another address has its own bucket.
    let mut client = Client::connect_from(b.addr, "127.0.0.22".parse().unwrap());
    assert_eq!(client.reply(), "220 mx.test ESMTP tarmac\r\n");
    // The bucket expires once it would be full again: 3 tokens at one per 20 s.
    let left = pttl(&redis, "tarmac:rate:ip:127.0.0.21");
    assert!(left > 40_000 && left <= 60_000, "TTL of the bucket: {left}");
    let left = pttl(&redis, "tarmac:rate:net:127.0.0.0/24");
    assert!(
        left > 0 && left <= 60_000,
        "TTL of the network's bucket: {left}"
    );
}

/// Every stderr line of a child up to and including the first containing `needle`, within
/// [`WAIT`].
#[track_caller]
fn lines_until(lines: &Receiver<String>, needle: &str) -> Vec<String> {
    let give_up = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = give_up.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(e) => panic!("no log line containing {needle:?} ({e}); saw {seen:#?}"),
        }
    }
}

/// `tarmac run` on a free port with its state in `redis`; returns the child and its address
/// once it listens and has connected to Redis.
fn run_shared(
    name: &str,
    redis: &RedisServer,
    downstream: std::net::SocketAddr,
) -> (Running, std::net::SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = temp_dir(name);
    let path = dir.join("tarmac.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"mx.test\"\nworkers = 2\n\
             max_connections = 1000\n\
             state_dir = \"state\"\n\n[downstream]\nservers = [\"{downstream}\"]\n\n[timeouts]\ndrain = \"5s\"\n\n\
             [dns]\nrdns = false\n\n[tarpit]\ngreet_pause = \"0s\"\n\n\
             [greylist]\ndelay = \"{}ms\"\n\n\
             [limits]\nconnection_rate_per_ip = \"100000/s\"\n\
             connection_rate_per_subnet = \"100000/s\"\n\n\
             [state]\nbackend = \"redis\"\nredis = \"{}\"\n",
            DELAY.as_millis(),
            redis.url()
        ),
    )
    .unwrap();
    let child = Running::start(tarmac(), &path);
    let started = lines_until(&child.lines, "connected to Redis");
    // The tests run as root, which is warned about (DESIGN.md §8); nothing else may be.
    assert!(
        !started
            .iter()
            .any(|l| l.contains("WARN") && !l.contains("running as root without [server] user")),
        "no warning at start: {started:#?}"
    );
    (child, format!("127.0.0.1:{port}").parse().unwrap())
}

#[test]
fn redis_stopped_mid_test_both_keep_serving_and_share_again_once_it_is_back() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let sink = sink(Behaviour::Normal);
    let (a, a_addr) = run_shared("redis-down-a", &redis, sink.local_addr());
    let (b, b_addr) = run_shared("redis-down-b", &redis, sink.local_addr());
    // Both listen (the log line comes before the state thread's, but make sure).
    assert_eq!(rcpt(a_addr, "one@example.net"), DEFERRED);
    assert_eq!(rcpt(b_addr, "one@example.net"), DEFERRED, "early on B");

    redis.stop();
    // Both keep serving: connections are greeted (rates from local buckets) and greylisting
    // fails open, for every new triplet, on both hosts.
    for (n, addr) in [a_addr, b_addr, a_addr, b_addr, a_addr]
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            rcpt(addr, &format!("down{n}@example.net")),
            "250 2.1.5 Ok\r\n",
            "fails open while Redis is down"
        );
    }
    // One warning per host, however many requests fell back...
    for child in [&a, &b] {
        let lines = lines_until(&child.lines, "unavailable");
        assert!(lines.last().unwrap().contains("WARN"), "{lines:#?}");
    }
    redis.restart();
    // ...and one line when it is back (within the once-a-second reconnect), with no second
    // warning before it.
    for child in [&a, &b] {
        let lines = lines_until(&child.lines, "is back");
        assert!(
            !lines.iter().any(|l| l.contains("unavailable")),
            "warned once only: {lines:#?}"
        );
    }
    // Shared again: a triplet deferred on B passes on A after the delay.
    assert_eq!(rcpt(b_addr, "again@example.net"), DEFERRED, "new on B");
    wait_out_the_delay(&redis, &grey_key("again@example.net"));
    assert_eq!(
        rcpt(a_addr, "again@example.net"),
        "250 2.1.5 Ok\r\n",
        "A passes what B deferred"
    );
    for child in [a, b] {
        child.signal("TERM");
        let (code, _) = child.wait_exit();
        assert_eq!(code, Some(0));
    }
}

#[test]
fn a_history_earned_on_one_host_weighs_on_the_other() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let sink = sink(Behaviour::Normal);
    let config = || {
        let mut config = shared_config(&redis, sink.local_addr());
        config.greylist.enabled = false;
        config.reputation.enabled = true;
        config.tarpit.greet_pause = crate::reputation::PAUSE;
        // No PASS: every connection gets the pause, so every one can talk first.
        config.tarpit.pass_ttl = Duration::ZERO;
        // Weight 2 reaches reject_at: a weighted client is refused at the greeting.
        config.scoring.reject_at = 2;
        config
    };
    let one = Server::start(config());
    let two = Server::start(config());
    let bad: IpAddr = "127.0.0.50".parse().unwrap();
    for _ in 0..3 {
        crate::reputation::pregreet(one.addr, bad);
    }
    // Host two never saw this address: only Redis can tell it.
    let mut weighted = Client::connect_from(two.addr, bad);
    let greeting = weighted.reply();
    assert!(
        greeting.ends_with(
            "554 5.7.1 Service unavailable; client [127.0.0.50] blocked by local policy\r\n"
        ),
        "{greeting}"
    );
    let ttl = pttl(&redis, "tarmac:rep:127.0.0.50");
    let half_life = i64::try_from(config().reputation.half_life.as_millis()).unwrap();
    assert!(ttl > 9 * half_life && ttl <= 10 * half_life, "{ttl}");
    // A clean address on the same hosts is served.
    let mut clean = Client::connect_from(two.addr, "127.0.0.51".parse().unwrap());
    assert!(clean.send_message().starts_with("250 "));
}

#[test]
fn a_bad_redis_url_is_a_check_error() {
    let dir = temp_dir("redis-url");
    let path = dir.join("tarmac.toml");
    for (backend, url, message) in [
        (
            "redis",
            "redis://127.0.0.1:99999/0",
            "invalid Redis URL \"redis://127.0.0.1:99999/0\": redis URL did not parse",
        ),
        (
            "local",
            "127.0.0.1:6379",
            "invalid Redis URL \"127.0.0.1:6379\": expected redis:// or unix://",
        ),
    ] {
        std::fs::write(
            &path,
            format!("[state]\nbackend = \"{backend}\"\nredis = \"{url}\"\n"),
        )
        .unwrap();
        let out = tarmac_check(&path);
        assert_eq!(out.status.code(), Some(1), "{url}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let expected = format!("{}:3: state.redis: {message}", path.display());
        assert!(stderr.contains(&expected), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A worker's side of the state thread, asking one question at a time: a real `mio::Poll`
/// whose waker the thread wakes, and the inbox it drains.
struct Asker {
    store: Store,
    poll: Poll,
    inbox: Inbox,
    id: usize,
    // Kept alive: the thread's owner stops it when dropped.
    _state: RedisState,
}

impl Asker {
    fn new(config: &Config) -> Asker {
        let rates = Arc::new(ConnectionRates::new(
            config.limits.connection_rate_per_ip,
            config.limits.connection_rate_per_subnet,
        ));
        let local = Arc::new(Local::new(
            Arc::new(PassCache::new(config.tarpit.pass_ttl)),
            Arc::new(Greylist::new(Instant::now())),
            Arc::new(ReputationTable::new()),
            rates,
        ));
        let mut state = RedisState::start(config, Arc::clone(&local)).unwrap();
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        let (id, inbox) = state.add_worker(waker);
        let store = Store::new(local, Some(state.handle()));
        Asker {
            store,
            poll,
            inbox,
            id,
            _state: state,
        }
    }

    /// The answer to `op`, from Redis (never the fallback: the test would not be about the
    /// script otherwise).
    #[track_caller]
    fn ask(&mut self, op: StateOp) -> StateAnswer {
        let before = self.store.stats().fallbacks;
        let answer = self.ask_anyone(op);
        assert_eq!(self.store.stats().fallbacks, before, "answered by Redis");
        answer
    }

    /// The answer to `op`, from Redis or the fallback, waited for as a worker waits.
    #[track_caller]
    fn ask_anyone(&mut self, op: StateOp) -> StateAnswer {
        let waiter = Waiter {
            worker: self.id,
            key: 7,
        };
        assert_eq!(self.store.ask(op, Instant::now(), waiter), None, "queued");
        let deadline = Instant::now() + WAIT;
        let mut events = Events::with_capacity(8);
        loop {
            if let Some(delivery) = self.inbox.try_recv() {
                assert_eq!(delivery.key, 7);
                return delivery.answer;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no answer within {WAIT:?}");
            self.poll.poll(&mut events, Some(left)).unwrap();
        }
    }

    #[track_caller]
    fn rate(&mut self, ip: &str) -> Result<(), RateRefusal> {
        let ip: IpAddr = ip.parse().unwrap();
        match self.ask(StateOp::CheckRate(ip)) {
            StateAnswer::Rate { ip: asked, verdict } => {
                assert_eq!(asked, ip);
                verdict
            }
            other => panic!("not a rate answer: {other:?}"),
        }
    }
}

#[test]
fn gcra_in_redis_bursts_then_refuses_then_refills_one_token_at_a_time() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut config = Config::default();
    config.state.backend = StateBackend::Redis;
    config.state.redis = redis.url();
    // 3 per 600 ms: a token every 200 ms, 3 at once. Networks: 4 per minute.
    config.limits.connection_rate_per_ip = Rate {
        count: 3,
        per: Duration::from_millis(600),
    };
    config.limits.connection_rate_per_subnet = Rate {
        count: 4,
        per: Duration::from_secs(60),
    };
    let mut asker = Asker::new(&config);

    let first = Instant::now();
    for n in 0..3 {
        assert_eq!(asker.rate("10.0.0.1"), Ok(()), "token {n} of the burst");
    }
    assert_eq!(asker.rate("10.0.0.1"), Err(RateRefusal::PerIp));
    assert_eq!(
        asker.rate("10.0.0.1"),
        Err(RateRefusal::PerIp),
        "a refusal takes nothing and gives nothing back"
    );
    // The bucket lives until it is full again: at most 600 ms.
    let left = pttl(&redis, "tarmac:rate:ip:10.0.0.1");
    assert!(left > 0 && left <= 600, "TTL {left}");
    // One token comes back 200 ms after the first was taken, and only one.
    let refilled = loop {
        match asker.rate("10.0.0.1") {
            Ok(()) => break first.elapsed(),
            Err(refusal) => assert_eq!(refusal, RateRefusal::PerIp),
        }
        assert!(first.elapsed() < WAIT, "never refilled");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        refilled >= Duration::from_millis(190),
        "refilled after {refilled:?}"
    );
    assert_eq!(asker.rate("10.0.0.1"), Err(RateRefusal::PerIp));

    // Networks: /24 buckets, 4 tokens, taken only when the address's bucket allowed.
    for n in 0..3 {
        assert_eq!(asker.rate("10.0.1.1"), Ok(()), "{n}");
    }
    assert_eq!(asker.rate("10.0.1.1"), Err(RateRefusal::PerIp));
    assert_eq!(asker.rate("10.0.1.2"), Ok(()), "the network's fourth token");
    assert_eq!(asker.rate("10.0.1.3"), Err(RateRefusal::PerSubnet));
    assert_eq!(asker.rate("10.0.2.3"), Ok(()), "another network");
    let left = pttl(&redis, "tarmac:rate:net:10.0.1.0/24");
    assert!(left > 0 && left <= 60_000, "TTL {left}");
}

fn greylist(key: &str) -> StateOp {
    greylist_from(
        "192.0.2.0/24",
        key,
        GreylistTimes::of(&Config::default().greylist),
    )
}

fn greylist_from(subnet: &str, key: &str, times: GreylistTimes) -> StateOp {
    StateOp::CheckGreylist {
        key: key.to_owned(),
        subnet: subnet.to_owned(),
        times,
    }
}

#[test]
fn a_network_over_its_quota_is_deferred_without_being_recorded_in_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut config = Config::default();
    config.state.backend = StateBackend::Redis;
    config.state.redis = redis.url();
    let mut asker = Asker::new(&config);
    let times = GreylistTimes {
        max_new_per_subnet: 2,
        ..GreylistTimes::of(&config.greylist)
    };
    let new = StateAnswer::Greylist(GreylistOutcome::New);
    let flood = "2001:db8:bad::/64";
    for key in ["a", "b", "c", "d"] {
        assert_eq!(asker.ask(greylist_from(flood, key, times)), new, "{key}");
    }
    let exists = |key: &str| -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query(&mut redis.connection())
            .unwrap()
    };
    assert!(exists("tarmac:grey:a") && exists("tarmac:grey:b"));
    assert!(
        !exists("tarmac:grey:c") && !exists("tarmac:grey:d"),
        "not recorded"
    );
    let created: i64 = redis::cmd("GET")
        .arg(format!("tarmac:greynew:{flood}"))
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(created, 2);
    // The count lives for the retry window from the network's first new triplet.
    let left = pttl(&redis, &format!("tarmac:greynew:{flood}"));
    let window = i64::try_from(times.retry_window.as_millis()).unwrap();
    assert!(left > 0 && left <= window, "TTL {left}");
    // A retry of a recorded triplet is decided as usual; another network is recorded.
    let retry = asker.ask(greylist_from(flood, "a", times));
    assert!(
        matches!(retry, StateAnswer::Greylist(GreylistOutcome::Early(_))),
        "{retry:?}"
    );
    assert_eq!(asker.ask(greylist_from("198.51.100.0/24", "c", times)), new);
    assert!(exists("tarmac:grey:c"));
}

#[test]
fn a_stalled_redis_answers_from_local_state_after_the_timeout() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let timeout = Duration::from_millis(500);
    let mut config = Config::default();
    config.state.backend = StateBackend::Redis;
    config.state.redis = redis.url();
    config.state.timeout = timeout;
    let mut asker = Asker::new(&config);
    let new = StateAnswer::Greylist(GreylistOutcome::New);
    assert_eq!(asker.ask(greylist("before")), new);

    // Connections stay open, nothing is answered: slow is down.
    redis.pause();
    for n in 0..3 {
        let asked = Instant::now();
        assert_eq!(
            asker.ask_anyone(greylist(&format!("stalled{n}"))),
            StateAnswer::Greylist(GreylistOutcome::Pass),
            "greylisting fails open"
        );
        // The first waits out the timeout (a lower bound: how much longer it takes is the
        // machine's business); the fallback count below shows each answer was the local one.
        if n == 0 {
            let took = asked.elapsed();
            assert!(took >= timeout, "answered before the timeout: {took:?}");
        }
    }
    let stats = asker.store.stats();
    assert_eq!(stats.fallbacks, 3, "{stats:?}");
    assert!(!stats.redis_up, "{stats:?}");

    redis.resume();
    let deadline = Instant::now() + WAIT;
    while !asker.store.stats().redis_up {
        assert!(Instant::now() < deadline, "never reconnected");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(asker.ask(greylist("after")), new, "Redis decides again");
}
