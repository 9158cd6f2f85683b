#!/bin/bash
# A one-node, CPU-only SLURM on this machine (Debian's slurm-wlm), for trying the job scripts end to end.
# Run as root: bash scripts/slurm/local_cluster.sh [CPUS]   (installs slurm-wlm + munge if absent, starts
# munged, slurmctld, slurmd; one partition "debug" on this host). No systemd needed; CI does not use this.
set -euo pipefail
CPUS=${1:-$(nproc)}
HOST=$(hostname -s)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)  # half the RAM: the node is shared
if ! command -v slurmctld >/dev/null; then
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge
fi
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
JobRequeue=1
KillWait=30
MinJobAge=3600
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
# FORCE:2: two jobs may share the CPUs, so two jobs run at once (the check that they pick different ports)
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
CONF
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown munge:munge /etc/munge/munge.key /run/munge && chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- munged
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
scontrol reconfigure  # daemons started by an earlier run read the file written above
for _ in $(seq 30); do  # the node registers within a few seconds
    sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc' && break
    sleep 1
done
sinfo
