#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (munged, slurmctld, slurmd), for the tests
# of `--executor slurm`. Installs Debian's slurm-wlm and munge when they are missing (needs
# root, or sudo). Idempotent: a second call finds the daemons running and only waits for the
# node. The node's CPUs and memory are this machine's. Exits 0 once `sinfo` shows the node idle.
#
#   bash scripts/slurm-cluster.sh          # start (or check) the cluster
#   bash scripts/slurm-cluster.sh stop     # stop the three daemons
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
NODE="$(hostname -s)"
CONF=/etc/slurm/slurm.conf

stop() {
  for daemon in slurmd slurmctld munged; do
    $SUDO pkill -x "$daemon" || true
  done
}

if [ "${1:-}" = "stop" ]; then stop; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "slurm-cluster: installing slurm-wlm and munge" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge: a key, its runtime folders, the daemon.
if [ ! -s /etc/munge/munge.key ]; then
  $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
$SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge
$SUDO chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
$SUDO chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  $SUDO runuser -u munge -- /usr/sbin/munged
fi

# slurm.conf for this host: its cores and (most of) its memory, no cgroups, no accounting.
CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
$SUDO mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
WANTED="$(cat <<CONF
# Written by normlab's scripts/slurm-cluster.sh: a single-node cluster on localhost.
ClusterName=normlab
SlurmctldHost=${NODE}(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
MaxArraySize=10001
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
)"
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$WANTED" ]; then
  echo "$WANTED" | $SUDO tee "$CONF" >/dev/null
  $SUDO pkill -x slurmd || true
  $SUDO pkill -x slurmctld || true
  sleep 1
fi
if ! pgrep -x slurmctld >/dev/null; then $SUDO /usr/sbin/slurmctld; fi
if ! pgrep -x slurmd >/dev/null; then $SUDO /usr/sbin/slurmd; fi

for _ in $(seq 1 60); do
  state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)"
  case "$state" in
    idle|mixed|allocated) echo "slurm-cluster: node $NODE is $state ($CPUS CPUs, ${MEM_MB} MB)"; exit 0 ;;
    down*|drain*) $SUDO scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
echo "slurm-cluster: the node did not become idle; see /var/log/slurm/*.log" >&2
sinfo >&2 || true
exit 1
