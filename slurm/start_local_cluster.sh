#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for the tests and for trying the launcher on a laptop:
# munged, a MariaDB, slurmdbd (accounting, so `sacct` and submitit's job.result() work), slurmctld
# and two emulated compute nodes n1, n2 (two `slurmd -N` on this host, each with all its cores).
#
#   slurm/start_local_cluster.sh      # installs what is missing (apt-get), starts what is not running
#   slurm/stop_local_cluster.sh       # stops it; --purge also deletes its state, logs and config
#
# Idempotent: run it again and it starts only what is down (a no-op when all is up). Needs root
# (it re-runs itself under sudo): it installs packages, writes /etc/slurm/slurm.conf and
# /etc/slurm/slurmdbd.conf, and adds one "127.0.0.1 n1 n2" line to /etc/hosts. Writing /etc/slurm is
# deliberate: every shell's sbatch/srun/squeue/sacct/scontrol then finds the cluster without
# SLURM_CONF — meant for throwaway machines (CI, a container, a laptop that is not a cluster login
# node). An /etc/slurm/slurm.conf this script did not write is kept as slurm.conf.before-lowrank.
#
# Everything else (daemon state, the database, pid files, logs) lives in LOCAL_SLURM_DIR
# (default /tmp/lowrank-slurm): logs in $LOCAL_SLURM_DIR/log. Requeues are fast on purpose
# (cred_expire=10, a 2 s scheduler interval): a requeued job runs again ~12 s later, not ~3 min.
set -euo pipefail

if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "start_local_cluster: needs root (apt-get, /etc/slurm, daemons)" >&2; exit 1; }
    exec sudo --preserve-env=LOCAL_SLURM_DIR,LOCAL_SLURM_DB_PORT,LOCAL_SLURM_TIMEOUT "$0" "$@"
fi

DIR=${LOCAL_SLURM_DIR:-/tmp/lowrank-slurm}
DB_PORT=${LOCAL_SLURM_DB_PORT:-13306}   # MariaDB on 127.0.0.1 only; not 3306, to stay clear of a system one
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}      # seconds to wait for each daemon
CLUSTER=lowrank
NODES=(n1 n2)
NODE_PORTS=(17001 17002)
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
DB_PASS=lowrank-local-only              # a local throwaway database reachable from 127.0.0.1 only
MARK="# written by lowrank-dist slurm/start_local_cluster.sh"
HOST=$(hostname -s)
CPUS=$(nproc)
export PATH=$PATH:/usr/sbin:/sbin
started=$SECONDS

log() { echo "start_local_cluster: $*" >&2; }

# Run "$@" until it succeeds, at most TIMEOUT seconds; then fail with the tail of the daemon's log.
wait_for() {
    local what=$1 logfile=$2; shift 2
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "$what is not ready after ${TIMEOUT}s; last lines of $logfile:"
            tail -n 25 "$logfile" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.3
    done
}

# Whether the process in pid file $1 is alive and is the program $2.
alive() { local pid; pid=$(cat "$1" 2>/dev/null) && [[ -n $pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]]; }

munge_ok() { munge -n | unmunge; }
db_ok() { mariadb-admin --no-defaults --socket="$DIR/mysql/mysqld.sock" -uroot ping; }
dbd_ok() { sacctmgr -n show cluster format=cluster; }
ctld_ok() { scontrol ping | grep -q UP; }
sacct_ok() { sacct -n -X -S now-1minute -o jobid; }
# Both nodes responding (no "*" suffix) and not down/drained; busy nodes count as up.
nodes_ok() {
    local states
    states=$(sinfo -h -N -n "$(IFS=,; echo "${NODES[*]}")" -o '%N %T' 2>/dev/null) || return 1
    [[ $(grep -cE ' (idle|mixed|allocated|completing)$' <<<"$states") -eq ${#NODES[@]} ]]
}
all_up() {
    alive /run/munge/munged.pid munged && alive "$DIR/mysql/mariadb.pid" mariadbd \
        && alive "$DIR/run/slurmdbd.pid" slurmdbd && alive "$DIR/run/slurmctld.pid" slurmctld \
        && alive "$DIR/run/slurmd-n1.pid" slurmd && alive "$DIR/run/slurmd-n2.pid" slurmd \
        && nodes_ok && sacct_ok >/dev/null 2>&1
}

summary() {
    echo "local SLURM cluster '$CLUSTER' up on $HOST: slurmctld + slurmd ${NODES[*]} (${CPUS} CPUs each, partition debug)" \
         "+ slurmdbd/MariaDB:$DB_PORT + munged; config $CONF; logs $DIR/log ($((SECONDS - started)) s)"
}

# The configuration this script wants (compared below with what is installed).
new_conf=$(cat <<EOF
$MARK; delete with slurm/stop_local_cluster.sh --purge
# Two emulated nodes on one host; state and logs in $DIR.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only after its credential expired: 10 s instead of 120 s.
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state/slurmctld
SlurmdSpoolDir=$DIR/state/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups on this machine: track processes by their parent, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
MinJobAge=300
InactiveLimit=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${NODE_PORTS[0]}-${NODE_PORTS[1]} CPUs=$CPUS RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
)
new_dbd_conf=$(cat <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
)
# Already up with this configuration: nothing to do.
if [[ "$(cat "$CONF" 2>/dev/null)" == "$new_conf" && "$(cat "$DBD_CONF" 2>/dev/null)" == "$new_dbd_conf" ]] \
        && all_up 2>/dev/null; then
    summary
    exit 0
fi

mkdir -p "$DIR"/{log,run,state}
chmod 755 "$DIR" "$DIR"/{log,run,state}

# --- packages ------------------------------------------------------------------------------------
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client slurmdbd:slurmdbd munged:munge mariadbd:mariadb-server; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if ((${#need[@]})); then
    log "installing ${need[*]} (apt-get; log $DIR/log/apt.log)"
    export DEBIAN_FRONTEND=noninteractive
    # No init system here: keep the packages' scripts from starting daemons; we start them below.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        our_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    install=(apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 "${need[@]}")
    if ! "${install[@]}" >"$DIR/log/apt.log" 2>&1; then
        apt-get update -q >>"$DIR/log/apt.log" 2>&1 && "${install[@]}" >>"$DIR/log/apt.log" 2>&1 \
            || { log "apt-get failed; last lines of $DIR/log/apt.log:"; tail -n 25 "$DIR/log/apt.log" >&2; exit 1; }
    fi
    if [[ -n ${our_policy:-} ]]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
fi
id slurm >/dev/null 2>&1 || { log "the slurm packages did not create the 'slurm' user"; exit 1; }

# --- names: n1, n2 (and this host) resolve to 127.0.0.1, else torch's rendezvous on n1 hangs -----
if ! grep -q '# lowrank-dist local SLURM nodes' /etc/hosts; then
    extra=""
    getent hosts "$HOST" >/dev/null || extra=" $HOST"
    echo "127.0.0.1 ${NODES[*]}$extra  # lowrank-dist local SLURM nodes" >>/etc/hosts
fi

# --- configuration -------------------------------------------------------------------------------
mkdir -p /etc/slurm "$DIR/state/slurmctld"
chown slurm:slurm "$DIR/state/slurmctld" "$DIR/run"
chmod 700 "$DIR/state/slurmctld"
for f in slurmctld slurmdbd; do touch "$DIR/log/$f.log"; chown slurm:slurm "$DIR/log/$f.log"; done

if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    log "keeping the existing $CONF as $CONF.before-lowrank"
    mv "$CONF" "$CONF.before-lowrank"
fi
changed=0
if [[ "$(cat "$CONF" 2>/dev/null)" != "$new_conf" ]]; then echo "$new_conf" >"$CONF"; chmod 644 "$CONF"; changed=1; fi
if [[ "$(cat "$DBD_CONF" 2>/dev/null)" != "$new_dbd_conf" ]]; then echo "$new_dbd_conf" >"$DBD_CONF"; changed=1; fi
chown slurm:slurm "$DBD_CONF"
chmod 600 "$DBD_CONF"   # slurmdbd refuses a config others can read (it holds the DB password)
if ((changed)); then     # daemons running with an older config: restart them with this one
    for pidfile in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/run/slurmdbd.pid"; do
        pid=$(cat "$pidfile" 2>/dev/null) || continue
        if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == slurm* ]]; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        fi
    done
fi

# --- munge: the key, then munged as user munge ---------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
if ! munge_ok >/dev/null 2>&1; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged --force
    touch "$DIR/run/munged.ours"   # stop_local_cluster.sh stops munged only if we started it
    wait_for munged /var/log/munge/munged.log munge_ok
fi

# --- MariaDB for slurmdbd: its own data dir and socket under $DIR, TCP on 127.0.0.1:$DB_PORT -----
MYDIR=$DIR/mysql
if [[ ! -d $MYDIR/mysql ]]; then
    mkdir -p "$MYDIR"
    chown mysql:mysql "$MYDIR"
    mariadb-install-db --no-defaults --user=mysql --datadir="$MYDIR" --skip-test-db \
        >"$DIR/log/mariadb-install.log" 2>&1 \
        || { log "mariadb-install-db failed:"; tail -n 25 "$DIR/log/mariadb-install.log" >&2; exit 1; }
fi
if ! db_ok >/dev/null 2>&1; then
    touch "$DIR/log/mariadb.log"
    chown mysql:mysql "$DIR/log/mariadb.log"
    setsid mariadbd --no-defaults --user=mysql --datadir="$MYDIR" --socket="$MYDIR/mysqld.sock" \
        --pid-file="$MYDIR/mariadb.pid" --log-error="$DIR/log/mariadb.log" --bind-address=127.0.0.1 \
        --port="$DB_PORT" --innodb-lock-wait-timeout=900 \
        </dev/null >>"$DIR/log/mariadb.log" 2>&1 &
    wait_for MariaDB "$DIR/log/mariadb.log" db_ok
fi
# slurmdbd connects over TCP from 127.0.0.1, which MariaDB may see as 'localhost' or '127.0.0.1'.
mariadb --no-defaults --socket="$MYDIR/mysqld.sock" -uroot <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

# --- slurmdbd, the cluster's accounting record, slurmctld, the two nodes -------------------------
if ! alive "$DIR/run/slurmdbd.pid" slurmdbd; then
    slurmdbd
    wait_for slurmdbd "$DIR/log/slurmdbd.log" dbd_ok
fi
if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
if ! alive "$DIR/run/slurmctld.pid" slurmctld; then
    slurmctld
    wait_for slurmctld "$DIR/log/slurmctld.log" ctld_ok
fi
for node in "${NODES[@]}"; do
    if ! alive "$DIR/run/slurmd-$node.pid" slurmd; then
        mkdir -p "$DIR/state/slurmd-$node"
        slurmd -N "$node"
    fi
done
wait_for "nodes ${NODES[*]}" "$DIR/log/slurmd-n1.log" nodes_ok
wait_for sacct "$DIR/log/slurmdbd.log" sacct_ok
summary
