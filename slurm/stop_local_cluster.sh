#!/usr/bin/env bash
# Stop the one-machine SLURM cluster that slurm/start_local_cluster.sh started: cancel its jobs, then
# stop the slurmd's, slurmctld, slurmdbd, MariaDB and (if that script started it) munged, each by the
# pid it wrote. A no-op when nothing runs.
#
#   slurm/stop_local_cluster.sh           # stop; state, accounting and logs stay in LOCAL_SLURM_DIR
#   slurm/stop_local_cluster.sh --purge   # also delete LOCAL_SLURM_DIR, /etc/slurm/{slurm,slurmdbd}.conf
#                                         # (only if that script wrote them) and the /etc/hosts line
# Packages stay installed.
set -euo pipefail

if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "stop_local_cluster: needs root" >&2; exit 1; }
    exec sudo --preserve-env=LOCAL_SLURM_DIR "$0" "$@"
fi
purge=0
case "${1:-}" in
    "") ;;
    --purge) purge=1 ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac

DIR=${LOCAL_SLURM_DIR:-/tmp/lowrank-slurm}
MARK="# written by lowrank-dist slurm/start_local_cluster.sh"
export PATH=$PATH:/usr/sbin:/sbin

# Stop together the processes in these "pidfile:program" pairs that are alive and are that program:
# TERM, then KILL whatever is left after 20 s.
stop() {
    local pair pid pids=()
    for pair in "$@"; do
        pid=$(cat "${pair%%:*}" 2>/dev/null) || continue
        [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "${pair#*:}" ]] || continue
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid") && stopped+=("${pair#*:}")
    done
    local left
    for _ in $(seq 100); do
        left=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
        ((left)) || return 0
        sleep 0.2
    done
    for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop_local_cluster: $(cat "/proc/$pid/comm" 2>/dev/null) ($pid) ignored SIGTERM for 20 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

stopped=()
if timeout 5 scontrol ping 2>/dev/null | grep -q UP; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 25); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
    fi
fi
nodes=()
for pidfile in "$DIR"/run/slurmd-*.pid; do nodes+=("$pidfile:slurmd"); done
stop "${nodes[@]}"
stop "$DIR/run/slurmctld.pid:slurmctld"   # before slurmdbd, so it can hand over its last job records
stop "$DIR/run/slurmdbd.pid:slurmdbd"
if [[ -e $DIR/run/munged.ours ]]; then
    stop "$DIR/mysql/mariadb.pid:mariadbd" /run/munge/munged.pid:munged
    rm -f "$DIR/run/munged.ours"
else
    stop "$DIR/mysql/mariadb.pid:mariadbd"
fi

if ((purge)); then
    rm -rf "$DIR"
    for f in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf; do
        if [[ -f $f ]] && grep -qF "$MARK" "$f"; then rm -f "$f"; fi
    done
    if [[ -f /etc/slurm/slurm.conf.before-lowrank && ! -e /etc/slurm/slurm.conf ]]; then
        mv /etc/slurm/slurm.conf.before-lowrank /etc/slurm/slurm.conf
    fi
    # /etc/hosts may be a bind mount (containers): rewrite it in place, not by renaming a new file.
    if grep -q '# lowrank-dist local SLURM nodes' /etc/hosts; then
        hosts=$(grep -v '# lowrank-dist local SLURM nodes' /etc/hosts)
        printf '%s\n' "$hosts" >/etc/hosts
    fi
    echo "local SLURM cluster stopped and purged ($DIR, its /etc/slurm files and /etc/hosts line removed)"
elif ((${#stopped[@]})); then
    echo "local SLURM cluster stopped (${stopped[*]}); state and logs kept in $DIR (--purge deletes them)"
else
    echo "local SLURM cluster is not running"
fi
