#!/usr/bin/env bash
# A single-node Slurm cluster on this machine: try the SLURM scripts on a laptop or workstation (CPU only)
# before a real cluster, and run the project's Slurm tests (.ci/run starts and stops it around pytest).
#
#   sudo sweeps/slurm/local_cluster.sh start    # installs Debian's Slurm + munge if missing, starts the daemons
#   sbatch ...; squeue; scontrol show job ID; sacct -c
#   sudo sweeps/slurm/local_cluster.sh stop     # stops the daemons this script started, removes its slurm.conf
#   sweeps/slurm/local_cluster.sh status
#
# Needs root (it writes /etc/slurm/slurm.conf and runs the daemons, as Debian's packages expect) and no systemd:
# munged runs as the munge user, slurmctld and slurmd are started directly. One node (127.0.0.1) with
# LOCAL_SLURM_CPUS CPUs (default: this machine's; more than the machine has lets jobs share cores) in partition
# "local"; no GPUs (GRES), no accounting database (sacct -c reads the job completion file). It refuses to touch
# an existing /etc/slurm/slurm.conf that it did not write (a real Slurm is configured here).
#   LOCAL_SLURM_DIR   state, spool and logs (default /tmp/recon-slurm); slurmctld.log / slurmd.log are there
#   LOCAL_SLURM_CPUS  CPUs the node offers (default: nproc)
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/recon-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by recon_lightning's sweeps/slurm/local_cluster.sh"
CPUS=${LOCAL_SLURM_CPUS:-$(nproc)}
# The node's name: this machine's (jobs use it as their address, e.g. Lightning's MASTER_ADDR), if it resolves.
NODE=$(hostname -s 2>/dev/null || true)
getent hosts "$NODE" >/dev/null 2>&1 || NODE=localhost
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

ours() { [ -f "$CONF" ] && head -n 1 "$CONF" | grep -qF "$MARK"; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sbatch munged; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]}: install Slurm (slurmctld slurmd slurm-client) and munge"
    echo "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

write_conf() {
    local mem_mb
    mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    mkdir -p /etc/slurm "$DIR/state" "$DIR/spool"
    cat > "$CONF" <<EOF
$MARK (state and logs in $DIR)
ClusterName=recon-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
EnforcePartLimits=ALL
ReturnToService=2
MpiDefault=none
SchedulerParameters=sched_interval=5
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is running already (a system service): use it, leave it running
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            cat /run/munge/munged.pid > "$DIR/munged.pid"  # ours: stop stops it
            return 0
        fi
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

start() {
    [ "$(id -u)" -eq 0 ] || die "start needs root (sudo $0 start)"
    if [ -f "$CONF" ] && ! ours; then
        die "$CONF exists and was not written by this script: a real Slurm is configured here; use it"
    fi
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && ours; then
        echo "local Slurm cluster already running (state in $DIR)"
        return 0
    fi
    install_packages
    stop_daemons
    rm -rf "$DIR/state" "$DIR/spool"
    mkdir -p "$DIR"
    write_conf
    start_munge
    slurmctld
    slurmd -N "$NODE"
    for _ in $(seq 100); do
        state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
        if [ "$state" = idle ]; then
            echo "local Slurm cluster up: node $NODE, $CPUS CPUs, partition local (state and logs in $DIR)"
            return 0
        fi
        sleep 0.2
    done
    echo "node state: ${state:-unknown}" >&2
    tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
    die "the cluster did not come up within 20 s"
}

stop_daemons() {
    local pidfile pid
    for name in slurmd slurmctld munged; do
        pidfile="$DIR/$name.pid"
        alive "$pidfile" || { rm -f "$pidfile"; continue; }
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

stop() {
    [ "$(id -u)" -eq 0 ] || die "stop needs root (sudo $0 stop)"
    if ours && alive "$DIR/slurmctld.pid"; then
        scancel --quiet --user="$(id -un)" 2>/dev/null || true  # jobs still running: their processes end too
        sleep 1
    fi
    stop_daemons
    if ours; then rm -f "$CONF"; fi
    echo "local Slurm cluster stopped"
}

status() {
    if ours && alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
        sinfo
        squeue
    else
        echo "local Slurm cluster not running"
        return 3
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
