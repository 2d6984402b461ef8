#!/usr/bin/env bash
# A Docker daemon and a local base image for the `docker` tests (tests/test_docker.py runs this; so can you).
#
# Uses a daemon that already answers; otherwise, as root with apt, installs Debian's docker.io (and debootstrap)
# when missing and starts dockerd with a data root that persists between runs (SFT_DOCKER_DATA_ROOT, default
# /var/lib/sft-docker), so the base image and the build cache survive. No registry is needed: the base image is
# a debootstrap (minbase) of this host's release from the mirror apt uses, imported once and reused by its tag.
#
# Prints KEY=VALUE lines: DOCKER (the client), DOCKERD_PID (the daemon started here, for the caller to stop;
# empty if one was already running), BASE_IMAGE. Exit 3: Docker cannot run here (the reason on stderr);
# other non-zero: something failed that should not have.
set -euo pipefail
data_root=${SFT_DOCKER_DATA_ROOT:-/var/lib/sft-docker}
log=${SFT_DOCKERD_LOG:-/var/log/sft-dockerd.log}
pidfile=/run/sft-dockerd.pid
cannot() {
  echo "docker: $*" >&2
  exit 3
}
client() { if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker || true; fi; }
answers() { [ -n "$(client)" ] && "$(client)" info >/dev/null 2>&1; }
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "$@" >/dev/null ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "$@" >/dev/null; }
}
apt_mirror() {
  # shellcheck disable=SC2016 # $(SITE) and $(RELEASE) are apt's placeholders, not the shell's
  apt-get indextargets --format '$(SITE) $(RELEASE)' | awk -v s="$suite" '$2 == s { print $1; exit }'
}

pid=
rootfs=
# On failure, stop the daemon started here (the caller never learns its pid); always drop the debootstrap tree.
cleanup() {
  local code=$?
  if [ "$code" != 0 ] && [ -n "$started" ] && [ -s "$pidfile" ]; then kill "$(cat "$pidfile")" || true; fi
  if [ -n "$rootfs" ]; then rm -rf "$rootfs" "$rootfs.log"; fi
}
started=
trap cleanup EXIT
if ! answers; then
  [ "$(id -u)" = 0 ] || cannot "no daemon answers, and starting one needs root"
  command -v apt-get >/dev/null || cannot "no daemon answers, and installing one needs apt-get (Debian/Ubuntu)"
  command -v dockerd >/dev/null || apt_install docker.io
  mkdir -p "$data_root" "$(dirname "$log")"
  rm -f "$pidfile" # a stale one: no daemon answers
  # setsid: the daemon outlives this script; the caller stops it by its pid.
  setsid dockerd --data-root "$data_root" --pidfile "$pidfile" >>"$log" 2>&1 </dev/null &
  started=1
  for _ in $(seq 60); do
    answers && break
    kill -0 $! 2>/dev/null || [ -s "$pidfile" ] || cannot "dockerd exited at start: $(tail -3 "$log" | tr '\n' ' ')"
    sleep 1
  done
  if ! answers; then
    cannot "dockerd did not answer within 60 s (see $log): $(tail -3 "$log" | tr '\n' ' ')"
  fi
  pid=$(cat "$pidfile")
fi
docker=$(client)

# shellcheck source=/dev/null
. /etc/os-release
suite=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
base=sft-test-base:$suite
if ! "$docker" image inspect "$base" >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || cannot "no image $base, and debootstrap needs root"
  command -v debootstrap >/dev/null || apt_install debootstrap
  # The mirror apt is configured with for this release (not -updates, -security or a third-party repo); apt
  # knows it once its lists are downloaded.
  mirror=$(apt_mirror)
  if [ -z "$mirror" ]; then
    apt-get update -q >/dev/null
    mirror=$(apt_mirror)
  fi
  rootfs=$(mktemp -d /var/tmp/sft-rootfs.XXXXXX)
  debootstrap --variant=minbase "$suite" "$rootfs" "${mirror:-http://deb.debian.org/debian}" >"$rootfs.log" 2>&1 ||
    { tail -5 "$rootfs.log" >&2; exit 1; }
  tar -C "$rootfs" -c . | "$docker" import - "$base" >/dev/null
fi
echo "DOCKER=$docker"
echo "DOCKERD_PID=$pid"
echo "BASE_IMAGE=$base"
