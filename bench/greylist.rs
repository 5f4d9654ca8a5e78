//! Greylist decisions per second, in process and through Redis on loopback (issue 6).
//!
//! - `greylist/local-table`: `Greylist::check` called directly, one thread: the in-process
//!   table's own cost.
//! - `greylist/local-store`: the same decisions asked through the `state::Store` front with the
//!   local backend, as a worker asks (the op carries its key and times; answered at once).
//! - `greylist/redis`: the same decisions through the Redis backend: `Store::ask` queues each
//!   on the state thread, which sends them to a real `redis-server` on loopback (started here,
//!   no persistence, `testkit/src/redis_server.rs`) in pipelined batches of the greylist Lua
//!   script; at most [`WINDOW`] await an answer, drained from the inbox of a real `mio::Poll` +
//!   `Waker` as a worker drains them.
//! - `greylist/ratio`: Redis ÷ local store.
//!
//! Each leg decides every triplet twice: the first pass must answer `New` for each, the second
//! `Early` (the 5-minute delay is not over), checked inside the timed loop. The Redis leg must
//! need no fallback. Rounds are interleaved (local, Redis, local, ...) and medians reported.
//!
//! `cargo bench --bench greylist` runs the full size; without `--bench` (as `cargo test
//! --all-targets` runs it, in a debug build) a small pass checks correctness only. Without
//! `redis-server` installed the Redis leg is skipped with a note (a failure under `CI=true`).

/// What this bench shares with the others: whole files of `bench/support/`, only those whose
/// every item it uses (see `bench/support/README.md`).
mod support {
    pub mod run;
    pub mod stats;
    pub mod window;
}

use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Poll, Token, Waker};
use tarmac::config::{Config, StateBackend};
use tarmac::policy::ConnectionRates;
use tarmac::state::redis::{Inbox, RedisState};
use tarmac::state::{
    Greylist, GreylistOutcome, GreylistTimes, Local, PassCache, ReputationTable, StateAnswer,
    StateOp, Store, Waiter,
};
use tarmac_testkit::redis_server::RedisServer;

use support::run::Run;
use support::stats::{median, per_second};
use support::window;

/// Decisions awaiting an answer at once in the Redis leg: a few pipelined batches' worth,
/// well below the state thread's queue of 4096, so nothing falls back for overload.
const WINDOW: usize = 1024;

/// Longest one round may take before the bench fails.
const ROUND_DEADLINE: Duration = Duration::from_secs(120);

/// Rounds per leg; the median is reported.
const ROUNDS: usize = 3;

fn main() {
    let Run { full, note } = Run::from_args();
    let triplets = if full { 100_000 } else { 2_000 };
    let keys: Vec<String> = (0..triplets)
        .map(|n| format!("198.51.100.0/24\u{1f}sender{n}@example.org\u{1f}rcpt@example.net"))
        .collect();
    let config = Config::default();
    let times = bench_times(&config);

    let redis = RedisServer::start();
    let decisions = 2 * keys.len();
    let mut table = Vec::new();
    let mut local = Vec::new();
    let mut shared = Vec::new();
    let mut prefix_round = 0;
    for _ in 0..ROUNDS {
        table.push(per_second(decisions, local_table(&keys, &config)));
        local.push(per_second(decisions, local_store(&keys, times)));
        if let Some(redis) = &redis {
            // A key prefix per round: each round's triplets are new to Redis.
            prefix_round += 1;
            let elapsed = through_redis(redis, &keys, times, prefix_round);
            shared.push(per_second(decisions, elapsed));
        }
    }
    let table = median(table);
    let local = median(local);
    println!(
        "greylist/local-table: {table:.0} decisions/s (Greylist::check, {decisions} decisions \
         over {triplets} triplets, one thread, median of {ROUNDS}){note}"
    );
    println!(
        "greylist/local-store: {local:.0} decisions/s (Store::ask, local backend, same \
         decisions, median of {ROUNDS}){note}"
    );
    if shared.is_empty() {
        println!("greylist/redis: skipped (redis-server not installed)");
        return;
    }
    let shared = median(shared);
    println!(
        "greylist/redis: {shared:.0} decisions/s (Store::ask, Redis backend on loopback: state \
         thread, pipelined Lua script, window {WINDOW}, same decisions, median of {ROUNDS}){note}"
    );
    println!(
        "greylist/ratio: {:.3} (Redis / local store){note}",
        shared / local
    );
}

/// The client network of every triplet (the keys' own).
const SUBNET: &str = "198.51.100.0/24";

/// `[greylist]`'s times, without the per-network quota: every triplet here comes from one
/// network, and the bench measures decisions, not the quota's deferrals.
fn bench_times(config: &Config) -> GreylistTimes {
    GreylistTimes {
        max_new_per_subnet: u32::MAX,
        ..GreylistTimes::of(&config.greylist)
    }
}

/// Both passes over `keys` straight into a table.
fn local_table(keys: &[String], config: &Config) -> Duration {
    let start = Instant::now();
    let table = Greylist::new(start);
    let times = bench_times(config);
    for (pass, expected) in [(0, "new"), (1, "early")] {
        for key in keys {
            let outcome = table.check(key, SUBNET, Instant::now(), &times);
            check(pass, expected, outcome);
        }
    }
    start.elapsed()
}

/// Both passes through the local `Store`.
fn local_store(keys: &[String], times: GreylistTimes) -> Duration {
    let start = Instant::now();
    let store = Store::new(Arc::new(local(&Config::default())), None);
    let waiter = Waiter { worker: 0, key: 0 };
    for (pass, expected) in [(0, "new"), (1, "early")] {
        for key in keys {
            let op = StateOp::CheckGreylist {
                key: key.clone(),
                subnet: SUBNET.to_owned(),
                times,
            };
            match store.ask(op, Instant::now(), waiter) {
                Some(StateAnswer::Greylist(outcome)) => check(pass, expected, outcome),
                other => panic!("local store answered {other:?}"),
            }
        }
    }
    start.elapsed()
}

/// Both passes through the Redis backend, with `round` in the key prefix.
fn through_redis(
    redis: &RedisServer,
    keys: &[String],
    times: GreylistTimes,
    round: usize,
) -> Duration {
    let mut config = Config::default();
    config.state.backend = StateBackend::Redis;
    config.state.redis = redis.url();
    config.state.prefix = format!("bench{round}:");
    // Generous: a debug build in quick mode must not fall back either.
    config.state.timeout = Duration::from_secs(5);
    let local = Arc::new(local(&config));
    let mut state = RedisState::start(&config, Arc::clone(&local)).expect("state thread");
    let mut poll = Poll::new().expect("poll");
    let waker = Arc::new(Waker::new(poll.registry(), Token(0)).expect("waker"));
    let (worker, inbox) = state.add_worker(waker);
    let store = Store::new(local, Some(state.handle()));
    wait_until_connected(&store);

    let start = Instant::now();
    for (pass, expected) in [(0, "new"), (1, "early")] {
        let answers = ask_all(&store, &mut poll, &inbox, worker, keys, times);
        for outcome in answers {
            check(pass, expected, outcome);
        }
    }
    let elapsed = start.elapsed();
    let stats = store.stats();
    assert_eq!(stats.fallbacks, 0, "no decision may fall back: {stats:?}");
    state.stop();
    elapsed
}

/// Asks every triplet, at most [`WINDOW`] in flight; answers in key order.
fn ask_all(
    store: &Store,
    poll: &mut Poll,
    inbox: &Inbox,
    worker: usize,
    keys: &[String],
    times: GreylistTimes,
) -> Vec<GreylistOutcome> {
    let ask = |i: usize| {
        let key = keys.get(i).expect("key").clone();
        let op = StateOp::CheckGreylist {
            key,
            subnet: SUBNET.to_owned(),
            times,
        };
        let waiter = Waiter {
            worker,
            key: i as u64,
        };
        assert_eq!(store.ask(op, Instant::now(), waiter), None, "queued");
        None
    };
    let delivered = || {
        let delivery = inbox.try_recv()?;
        let StateAnswer::Greylist(outcome) = delivery.answer else {
            panic!("not a greylist answer: {:?}", delivery.answer);
        };
        Some((delivery.key, outcome))
    };
    window::ask_all(keys.len(), WINDOW, ROUND_DEADLINE, poll, ask, delivered)
}

/// The state thread connects at start, on its own: waits (bounded) until it has.
fn wait_until_connected(store: &Store) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.stats().redis_up {
        assert!(
            Instant::now() < deadline,
            "the state thread never connected"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn local(config: &Config) -> Local {
    let rates = ConnectionRates::new(
        config.limits.connection_rate_per_ip,
        config.limits.connection_rate_per_subnet,
    );
    Local::new(
        Arc::new(PassCache::new(config.tarpit.pass_ttl)),
        Arc::new(Greylist::new(Instant::now())),
        Arc::new(ReputationTable::new()),
        Arc::new(rates),
    )
}

/// The first pass must find every triplet new, the second early.
#[track_caller]
fn check(pass: usize, expected: &str, outcome: GreylistOutcome) {
    let ok = match (pass, outcome) {
        (0, GreylistOutcome::New) => true,
        (1, GreylistOutcome::Early(left)) => left <= Duration::from_secs(300),
        _ => false,
    };
    assert!(ok, "pass {pass}: expected {expected}, got {outcome:?}");
}
