#!/usr/bin/env bash
# Watch an idle proxy: a simulated cloud, the release proxy (capture on, file watch on) and N
# simulated devices that only heartbeat, all on 127.0.0.1. Samples the proxy's CPU seconds,
# descriptors, RSS and its reload/frame counters after a settle period and again after
# DURATION, prints both and the difference, and exits 1 when something grew that should not.
#
#   scripts/idle-watch.sh [DEVICES] [DURATION_S]      # defaults: 100 devices, 60 s
#   NEW_PATH=1 scripts/idle-watch.sh                  # devices on the new path (new_primary,
#                                                     # a second simulated cloud as backend)
#   SHADOW=1 scripts/idle-watch.sh                    # devices on the cloud, each mirrored to
#                                                     # the backend, with parity
#
# Nothing leaves the machine: every address is loopback. Needs curl and python3 (for free ports).
set -euo pipefail
devices=${1:-100}
duration=${2:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/target/release/cync-mitm"
[ -x "$bin" ] || (cd "$root" && cargo build --release -q)
work=$(mktemp -d)
pids=()
# shellcheck disable=SC2329 # called by the EXIT trap
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cloud_port=$(free_port)
new_port=$(free_port)
proxy_port=$(free_port)
admin_port=$(free_port)

cat >"$work/proxy.toml" <<EOF
[listen]
tls = "127.0.0.1:$proxy_port"
[upstream]
addresses = ["127.0.0.1:$cloud_port"]
[admin]
listen = "127.0.0.1:$admin_port"
[tls]
cert_dir = "$work/certs"
[capture]
enabled = true
dir = "$work/captures"
[slo]
state_file = "$work/slo/state.json"
EOF
backend=0
if [ "${NEW_PATH:-0}" = 1 ] || [ "${SHADOW:-0}" = 1 ]; then backend=1; fi
if [ "$backend" = 1 ]; then
  mode=new_primary
  [ "${SHADOW:-0}" = 1 ] && mode=shadow
  cat >>"$work/proxy.toml" <<EOF
[routing]
mode = "$mode"
canary_percent = 100
[parity]
dir = "$work/parity"
[new_path]
addresses = ["127.0.0.1:$new_port"]
ca_file = "$work/certs/ca.pem"
sni = "cm.gelighting.com"
EOF
fi

"$bin" certs init --dir "$work/certs" >/dev/null
"$bin" sim cloud --listen "127.0.0.1:$cloud_port" --cert-dir "$work/certs" --report-every 1h \
  >"$work/cloud.log" 2>&1 &
pids+=($!)
if [ "$backend" = 1 ]; then
  "$bin" sim cloud --listen "127.0.0.1:$new_port" --cert-dir "$work/certs" --report-every 1h \
    >"$work/backend.log" 2>&1 &
  pids+=($!)
fi
RUST_LOG=warn "$bin" run --config "$work/proxy.toml" >"$work/proxy.log" 2>&1 &
proxy=$!
pids+=("$proxy")
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$admin_port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
if [ "$devices" -gt 0 ]; then
  "$bin" sim devices --target "127.0.0.1:$proxy_port" --count "$devices" --report-every 1h \
    >"$work/devices.log" 2>&1 &
  pids+=($!)
fi
sleep 10 # connects, first heartbeats, probe

sample() {
  local stat cpu fds rss metrics
  stat=$(cut -d' ' -f14,15 "/proc/$proxy/stat")
  cpu=$(awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($1 + $2) / t}' <<<"$stat")
  fds=$(find "/proc/$proxy/fd" -mindepth 1 -maxdepth 1 | wc -l)
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$proxy/status")
  metrics=$(curl -fs "http://127.0.0.1:$admin_port/metrics")
  local reloads devs captures
  reloads=$(awk '/^cync_mitm_config_reloads_total/ {s += $2} END {print s + 0}' <<<"$metrics")
  devs=$(awk '/^cync_mitm_connections_active\{peer="device"\}/ {print $2}' <<<"$metrics")
  captures=$(awk '/^cync_mitm_capture_files_total/ {print $2}' <<<"$metrics")
  echo "$cpu $fds $rss $reloads ${devs:-0} ${captures:-0}"
}

read -r c0 f0 r0 l0 d0 k0 < <(sample)
sleep "$duration"
read -r c1 f1 r1 l1 d1 k1 < <(sample)
printf '%-22s %10s %10s %10s\n' "" start "after ${duration}s" change
printf '%-22s %10s %10s %10s\n' "CPU seconds" "$c0" "$c1" "$(awk -v a="$c0" -v b="$c1" 'BEGIN {printf "%.2f", b - a}')"
printf '%-22s %10s %10s %10s\n' "descriptors" "$f0" "$f1" "$((f1 - f0))"
printf '%-22s %10s %10s %10s\n' "RSS KiB" "$r0" "$r1" "$((r1 - r0))"
printf '%-22s %10s %10s %10s\n' "config reloads" "$l0" "$l1" "$((l1 - l0))"
printf '%-22s %10s %10s %10s\n' "devices connected" "$d0" "$d1" "$((d1 - d0))"
printf '%-22s %10s %10s %10s\n' "capture files opened" "$k0" "$k1" "$((k1 - k0))"

fail=0
cpu_per_min=$(awk -v a="$c0" -v b="$c1" -v d="$duration" 'BEGIN {printf "%.2f", (b - a) * 60 / d}')
if awk -v x="$cpu_per_min" 'BEGIN {exit !(x > 1.0)}'; then
  echo "FAIL: $cpu_per_min CPU seconds per idle minute (limit 1.0)"
  fail=1
fi
if [ $((f1 - f0)) -gt 5 ]; then echo "FAIL: descriptors grew by $((f1 - f0))"; fail=1; fi
if [ $((r1 - r0)) -gt 4096 ]; then echo "FAIL: RSS grew by $((r1 - r0)) KiB"; fail=1; fi
if [ "$l1" != "$l0" ]; then echo "FAIL: the idle proxy reloaded $((l1 - l0)) times"; fail=1; fi
if [ "$d1" != "$devices" ] || [ "$d0" != "$devices" ]; then
  echo "FAIL: $d0 then $d1 devices connected, $devices expected"
  fail=1
fi
if [ "$k1" != "$k0" ]; then echo "FAIL: $((k1 - k0)) capture files opened while idle"; fail=1; fi
if grep -qE 'ERROR|panicked' "$work/proxy.log"; then
  echo "FAIL: errors in the proxy log:"
  grep -E 'ERROR|panicked' "$work/proxy.log" | head -5
  fail=1
fi
if [ "${NEW_PATH:-0}" = 1 ]; then
  on_new=$(curl -fs "http://127.0.0.1:$admin_port/metrics" |
    awk '/^tcp_comm_routing_decision_total\{transport="new"\}/ {print $2}')
  echo "routed to the new path: ${on_new:-0}"
  if [ "${on_new:-0}" -lt "$devices" ]; then echo "FAIL: devices not on the new path"; fail=1; fi
fi
if [ "${SHADOW:-0}" = 1 ]; then
  m=$(curl -fs "http://127.0.0.1:$admin_port/metrics")
  mirrors=$(awk '/^cync_mitm_mirrors_active / {print $2}' <<<"$m")
  drifts=$(awk '/^tcp_comm_parity_drifts_total/ {s += $2} END {print s + 0}' <<<"$m")
  matches=$(awk '/^tcp_comm_parity_matches_total/ {s += $2} END {print s + 0}' <<<"$m")
  echo "mirrors: ${mirrors:-0}; parity: $matches matches, $drifts drifts"
  if [ "${mirrors:-0}" != "$devices" ]; then echo "FAIL: ${mirrors:-0} mirrors for $devices devices"; fail=1; fi
  if [ "$drifts" != 0 ]; then echo "FAIL: $drifts parity drifts against an identical backend"; fail=1; fi
fi
[ "$fail" = 0 ] && echo "ok: flat"
exit "$fail"
