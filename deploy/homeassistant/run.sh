#!/usr/bin/env bash
# The Home Assistant add-on's entry point. The add-on's options (/data/options.json, written by
# the Supervisor from config.yaml's schema) become /data/cync-mitm.toml; a file the user put at
# /config/cync-mitm.toml (the add-on's config folder) is used as written instead. The proxy
# runs in /data, so its certificates, captures and SLO state are kept there.
#
# Environment (defaults are the add-on's; tests set them): CYNC_MITM_OPTIONS, CYNC_MITM_DATA,
# CYNC_MITM_USER_CONFIG, CYNC_MITM_BIN, CYNC_MITM_LISTEN, CYNC_MITM_ADMIN, and CYNC_MITM_RUN_AS
# ("uid:gid" to drop to when started as root, 10001:10001 when unset; empty keeps root).
set -euo pipefail

options="${CYNC_MITM_OPTIONS:-/data/options.json}"
data="${CYNC_MITM_DATA:-/data}"
user_config="${CYNC_MITM_USER_CONFIG:-/config/cync-mitm.toml}"
bin="${CYNC_MITM_BIN:-/usr/local/bin/cync-mitm}"
listen="${CYNC_MITM_LISTEN:-0.0.0.0:23779}"
admin="${CYNC_MITM_ADMIN:-0.0.0.0:9400}"
run_as="${CYNC_MITM_RUN_AS-10001:10001}"

log() { echo "cync-mitm add-on: $*" >&2; }

# The whole file in one jq program: strings through @json (valid TOML basic strings), lists of
# strings likewise, booleans and numbers checked for their type. An option that is missing or
# null is left out (the proxy's default applies); one of the wrong type stops the add-on.
toml_from_options() {
  jq -r --arg listen "$listen" --arg admin "$admin" '
    def s($k): if .[$k] == null or .[$k] == "" then empty
      elif (.[$k] | type) == "string" then .[$k] | @json
      else error("option \($k) must be a string") end;
    def l($k): if .[$k] == null then empty
      elif (.[$k] | type) == "array" then "[" + (.[$k] | map(tostring | @json) | join(", ")) + "]"
      else error("option \($k) must be a list") end;
    def b($k): if .[$k] == null then empty
      elif (.[$k] | type) == "boolean" then .[$k] | tostring
      else error("option \($k) must be true or false") end;
    def n($k): if .[$k] == null then empty
      elif (.[$k] | type) == "number" and (.[$k] | isinfinite | not) and (.[$k] | isnan | not) then .[$k] | tostring
      else error("option \($k) must be a number") end;
    def kv($key; v): [v] | if length == 0 then empty else "\($key) = \(.[0])" end;
    if type != "object" then error("the options are not a JSON object") else . end
    | [
      "# Written by the add-on from its options at every start: change the options (or put",
      "# your own cync-mitm.toml in the add-on config folder), not this file.",
      "[listen]", "tls = \($listen | @json)",
      "[upstream]",
      (if (.upstream_addresses // []) == [] then empty else kv("addresses"; l("upstream_addresses")) end),
      kv("pin_sha256"; l("upstream_pin_sha256")),
      "[admin]", "listen = \($admin | @json)",
      kv("allowed_hosts"; l("admin_allowed_hosts")),
      "[log]", kv("filter"; s("log_level")),
      "[metrics]", kv("per_device_labels"; b("per_device_metrics")),
      "[routing]",
      kv("mode"; s("routing_mode")),
      kv("canary_percent"; n("canary_percent")),
      kv("seed"; s("routing_seed")),
      kv("cohort"; l("cohort")),
      kv("exclude"; l("exclude")),
      "[new_path]",
      kv("addresses"; l("new_path_addresses")),
      kv("verify"; b("new_path_verify")),
      "[capture]",
      kv("enabled"; b("capture")),
      kv("max_total_bytes"; n("capture_max_total_mb") | tonumber | floor * 1048576 | tostring)
    ] | .[]' "$options"
}

generate() {
  local out="$1"
  if [ ! -r "$options" ]; then
    log "no options file at $options"
    exit 64
  fi
  if ! toml_from_options >"$out.tmp"; then
    rm -f "$out.tmp"
    log "the add-on's options could not be turned into a configuration (above)"
    exit 64
  fi
  mv -f "$out.tmp" "$out"
}

# Runs the proxy binary as the user it serves as.
as_user=()
if [ -n "$run_as" ] && [ "$(id -u)" = 0 ]; then
  as_user=(setpriv "--reuid=${run_as%%:*}" "--regid=${run_as##*:}" --clear-groups
    --inh-caps=-all --bounding-set=-all --no-new-privs)
fi

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
if [ "${#as_user[@]}" -gt 0 ]; then
  chown -R "$run_as" "$data"
fi

# Checked as the user that will read it (a file only root can read fails here, not later).
if ! "${as_user[@]}" "$bin" config check "$config" >&2; then
  log "the configuration is invalid or unreadable (above)"
  exit 64
fi
if [ "$config" = "$user_config" ] \
  && "$bin" config show "$config" 2>/dev/null | awk '/^\[/{s=$0} s=="[admin]" && /^listen = "127\./{f=1} END{exit !f}'; then
  log "warning: admin.listen is on loopback in $config: the Supervisor's watchdog and the web UI cannot reach it (use \"0.0.0.0:9400\")"
fi

exec "${as_user[@]}" "$bin" run --config "$config"
