#!/usr/bin/env bash
# System calls per relayed message: tarmac (synchronous relay, one worker) between Postfix's
# smtp-source and smtp-sink, counted by `strace -c -f` on the tarmac process alone, inside a
# private network namespace (loopback only: nothing can reach the machine's network or its
# resolver). Prints per-message counts by system call and the total.
#
#   bench/syscalls.sh [TARMAC_BINARY] [MESSAGES]
#
# Needs root (unshare -n), strace and Postfix's smtp-sink/smtp-source. Not run by CI: the count is
# a measurement, quoted in docs/benchmarks.md, not a test.
set -euo pipefail
if [ "${1:-}" != "--inside" ]; then
    bin=$(realpath "${1:-target/release/tarmac}")
    exec unshare -n "$0" --inside "$bin" "${2:-2000}"
fi
bin=$2
messages=$3
ip link set lo up
dir=$(mktemp -d)
mkdir "$dir/state"
trap 'kill $sink_pid $tarmac_pid 2>/dev/null || true; wait $tarmac_pid 2>/dev/null || true; rm -rf "$dir"' EXIT
cat >"$dir/tarmac.toml" <<TOML
[server]
listen = ["127.0.0.1:2525"]
hostname = "mx.bench"
workers = 1
max_connections = 1000
state_dir = "$dir/state"
[limits]
connection_rate_per_ip = "1000000/s"
connection_rate_per_subnet = "1000000/s"
[downstream]
servers = ["127.0.0.1:2526"]
mode = "synchronous"
announce_client = "xclient"
tls = "none"
[dns]
servers = ["127.0.0.1:53"]
rdns = false
[tarpit]
greet_pause = "0s"
[greylist]
enabled = false
[lists]
allow = []
deny = []
[rules]
files = []
TOML
smtp-sink -u nobody 127.0.0.1:2526 256 & sink_pid=$!
RUST_LOG=warn "$bin" run -c "$dir/tarmac.toml" & tarmac_pid=$!
for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/2525) 2>/dev/null && break
    sleep 0.1
done
# Warm up (first connections, lazily built state), then count.
smtp-source -s 4 -m 200 -l 4096 -f a@example.org -t b@example.net 127.0.0.1:2525
strace -c -f -o "$dir/strace" -p "$tarmac_pid" & strace_pid=$!
sleep 1
smtp-source -s 4 -m "$messages" -l 4096 -f a@example.org -t b@example.net 127.0.0.1:2525
kill -INT "$strace_pid"; wait "$strace_pid" || true
awk -v n="$messages" '
    $1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" { calls = $4; name = $NF; per[name] = calls / n; total += calls }
    END { for (s in per) if (per[s] >= 0.05) printf "%-16s %6.2f\n", s, per[s]; printf "%-16s %6.2f per message (%d messages)\n", "total", total / n, n }
' "$dir/strace" | sort -k2 -nr
