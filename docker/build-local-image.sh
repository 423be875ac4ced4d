#!/usr/bin/env bash
# Builds the drizzle:local image from local material only (no registry, no
# base image): the host's `drizzle` binary plus the shared libraries `ldd`
# lists, on a `FROM scratch` image. The result is what docker/Dockerfile
# builds, for machines that cannot pull base images.
#
#   docker/build-local-image.sh                 # release build, tag drizzle:local
#   DRIZZLE_BIN=target/debug/drizzle docker/build-local-image.sh   # reuse a build
#   DRIZZLE_IMAGE=name:tag docker/build-local-image.sh
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
image="${DRIZZLE_IMAGE:-drizzle:local}"
bin="${DRIZZLE_BIN:-}"
if [[ -z "$bin" ]]; then
  (cd "$root" && cargo build --release -p drizzle-server --bin drizzle)
  bin="$root/target/release/drizzle"
fi
[[ -x "$bin" ]] || { echo "no executable at $bin" >&2; exit 1; }

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/data" "$ctx/rootfs/tmp"
cp "$bin" "$ctx/rootfs/drizzle"
# The dynamic loader and every library the binary links, at their paths.
ldd "$bin" | awk '/=>/ { print $3 } !/=>/ && /^[ \t]*\// { print $1 }' | while read -r lib; do
  [[ -n "$lib" && -e "$lib" ]] || continue
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
EXPOSE 5433 7000 7100
VOLUME ["/data"]
ENTRYPOINT ["/drizzle"]
CMD ["server", "--listen", "0.0.0.0:5433", "--cluster-listen", "0.0.0.0:7000", "--data-dir", "/data"]
DOCKERFILE
docker build -q -t "$image" "$ctx" >/dev/null
echo "built $image from $bin"
