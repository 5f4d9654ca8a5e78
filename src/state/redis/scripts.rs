//! Each [`StateOp`] as Redis commands, and their replies read back: key names, and the Lua
//! scripts that decide greylisting and connection rates atomically on Redis's own clock.
//!
//! Keys (all after `[state] prefix`, all with a TTL, so nothing is ever swept):
//!
//! | key | value | TTL |
//! |---|---|---|
//! | `pass:IP` | `1` | `[tarpit] pass_ttl` from the PASS |
//! | `grey:TRIPLET` | first attempt (ms, Redis clock), or `pass` | `retry_window` from the first attempt; `pass_ttl` from the last pass |
//! | `greynew:NET/LEN` | new triplets the client network created in its window | `retry_window` from its first |
//! | `rate:ip:IP`, `rate:net:NET/LEN` | the bucket's theoretical arrival time (µs) | until the bucket is full again |
//! | `rep:IP` (IPv6 by /64) | hash: `bad`, `delivered`, `passes` (decayed counts), `at` (ms) | 10 half-lives from the last event |
//!
//! Why scripts: a greylist decision reads, decides and writes one key, and a connection takes a
//! token from two buckets; done as separate commands, two hosts deciding at once would both see
//! "new", or both take the last token. A script runs atomically, and `TIME` inside it is one
//! clock for every host, so their own clocks may differ (Redis ≥ 5 replicates a script's
//! effects, not the script, so reading `TIME` before writing is allowed).
//!
//! A reply that is not what the script returns (an error: a key of the wrong type, a script
//! missing from the cache) makes that one job fall back; [`Unusable::NoScript`] tells the
//! thread to load the scripts again.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use redis::{Pipeline, Script, ServerErrorKind, Value};

use super::{Gcra, Settings};
use crate::policy::RateRefusal;
use crate::policy::rates::network_name;
use crate::policy::reputation::{self, Counts, Event, History};
use crate::state::greylist::GreylistOutcome;
use crate::state::op::{StateAnswer, StateOp};

/// Greylisting one triplet: the same decision as `Greylist::check`, on the Redis clock,
/// with the client network's quota of new triplets (`max_new_per_subnet`) as a counter whose
/// TTL is the window. `max_entries` has no counterpart: every key expires by itself, and
/// Redis's own `maxmemory` bounds the rest.
const GREYLIST: &str = r"
-- tarmac greylisting. KEYS[1]: the triplet, KEYS[2]: the client network's new-triplet count.
-- ARGV: delay, retry_window, pass_ttl (ms), max_new_per_subnet.
-- Value: the first attempt's time in ms while unconfirmed, 'pass' once a retry passed.
-- Returns {0, 0} new, {1, ms left} early, {2, 0} pass, {3, 0} new but not recorded (the
-- network is over its quota).
local delay = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local pass_ttl = tonumber(ARGV[3])
local max_new = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seen = redis.call('GET', KEYS[1])
if seen == 'pass' then
  redis.call('PEXPIRE', KEYS[1], pass_ttl)
  return {2, 0}
end
local first = tonumber(seen)
if first then
  local waited = now - first
  if waited < delay then
    return {1, delay - waited}
  end
  if waited <= window then
    redis.call('SET', KEYS[1], 'pass', 'PX', pass_ttl)
    return {2, 0}
  end
end
local created = tonumber(redis.call('GET', KEYS[2])) or 0
if created >= max_new then
  return {3, 0}
end
if created == 0 then
  redis.call('SET', KEYS[2], 1, 'PX', window)
else
  redis.call('INCR', KEYS[2])
end
redis.call('SET', KEYS[1], string.format('%d', now), 'PX', window)
return {0, 0}
";

/// Taking a connection token: governor's GCRA (`policy::rates`), address first, then network.
const RATES: &str = r"
-- tarmac connection rates. KEYS[1]: the address's bucket, KEYS[2]: its network's.
-- ARGV: interval and tolerance (us) of the address's rate, then of the network's.
-- Value: the theoretical arrival time (us). Returns 0 taken, 1 address empty, 2 network empty.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function take(key, interval, tolerance)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then
    tat = now
  end
  if now < tat - tolerance then
    return false
  end
  local next = tat + interval
  redis.call('SET', key, string.format('%d', next), 'PX', math.ceil((next - now) / 1000))
  return true
end
if not take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])) then
  return 1
end
if not take(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4])) then
  return 2
end
return 0
";

/// Reputation: the counts decayed to Redis's now (`policy::reputation`'s decay, `2^(−Δt/half
/// life)`), then, when recording, one added to the event's count. Decaying on one clock keeps
/// every host's view the same; the counts go back as strings because Lua numbers returned to
/// Redis are cut to integers.
const REPUTATION: &str = r"
-- tarmac reputation. KEYS[1]: the address's hash. ARGV: half-life (ms), then the count to add
-- one to ('bad', 'delivered', 'passes'), or '' to only read. Returns {bad, delivered, passes}.
local half_life = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'bad', 'delivered', 'passes', 'at')
local at = tonumber(h[4]) or now
local factor = 1
if now > at then
  factor = 2 ^ (-(now - at) / half_life)
end
local counts = {
  bad = (tonumber(h[1]) or 0) * factor,
  delivered = (tonumber(h[2]) or 0) * factor,
  passes = (tonumber(h[3]) or 0) * factor,
}
local field = ARGV[2]
if field ~= '' then
  counts[field] = math.min(counts[field] + 1, 1e9)
  redis.call('HSET', KEYS[1], 'bad', string.format('%.6f', counts.bad),
    'delivered', string.format('%.6f', counts.delivered),
    'passes', string.format('%.6f', counts.passes), 'at', string.format('%d', now))
  redis.call('PEXPIRE', KEYS[1], 10 * half_life)
end
return {string.format('%.6f', counts.bad), string.format('%.6f', counts.delivered),
  string.format('%.6f', counts.passes)}
";

/// The scripts, with their SHA1s for `EVALSHA`.
pub(super) struct Scripts {
    greylist: Script,
    rates: Script,
    reputation: Script,
}

/// Why a reply cannot answer its job.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Unusable {
    /// Redis does not know the script (its cache was flushed): load them again.
    NoScript,
    /// Anything else: an error reply, or a reply of the wrong shape.
    Other(String),
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            greylist: Script::new(GREYLIST),
            rates: Script::new(RATES),
            reputation: Script::new(REPUTATION),
        }
    }

    /// Puts both scripts in Redis's script cache, so the pipeline can call them by SHA1.
    pub(super) fn load(&self, con: &mut redis::Connection) -> redis::RedisResult<()> {
        self.greylist.load(con)?;
        self.rates.load(con)?;
        self.reputation.load(con)?;
        Ok(())
    }

    /// Appends the command that carries out `op` to `pipe`.
    pub(super) fn push(&self, pipe: &mut Pipeline, op: &StateOp, settings: &Settings) {
        let prefix = settings.prefix.as_bytes();
        match op {
            StateOp::CheckPass(ip) => {
                let key = [prefix, b"pass:", ip.to_canonical().to_string().as_bytes()].concat();
                pipe.cmd("EXISTS").arg(key);
            }
            StateOp::RecordPass(ip) => {
                let key = [prefix, b"pass:", ip.to_canonical().to_string().as_bytes()].concat();
                pipe.cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("PX")
                    .arg(millis(settings.pass_ttl));
            }
            StateOp::CheckGreylist { key, subnet, times } => {
                let key = [prefix, b"grey:", key.as_bytes()].concat();
                let quota = [prefix, b"greynew:", subnet.as_bytes()].concat();
                pipe.cmd("EVALSHA")
                    .arg(self.greylist.get_hash())
                    .arg(2)
                    .arg(key)
                    .arg(quota)
                    .arg(millis(times.delay))
                    .arg(millis(times.retry_window))
                    .arg(millis(times.pass_ttl))
                    .arg(times.max_new_per_subnet);
            }
            StateOp::CheckRate(ip) => {
                let ip = ip.to_canonical();
                let address = [prefix, b"rate:ip:", ip.to_string().as_bytes()].concat();
                let network = [prefix, b"rate:net:", network_name(ip).as_bytes()].concat();
                let Gcra {
                    interval_us: ip_interval,
                    tolerance_us: ip_tolerance,
                } = settings.per_ip;
                let Gcra {
                    interval_us: net_interval,
                    tolerance_us: net_tolerance,
                } = settings.per_subnet;
                pipe.cmd("EVALSHA")
                    .arg(self.rates.get_hash())
                    .arg(2)
                    .arg(address)
                    .arg(network)
                    .arg(ip_interval)
                    .arg(ip_tolerance)
                    .arg(net_interval)
                    .arg(net_tolerance);
            }
            StateOp::CheckReputation { ip, half_life } => {
                self.push_reputation(pipe, prefix, *ip, *half_life, "");
            }
            StateOp::RecordReputation {
                ip,
                event,
                half_life,
            } => {
                let field = match event {
                    Event::Pregreet | Event::Rejected | Event::ProtocolAbuse => "bad",
                    Event::Delivered => "delivered",
                    Event::GreylistPass => "passes",
                };
                self.push_reputation(pipe, prefix, *ip, *half_life, field);
            }
        }
    }

    /// The reputation script for `ip`'s key: a read (`field` empty) or an event.
    fn push_reputation(
        &self,
        pipe: &mut Pipeline,
        prefix: &[u8],
        ip: IpAddr,
        half_life: Duration,
        field: &str,
    ) {
        let key = [prefix, b"rep:", reputation::key(ip).to_string().as_bytes()].concat();
        pipe.cmd("EVALSHA")
            .arg(self.reputation.get_hash())
            .arg(1)
            .arg(key)
            .arg(millis(half_life))
            .arg(field);
    }
}

/// The answer in `reply` to `op`: `Ok(None)` for an op that has none (it was carried out).
/// `now` is when the reply was read: a history's counts are as of then.
pub(super) fn read(
    op: &StateOp,
    reply: Value,
    now: Instant,
) -> Result<Option<StateAnswer>, Unusable> {
    if let Value::ServerError(error) = &reply {
        if error.kind() == Some(ServerErrorKind::NoScript) {
            return Err(Unusable::NoScript);
        }
        return Err(Unusable::Other(format!(
            "{} {}",
            error.code(),
            error.details().unwrap_or_default()
        )));
    }
    let answer = match (op, &reply) {
        (StateOp::CheckPass(_), Value::Int(n)) => StateAnswer::Pass(*n > 0),
        (StateOp::RecordPass(_), Value::Okay) => return Ok(None),
        (StateOp::CheckGreylist { .. }, Value::Array(items)) => match items.as_slice() {
            // Recorded or not (over the network's quota), the client is deferred the same.
            [Value::Int(0 | 3), _] => StateAnswer::Greylist(GreylistOutcome::New),
            [Value::Int(1), Value::Int(left)] => {
                let left = u64::try_from(*left).unwrap_or(0);
                StateAnswer::Greylist(GreylistOutcome::Early(std::time::Duration::from_millis(
                    left,
                )))
            }
            [Value::Int(2), _] => StateAnswer::Greylist(GreylistOutcome::Pass),
            _ => return Err(unexpected(&reply)),
        },
        (StateOp::CheckRate(ip), Value::Int(code)) => StateAnswer::Rate {
            ip: *ip,
            verdict: match code {
                0 => Ok(()),
                1 => Err(RateRefusal::PerIp),
                2 => Err(RateRefusal::PerSubnet),
                _ => return Err(unexpected(&reply)),
            },
        },
        (StateOp::RecordReputation { .. }, Value::Array(_)) => return Ok(None),
        (StateOp::CheckReputation { .. }, Value::Array(items)) => {
            let count = |item: Option<&Value>| match item {
                Some(Value::BulkString(bytes)) => std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|text| text.parse::<f64>().ok()),
                _ => None,
            };
            let (Some(bad), Some(delivered), Some(passes)) = (
                count(items.first()),
                count(items.get(1)),
                count(items.get(2)),
            ) else {
                return Err(unexpected(&reply));
            };
            let counts = Counts {
                bad,
                delivered,
                passes,
            };
            if bad == 0.0 && delivered == 0.0 && passes == 0.0 {
                StateAnswer::Reputation(None)
            } else {
                match History::from_counts(counts, now) {
                    Some(history) => StateAnswer::Reputation(Some(history)),
                    None => return Err(unexpected(&reply)),
                }
            }
        }
        _ => return Err(unexpected(&reply)),
    };
    Ok(Some(answer))
}

fn unexpected(reply: &Value) -> Unusable {
    Unusable::Other(format!("unexpected reply {reply:?}"))
}

/// Whole milliseconds, at least 1 (`PX 0` is an error), saturating.
fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::state::GreylistTimes;

    #[test]
    fn replies_read_back_into_answers() {
        let now = Instant::now();
        let ip = "192.0.2.7".parse().unwrap();
        let grey = StateOp::CheckGreylist {
            key: "k".to_owned(),
            subnet: "192.0.2.0/24".to_owned(),
            times: GreylistTimes {
                delay: Duration::from_secs(1),
                retry_window: Duration::from_secs(2),
                pass_ttl: Duration::from_secs(3),
                max_entries: 1000,
                max_new_per_subnet: 10,
            },
        };
        let array = |a, b| Value::Array(vec![Value::Int(a), Value::Int(b)]);
        assert_eq!(
            read(&grey, array(0, 0), now),
            Ok(Some(StateAnswer::Greylist(GreylistOutcome::New)))
        );
        assert_eq!(
            read(&grey, array(3, 0), now),
            Ok(Some(StateAnswer::Greylist(GreylistOutcome::New)))
        );
        assert_eq!(
            read(&grey, array(1, 1500), now),
            Ok(Some(StateAnswer::Greylist(GreylistOutcome::Early(
                Duration::from_millis(1500)
            ))))
        );
        assert_eq!(
            read(&grey, array(2, 0), now),
            Ok(Some(StateAnswer::Greylist(GreylistOutcome::Pass)))
        );
        assert!(read(&grey, array(7, 0), now).is_err());
        assert!(read(&grey, Value::Int(0), now).is_err());
        let rate = StateOp::CheckRate(ip);
        assert_eq!(
            read(&rate, Value::Int(2), now),
            Ok(Some(StateAnswer::Rate {
                ip,
                verdict: Err(RateRefusal::PerSubnet)
            }))
        );
        assert!(read(&rate, Value::Int(3), now).is_err());
        assert_eq!(
            read(&StateOp::CheckPass(ip), Value::Int(1), now),
            Ok(Some(StateAnswer::Pass(true)))
        );
        assert_eq!(read(&StateOp::RecordPass(ip), Value::Okay, now), Ok(None));
        assert!(read(&StateOp::RecordPass(ip), Value::Nil, now).is_err());

        let half_life = Duration::from_secs(3600);
        let check = StateOp::CheckReputation { ip, half_life };
        let counts = |items: [&str; 3]| {
            Value::Array(
                items
                    .iter()
                    .map(|n| Value::BulkString(n.as_bytes().to_vec()))
                    .collect(),
            )
        };
        assert_eq!(
            read(&check, counts(["0.000000", "0.000000", "0.000000"]), now),
            Ok(Some(StateAnswer::Reputation(None)))
        );
        let Ok(Some(StateAnswer::Reputation(Some(history)))) =
            read(&check, counts(["3.000000", "0.500000", "0.000000"]), now)
        else {
            panic!("a history");
        };
        let read_back = history.counts(now, half_life);
        assert!((read_back.bad - 3.0).abs() < 1e-6 && (read_back.delivered - 0.5).abs() < 1e-6);
        assert!(read(&check, counts(["x", "0", "0"]), now).is_err());
        assert!(read(&check, counts(["-1", "0", "0"]), now).is_err());
        let record = StateOp::RecordReputation {
            ip,
            event: Event::Pregreet,
            half_life,
        };
        assert_eq!(read(&record, counts(["1", "0", "0"]), now), Ok(None));
    }

    #[test]
    fn gcra_parameters_match_governor_quotas() {
        let rate = |count, secs| crate::config::Rate {
            count,
            per: Duration::from_secs(secs),
        };
        // 30/min: a token every 2 s, 30 at once.
        assert_eq!(
            Gcra::of(rate(30, 60)),
            Gcra {
                interval_us: 2_000_000,
                tolerance_us: 58_000_000
            }
        );
        // One a minute: no burst beyond the one token.
        assert_eq!(
            Gcra::of(rate(1, 60)),
            Gcra {
                interval_us: 60_000_000,
                tolerance_us: 0
            }
        );
        // Beyond 10⁶/s: 1 µs between tokens, the whole count at once.
        assert_eq!(Gcra::of(rate(u32::MAX, 1)).interval_us, 1);
        assert_eq!(Gcra::of(rate(0, 60)), Gcra::of(rate(1, 60)));
    }
}
