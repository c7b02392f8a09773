#!/usr/bin/env bash
# Builds the nines container image with no registry: FROM scratch around a
# nines binary built by cargo, plus the shared libraries it loads.
#
#   bash deploy/build-image.sh [BINARY] [TAG]
#
# BINARY defaults to target/release/nines (which cargo builds, or rebuilds
# if the source changed), TAG to nines:local.
set -euo pipefail
cd "$(dirname "$0")/.."
binary="${1:-target/release/nines}"
tag="${2:-nines:local}"
if [[ $# -eq 0 ]]; then
  cargo build --release --bin nines
fi
if [[ ! -x "$binary" ]]; then
  echo "build-image.sh: $binary is not an executable" >&2
  exit 1
fi
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/local/bin" "$root/tmp" "$root/etc/nines" "$ctx/data" "$ctx/certs"
chmod 1777 "$root/tmp"
# The image gets the binary without its debug information (most of its
# size); that stays beside the build as BINARY.debug, which gdb and perf
# find through the debug link.
objcopy --only-keep-debug "$binary" "$binary.debug"
objcopy --strip-debug --add-gnu-debuglink="$binary.debug" "$binary" "$root/usr/local/bin/nines"
# The dynamic loader and every library the binary links, at their own paths.
ldd "$binary" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
echo 'nines:x:65532:65532:nines:/data:/usr/local/bin/nines' > "$root/etc/passwd"
echo 'nines:x:65532:' > "$root/etc/group"
cp deploy/Dockerfile.scratch "$ctx/Dockerfile"
docker build -q -t "$tag" "$ctx"
echo "built $tag"
