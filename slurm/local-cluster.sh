#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the `slurm` tests (CI runs it before `make test`).
# Needs root and Debian/Ubuntu packages (slurm-wlm, munge); installs them if missing. Idempotent: does nothing
# when a controller already answers. Exits non-zero, saying why, when it cannot start one.
set -euo pipefail
if command -v sinfo >/dev/null && sinfo -h >/dev/null 2>&1; then echo "slurm: a controller already answers"; exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "slurm: needs root to start a local cluster" >&2; exit 1; fi
if ! command -v slurmctld >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm >/dev/null; }
fi
host=$(hostname -s)
# The node as slurmd sees it (sockets, cores, threads), less 1 GiB of memory for the system.
node=$(slurmd -C | head -1 | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^RealMemory=/) $i = "RealMemory=" (substr($i, 12) - 1024); print}')
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmUser=root
ReturnToService=2
MpiDefault=none
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
  if sinfo -h -o %t 2>/dev/null | grep -qE 'idle|mix|alloc'; then sinfo; exit 0; fi
  sleep 1
done
echo "slurm: the controller did not come up (see /var/log/slurm/)" >&2
exit 1
