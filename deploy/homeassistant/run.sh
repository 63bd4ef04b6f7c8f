#!/usr/bin/env bash
# The Home Assistant add-on's entry point. The add-on's options (/data/options.json, written by
# the Supervisor from config.yaml's schema) become /data/cync-mitm.toml; a file the user put at
# /config/cync-mitm.toml (the add-on's config folder) is used as written instead. The proxy
# runs in /data, so its certificates, captures and SLO state are kept (and backed up) there.
#
# Environment (defaults are the add-on's; tests set them): CYNC_MITM_OPTIONS, CYNC_MITM_DATA,
# CYNC_MITM_USER_CONFIG, CYNC_MITM_BIN, CYNC_MITM_LISTEN, CYNC_MITM_ADMIN, and CYNC_MITM_RUN_AS
# ("uid:gid" to drop to when started as root; empty keeps the current user).
set -euo pipefail

options="${CYNC_MITM_OPTIONS:-/data/options.json}"
data="${CYNC_MITM_DATA:-/data}"
user_config="${CYNC_MITM_USER_CONFIG:-/config/cync-mitm.toml}"
bin="${CYNC_MITM_BIN:-/usr/local/bin/cync-mitm}"
listen="${CYNC_MITM_LISTEN:-0.0.0.0:23779}"
admin="${CYNC_MITM_ADMIN:-0.0.0.0:9400}"
run_as="${CYNC_MITM_RUN_AS:-}"

log() { echo "cync-mitm add-on: $*" >&2; }

# A JSON value as TOML: strings through jq's JSON escaping (valid TOML basic strings), lists
# of strings likewise, booleans and numbers as they are.
opt() { jq -c --arg k "$1" '.[$k]' "$options"; }
str() { jq -r --arg k "$1" '.[$k] | tostring | @json' "$options"; }
list() { jq -r --arg k "$1" '"[" + ((.[$k] // []) | map(tostring | @json) | join(", ")) + "]"' "$options"; }

generate() {
  local out="$1" seed upstream
  [ -r "$options" ] || { log "no options file at $options"; exit 64; }
  jq -e 'type == "object"' "$options" >/dev/null || { log "$options is not a JSON object"; exit 64; }
  seed="$(str routing_seed)"
  upstream="$(list upstream_addresses)"
  {
    echo "# Written by the add-on's run.sh from its options at every start: edit the options"
    echo "# (or put your own cync-mitm.toml in the add-on's config folder), not this file."
    echo "[listen]"
    echo "tls = $(jq -rn --arg v "$listen" '$v | @json')"
    echo "[upstream]"
    # Empty: the built-in Cync cloud addresses.
    [ "$upstream" = "[]" ] || echo "addresses = $upstream"
    echo "pin_sha256 = $(list upstream_pin_sha256)"
    echo "[admin]"
    echo "listen = $(jq -rn --arg v "$admin" '$v | @json')"
    echo "allowed_hosts = $(list admin_allowed_hosts)"
    echo "[log]"
    echo "filter = $(str log_level)"
    echo "[metrics]"
    echo "per_device_labels = $(opt per_device_metrics)"
    echo "[routing]"
    echo "mode = $(str routing_mode)"
    echo "canary_percent = $(jq -r '.canary_percent | tonumber' "$options")"
    # Empty: the built-in seed.
    [ "$seed" = '""' ] || echo "seed = $seed"
    echo "cohort = $(list cohort)"
    echo "exclude = $(list exclude)"
    echo "[new_path]"
    echo "addresses = $(list new_path_addresses)"
    echo "verify = $(opt new_path_verify)"
    echo "[capture]"
    echo "enabled = $(opt capture)"
    echo "max_total_bytes = $(jq -r '(.capture_max_total_mb | tonumber | floor) * 1048576' "$options")"
  } >"$out.tmp"
  mv -f "$out.tmp" "$out"
}

mkdir -p "$data"
cd "$data"
if [ -f "$user_config" ]; then
  config="$user_config"
  log "using $config as written (the add-on's options are not applied)"
else
  config="$data/cync-mitm.toml"
  generate "$config"
  log "configuration written to $config from the add-on's options"
fi

if ! "$bin" config check "$config" >&2; then
  log "the configuration is invalid (above)"
  exit 64
fi

if [ -n "$run_as" ] && [ "$(id -u)" = 0 ]; then
  chown -R "$run_as" "$data"
  exec setpriv --reuid="${run_as%%:*}" --regid="${run_as##*:}" --clear-groups \
    --inh-caps=-all --bounding-set=-all --no-new-privs \
    "$bin" run --config "$config"
fi
exec "$bin" run --config "$config"
