#!/usr/bin/env bash
# The web console's cost on the proxy: a simulated cloud, the release proxy and DEVICES simulated
# devices heartbeating every second (two frames each: ping, pong), all on 127.0.0.1. Three runs
# of the same fleet, each DURATION seconds:
#   none  no console open (the baseline);
#   page  one stream read as fast as it comes (curl), /api/devices polled every 6 s and
#         /api/rollout every 2 s, as an open console page does with more than 300 devices;
#   slow  one stream read 1 KiB per second through a 4 KiB receive buffer (a stalled browser), with
#         the same polling;
#   chrome  the console page itself in a headless Chromium (through chromedriver), rendering
#         what it receives; events delivered are what the page counted (skipped when chromium
#         or chromedriver is missing: apt-get install chromium chromium-driver).
# For each: the proxy's CPU seconds per second (from /proc), the fleet's answered heartbeats and
# request → answer p99 (the relay), events delivered per second to the stream, and the events
# dropped (cync_mitm_console_events_dropped_total by reason).
#
#   scripts/console-load.sh [DEVICES] [DURATION_S]      # defaults: 1000 devices, 30 s
#   RUNS="none chrome" scripts/console-load.sh          # only those runs
#
# Nothing leaves the machine. Needs curl and python3.
set -euo pipefail
devices=${1:-1000}
duration=${2:-30}
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/target/release/cync-mitm"
[ -x "$bin" ] || (cd "$root" && cargo build --release -q)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cloud_port=$(free_port)
proxy_port=$(free_port)
admin_port=$(free_port)
admin="http://127.0.0.1:$admin_port"
cat >"$work/proxy.toml" <<EOF
[listen]
tls = "127.0.0.1:$proxy_port"
[upstream]
addresses = ["127.0.0.1:$cloud_port"]
[admin]
listen = "127.0.0.1:$admin_port"
[tls]
cert_dir = "$work/certs"
[slo]
state_file = "$work/slo/state.json"
EOF
ulimit -n 65536 2>/dev/null || true
"$bin" certs init --dir "$work/certs" >/dev/null
"$bin" sim cloud --listen "127.0.0.1:$cloud_port" --cert-dir "$work/certs" --report-every 1h \
  >"$work/cloud.log" 2>&1 &
pids+=($!)
RUST_LOG=warn "$bin" run --config "$work/proxy.toml" >"$work/proxy.log" 2>&1 &
proxy=$!
pids+=("$proxy")
for _ in $(seq 100); do
  curl -fs "$admin/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

cpu() { awk -v t="$(getconf CLK_TCK)" '{printf "%.3f", ($14 + $15) / t}' "/proc/$proxy/stat"; }
dropped() { curl -fs "$admin/metrics" | awk -v r="$1" '$0 ~ "^cync_mitm_console_events_dropped_total\\{reason=\""r"\"\\}" {print $2}'; }

slow_reader() {
  python3 - "$admin_port" "$work/slow.out" >/dev/null 2>&1 <<'PY' &
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.connect(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
n = 0
with open(sys.argv[2], "wb") as out:
    while True:
        b = s.recv(1024)
        if not b:
            break
        out.write(b)
        out.flush()
        time.sleep(1)
PY
  echo $!
}

poller() {
  # As the page polls a fleet of more than 300: the devices every 6 s, the rollout every 2 s.
  local i=0
  while true; do
    if [ $((i % 3)) = 0 ]; then curl -fs "$admin/api/devices" >/dev/null || true; fi
    curl -fs "$admin/api/rollout" >/dev/null || true
    i=$((i + 1))
    sleep 2
  done >/dev/null 2>&1 &
  echo $!
}

wd=""
if command -v chromedriver >/dev/null && command -v chromium >/dev/null; then
  wd_port=$(free_port)
  chromedriver --port="$wd_port" --allowed-ips=127.0.0.1 >"$work/chromedriver.log" 2>&1 &
  pids+=($!)
  wd="http://127.0.0.1:$wd_port"
  for _ in $(seq 50); do curl -fs "$wd/status" >/dev/null 2>&1 && break; sleep 0.1; done
fi
json_get() { python3 -c 'import json,sys; v=json.load(sys.stdin)["value"]; print(eval(sys.argv[1]))' "$1"; }
page_counts() {
  curl -fs -X POST "$wd/session/$session/execute/sync" -H 'content-type: application/json' \
    -d '{"script":"return [stream.received, stream.dropped]","args":[]}' | json_get 'f"{v[0]} {v[1]}"'
}
runs="none page slow"
[ -n "$wd" ] && runs="$runs chrome"
runs=${RUNS:-$runs}
# CPU seconds of every Chromium process (the browser shares the machine's cores).
chrome_cpu() { ps -C chromium -o times= 2>/dev/null | awk '{s += $1} END {print s + 0}'; }

printf '%-6s %10s %10s %12s %10s %12s %10s %10s\n' run "CPU s/s" "answered/s" "p99 ms" "events/s" "delivered" "drop rate" "drop slow"
for run in $runs; do
  extra=()
  rm -f "$work/stream.out" "$work/slow.out"
  case $run in
    page)
      curl -sN "$admin/api/events" >"$work/stream.out" &
      extra+=($!)
      extra+=("$(poller)")
      ;;
    slow)
      extra+=("$(slow_reader)")
      extra+=("$(poller)")
      ;;
    chrome)
      session=$(curl -fs -X POST "$wd/session" -H 'content-type: application/json' -d '{"capabilities":{"alwaysMatch":{"goog:chromeOptions":{"binary":"'"$(command -v chromium)"'","args":["--headless=new","--no-sandbox","--disable-gpu","--disable-dev-shm-usage","--window-size=1400,1800"]}}}}' | json_get 'v["sessionId"]')
      curl -fs -X POST "$wd/session/$session/url" -H 'content-type: application/json' \
        -d "{\"url\":\"$admin/\"}" >/dev/null
      ;;
  esac
  sleep 1
  r0=$(dropped rate); s0=$(dropped slow_client)
  "$bin" sim devices --target "127.0.0.1:$proxy_port" --count "$devices" --heartbeat 1s \
    --ramp 3s --duration "$((duration + 8))s" --report-every 1h >"$work/fleet-$run.log" 2>&1 &
  fleet=$!
  sleep 8 # connected and heartbeating
  c0=$(cpu); e0=$( [ -f "$work/stream.out" ] && grep -c '^data: {"seq"' "$work/stream.out" || echo 0 )
  [ "$run" = chrome ] && read -r e0 p0 < <(page_counts) && b0=$(chrome_cpu)
  sleep "$duration"
  c1=$(cpu); e1=$( [ -f "$work/stream.out" ] && grep -c '^data: {"seq"' "$work/stream.out" || echo 0 )
  if [ "$run" = chrome ]; then
    read -r e1 p1 < <(page_counts)
    b1=$(chrome_cpu)
    curl -fs -X DELETE "$wd/session/$session" >/dev/null || true
    echo "chrome: the page counted $((p1 - p0)) events dropped for it (slow page); Chromium used $(awk -v a="$b0" -v b="$b1" -v d="$duration" 'BEGIN {printf "%.2f", (b - a) / d}') CPU s/s" >&2
  fi
  if [ "$run" = page ]; then devsize=$(curl -fs "$admin/api/devices" | wc -c); fi
  wait "$fleet" || true
  r1=$(dropped rate); s1=$(dropped slow_client)
  for p in "${extra[@]}"; do kill "$p" 2>/dev/null || true; done
  report=$(tail -1 "$work/fleet-$run.log")
  read -r answered p99 < <(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); l=r["latency"]; print(r["answered"], l.get("p99_ms", l.get("p99")))' "$report")
  delivered=$((e1 - e0))
  [ "$run" = slow ] && delivered=$(grep -c '^data: {"seq"' "$work/slow.out" 2>/dev/null || echo 0)
  printf '%-6s %10s %10s %12s %10s %12s %10s %10s\n' "$run" \
    "$(awk -v a="$c0" -v b="$c1" -v d="$duration" 'BEGIN {printf "%.3f", (b - a) / d}')" \
    "$(awk -v a="$answered" -v d="$((duration + 8))" 'BEGIN {printf "%.0f", a / d}')" \
    "$p99" \
    "$(awk -v e="$((e1 - e0))" -v d="$duration" 'BEGIN {printf "%.0f", e / d}')" \
    "$delivered" "$((${r1%.*} - ${r0%.*}))" "$((${s1%.*} - ${s0%.*}))"
done
echo "page weight: $(( $(curl -fs "$admin/" | wc -c) + $(curl -fs "$admin/console.js" | wc -c) + $(curl -fs "$admin/console.css" | wc -c) )) bytes"
echo "one /api/devices answer with $devices devices: ${devsize:-?} bytes"
