#!/usr/bin/env bash
# Makes the local add-on folder Home Assistant builds: DEST/cync_mitm/ with the manifest, the
# Dockerfile, run.sh, the docs and source.tar.gz (the project's source from this checkout,
# what the image compiles). Copy that folder into the Home Assistant host's /addons share.
#
#   deploy/homeassistant/package.sh /tmp/addons     # then copy /tmp/addons/cync_mitm
set -euo pipefail

if [ "$#" -ne 1 ]; then
  echo "usage: $0 DEST" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$1/cync_mitm"

mkdir -p "$out"
for f in config.yaml build.yaml Dockerfile run.sh DOCS.md README.md; do
  cp "$here/$f" "$out/$f"
done
chmod 0755 "$out/run.sh"
# What the build stage needs (as deploy/docker/Dockerfile copies it): no tests, no target/.
tar -czf "$out/source.tar.gz" -C "$root" --owner=0 --group=0 --exclude='*.orig' \
  Cargo.toml Cargo.lock build.rs benches src
echo "add-on folder: $out ($(du -sh "$out" | cut -f1)); copy it into /addons on the Home Assistant host"
