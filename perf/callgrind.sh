#!/usr/bin/env bash
# Instructions per request, and where they go: the gateway under valgrind's callgrind, sent
# tools/call requests one at a time on one keep-alive connection through the harness's mock
# upstream. Instruction counts do not move with the machine's load, so a change's effect on the
# gateway's own work shows on a shared VM where timings move by ±10 %.
#
#   perf/callgrind.sh [guard|passthrough|sse|tools_list_100|tools_list_100_fresh|tools_list_all] [REQUESTS]
#                                                         (after `cargo build --release --workspace`)
#
# The tools_list pair is the harness's: the same full guard, a 100-tool (~20 KiB) tools/list
# answer, filtered to half for tools_list_100 and relayed whole for tools_list_all; the
# difference between the two is the filter's cost.
#
# Prints instructions per request (all threads; the audit writer apart) and the functions with
# the most inclusive instructions; leaves the profile in $OUT (default /tmp/mcp-guard-callgrind)
# for `callgrind_annotate`. Needs valgrind and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
scenario="${1:-guard}"
requests="${2:-2000}"
out="${OUT:-/tmp/mcp-guard-callgrind}"
bin="${BIN:-target/release/mcp-guard}"
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 2; }
[ -x "$bin" ] && [ -x target/release/perf ] || { echo "run cargo build --release --workspace first" >&2; exit 2; }
rm -rf "$out" && mkdir -p "$out"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

wait_for_address() { # file -> host:port printed after "listening on http://"
  for _ in $(seq 240); do
    addr=$(grep -o 'listening on http://[0-9.:]*' "$1" 2>/dev/null | head -1 | sed 's|.*//||') || true
    [ -n "$addr" ] && { echo "$addr"; return; }
    sleep 0.5
  done
  echo "no listening address in $1" >&2; exit 1
}

case "$scenario" in
  guard | passthrough) tools=5 call=echo ;;
  sse) tools=5 call=echo_sse ;; # the harness's `sse` scenario: no guard, one chunked SSE event
  tools_list_100 | tools_list_all) tools=100 call=tools_list ;;
  tools_list_100_fresh) tools=100 call=tools_list fresh=--fresh-lists ;;
  *) echo "unknown scenario $scenario" >&2; exit 2 ;;
esac

target/release/perf upstream --threads 1 --tools "$tools" ${fresh:-} >"$out/upstream.log" 2>&1 &
pids+=($!)
upstream=$(wait_for_address "$out/upstream.log")

{
  printf '[server]\nhost = "127.0.0.1"\nport = 0\nworkers = 1\n\n[admin]\nport = 0\n\n'
  printf '[upstream]\ntransport = "http"\nurl = "http://%s/mcp"\n\n' "$upstream"
  if [ "$scenario" != passthrough ] && [ "$scenario" != sse ]; then
    # The perf harness's guarded scenarios: API key, tool policy, rate limit, audit file.
    case "$scenario" in
      tools_list_100 | tools_list_100_fresh) allowed='["echo", "echo_sse", "tool_0*0", "tool_0*2", "tool_0*4", "tool_0*6", "tool_0*8"]' ;;
      tools_list_all) allowed='[]' ;;
      *) allowed='["echo"]' ;;
    esac
    printf '[[auth.api_keys]]\nid = "perf"\nkey_hash = "oNtTxBO8b6J3SxRCrD+weuf3watudilxAdoYlAE5lYM="\nallowed_tools = %s\n\n' "$allowed"
    printf '[rate_limit]\nenabled = true\nrequests_per_second = 1000000000\nburst_size = 1000000000\n\n'
    printf '[audit]\nenabled = true\nfile = "%s/audit.jsonl"\n' "$out"
  else
    printf '[rate_limit]\nenabled = false\n\n[audit]\nenabled = false\n'
  fi
} >"$out/guard.toml"

# --fair-sched: the gateway's threads would otherwise starve each other under valgrind's lock.
valgrind --tool=callgrind --fair-sched=yes --callgrind-out-file="$out/callgrind.out.%p" \
  "$bin" --config "$out/guard.toml" >"$out/gateway.log" 2>&1 &
pids+=($!)
gateway=$(wait_for_address "$out/gateway.log")

drive() { # requests on one connection, each answer read whole before the next is sent
  python3 - "$gateway" "$1" "$call" <<'PY'
import re, socket, sys
host, port = sys.argv[1].rsplit(":", 1); n = int(sys.argv[2]); call = sys.argv[3]
s = socket.create_connection((host, int(port)))
base = (f"POST /mcp HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        "Accept: application/json, text/event-stream\r\nAuthorization: Bearer perf-load-generator-key\r\n")
buf = b""
def exchange(head, body):
    global buf
    s.sendall((head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body.encode())
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk: sys.exit("connection closed")
        buf += chunk
    h, rest = buf.split(b"\r\n\r\n", 1)
    if re.search(rb"(?i)transfer-encoding: *chunked", h):
        # An SSE answer: read up to the last chunk (the harness's events hold no "0\r\n\r\n").
        while b"\r\n0\r\n\r\n" not in b"\r\n" + rest:
            chunk = s.recv(65536)
            if not chunk: sys.exit("connection closed mid-stream")
            rest += chunk
        end = (b"\r\n" + rest).index(b"\r\n0\r\n\r\n") + 5
        buf = rest[end:]
    else:
        length = int(re.search(rb"(?i)content-length: *(\d+)", h).group(1))
        while len(rest) < length: rest += s.recv(65536)
        buf = rest[length:]
    if not h.startswith(b"HTTP/1.1 200"): sys.exit(f"unexpected answer: {h[:80]!r}")
    return h.decode()
h = exchange(base, '{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"callgrind","version":"1"}}}')
sid = re.search(r"(?i)mcp-session-id: *(\S+)", h)
head = base + "Mcp-Protocol-Version: 2025-11-25\r\n" + (f"Mcp-Session-Id: {sid.group(1)}\r\n" if sid else "")
for i in range(1, n + 1):
    if call in ("echo", "echo_sse"):
        exchange(head, '{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"%s","arguments":{"text":"hello"}}}' % (i, call))
    else:
        exchange(head, '{"jsonrpc":"2.0","id":%d,"method":"tools/list","params":{}}' % i)
PY
}

# Warm-up (connections pooled, caches filled), then only the measured requests are counted.
drive 200
callgrind_control -z >/dev/null 2>&1
drive "$requests"
callgrind_control -d >/dev/null 2>&1
sleep 1
profile=$(ls "$out"/callgrind.out.*.1 | head -1)
total=$(awk '/^summary:/ {print $2; exit}' "$profile")
calls=$((requests + 1)) # and the driver's initialize
callgrind_annotate --inclusive=yes --threshold=100 --auto=no "$profile" 2>/dev/null |
  sed 's/\[[^]]*\]//g; s|/rustc/[0-9a-f]*/library/||; s|/root/.cargo/registry/src/[^/]*/||; s|'"$PWD"'/||' \
  >"$out/inclusive.txt"
audit=$(awk '/audit\/mod.rs:std::sys::backtrace::__rust_begin_short_backtrace/ {gsub(",", "", $1); print $1; exit}' "$out/inclusive.txt")
echo "scenario $scenario, $requests requests on one connection"
echo "instructions per request: $((total / calls)) (audit writer thread: $(( ${audit:-0} / calls )))"
echo "top inclusive (per request):"
sed -n 's/^ *\([0-9,]*\) ([ 0-9.]*%) *\(.*\)$/\1 \2/p' "$out/inclusive.txt" |
  awk -v n="$calls" '{c=$1; gsub(",", "", c); $1=""; printf "%8d %s\n", c/n, substr($0, 2, 140)}' | sed -n '5,45p'
echo "profile: $profile (callgrind_annotate --auto=yes $profile)"
