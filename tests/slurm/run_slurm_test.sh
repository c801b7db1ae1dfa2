#!/usr/bin/env bash
# End-to-end test of workflow/profiles/slurm on a throw-away single-node SLURM cluster (`make test-slurm`).
#
# 1. Installs Debian's slurm-wlm + munge when missing (apt-get; service starts are blocked).
# 2. Starts, as root and bound to 127.0.0.1, one munged with a freshly generated key, one slurmctld and
#    one slurmd. Every file (slurm.conf, gres.conf, key, socket, state, spool, logs) lies in a temp dir;
#    clients find it through SLURM_CONF. No accounting storage (so `sacct` does not work); finished jobs
#    stay in slurmctld (MinJobAge) for the whole test, so the plugin polls with `squeue` and the checks
#    can read every job's record with squeue/scontrol at the end. The node has this machine's CPUs and
#    memory (`slurmd -C`) and its NVIDIA GPUs, or, without any, one placeholder GPU (File=/dev/null) so
#    that the GPU request path is exercised.
# 3. Smoke step (~1 min): a 3-rule Snakefile run through the profile: a `threads: workflow.cores` rule
#    with gpu=0 (must get max-threads CPUs and no GPU), a gpu=1 rule (must get a GPU), a gpu=0 rule.
# 4. Demo step: the `make demo` workflow (config.yaml) run through the profile in a temp work directory,
#    then the demo's metric floors (tests/test_demo.py) checked on its results. tests/slurm/config.yaml
#    is a tiny variant for a quick look (BESTIE_SLURM_CONFIG=tests/slurm/config.yaml).
# After each run the script checks SLURM's own records: every job Snakemake planned was submitted to
# slurmctld (its log), ran in the profile's partition, exited 0, left its SLURM log, GPU requests match
# the rules' `gpu` resource, and the final outputs exist and are non-empty.
# On exit it cancels the jobs, stops the daemons it started by their process ids and checks with pgrep
# that none is left.
#
# Environment (all optional):
#   BESTIE_SLURM_STEPS       steps to run, default "smoke demo"
#   BESTIE_SLURM_TIMEOUT     seconds allowed for the demo run, default 3600 (smoke: 300)
#   BESTIE_SLURM_KEEP=1      keep the temp dir (it is always kept when a step fails)
#   BESTIE_SLURM_CONFIG      workflow config of the demo step, default config.yaml (the `make demo` run;
#                            its finished results then go through the demo floor tests, tests/test_demo.py)
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV_BIN="$REPO/.venv/bin"
PROFILE="$REPO/workflow/profiles/slurm"
STEPS="${BESTIE_SLURM_STEPS:-smoke demo}"
DEMO_TIMEOUT="${BESTIE_SLURM_TIMEOUT:-3600}"
SMOKE_TIMEOUT=300
DEMO_CONFIG="${BESTIE_SLURM_CONFIG:-$REPO/config.yaml}"
PARTITION=bestie_test          # the profile's BESTIE_SLURM_PARTITION; deliberately not the default one
DAEMONS="munged slurmctld slurmd slurmstepd"

log() { printf '[slurm-test %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() {
    log "FAIL: $*"
    exit 1
}

# --------------------------------------------------------------------------------------------- checks
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo > /dev/null && sudo -n true 2> /dev/null; then
        exec sudo -n -E bash "${BASH_SOURCE[0]}" "$@"
    fi
    die "must run as root (installs packages, runs slurmd as root); sudo without password is not available"
fi
[ -x "$VENV_BIN/snakemake" ] || die "$VENV_BIN/snakemake not found: run \`make venv\` first"
"$VENV_BIN/python" -c "import snakemake_executor_plugin_slurm" 2> /dev/null ||
    die "snakemake-executor-plugin-slurm is not installed in .venv (pip install -e '.[slurm]')"
[ -f "$PROFILE/config.yaml" ] || die "profile $PROFILE/config.yaml not found"

# ------------------------------------------------------------------------------------------- install
install_packages() {
    local needed="slurmctld slurmd sbatch squeue scontrol sinfo scancel srun munged munge unmunge"
    local missing="" exe
    for exe in $needed; do
        command -v "$exe" > /dev/null || missing="$missing $exe"
    done
    if [ -z "$missing" ]; then
        log "slurm-wlm and munge already installed ($(slurmctld -V), $(munged -V 2>&1 | head -1))"
        return
    fi
    command -v apt-get > /dev/null || die "missing$missing and no apt-get: install slurm-wlm and munge (Debian bookworm)"
    log "installing slurm-wlm munge (missing:$missing)"
    # Keep the packages' maintainer scripts from starting system-wide daemons (invoke-rc.d honours this).
    local guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        guard=/usr/sbin/policy-rc.d
    fi
    local rc=0
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurm-wlm munge > "$INSTALL_LOG" 2>&1 ||
        { apt-get update -q >> "$INSTALL_LOG" 2>&1 &&
            apt-get install -y -q --no-install-recommends slurm-wlm munge >> "$INSTALL_LOG" 2>&1; } || rc=$?
    [ -n "$guard" ] && rm -f "$guard"
    if [ "$rc" -ne 0 ]; then
        tail -20 "$INSTALL_LOG"
        die "apt-get install slurm-wlm munge failed (rc=$rc); full log: $INSTALL_LOG"
    fi
    log "installed $(slurmctld -V)"
}

# ------------------------------------------------------------------------------------------- helpers
free_port() {
    "$VENV_BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every 0.5 s
wait_for() {
    local limit=$1 what=$2
    shift 2
    local end=$((SECONDS + limit))
    until "$@" > /dev/null 2>&1; do
        [ $SECONDS -lt $end ] || return 1
        sleep 0.5
    done
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2> /dev/null; }

stop_pid() { # stop_pid NAME PID: SIGTERM, then SIGKILL after 20 s
    local name=$1 pid=${2:-}
    alive "$pid" || return 0
    kill -TERM "$pid" 2> /dev/null || true
    local end=$((SECONDS + 20))
    while alive "$pid" && [ $SECONDS -lt $end ]; do sleep 0.2; done
    if alive "$pid"; then
        log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2> /dev/null || true
    fi
    wait "$pid" 2> /dev/null || true
}

daemon_pids() { # pids of the daemon names, one per line (sorted)
    local name
    for name in $DAEMONS; do pgrep -x "$name" || true; done | sort
}

show_logs() {
    local f
    for f in "$TMP"/log/*.log; do
        [ -s "$f" ] || continue
        echo "----- tail of $f"
        tail -n 25 "$f"
    done
}

MUNGE_PID="" CTLD_PID="" SLURMD_PID="" TMP="" BASELINE="" FAILED_STEP=""
cleanup() {
    local rc=$?
    set +eE
    trap - EXIT INT TERM ERR
    if [ -n "$CTLD_PID" ] && alive "$CTLD_PID"; then
        local jobs
        jobs=$(squeue -h -o %i --states=PENDING,RUNNING,SUSPENDED,COMPLETING 2> /dev/null)
        if [ -n "$jobs" ]; then
            log "cancelling jobs still queued: $(echo $jobs)"
            scancel $jobs 2> /dev/null
            wait_for 30 "jobs to end" sh -c '[ -z "$(squeue -h -o %i --states=PENDING,RUNNING,SUSPENDED,COMPLETING)" ]'
        fi
    fi
    [ "$rc" -ne 0 ] && [ -n "$TMP" ] && [ -d "$TMP/log" ] && show_logs
    stop_pid slurmd "$SLURMD_PID"
    stop_pid slurmctld "$CTLD_PID"
    stop_pid munged "$MUNGE_PID"
    # slurmstepd / slurmscriptd are children of our daemons: anything new since the start is a leftover
    local left
    left=$(comm -13 <(echo "$BASELINE") <(daemon_pids) | grep -v '^$' || true)
    if [ -n "$left" ]; then
        log "FAIL: daemons left running after the test:"
        ps -o pid,ppid,etime,args -p $left
        log "stopping them (pids $(echo $left))"
        kill -KILL $left 2> /dev/null
        rc=1
    else
        log "no munged/slurmctld/slurmd/slurmstepd left running (pgrep)"
    fi
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        if [ "$rc" -ne 0 ] || [ "${BESTIE_SLURM_KEEP:-0}" = 1 ]; then
            log "kept $TMP (config, logs, work directories)"
        else
            rm -rf "$TMP"
        fi
    fi
    if [ "$rc" -eq 0 ]; then log "PASS"; else log "FAILED${FAILED_STEP:+ in step $FAILED_STEP} (rc=$rc)"; fi
    exit "$rc"
}

# ------------------------------------------------------------------------------------------ cluster
start_cluster() {
    TMP=$(mktemp -d /tmp/bestie-slurm.XXXXXX)
    chmod 755 "$TMP" # munged insists that everyone may traverse the directories of its socket
    mkdir -p "$TMP"/{etc,state,spool,log,run,munge,bin,key}
    chmod 700 "$TMP/key"

    local node cpus boards sockets cores threads mem hw
    node=$(hostname -s)
    hw=$(slurmd -C | head -1)
    field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<< "$hw"; }
    cpus=$(field CPUs) boards=$(field Boards) sockets=$(field SocketsPerBoard)
    cores=$(field CoresPerSocket) threads=$(field ThreadsPerCore) mem=$(field RealMemory)
    [ -n "$cpus" ] && [ -n "$mem" ] || die "could not read CPUs/RealMemory from \`slurmd -C\`: $hw"
    NODE_CPUS=$cpus NODE_MEM=$mem

    # GPUs: the machine's NVIDIA devices, else one placeholder so that --gpus requests can be scheduled.
    local gpu_files
    gpu_files=$(compgen -G '/dev/nvidia[0-9]*' | sort -V | paste -sd, || true)
    if [ -n "$gpu_files" ]; then
        NODE_GPUS=$(tr ',' '\n' <<< "$gpu_files" | wc -l) GPU_KIND="real ($gpu_files)"
    else
        gpu_files=/dev/null NODE_GPUS=1 GPU_KIND="placeholder (File=/dev/null, no device)"
    fi

    # munge: generated key, private socket
    if command -v mungekey > /dev/null; then
        mungekey --create --keyfile="$TMP/key/munge.key" > /dev/null 2>&1
    else
        dd if=/dev/urandom of="$TMP/key/munge.key" bs=1 count=1024 status=none
    fi
    chmod 400 "$TMP/key/munge.key"
    local sock="$TMP/munge/munge.socket"
    munged --foreground --key-file="$TMP/key/munge.key" --socket="$sock" --pid-file="$TMP/run/munged.pid" \
        --seed-file="$TMP/munge/munged.seed" --log-file="$TMP/log/munged.log" \
        > "$TMP/log/munged.log" 2>&1 &
    MUNGE_PID=$!
    wait_for 20 munge sh -c "munge -n -S '$sock' | unmunge -S '$sock'" ||
        die "munged (pid $MUNGE_PID) did not answer on $sock: $(tail -3 "$TMP/log/munged.log")"

    local ctld_port slurmd_port
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done
    export SLURM_CONF="$TMP/etc/slurm.conf"
    cat > "$SLURM_CONF" << EOF
# written by tests/slurm/run_slurm_test.sh: single node, loopback only, no accounting
ClusterName=bestietest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
StateSaveLocation=$TMP/state
SlurmdSpoolDir=$TMP/spool
SlurmctldPidFile=$TMP/run/slurmctld.pid
SlurmdPidFile=$TMP/run/slurmd.pid
SlurmctldLogFile=$TMP/log/slurmctld.log
SlurmdLogFile=$TMP/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=$((DEMO_TIMEOUT + SMOKE_TIMEOUT + 600))
KillWait=5
GresTypes=gpu
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node CPUs=$cpus Boards=${boards:-1} SocketsPerBoard=${sockets:-1} CoresPerSocket=${cores:-$cpus} ThreadsPerCore=${threads:-1} RealMemory=$mem Gres=gpu:$NODE_GPUS State=UNKNOWN
PartitionName=default_part Nodes=$node Default=YES MaxTime=INFINITE State=UP
PartitionName=$PARTITION Nodes=$node Default=NO MaxTime=INFINITE State=UP
EOF
    echo "NodeName=$node Name=gpu File=$gpu_files" > "$TMP/etc/gres.conf"

    slurmctld -D -f "$SLURM_CONF" > "$TMP/log/slurmctld.stderr" 2>&1 &
    CTLD_PID=$!
    wait_for 30 slurmctld scontrol ping ||
        die "slurmctld (pid $CTLD_PID) does not answer \`scontrol ping\`: $(tail -5 "$TMP/log/slurmctld.stderr")"
    slurmd -D -f "$SLURM_CONF" -N "$node" > "$TMP/log/slurmd.stderr" 2>&1 &
    SLURMD_PID=$!
    if ! wait_for 60 "node idle" sh -c "sinfo -h -n '$node' -p '$PARTITION' -o %T | grep -qx idle"; then
        sinfo -R
        die "node $node did not become idle: $(sinfo -h -n "$node" -o '%T %E')"
    fi
    # Nested `srun` in each job (snakemake-executor-plugin-slurm-jobstep) runs with every SLURM_* variable
    # but the job id removed, SLURM_CONF included, so it would look for /etc/slurm/slurm.conf. A cluster
    # has its config there (or runs configless); this private cluster gives srun its config by a shim
    # that the jobs find first on PATH (sbatch --export=ALL). It still runs the real srun.
    printf '#!/bin/sh\nSLURM_CONF=%s exec %s "$@"\n' "$SLURM_CONF" "$(command -v srun)" > "$TMP/bin/srun"
    chmod 755 "$TMP/bin/srun"
    log "cluster up: $(sinfo -V), node $node CPUs=$cpus RealMemory=${mem}MB GPUs=$NODE_GPUS $GPU_KIND," \
        "partitions default_part (default) + $PARTITION, ports $ctld_port/$slurmd_port, SLURM_CONF=$SLURM_CONF"
}

# ---------------------------------------------------------------------------------------- run + verify
# run_workflow NAME WORKDIR TIMEOUT SNAKEMAKE-ARGS...: dry run (the plan), then the real run through the
# profile; then verify_run.
run_workflow() {
    local name=$1 workdir=$2 limit=$3
    shift 3
    FAILED_STEP=$name
    local common=(--profile "$PROFILE" --directory "$workdir" "$@")
    local plan="$TMP/log/$name.plan.txt" runlog="$TMP/log/$name.snakemake.log"

    # The plan: every job of the DAG (the dry run prints "rule X:" for each, local or not).
    if ! "$VENV_BIN/snakemake" "${common[@]}" --dry-run > "$plan" 2>&1; then
        tail -30 "$plan"
        die "$name: dry run failed (see $plan)"
    fi
    local planned planned_rules
    planned=$(grep -c '^rule [A-Za-z0-9_]*:$' "$plan" || true)
    planned_rules=$(sed -n 's/^rule \([A-Za-z0-9_]*\):$/\1/p' "$plan" | sort | uniq -c | awk '{printf "%s%s x%s", s, $2, $1; s=", "}')
    [ "$planned" -gt 0 ] || die "$name: the dry run plans no job (see $plan)"
    log "$name: plan has $planned jobs: $planned_rules"
    expected_gpus "$name"

    local ctld_lines
    ctld_lines=$(wc -l < "$TMP/log/slurmctld.log")
    local t0=$SECONDS rc=0
    log "$name: snakemake ${common[*]}"
    timeout --kill-after=30 "$limit" "$VENV_BIN/snakemake" "${common[@]}" \
        --slurm-init-seconds-before-status-checks 2 > "$runlog" 2>&1 || rc=$?
    local took=$((SECONDS - t0))
    if [ "$rc" -ne 0 ]; then
        tail -40 "$runlog"
        case $rc in 124 | 137) die "$name: snakemake did not finish within ${limit}s (log: $runlog)" ;; esac
        die "$name: snakemake exited with $rc after ${took}s (log: $runlog)"
    fi
    log "$name: snakemake finished in ${took}s"
    verify_run "$name" "$workdir" "$runlog" "$planned" "$ctld_lines"
    RUN_SECONDS=$took
}

# verify_run NAME WORKDIR RUNLOG PLANNED CTLD_LOG_OFFSET
verify_run() {
    local name=$1 workdir=$2 runlog=$3 planned=$4 offset=$5
    local uuid sm_ids ctld_ids q_ids id
    uuid=$(sed -n 's/.*SLURM run ID: \([0-9a-zA-Z_-]*\).*/\1/p' "$runlog" | head -1)
    [ -n "$uuid" ] || die "$name: no 'SLURM run ID' in $runlog: the run did not use the slurm executor"
    grep -q "steps (100%) done" "$runlog" || die "$name: the run log has no 'steps (100%) done' line"
    # ids Snakemake says it submitted
    sm_ids=$(sed -n 's/.*has been submitted with SLURM jobid \([0-9]*\).*/\1/p' "$runlog" | sort -n)
    # ids slurmctld accepted during this run (its own log)
    ctld_ids=$(tail -n +"$((offset + 1))" "$TMP/log/slurmctld.log" |
        sed -n 's/.*_slurm_rpc_submit_batch_job: JobId=\([0-9]*\).*/\1/p' | sort -n)
    # ids slurmctld still lists under the run's job name, with state (MinJobAge outlasts the test)
    q_ids=$(squeue -h --states=all --name "$uuid" -o '%i' | sort -n)
    # jobs the run executed: "rule X:" through the executor (SLURM), "localrule X:" in this process; a
    # local job is allowed only for a rule without a command (like `all`), which does nothing
    local executed remote local_cmd n_sm n_ctld
    executed=$(awk '/^(local)?rule [A-Za-z0-9_]+:$/ {kind = $1; rule = substr($2, 1, length($2) - 1)}
                    /^Shell command: / && kind != "" {print kind, rule, ($3 == "None" && NF == 3) ? "nocmd" : "cmd"; kind = ""}' "$runlog")
    remote=$(grep -c '^rule ' <<< "$executed" || true)
    local_cmd=$(grep '^localrule .* cmd$' <<< "$executed" | awk '{print $2}' | paste -sd, || true)
    [ -z "$local_cmd" ] || die "$name: jobs with a command ran outside SLURM (local rules): $local_cmd"
    [ "$(grep -c . <<< "$executed" || true)" -eq "$planned" ] ||
        die "$name: the run executed $(grep -c . <<< "$executed" || true) jobs, the plan had $planned"
    n_sm=$(grep -c . <<< "$sm_ids" || true)
    n_ctld=$(grep -c . <<< "$ctld_ids" || true)
    [ "$n_sm" -eq "$remote" ] || die "$name: Snakemake submitted $n_sm jobs to SLURM for $remote non-local jobs"
    [ "$sm_ids" = "$ctld_ids" ] ||
        die "$name: job ids submitted by Snakemake ($(echo $sm_ids)) differ from slurmctld's log ($(echo $ctld_ids))"
    [ "$sm_ids" = "$q_ids" ] ||
        die "$name: squeue --name $uuid lists $(echo $q_ids), Snakemake submitted $(echo $sm_ids)"
    local bad="" gpu_jobs=0 line jid state part tres exit_ok
    for jid in $sm_ids; do
        line=$(scontrol show job -o "$jid")
        echo "$line" >> "$TMP/log/$name.jobs.txt"
        state=$(sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' <<< "$line")
        part=$(sed -n 's/.* Partition=\([^ ]*\).*/\1/p' <<< "$line")
        # the GPU request as slurmctld recorded it: TresPerJob=gres:gpu:N (--gpus) or TresPerNode (--gres)
        tres=$(grep -o 'TresPer\(Job\|Node\)=[^ ]*' <<< "$line" | paste -sd' ' || true)
        grep -q "_job_complete: JobId=$jid WEXITSTATUS 0" "$TMP/log/slurmctld.log" && exit_ok=yes || exit_ok=no
        [ "$state" = COMPLETED ] || bad="$bad $jid:state=$state"
        [ "$exit_ok" = yes ] || bad="$bad $jid:nonzero-exit"
        [ "$part" = "$PARTITION" ] || bad="$bad $jid:partition=$part"
        compgen -G "$workdir/.snakemake/slurm_logs/*/$jid.log" > /dev/null ||
            compgen -G "$workdir/.snakemake/slurm_logs/*/*/$jid.log" > /dev/null || bad="$bad $jid:no-slurm-log"
        # the GPU request of the job must be the rule's gpu resource (none for gpu=0)
        local rule want got
        rule=$(sed -n 's/.* Comment=rule_\([^ ]*\).*/\1/p' <<< "$line")
        rule=${rule%%_wildcards_*}
        want=$(awk -v r="$rule" '$1 == r {print $2}' "$TMP/log/$name.gpus.txt" | head -1)
        got=$(grep -o 'gpu\(:[A-Za-z0-9_.]*\)\{0,1\}:[0-9]*' <<< "$tres" | head -1 | sed 's/.*://' || true)
        got=${got:-0}
        [ "${want:-?}" = "$got" ] || bad="$bad $jid:rule=$rule:gpus=$got,expected=${want:-unknown}"
        [ "$got" -gt 0 ] && gpu_jobs=$((gpu_jobs + 1))
    done
    [ -z "$bad" ] || die "$name: jobs failing the checks:$bad"
    log "$name: OK: $planned planned jobs ran; $n_sm submitted (snakemake) = $n_ctld accepted (slurmctld log)" \
        "= all jobs with a command; $((planned - remote)) command-less local job(s) (rule all);" \
        "all COMPLETED with exit 0 in partition $PARTITION, SLURM logs kept; $gpu_jobs job(s) got GPUs, as their rules asked"
}

# expected_gpus NAME: "rule gpus" per rule, from the resources lines of the dry run's plan
expected_gpus() {
    local name=$1
    awk '/^rule [A-Za-z0-9_]*:$/ {r = substr($2, 1, length($2) - 1)}
         /^ *resources:/ && r != "" {g = 0; if (match($0, /gpu=[0-9]+/)) g = substr($0, RSTART + 4, RLENGTH - 4);
                                     print r, g; r = ""}' "$TMP/log/$name.plan.txt" | sort -u > "$TMP/log/$name.gpus.txt"
}

check_outputs() { # check_outputs NAME FILE...: each exists and is non-empty
    local name=$1 f missing=""
    shift
    for f in "$@"; do [ -s "$f" ] || missing="$missing $f"; done
    [ -z "$missing" ] || die "$name: final outputs missing or empty:$missing"
    log "$name: final outputs present and non-empty: $*"
}

# ------------------------------------------------------------------------------------------- steps
smoke_step() {
    local wd="$TMP/smoke"
    mkdir -p "$wd"
    cat > "$wd/Snakefile" << 'EOF'
# 3-rule smoke workflow: one job per rule, CPU threads from the profile, one GPU job.
rule all:
    input:
        "out/summary.txt",


rule cpu_step:
    output:
        "out/cpu.txt",
    threads: workflow.cores
    resources:
        gpu=0,
        mem_mb=200,
        runtime=5,
    shell:
        'echo "job=$SLURM_JOB_ID threads={threads} cuda=${{CUDA_VISIBLE_DEVICES-unset}}" > {output}'


rule gpu_step:
    input:
        "out/cpu.txt",
    output:
        "out/gpu.txt",
    resources:
        gpu=1,
        mem_mb=200,
        runtime=5,
    shell:
        'echo "job=$SLURM_JOB_ID cuda=${{CUDA_VISIBLE_DEVICES-unset}}" > {output}'


rule summary:
    input:
        "out/cpu.txt",
        "out/gpu.txt",
    output:
        "out/summary.txt",
    resources:
        gpu=0,
        mem_mb=200,
        runtime=5,
    shell:
        "cat {input} > {output}"
EOF
    run_workflow smoke "$wd" "$SMOKE_TIMEOUT" --snakefile "$wd/Snakefile"
    check_outputs smoke "$wd/out/summary.txt"
    # the jobs' own view: threads = max-threads from the profile, GPU visible only to the gpu=1 job
    grep -q "threads=$NODE_CPUS " "$wd/out/cpu.txt" || die "smoke: cpu_step ran with $(cat "$wd/out/cpu.txt"), expected threads=$NODE_CPUS"
    grep -q "cuda=unset" "$wd/out/cpu.txt" || die "smoke: the gpu=0 job saw a GPU: $(cat "$wd/out/cpu.txt")"
    if grep -q "cuda=unset" "$wd/out/gpu.txt"; then die "smoke: the gpu=1 job got no GPU: $(cat "$wd/out/gpu.txt")"; fi
    # each command ran inside the SLURM job Snakemake submitted for it
    local jid
    for jid in $(sed -n 's/^job=\([0-9]*\) .*/\1/p' "$wd/out/summary.txt"); do
        grep -q "has been submitted with SLURM jobid $jid " "$TMP/log/smoke.snakemake.log" ||
            die "smoke: a command ran in SLURM job $jid, which this run did not submit"
    done
    log "smoke: jobs report: $(tr '\n' ';' < "$wd/out/summary.txt")"
    SMOKE_SECONDS=$RUN_SECONDS
}

demo_step() {
    [ -f "$REPO/Snakefile" ] || die "demo: $REPO/Snakefile not found"
    [ -f "$DEMO_CONFIG" ] || die "demo: config $DEMO_CONFIG not found"
    local wd="$TMP/demo"
    mkdir -p "$wd"
    # --resources mem_mb caps every job's memory request at the node's memory (rules ask up to 16 GB)
    local args=(--snakefile "$REPO/Snakefile" --configfile "$DEMO_CONFIG" --resources "mem_mb=$NODE_MEM")
    run_workflow demo "$wd" "$DEMO_TIMEOUT" "${args[@]}"
    local run
    run=$("$VENV_BIN/python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["run"])' "$DEMO_CONFIG")
    check_outputs demo "$wd/results/$run/report.html" "$wd/results/$run/metrics.json"
    "$VENV_BIN/python" -c 'import json, sys; d = json.load(open(sys.argv[1])); assert isinstance(d, dict) and d, "empty"' \
        "$wd/results/$run/metrics.json" || die "demo: results/$run/metrics.json is not a non-empty JSON object"
    DEMO_SECONDS=$RUN_SECONDS
    if [ "$run" = demo ]; then # the real demo: its metrics must clear the floors of tests/test_demo.py
        BESTIE_DEMO_RESULTS="$wd/results/$run" "$VENV_BIN/python" -m pytest -q -m demo -p no:cacheprovider \
            "$REPO/tests/test_demo.py" || die "demo: the demo floor tests failed on $wd/results/$run"
        log "demo: floor tests passed on the SLURM run's results"
    fi
}

# ---------------------------------------------------------------------------------------------- main
INSTALL_LOG=$(mktemp /tmp/bestie-slurm-apt.XXXXXX.log)
T_START=$SECONDS
install_packages
rm -f "$INSTALL_LOG"
BASELINE=$(daemon_pids)
[ -z "$BASELINE" ] || log "note: already running before the test (left alone): pids $(echo $BASELINE)"
trap cleanup EXIT
# unexpected failures: name the command (only in the main shell, not in $(...) subshells)
trap '[ "$BASHPID" = "$$" ] && log "FAIL: command failed (line $LINENO): $BASH_COMMAND" >&2' ERR
trap 'exit 130' INT TERM
start_cluster
# the profile reads these; jobs get PATH (shim + .venv/bin, so `python -m bestie` is the venv's) via --export=ALL
export BESTIE_SLURM_PARTITION=$PARTITION BESTIE_SLURM_MAX_THREADS=$NODE_CPUS
export PATH="$TMP/bin:$VENV_BIN:$PATH"
SMOKE_SECONDS=- DEMO_SECONDS=-
for step in $STEPS; do
    case $step in
        smoke) smoke_step ;;
        demo) demo_step ;;
        *) die "unknown step '$step' in BESTIE_SLURM_STEPS (smoke, demo)" ;;
    esac
done
FAILED_STEP=""
log "timings: smoke run ${SMOKE_SECONDS}s, demo run ${DEMO_SECONDS}s, total $((SECONDS - T_START))s"
