#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the fan-out tests (tests/test_cluster_fanout.py): Debian's munge,
# slurmctld and slurmd, localhost only, a minimal slurm.conf with this machine's CPUs and memory, a fresh munge key,
# and job accounting (slurmdbd on MariaDB, on a local socket): submitit learns how a job ended (cancelled, failed)
# from `sacct`, which needs it. As root; idempotent: a Slurm that already answers is left as it is.
# Exit status 0 once the node is idle and `sacct` answers.
#   bash .ci/slurm.sh          # install (apt-get, once), configure, start, wait until the node is up
#   bash .ci/slurm.sh --stop   # stop the daemons this script started
set -euo pipefail

conf_dir=/etc/slurm
node="$(hostname -s)"

stop() {
    for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
        pidfile="/run/cxrbench-$daemon.pid"
        if [[ -f "$pidfile" ]]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
}

up() {
    timeout 5 sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)' && timeout 5 sacct -n >/dev/null 2>&1
}

if [[ "${1:-}" == "--stop" ]]; then
    stop
    exit 0
fi

if command -v sinfo >/dev/null && up; then
    echo "slurm: already running ($(sinfo -h -o '%N %t %c CPUs'))"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v munged >/dev/null ||
    ! command -v mariadbd >/dev/null; then
    echo "slurm: installing Debian's slurm-wlm, slurmdbd, munge and mariadb-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm slurmdbd munge mariadb-server >/dev/null
fi

echo "slurm: munge key and daemon"
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! timeout 5 munge -n </dev/null >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    sleep 1
    pgrep -u munge -n munged >/run/cxrbench-munged.pid
fi

echo "slurm: accounting database (MariaDB, local socket only) and slurmdbd"
install -d -o mysql -g mysql -m 0755 /run/mysqld
if ! timeout 5 mariadb -e 'select 1' >/dev/null 2>&1; then
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >/dev/null
    mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock >/var/log/cxrbench-mariadb.log 2>&1 &
    echo $! >/run/cxrbench-mariadbd.pid
    for _ in $(seq 1 30); do
        timeout 5 mariadb -e 'select 1' >/dev/null 2>&1 && break
        sleep 1
    done
fi
db_password="$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost'; ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$db_password';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
install -d -m 0755 "$conf_dir" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat >"$conf_dir/slurmdbd.conf" <<CONF
# Written by cxrbench's .ci/slurm.sh: accounting for the one-node Slurm, in this machine's MariaDB.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$db_password
CONF
chmod 0600 "$conf_dir/slurmdbd.conf"
pkill -F /run/slurmdbd.pid 2>/dev/null || true
sleep 1
slurmdbd
for _ in $(seq 1 30); do
    [[ -s /run/slurmdbd.pid ]] && timeout 5 sacctmgr -n list cluster >/dev/null 2>&1 && break
    sleep 1
done
cp /run/slurmdbd.pid /run/cxrbench-slurmdbd.pid

echo "slurm: slurm.conf for $node ($(nproc) CPUs)"
memory_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10))
cat >"$conf_dir/slurm.conf" <<CONF
# Written by cxrbench's .ci/slurm.sh: one node, this machine, localhost only.
ClusterName=cxrbench
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MaxArraySize=1001
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
timeout 10 sacctmgr -i add cluster cxrbench >/dev/null 2>&1 || true # slurmctld registers it too; harmless

echo "slurm: starting slurmctld and slurmd"
pkill -F /run/slurmctld.pid 2>/dev/null || true
pkill -F /run/slurmd.pid 2>/dev/null || true
sleep 1
slurmctld -i
slurmd
for daemon in slurmctld slurmd; do
    for _ in $(seq 1 30); do
        [[ -s "/run/$daemon.pid" ]] && break
        sleep 0.5
    done
    cp "/run/$daemon.pid" "/run/cxrbench-$daemon.pid"
done

for _ in $(seq 1 30); do
    if up; then
        echo "slurm: up ($(sinfo -h -o '%N %t %c CPUs %m MB'), accounting by slurmdbd)"
        exit 0
    fi
    sleep 1
done
echo "slurm: the node did not come up ($(sinfo -h -o %t 2>&1 || true)); logs in /var/log/slurm/" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log /var/log/slurm/slurmdbd.log >&2 || true
exit 1
