#!/usr/bin/env bash
# Makes the local add-on folder Home Assistant builds: DEST/cync_mitm/ with the manifest, the
# Dockerfile, run.sh, the docs and source.tar.gz (what the image compiles: the checkout's
# files as they are now, with a COMMIT file naming the commit, "-dirty" when files differ
# from it). Copy that folder into the Home Assistant host's /addons share.
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
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT

mkdir -p "$out"
for f in config.yaml build.yaml Dockerfile run.sh DOCS.md README.md; do
  cp "$here/$f" "$out/$f"
done
chmod 0755 "$out/run.sh"
commit=unknown
if git -C "$root" rev-parse --short=12 HEAD >/dev/null 2>&1; then
  commit="$(git -C "$root" rev-parse --short=12 HEAD)"
  git -C "$root" diff --quiet HEAD -- Cargo.toml Cargo.lock build.rs benches src || commit="$commit-dirty"
fi
# What the build stage needs (as deploy/docker/Dockerfile copies it): no tests, no target/.
cp -R "$root/Cargo.toml" "$root/Cargo.lock" "$root/build.rs" "$root/benches" "$root/src" "$stage/"
echo "$commit" >"$stage/COMMIT"
(cd "$stage" && tar -czf "$out/source.tar.gz" COMMIT Cargo.toml Cargo.lock build.rs benches src)
echo "add-on folder: $out (commit $commit); copy it into /addons on the Home Assistant host"
