#!/usr/bin/env bash
# Everything the container test needs, idempotent: Debian's docker.io and debootstrap (only when
# missing), a running Docker daemon (started only when none answers), and the base image built
# from Debian packages (cached by tag). Safe to run when all of it is already there.
set -euo pipefail
cd "$(dirname "$0")"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  log="${TMPDIR:-/tmp}/usersvc-dockerd.log"
  echo "starting dockerd (log: $log)"
  as_root sh -c "nohup dockerd >'$log' 2>&1 &"
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { tail -20 "$log"; echo "dockerd did not start" >&2; exit 1; }
fi

./build_base_image.sh "${USERSVC_TEST_BASE_IMAGE:-usersvc-test-base:bookworm}"
