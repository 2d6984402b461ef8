#!/usr/bin/env bash
# A two-node Slurm cluster on this machine, for the `slurm` tests (CI runs it before `make test`).
#
#   slurm/local-cluster.sh        # install (Debian/Ubuntu slurm-wlm, munge) if missing, then start; idempotent
#   slurm/local-cluster.sh down   # stop the daemons this script started and remove their state
#
# Two nodes, sft-node1 and sft-node2, each a `slurmd -N <node>` of its own on a distinct loopback address
# (127.0.0.2, 127.0.0.3: /etc/hosts entries, so node names resolve as on a real cluster, where the rendezvous
# host is the allocation's first node name) and a distinct port. Debian's slurmd is not built with
# --enable-multiple-slurmd, but per-node ports, spool dirs, pid and log files (%n) let two run side by side.
# Both nodes advertise this machine's CPUs: jobs oversubscribe its cores, which is fine for tiny test jobs.
# Needs root. Exits non-zero, saying why, when it cannot start the cluster.
set -euo pipefail
NODES=(sft-node1 sft-node2)
ADDRS=(127.0.0.2 127.0.0.3)
PORTS=(6818 6819)
CONF=/etc/slurm/slurm.conf
MARK="# sft-launcher local cluster"

stop() {  # by pid file: only the daemons this configuration started
  for pidfile in /run/slurmd-*.pid /run/slurmd.pid /run/slurmctld.pid; do  # slurmd.pid: the older one-node setup
    [ -s "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$pidfile"
  done
}

if [ "${1:-up}" = down ]; then
  [ "$(id -u)" = 0 ] || { echo "slurm: needs root" >&2; exit 1; }
  stop
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd-sft-node*
  sed -i "/$MARK/d" /etc/hosts
  echo "slurm: local cluster stopped"
  exit 0
fi

up() { command -v sinfo >/dev/null && [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE 'idle|mix|alloc')" -ge 2 ]; }
if up; then echo "slurm: a two-node cluster already answers"; sinfo -N; exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "slurm: needs root to start a local cluster" >&2; exit 1; fi
if ! command -v slurmctld >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q slurm-wlm >/dev/null \
    || { apt-get update -q >/dev/null \
      && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q slurm-wlm >/dev/null; }
fi
stop  # a half-started or older (one-node) configuration of ours: start again from a clean state
host=$(hostname -s)
# This machine as slurmd sees it (sockets, cores, threads), less 1 GiB of memory for the system, per node.
hw=$(slurmd -C | head -1 | awk '{for (i = 2; i <= NF; i++) {
  if ($i ~ /^RealMemory=/) $i = "RealMemory=" (substr($i, 12) - 1024); printf "%s ", $i}}')
sed -i "/$MARK/d" /etc/hosts
mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm /run/munge
{
  cat <<CONF
$MARK
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
# A requeued job may start again after this many seconds (default 120: long for tests).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmUser=root
ReturnToService=2
MpiDefault=none
# Jobs are requeued by the batch script (scontrol requeue) after a preemption checkpoint.
JobRequeue=1
# A dead rank ends its step quickly (srun --kill-on-bad-exit), and leftover steps are killed soon after.
KillWait=10
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=/var/spool/slurmd-%n
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
CONF
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeAddr=${ADDRS[$i]} NodeHostname=$host Port=${PORTS[$i]} $hw State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=sft-node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
} > "$CONF"
for i in "${!NODES[@]}"; do
  echo "${ADDRS[$i]} ${NODES[$i]} $MARK" >> /etc/hosts
  mkdir -p "/var/spool/slurmd-${NODES[$i]}"
done
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
slurmctld -i  # -i: ignore state left by an earlier configuration
for node in "${NODES[@]}"; do slurmd -N "$node"; done
for _ in $(seq 60); do
  if up; then sinfo -N; exit 0; fi
  sleep 1
done
echo "slurm: the cluster did not come up (see /var/log/slurm/): $(sinfo -h -N -o '%N %t' 2>&1 | tr '\n' ' ')" >&2
exit 1
