#!/usr/bin/env bash
# Local Kafka + PostgreSQL for minichat, without Docker.
#
#   scripts/stack.sh up          start (or reuse) both services; prints the export lines on stdout
#   scripts/stack.sh down        stop both, keep data           (down --purge / MINICHAT_STACK_PURGE=1: delete data too)
#   scripts/stack.sh status      human-readable state; exit 0 when both run, 3 otherwise
#   scripts/stack.sh env         print the export lines without starting anything
#   scripts/stack.sh stop-kafka | stop-pg        stop one service, keep its data (`up` starts it again)
#   scripts/stack.sh restart-kafka | restart-pg  stop one service and start it again (same data, ports)
#   scripts/stack.sh up-kafka    start (or reuse) the broker only; prints its export lines
#
# Three-broker mode (MINICHAT_STACK_KAFKA_BROKERS=3, for every command above): three KRaft nodes,
# each broker + controller (a controller quorum of 3), replication factor 3 by default,
# min.insync.replicas=2, no unclean leader election, the offsets and transaction state topics at
# factor 3. Node N (1-3) has node.id N, broker port PORT+N-1 and controller port CPORT+N-1 (ports
# default to 9192 and 9292 in this mode); the export line names all three. For fault tests:
#   scripts/stack.sh kill-broker N    SIGKILL node N (kill -9; its data stays)
#   scripts/stack.sh start-broker N   start node N again and wait until it is ready
#   scripts/stack.sh stop-broker N    stop node N gracefully
#   scripts/stack.sh brokers          one line per node: N, node id, port, pid (or -), running|stopped,
#                                     and the clock offset it was started with (0: none)
# A skewed clock on one node (clock-skew tests): MINICHAT_STACK_KAFKA_NODE<N>_FAKETIME=OFFSET when
# node N starts (up, up-kafka, start-broker N) runs its JVM under libfaketime (LD_PRELOAD, Debian
# package libfaketime, installed with apt when missing) with FAKETIME=OFFSET, e.g. +2s, +0.05s,
# -0.05s (seconds with a fraction; libfaketime reads "+50ms" as 50 minutes), and
# FAKETIME_DONT_FAKE_MONOTONIC=1 and FAKETIME_FORCE_MONOTONIC_FIX=0 (the JVM's monotonic clock and
# its timed waits stay true: without them its timed waits return at once and it spins). The
# node's wall clock - and so the LogAppendTime of every record it appends as a partition's leader -
# is then off by OFFSET; restart it without the variable to end the skew.
# (a partition's leader is a node id in the cluster's metadata: tests/cluster.py reads it).
# Use its own state dir; a state dir keeps the broker count it was formatted with. The secure mode
# is for the single broker only.
#
# Secure mode (MINICHAT_STACK_KAFKA_SECURE=1, for every command above): the broker's only client
# listener is SASL_SSL (SCRAM-SHA-512; a throwaway CA and broker certificate made with openssl and
# keytool in <state dir>/kafka/secure), the StandardAuthorizer denies what no ACL allows, and the
# users admin (super user), gateway and minichat get the ACLs of docs/security.md. The export lines
# then carry the protocol, mechanism, CA file and minichat's user and password file; the gateway's
# and admin's password files lie next to it (MINICHAT_STACK_KAFKA_SECURE_DIR). Use its own state
# dir: a state dir keeps the mode it was formatted in.
#
# Kafka: one KRaft broker+controller (or three) from Maven Central jars (tools/kafka/pom.xml).
# PostgreSQL: a throwaway cluster (fsync off) from the distribution's binaries, run as user postgres.
# Only stdout carries the export lines; every progress or log line goes to stderr, so
#   eval "$(scripts/stack.sh up)"
# is the intended use.
#
# Environment (all optional):
#   MINICHAT_STACK_DIR                     state dir (default <repo>/.stack)
#   MINICHAT_STACK_KAFKA_LIBS              Kafka jar cache dir (default <state dir>/kafka/libs); point a
#                                          second stack at an existing cache to skip the Maven download
#   MINICHAT_STACK_KAFKA_PORT              broker port (9092)
#   MINICHAT_STACK_KAFKA_CONTROLLER_PORT   KRaft controller port (9093)
#   MINICHAT_STACK_PG_PORT                 PostgreSQL port (5432)
#   MINICHAT_STACK_TIMEOUT                 seconds to wait for each readiness / shutdown (90)
#   MINICHAT_STACK_KAFKA_VERSION           Kafka version to resolve (default: kafka.version in tools/kafka/pom.xml)
#   MINICHAT_STACK_KAFKA_JVM_OPTS          extra JVM options for the broker (word-split)
#   MINICHAT_STACK_MVN_ARGS                extra Maven arguments (word-split), e.g. -Dmaven.repo.local=/tmp/m2
#   MINICHAT_STACK_PG_BIN                  PostgreSQL bin dir (default: newest /usr/lib/postgresql/*/bin)
#   MINICHAT_STACK_PURGE=1                 make `down` behave like `down --purge`
#   MINICHAT_STACK_KAFKA_SECURE=1          secure mode (above)
#   MINICHAT_STACK_KAFKA_BROKERS           1 (default) or 3: three-broker mode (above)
#   MINICHAT_STACK_KAFKA_HEAP              each broker's JVM heap (512m with one broker, 384m with three)
#   MINICHAT_STACK_KAFKA_TOPIC_PREFIX      secure mode: topic prefix the ACLs cover (minichat.)
#   MINICHAT_STACK_KAFKA_GROUP_ID          secure mode: minichat's consumer group (prefix) the ACLs cover (minichat)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
POM="$REPO/tools/kafka/pom.xml"
STACK_DIR=${MINICHAT_STACK_DIR:-$REPO/.stack}
KAFKA_BROKERS=${MINICHAT_STACK_KAFKA_BROKERS:-1}
if [[ $KAFKA_BROKERS == 3 ]]; then
    KAFKA_PORT=${MINICHAT_STACK_KAFKA_PORT:-9192}
    KAFKA_CPORT=${MINICHAT_STACK_KAFKA_CONTROLLER_PORT:-9292}
    KAFKA_HEAP=${MINICHAT_STACK_KAFKA_HEAP:-384m}
else
    KAFKA_PORT=${MINICHAT_STACK_KAFKA_PORT:-9092}
    KAFKA_CPORT=${MINICHAT_STACK_KAFKA_CONTROLLER_PORT:-9093}
    KAFKA_HEAP=${MINICHAT_STACK_KAFKA_HEAP:-512m}
fi
PG_PORT=${MINICHAT_STACK_PG_PORT:-5432}
TIMEOUT=${MINICHAT_STACK_TIMEOUT:-90}
READY_LINE="Kafka Server started"
PG_USER=minichat # the admin login: owns the schema (db migrate, db grant-reader), creates databases
PG_PASSWORD=minichat
PG_DB=minichat
PG_RUNTIME_USER=minichat_worker # the worker's own login: owns nothing (scripts/pg-logins.sql)
PG_RUNTIME_PASSWORD=minichat_worker

# Seconds since $1 (an $EPOCHREALTIME value), one decimal.
elapsed() {
    local now=${EPOCHREALTIME/[.,]/} start=${1/[.,]/}
    local ds=$(((now - start) / 100000))
    printf '%d.%d\n' $((ds / 10)) $((ds % 10))
}

log() { printf '[stack] %s\n' "$*" >&2; }
die() {
    printf '[stack] error: %s\n' "$*" >&2
    exit 1
}

for _v in KAFKA_PORT KAFKA_CPORT PG_PORT TIMEOUT; do
    [[ ${!_v} =~ ^[0-9]+$ ]] || die "$_v must be a number, got '${!_v}'"
done
[[ $KAFKA_BROKERS == 1 || $KAFKA_BROKERS == 3 ]] || die "MINICHAT_STACK_KAFKA_BROKERS must be 1 or 3, got '$KAFKA_BROKERS'"
[[ $KAFKA_HEAP =~ ^[0-9]+[mMgG]$ ]] || die "MINICHAT_STACK_KAFKA_HEAP must look like 512m, got '$KAFKA_HEAP'"
# broker ports PORT..PORT+n-1 and controller ports CPORT..CPORT+n-1 must not overlap
((KAFKA_PORT + KAFKA_BROKERS <= KAFKA_CPORT || KAFKA_CPORT + KAFKA_BROKERS <= KAFKA_PORT)) ||
    die "Kafka broker ports ($KAFKA_PORT+) and controller ports ($KAFKA_CPORT+) overlap"

[[ $STACK_DIR == /* ]] || STACK_DIR="$PWD/$STACK_DIR" # absolute: mvn and postgres need it; created by up/down
KAFKA_DIR="$STACK_DIR/kafka"
KAFKA_LIBS=${MINICHAT_STACK_KAFKA_LIBS:-$KAFKA_DIR/libs}
[[ $KAFKA_LIBS == /* ]] || KAFKA_LIBS="$PWD/$KAFKA_LIBS"
KAFKA_LOG4J="$KAFKA_DIR/log4j2.properties"
KAFKA_MODE_FILE="$KAFKA_DIR/brokers" # the broker count the state dir was formatted with
KAFKA_SECURE=${MINICHAT_STACK_KAFKA_SECURE:-0}
[[ $KAFKA_SECURE != 1 || $KAFKA_BROKERS == 1 ]] || die "the secure mode runs one broker only (MINICHAT_STACK_KAFKA_BROKERS=1)"
KAFKA_SECURE_DIR="$KAFKA_DIR/secure"
KAFKA_SECURE_USERS="admin gateway minichat" # SCRAM users of secure mode
KAFKA_ACL_PREFIX=${MINICHAT_STACK_KAFKA_TOPIC_PREFIX:-minichat.}
KAFKA_ACL_GROUP=${MINICHAT_STACK_KAFKA_GROUP_ID:-minichat}

# Selects Kafka node $1 (1-based): NODE, NODE_DIR, its files and its ports. With one broker the
# node's files are the state dir's kafka/ itself.
kafka_node() {
    NODE=$1
    if [[ $KAFKA_BROKERS == 1 ]]; then NODE_DIR=$KAFKA_DIR; else NODE_DIR="$KAFKA_DIR/node$1"; fi
    KAFKA_PIDFILE="$NODE_DIR/kafka.pid"
    KAFKA_OUT="$NODE_DIR/server.out"
    KAFKA_PROPS="$NODE_DIR/server.properties"
    NODE_PORT=$((KAFKA_PORT + $1 - 1))
    NODE_CPORT=$((KAFKA_CPORT + $1 - 1))
}
kafka_node 1

kafka_nodes() { seq 1 "$KAFKA_BROKERS"; }

# Selects the node named by the argument of kill-broker / start-broker / stop-broker.
node_arg() {
    [[ ${1:-} =~ ^[0-9]+$ ]] && (($1 >= 1 && $1 <= KAFKA_BROKERS)) ||
        die "name a node from 1 to $KAFKA_BROKERS (MINICHAT_STACK_KAFKA_BROKERS=$KAFKA_BROKERS), got '${1:-}'"
    kafka_node "$1"
}

# ------------------------------------------------------------------------------------------ helpers

print_env() {
    print_kafka_env
    printf 'export MINICHAT_ADMIN_DATABASE_URL=postgresql://%s:%s@127.0.0.1:%s/%s\n' \
        "$PG_USER" "$PG_PASSWORD" "$PG_PORT" "$PG_DB"
    printf 'export MINICHAT_DATABASE_URL=postgresql://%s:%s@127.0.0.1:%s/%s\n' \
        "$PG_RUNTIME_USER" "$PG_RUNTIME_PASSWORD" "$PG_PORT" "$PG_DB"
}

print_kafka_env() {
    local n servers=""
    for n in $(kafka_nodes); do servers+=",127.0.0.1:$((KAFKA_PORT + n - 1))"; done
    printf 'export MINICHAT_KAFKA_BOOTSTRAP_SERVERS=%s\n' "${servers#,}"
    if [[ $KAFKA_SECURE == 1 ]]; then kafka_secure_env; fi
}

# True when process $1 still runs. A zombie (exited, not reaped yet: where PID 1 does not reap
# orphans) does not count, but a JVM whose main thread has exited while other threads still shut
# down shows as a zombie leader with live threads, and that does count.
alive() {
    local state="" threads=1
    kill -0 "$1" 2>/dev/null || return 1
    if [[ -r "/proc/$1/status" ]]; then
        state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null || true)
        threads=$(sed -n 's/^Threads:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$1/status" 2>/dev/null || true)
    fi
    [[ $state != Z || ${threads:-1} -gt 1 ]]
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    # shellcheck disable=SC2016  # $1 is expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

APT_UPDATED=0
apt_install() {
    [[ $EUID -eq 0 ]] || die "missing $*; install it (as root: apt-get install -y $*) and retry"
    command -v apt-get >/dev/null || die "missing $* and no apt-get on this machine"
    export DEBIAN_FRONTEND=noninteractive
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        apt-get update -q >&2
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    apt-get install -y -q --no-install-recommends "$@" >&2
}

ensure_java() { command -v java >/dev/null || apt_install openjdk-17-jre-headless; }

# The multithreaded libfaketime (for a JVM), installed when missing; its path on stdout.
faketime_lib() {
    local lib
    for lib in /usr/lib/*/faketime/libfaketimeMT.so.1 /usr/lib/faketime/libfaketimeMT.so.1; do
        if [[ -f $lib ]]; then
            echo "$lib"
            return 0
        fi
    done
    apt_install libfaketime
    for lib in /usr/lib/*/faketime/libfaketimeMT.so.1 /usr/lib/faketime/libfaketimeMT.so.1; do
        if [[ -f $lib ]]; then
            echo "$lib"
            return 0
        fi
    done
    die "libfaketime installed, but no libfaketimeMT.so.1 found"
}

# The selected node's clock offset (MINICHAT_STACK_KAFKA_NODE<N>_FAKETIME), empty for none.
kafka_node_faketime() {
    local name="MINICHAT_STACK_KAFKA_NODE${NODE}_FAKETIME"
    local offset=${!name:-}
    [[ -z $offset || $offset =~ ^[+-][0-9]+([.][0-9]+)?[smhdy]?$ ]] ||
        die "$name must be an offset like +2s or -0.05s, got '$offset'"
    echo "$offset"
}
ensure_mvn() { command -v mvn >/dev/null || apt_install maven; }

# ------------------------------------------------------------------------------------------ Kafka

kafka_version() {
    if [[ -n ${MINICHAT_STACK_KAFKA_VERSION:-} ]]; then
        printf '%s\n' "$MINICHAT_STACK_KAFKA_VERSION"
    else
        sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n 1
    fi
}

# Prints the broker's pid when the pid file names a live broker of THIS state dir.
kafka_pid() {
    local pid cmd
    [[ -s $KAFKA_PIDFILE ]] || return 1
    pid=$(<"$KAFKA_PIDFILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    alive "$pid" || return 1
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmd == *kafka.Kafka* && $cmd == *"$KAFKA_PROPS"* ]] || return 1
    printf '%s\n' "$pid"
}

# Fills $KAFKA_LIBS with the broker's runtime classpath, only when it is empty or out of date.
ensure_kafka_libs() {
    local version want tmp mvn_extra=()
    version=$(kafka_version)
    [[ -n $version ]] || die "cannot read kafka.version from $POM"
    want="kafka=$version pom=$(sha256sum "$POM" | cut -c1-16)"
    if [[ -f "$KAFKA_LIBS/kafka_2.13-$version.jar" && "$(cat "$KAFKA_LIBS/.stamp" 2>/dev/null)" == "$want" ]]; then
        return 0
    fi
    ensure_mvn
    read -r -a mvn_extra <<<"${MINICHAT_STACK_MVN_ARGS:-}"
    log "resolving Kafka $version jars from Maven Central into $KAFKA_LIBS (first run: ~30 s)"
    tmp="$KAFKA_DIR/libs.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp" "$(dirname "$KAFKA_LIBS")"
    # Debian's Maven 3.8.7 prints stray colour resets even with -q -B: keep its output in a log.
    if ! mvn -q -B -f "$POM" "-Dkafka.version=$version" "${mvn_extra[@]}" dependency:copy-dependencies \
        "-DoutputDirectory=$tmp" -DincludeScope=runtime >"$KAFKA_DIR/mvn.log" 2>&1 </dev/null; then
        sed 's/\x1b\[[0-9;]*m//g' "$KAFKA_DIR/mvn.log" >&2
        rm -rf "$tmp"
        die "mvn could not resolve the Kafka jars (output above, also in $KAFKA_DIR/mvn.log)"
    fi
    [[ -f "$tmp/kafka_2.13-$version.jar" ]] || {
        rm -rf "$tmp"
        die "mvn ran but kafka_2.13-$version.jar is missing"
    }
    rm -rf "$KAFKA_LIBS"
    mv "$tmp" "$KAFKA_LIBS"
    printf '%s\n' "$want" >"$KAFKA_LIBS/.stamp"
    log "jar cache ready: $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars"
}

# The replication settings of the mode: factor 1 with one broker; factor 3, two in sync and no
# unclean leader election with three.
kafka_replication_config() {
    local rf=1 isr=1 n voters=""
    if [[ $KAFKA_BROKERS == 3 ]]; then rf=3 isr=2; fi
    for n in $(kafka_nodes); do voters+=",$n@127.0.0.1:$((KAFKA_CPORT + n - 1))"; done
    cat <<EOF
controller.quorum.voters=${voters#,}
offsets.topic.replication.factor=$rf
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
default.replication.factor=$rf
min.insync.replicas=$isr
unclean.leader.election.enable=false
EOF
    if [[ $KAFKA_BROKERS == 3 ]]; then
        # a SIGKILLed node is fenced (its partitions led elsewhere, it leaves their ISRs) after
        # 4 s without a heartbeat rather than 9 s: the same failover, sooner
        printf '%s\n' broker.session.timeout.ms=4000 broker.heartbeat.interval.ms=500
        # a restarted node takes back the partitions it prefers (first in their replica list)
        # within seconds rather than 5 minutes, and a replica order changed by a reassignment
        # moves the leader as soon: tests place leaders on a chosen node this way
        printf '%s\n' leader.imbalance.check.interval.seconds=3
    fi
}

write_kafka_config() {
    cat >"$KAFKA_PROPS" <<EOF
# Generated by scripts/stack.sh on every start; edits are overwritten.
process.roles=broker,controller
node.id=$NODE
listeners=PLAINTEXT://127.0.0.1:$NODE_PORT,CONTROLLER://127.0.0.1:$NODE_CPORT
advertised.listeners=PLAINTEXT://127.0.0.1:$NODE_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$NODE_DIR/data
num.partitions=8
auto.create.topics.enable=false
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1
$(kafka_replication_config)
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=2
background.threads=2
num.recovery.threads.per.data.dir=1
log.cleaner.dedupe.buffer.size=16777216
EOF
    if [[ $KAFKA_SECURE == 1 ]]; then
        chmod 600 "$KAFKA_PROPS" # it holds the broker's passwords
        kafka_secure_config >>"$KAFKA_PROPS"
    fi
    cat >"$KAFKA_LOG4J" <<'EOF'
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.target = SYSTEM_OUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stdout.ref = STDOUT
# keeps the readiness line "[KafkaRaftServer nodeId=N] Kafka Server started"
logger.ready.name = kafka.server.KafkaRaftServer
logger.ready.level = INFO
EOF
}

kafka_jvm_opts() {
    local extra=()
    read -r -a extra <<<"${MINICHAT_STACK_KAFKA_JVM_OPTS:-}"
    JVM_OPTS=(-XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError -XX:TieredStopAtLevel=1
        -Djava.awt.headless=true "-Dlog4j2.configurationFile=$KAFKA_LOG4J" "-Dkafka.logs.dir=$NODE_DIR/logs"
        "${extra[@]}")
}

# 22-character URL-safe base64 of 16 random bytes, as `kafka-storage random-uuid` prints
# (never starting with '-', which the argument parser would take for an option).
kafka_cluster_id() {
    local id
    while :; do
        id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
        [[ $id != -* ]] && break
    done
    printf '%s\n' "$id"
}

# The broker count the state dir was formatted with must be the wanted one.
kafka_check_mode() {
    local had=1
    if [[ -f $KAFKA_MODE_FILE ]]; then
        had=$(<"$KAFKA_MODE_FILE")
    elif [[ ! -f "$KAFKA_DIR/data/meta.properties" ]]; then
        return 0 # nothing formatted yet
    fi
    [[ $had == "$KAFKA_BROKERS" ]] ||
        die "$KAFKA_DIR was formatted with $had broker(s), MINICHAT_STACK_KAFKA_BROKERS=$KAFKA_BROKERS: use another MINICHAT_STACK_DIR, or 'down --purge' first"
}

# Formats the selected node's log dir when it is not formatted yet (every node of a cluster with
# the same cluster id, kept in kafka/cluster.id).
kafka_format() {
    local cid
    [[ -f "$NODE_DIR/data/meta.properties" ]] && return 0
    if [[ ! -s "$KAFKA_DIR/cluster.id" ]]; then kafka_cluster_id >"$KAFKA_DIR/cluster.id"; fi
    cid=$(<"$KAFKA_DIR/cluster.id")
    printf '%s\n' "$KAFKA_BROKERS" >"$KAFKA_MODE_FILE"
    log "formatting Kafka log dir of node $NODE (cluster id $cid)"
    SCRAM_ARGS=()
    if [[ $KAFKA_SECURE == 1 ]]; then kafka_secure_scram_args; fi
    if ! java -Xmx256m "${JVM_OPTS[@]}" -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool \
        format -t "$cid" -c "$KAFKA_PROPS" "${SCRAM_ARGS[@]}" >"$NODE_DIR/format.out" 2>&1 </dev/null; then
        cat "$NODE_DIR/format.out" >&2
        die "kafka-storage format failed (node $NODE)"
    fi
    if [[ $KAFKA_SECURE == 1 ]]; then touch "$KAFKA_SECURE_DIR/formatted"; fi
}

# Starts the selected node in the background (own session, output to server.out). Does not wait.
kafka_start() {
    kafka_check_mode
    mkdir -p "$NODE_DIR/data" "$NODE_DIR/logs"
    if [[ $KAFKA_SECURE == 1 ]]; then kafka_secure_prepare; fi
    write_kafka_config
    kafka_jvm_opts
    kafka_format
    local offset lib skew=()
    offset=$(kafka_node_faketime) || exit 1
    if [[ -n $offset ]]; then
        lib=$(faketime_lib) || exit 1
        # FAKETIME_FORCE_MONOTONIC_FIX=0: Debian builds libfaketime with that fix on, and with it
        # every timed wait of the JVM (Object.wait, LockSupport.parkNanos) returns at once: its
        # periodic threads spin, a start takes ten times longer
        skew=(env "LD_PRELOAD=$lib" "FAKETIME=$offset" FAKETIME_DONT_FAKE_MONOTONIC=1 FAKETIME_FORCE_MONOTONIC_FIX=0)
    fi
    log "starting Kafka node $NODE on 127.0.0.1:$NODE_PORT (controller $NODE_CPORT)$([[ $KAFKA_SECURE == 1 ]] && echo ', SASL_SSL')$([[ -n $offset ]] && echo ", clock $offset")"
    : >"$KAFKA_OUT"
    rm -f "$KAFKA_PIDFILE"
    echo "${offset:-0}" >"$NODE_DIR/faketime"
    # setsid: own session, so Ctrl-C in the calling shell or make does not reach the broker;
    # 9>&- : do not inherit the stack lock.
    # shellcheck disable=SC2016  # $$ and $1 are expanded by the inner bash
    setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$KAFKA_PIDFILE" \
        "${skew[@]}" java "-Xms$KAFKA_HEAP" "-Xmx$KAFKA_HEAP" "${JVM_OPTS[@]}" -cp "$KAFKA_LIBS/*" kafka.Kafka \
        "$KAFKA_PROPS" </dev/null >>"$KAFKA_OUT" 2>&1 9>&- &
}

# Starts every node that does not run yet, without waiting (a cluster's new nodes are formatted in
# parallel first: a JVM each).
kafka_start_all() {
    local n pids=()
    kafka_check_mode
    if [[ $KAFKA_BROKERS != 1 ]]; then
        mkdir -p "$KAFKA_DIR"
        if [[ ! -s "$KAFKA_DIR/cluster.id" ]]; then kafka_cluster_id >"$KAFKA_DIR/cluster.id"; fi
        for n in $(kafka_nodes); do
            kafka_node "$n"
            if kafka_pid >/dev/null || [[ -f "$NODE_DIR/data/meta.properties" ]]; then continue; fi
            mkdir -p "$NODE_DIR/data" "$NODE_DIR/logs"
            write_kafka_config
            kafka_jvm_opts
            kafka_format &
            pids+=($!)
        done
        for n in "${pids[@]}"; do wait "$n" || die "formatting a Kafka node failed"; done
    fi
    for n in $(kafka_nodes); do
        kafka_node "$n"
        kafka_pid >/dev/null || kafka_start
    done
}

# Waits until the selected node answers (its readiness line logged and its port open).
kafka_wait_ready() {
    local deadline=$((SECONDS + TIMEOUT)) pid=""
    while :; do
        if [[ -z $pid && -s $KAFKA_PIDFILE ]]; then
            pid=$(<"$KAFKA_PIDFILE")
        fi
        if [[ -n $pid ]] && ! alive "$pid"; then
            tail -n 40 "$KAFKA_OUT" >&2 || true
            die "Kafka node $NODE exited during start-up (full output: $KAFKA_OUT)"
        fi
        if [[ -n $pid ]] && grep -q "$READY_LINE" "$KAFKA_OUT" && port_open "$NODE_PORT"; then
            if [[ $KAFKA_SECURE == 1 ]]; then kafka_secure_acls; fi
            return 0
        fi
        if ((SECONDS >= deadline)); then
            tail -n 40 "$KAFKA_OUT" >&2 || true
            kafka_stop
            die "Kafka node $NODE not ready after ${TIMEOUT}s (full output: $KAFKA_OUT)"
        fi
        sleep 0.2
    done
}

kafka_wait_ready_all() {
    local n
    for n in $(kafka_nodes); do
        kafka_node "$n"
        kafka_wait_ready
    done
}

# Pids of the running nodes, space-separated.
kafka_pids() {
    local n pid pids=()
    for n in $(kafka_nodes); do
        kafka_node "$n"
        if pid=$(kafka_pid); then pids+=("$pid"); fi
    done
    echo "${pids[*]}"
}

# Stops every running node: SIGTERM to all at once (one by one, the last node of a cluster would
# wait for a controller quorum that is gone), SIGKILL after the timeout.
kafka_stop() {
    local pid deadline n pids=() left
    if [[ ${1:-} == all ]]; then
        read -r -a pids <<<"$(kafka_pids)"
    elif pid=$(kafka_pid); then
        pids=("$pid")
    fi
    if [[ ${#pids[@]} -eq 0 ]]; then
        if [[ ${1:-} == all ]]; then
            for n in $(kafka_nodes); do
                kafka_node "$n"
                rm -f "$KAFKA_PIDFILE"
            done
        else
            rm -f "$KAFKA_PIDFILE"
        fi
        log "kafka: not running"
        return 0
    fi
    log "stopping Kafka (pid ${pids[*]})"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    deadline=$((SECONDS + TIMEOUT))
    while :; do
        left=()
        for pid in "${pids[@]}"; do
            if alive "$pid"; then left+=("$pid"); fi
        done
        [[ ${#left[@]} -eq 0 ]] && break
        if ((SECONDS >= deadline)); then
            log "Kafka (pid ${left[*]}) did not stop within ${TIMEOUT}s: SIGKILL"
            kill -KILL "${left[@]}" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    if [[ ${1:-} == all ]]; then
        for n in $(kafka_nodes); do
            kafka_node "$n"
            rm -f "$KAFKA_PIDFILE"
        done
    else
        rm -f "$KAFKA_PIDFILE"
    fi
}

# SIGKILL of the selected node (a crash: no controlled shutdown); returns once it is gone.
kafka_kill() {
    local pid deadline=$((SECONDS + TIMEOUT))
    if ! pid=$(kafka_pid); then
        log "kafka node $NODE: not running"
        return 0
    fi
    kill -KILL "$pid" 2>/dev/null || true
    while alive "$pid"; do
        ((SECONDS < deadline)) || die "Kafka node $NODE (pid $pid) survived SIGKILL for ${TIMEOUT}s"
        sleep 0.05
    done
    rm -f "$KAFKA_PIDFILE"
    log "kafka node $NODE: killed (pid $pid)"
}

# For the selected node: sets KAFKA_RUNNING_PID when it already runs (on the wanted port;
# KAFKA_WAIT=1 when it does not answer yet); otherwise checks that its ports are free. Starts nothing.
kafka_preflight() {
    local p
    local running_port
    KAFKA_RUNNING_PID=""
    KAFKA_WAIT=0
    if KAFKA_RUNNING_PID=$(kafka_pid); then
        # server.properties is rewritten only when a broker starts: it holds the running one's ports
        running_port=$(sed -n 's|^advertised.listeners=[A-Z_]*://127.0.0.1:\([0-9]*\).*|\1|p' "$KAFKA_PROPS" | tail -n 1)
        [[ $running_port == "$NODE_PORT" ]] ||
            die "Kafka (pid $KAFKA_RUNNING_PID) runs on port $running_port, not $NODE_PORT: run 'scripts/stack.sh down' first"
        if ! port_open "$NODE_PORT"; then
            KAFKA_WAIT=1 # still starting (say, an earlier `up` was interrupted): wait for it below
        fi
        return 0
    fi
    KAFKA_RUNNING_PID=""
    for p in "$NODE_PORT" "$NODE_CPORT"; do
        if port_open "$p"; then
            die "port 127.0.0.1:$p is taken by another process (not this stack's Kafka, state dir $STACK_DIR); stop it or set MINICHAT_STACK_KAFKA_PORT / MINICHAT_STACK_KAFKA_CONTROLLER_PORT"
        fi
    done
}

# kafka_preflight for every node: KAFKA_START=1 when one of them must be started, KAFKA_WAIT=1
# when one must be waited for, KAFKA_RUNNING_PIDS those already running.
kafka_preflight_all() {
    local n start=0 wait=0 running=()
    for n in $(kafka_nodes); do
        kafka_node "$n"
        kafka_preflight
        if [[ -z $KAFKA_RUNNING_PID ]]; then
            start=1 wait=1
        else
            running+=("$KAFKA_RUNNING_PID")
            if [[ $KAFKA_WAIT -eq 1 ]]; then wait=1; fi
        fi
    done
    KAFKA_START=$start
    KAFKA_WAIT=$wait
    KAFKA_RUNNING_PIDS="${running[*]}"
}

# ------------------------------------------------------------------------------------------ Kafka, secure mode

kafka_secret() { head -c 24 /dev/urandom | base64 | tr -d '/+=\n'; }

# Tools, passwords and certificates (made once per state dir, kept across restarts).
kafka_secure_prepare() {
    local d=$KAFKA_SECURE_DIR user ks
    command -v openssl >/dev/null || apt_install openssl
    # keytool comes with the JRE; javac (the JDK) runs tools/kafka/StackAcls.java
    command -v keytool >/dev/null && command -v javac >/dev/null || apt_install openjdk-17-jdk-headless
    if [[ -f "$KAFKA_DIR/data/meta.properties" && ! -f "$d/formatted" ]]; then
        die "$KAFKA_DIR/data was formatted without MINICHAT_STACK_KAFKA_SECURE=1: use another MINICHAT_STACK_DIR, or 'down --purge' first"
    fi
    mkdir -p "$d"
    chmod 700 "$d"
    for user in keystore $KAFKA_SECURE_USERS; do
        if [[ ! -s "$d/$user.password" ]]; then
            (umask 077 && kafka_secret >"$d/$user.password")
        fi
    done
    [[ -s "$d/broker.p12" && -s "$d/truststore.p12" && -s "$d/ca.pem" ]] && return 0
    log "making a throwaway CA and broker certificate in $d"
    ks=$(<"$d/keystore.password")
    (
        cd "$d"
        umask 077
        openssl req -x509 -newkey rsa:2048 -nodes -days 365 -keyout ca.key -out ca.pem \
            -subj "/CN=minichat stack CA" -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout broker.key -out broker.csr -subj "/CN=localhost" 2>/dev/null
        printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth,clientAuth" \
            "authorityKeyIdentifier=keyid" "subjectKeyIdentifier=hash" >broker.ext
        openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 \
            -extfile broker.ext -out broker.pem 2>/dev/null
        openssl pkcs12 -export -in broker.pem -inkey broker.key -certfile ca.pem -name broker \
            -out broker.p12 -passout "file:keystore.password"
        rm -f truststore.p12
        keytool -importcert -noprompt -alias ca -file ca.pem -keystore truststore.p12 -storetype PKCS12 \
            -storepass:file keystore.password >/dev/null 2>&1
        chmod 644 ca.pem
    ) || die "making the certificates in $d failed"
}

kafka_secure_jaas() {
    printf 'org.apache.kafka.common.security.scram.ScramLoginModule required username="%s" password="%s";' \
        "$1" "$(<"$KAFKA_SECURE_DIR/$1.password")"
}

# Appended to server.properties (a later key wins): SASL_SSL for clients and between brokers,
# the controller listener stays PLAINTEXT on 127.0.0.1 (its principal, ANONYMOUS, is a super user:
# the broker reaches its own controller through it).
kafka_secure_config() {
    local d=$KAFKA_SECURE_DIR
    cat <<EOF
# secure mode (MINICHAT_STACK_KAFKA_SECURE=1)
listeners=SASL_SSL://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CPORT
advertised.listeners=SASL_SSL://127.0.0.1:$KAFKA_PORT
inter.broker.listener.name=SASL_SSL
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=$(kafka_secure_jaas admin)
ssl.keystore.type=PKCS12
ssl.keystore.location=$d/broker.p12
ssl.keystore.password=$(<"$d/keystore.password")
ssl.truststore.type=PKCS12
ssl.truststore.location=$d/truststore.p12
ssl.truststore.password=$(<"$d/keystore.password")
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:admin;User:ANONYMOUS
EOF
}

kafka_secure_scram_args() {
    local user
    for user in $KAFKA_SECURE_USERS; do
        SCRAM_ARGS+=(--add-scram "SCRAM-SHA-512=[name=$user,password=$(<"$KAFKA_SECURE_DIR/$user.password")]")
    done
}

# The ACL table of docs/security.md: PRINCIPAL OPERATION RESOURCE_TYPE PATTERN_TYPE NAME.
kafka_secure_acl_lines() {
    local p=$KAFKA_ACL_PREFIX t
    # minichat owns every topic under the prefix: creates and configures them, reads the inputs,
    # writes its outputs, reads dead-letters; its group(s); idempotent produce, broker count.
    printf 'User:minichat %s TOPIC PREFIXED %s\n' ALL "$p"
    printf 'User:minichat %s GROUP PREFIXED %s\n' READ "$KAFKA_ACL_GROUP" DESCRIBE "$KAFKA_ACL_GROUP"
    printf 'User:minichat %s CLUSTER LITERAL kafka-cluster\n' DESCRIBE IDEMPOTENT_WRITE
    # gateways: write the inputs, read the decisions (GatewayClient uses no consumer group; their
    # own consumers may use groups named gateway*)
    for t in turn-requests provider-responses usage; do
        printf 'User:gateway %s TOPIC LITERAL %s%s\n' WRITE "$p" "$t" DESCRIBE "$p" "$t"
    done
    printf 'User:gateway %s TOPIC LITERAL %sturn-decisions\n' READ "$p" DESCRIBE "$p"
    printf 'User:gateway %s GROUP PREFIXED gateway\n' READ DESCRIBE
    printf 'User:gateway IDEMPOTENT_WRITE CLUSTER LITERAL kafka-cluster\n'
}

kafka_secure_admin_config() {
    local d=$KAFKA_SECURE_DIR
    (umask 077 && cat >"$d/admin.properties" <<EOF
bootstrap.servers=127.0.0.1:$KAFKA_PORT
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=$(kafka_secure_jaas admin)
ssl.truststore.type=PEM
ssl.truststore.location=$d/ca.pem
EOF
    )
}

# Creates the ACLs (again only when the table changed), as admin over SASL_SSL.
kafka_secure_acls() {
    local d=$KAFKA_SECURE_DIR want
    want=$(kafka_secure_acl_lines | sha256sum | cut -c1-16)
    [[ "$(cat "$d/acls.stamp" 2>/dev/null)" == "$want" ]] && return 0
    kafka_secure_admin_config
    log "creating the ACLs (tools/kafka/StackAcls.java)"
    if ! kafka_secure_acl_lines | java -Xmx128m -XX:TieredStopAtLevel=1 "-Dlog4j2.configurationFile=$KAFKA_LOG4J" \
        -cp "$KAFKA_LIBS/*" "$REPO/tools/kafka/StackAcls.java" "$d/admin.properties" >"$d/acls.out" 2>&1; then
        cat "$d/acls.out" >&2
        kafka_stop
        die "creating the ACLs failed (output above)"
    fi
    printf '%s\n' "$want" >"$d/acls.stamp"
}

kafka_secure_env() {
    local d=$KAFKA_SECURE_DIR
    printf 'export MINICHAT_KAFKA_SECURITY_PROTOCOL=SASL_SSL\n'
    printf 'export MINICHAT_KAFKA_SASL_MECHANISM=SCRAM-SHA-512\n'
    printf 'export MINICHAT_KAFKA_SASL_USERNAME=minichat\n'
    printf 'export MINICHAT_KAFKA_SASL_PASSWORD_FILE=%s\n' "$d/minichat.password"
    printf 'export MINICHAT_KAFKA_SSL_CAFILE=%s\n' "$d/ca.pem"
    printf 'export MINICHAT_STACK_KAFKA_SECURE_DIR=%s\n' "$d"
}

# ------------------------------------------------------------------------------------------ PostgreSQL

pg_find_bin() {
    local d
    if [[ -n ${MINICHAT_STACK_PG_BIN:-} ]]; then
        [[ -x "$MINICHAT_STACK_PG_BIN/initdb" ]] || die "MINICHAT_STACK_PG_BIN=$MINICHAT_STACK_PG_BIN has no initdb"
        printf '%s\n' "$MINICHAT_STACK_PG_BIN"
        return 0
    fi
    while IFS= read -r d; do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
            printf '%s\n' "$d"
            return 0
        fi
    done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -t/ -k4,4 -n -r)
    return 1
}

ensure_pg_bin() {
    if PG_BIN=$(pg_find_bin); then
        return 0
    fi
    apt_install postgresql
    PG_BIN=$(pg_find_bin) || die "postgresql installed but no initdb under /usr/lib/postgresql/*/bin"
    # The Debian package creates a 'main' cluster and may start it on 5432 (where no
    # policy-rc.d forbids it). We just installed it, so stop it if it took our port.
    if command -v pg_lsclusters >/dev/null && port_open "$PG_PORT"; then
        local ver name port status
        while read -r ver name port status _; do
            if [[ $port == "$PG_PORT" && $status == online* ]]; then
                log "stopping the packaged cluster $ver/$name that the install started on port $port"
                pg_ctlcluster "$ver" "$name" stop >&2 || true
            fi
        done < <(pg_lsclusters -h 2>/dev/null)
    fi
}

# Runs a PostgreSQL server binary as the postgres user when we are root (initdb/pg_ctl refuse root).
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# Chooses PG_DIR (holding data/ and server.log). Normally $STACK_DIR/pg; when the postgres user
# cannot reach the state dir (say, a checkout under /root) or the socket path would be too long,
# a short directory under /var/tmp is used instead and $STACK_DIR/pg becomes a symlink to it.
pg_dirs() {
    local fallback
    fallback="/var/tmp/minichat-stack-$(printf '%s' "$STACK_DIR" | sha256sum | cut -c1-12)"
    if [[ -L "$STACK_DIR/pg" ]]; then
        PG_DIR=$(readlink -f "$STACK_DIR/pg")
    elif [[ -d "$STACK_DIR/pg" ]]; then
        PG_DIR="$STACK_DIR/pg"
    elif [[ ${1:-} == create ]]; then
        PG_DIR="$STACK_DIR/pg"
        if { [[ $EUID -eq 0 ]] && ! runuser -u postgres -- test -x "$STACK_DIR" 2>/dev/null; } ||
            ((${#PG_DIR} + 20 > 100)); then
            log "postgres cannot use $STACK_DIR directly; its data goes to $fallback"
            PG_DIR=$fallback
            mkdir -p "$PG_DIR"
            ln -sfn "$PG_DIR" "$STACK_DIR/pg"
        fi
    else
        PG_DIR="$STACK_DIR/pg"
    fi
    PG_DATA="$PG_DIR/data"
    PG_LOG="$PG_DIR/server.log"
}

# Prints the postmaster pid when our cluster runs.
pg_pid() {
    local pid cmd
    [[ -s "$PG_DATA/postmaster.pid" ]] || return 1
    pid=$(head -n 1 "$PG_DATA/postmaster.pid")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    alive "$pid" || return 1
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmd == *postgres* ]] || return 1 # a stale postmaster.pid whose pid was reused
    printf '%s\n' "$pid"
}

# Port the running postmaster listens on (line 4 of postmaster.pid).
pg_running_port() { sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null; }

pg_write_config() {
    local data_q=${PG_DATA//\'/\'\'}
    cat >"$PG_DATA/minichat.conf" <<EOF
# Generated by scripts/stack.sh on every start; edits are overwritten. Throwaway settings:
# never use fsync=off on data you want to keep.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$data_q'
max_connections = 300
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = minimal
max_wal_senders = 0
timezone = 'UTC'
log_timezone = 'UTC'
EOF
    if [[ $EUID -eq 0 ]]; then chown postgres:postgres "$PG_DATA/minichat.conf"; fi
}

pg_initdb() {
    log "initdb $PG_DATA"
    mkdir -p "$PG_DIR"
    if [[ $EUID -eq 0 ]]; then chown postgres:postgres "$PG_DIR"; fi
    if ! as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust -E UTF8 --no-locale --no-sync \
        >"$STACK_DIR/initdb.log" 2>&1; then
        cat "$STACK_DIR/initdb.log" >&2
        die "initdb failed"
    fi
    printf "\ninclude_if_exists = 'minichat.conf'\n" >>"$PG_DATA/postgresql.conf"
}

pg_provision() {
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_DATA" -p "$PG_PORT" -U postgres -d postgres >&2 <<EOF
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE $PG_USER LOGIN CREATEDB CREATEROLE PASSWORD '$PG_PASSWORD';
  ELSE
    ALTER ROLE $PG_USER LOGIN CREATEDB CREATEROLE PASSWORD '$PG_PASSWORD';
  END IF;
END
\$\$;
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER'
 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_database WHERE datname = '$PG_DB')\gexec
EOF
    # the runtime role and the worker's login ($PG_RUNTIME_USER), on an existing data dir too
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_DATA" -p "$PG_PORT" -U postgres -d postgres \
        -f "$REPO/scripts/pg-logins.sql" >&2
}

pg_wait_ready() {
    local deadline=$((SECONDS + TIMEOUT))
    until "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -t 2; do
        if ((SECONDS >= deadline)); then
            tail -n 40 "$PG_LOG" >&2 || true
            die "PostgreSQL not ready after ${TIMEOUT}s (log: $PG_LOG)"
        fi
        sleep 0.2
    done
}

# Sets PG_RUNNING_PID when our cluster already runs (on the wanted port); otherwise checks that
# the port is free. Starts nothing.
pg_preflight() {
    local running_port
    pg_dirs create
    PG_RUNNING_PID=""
    if PG_RUNNING_PID=$(pg_pid); then
        running_port=$(pg_running_port)
        [[ $running_port == "$PG_PORT" ]] ||
            die "PostgreSQL (pid $PG_RUNNING_PID) runs on port $running_port, not $PG_PORT: run 'scripts/stack.sh down' first"
        return 0 # if it is still starting, pg_wait_ready waits for it
    fi
    PG_RUNNING_PID=""
    if port_open "$PG_PORT"; then
        die "port 127.0.0.1:$PG_PORT is taken by another process (not this stack's PostgreSQL, state dir $STACK_DIR); stop it or set MINICHAT_STACK_PG_PORT"
    fi
}

pg_start() {
    [[ -f "$PG_DATA/PG_VERSION" ]] || pg_initdb
    pg_write_config
    # pg_preflight found no live postmaster for this data dir, so a postmaster.pid left behind is
    # stale. PostgreSQL removes such a file itself unless its pid still exists: a zombie (where
    # nothing reaps orphans) or a reused pid would block the start.
    # Same for the socket lock files (the sockets live in the data dir).
    if [[ -f "$PG_DATA/postmaster.pid" ]]; then
        log "removing stale $PG_DATA/postmaster.pid"
        rm -f "$PG_DATA/postmaster.pid" "$PG_DATA"/.s.PGSQL.*
    fi
    log "starting PostgreSQL $(cat "$PG_DATA/PG_VERSION") on 127.0.0.1:$PG_PORT"
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$TIMEOUT" -s start >&2 9>&-; then
        tail -n 40 "$PG_LOG" >&2 || true
        die "pg_ctl start failed (log: $PG_LOG)"
    fi
}

pg_stop() {
    local pid
    pg_dirs
    if ! pid=$(pg_pid); then
        log "postgres: not running"
        return 0
    fi
    ensure_pg_bin
    log "stopping PostgreSQL (pid $pid)"
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t "$TIMEOUT" -s stop >&2; then
        log "fast shutdown failed; trying immediate"
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m immediate -w -t "$TIMEOUT" -s stop >&2 || true
    fi
}

# ------------------------------------------------------------------------------------------ commands

lock() {
    mkdir -p "$STACK_DIR"
    exec 9>"$STACK_DIR/.lock"
    flock -w "$((TIMEOUT * 3))" 9 || die "another scripts/stack.sh holds $STACK_DIR/.lock"
}

cmd_up() {
    local t0=$EPOCHREALTIME
    lock
    # 1. what runs already, and are the ports of the rest free? (fail before starting anything)
    kafka_preflight_all
    pg_preflight
    # 2. tools, installed only when missing
    if [[ $KAFKA_START -eq 1 ]]; then
        ensure_java
        ensure_kafka_libs
    fi
    ensure_pg_bin
    # 3. start the broker(s) without waiting, bring PostgreSQL up meanwhile, then wait for them
    if [[ $KAFKA_START -eq 1 ]]; then
        kafka_start_all
    elif [[ $KAFKA_WAIT -eq 0 ]]; then
        log "kafka: already running (pid $KAFKA_RUNNING_PIDS, $(kafka_servers))"
    else
        log "kafka: pid $KAFKA_RUNNING_PIDS still starting; waiting for it"
    fi
    if [[ -n $PG_RUNNING_PID ]]; then
        log "postgres: already running (pid $PG_RUNNING_PID, 127.0.0.1:$PG_PORT)"
    else
        pg_start
    fi
    pg_wait_ready
    pg_provision
    if [[ $KAFKA_WAIT -eq 1 ]]; then
        kafka_wait_ready_all
        log "kafka: ready (pid $(kafka_pids), $(kafka_servers))"
    fi
    log "stack up in $(elapsed "$t0") s"
    print_env
}

# host:port of every node, comma-separated.
kafka_servers() { print_kafka_env | sed -n 's/^export MINICHAT_KAFKA_BOOTSTRAP_SERVERS=//p'; }

cmd_down() {
    local purge=${MINICHAT_STACK_PURGE:-0} arg n
    for arg in "$@"; do
        case $arg in
            --purge) purge=1 ;;
            *) die "unknown option for down: $arg" ;;
        esac
    done
    lock
    kafka_stop all
    pg_stop
    if [[ $purge == 1 ]]; then
        log "purging data in $STACK_DIR (keeping the jar cache $KAFKA_LIBS)"
        kafka_node 1
        rm -rf "$KAFKA_DIR/data" "$KAFKA_DIR/logs" "$KAFKA_OUT" "$KAFKA_PROPS" "$KAFKA_LOG4J" \
            "$KAFKA_DIR/format.out" "$KAFKA_DIR/mvn.log" "$KAFKA_PIDFILE" "$KAFKA_DIR"/libs.tmp.* "$STACK_DIR/initdb.log" \
            "$KAFKA_SECURE_DIR" "$KAFKA_MODE_FILE" "$KAFKA_DIR/cluster.id"
        for n in 1 2 3; do rm -rf "$KAFKA_DIR/node$n"; done
        rm -rf "$PG_DIR"
        if [[ -L "$STACK_DIR/pg" ]]; then rm -f "$STACK_DIR/pg"; fi
    fi
}

# One service only, for fault tests: the other keeps running, data and ports stay.
cmd_stop_kafka() {
    lock
    kafka_stop all
}

cmd_stop_pg() {
    lock
    pg_stop
}

cmd_restart_kafka() {
    local t0=$EPOCHREALTIME
    lock
    kafka_stop all
    kafka_preflight_all
    ensure_java
    ensure_kafka_libs
    kafka_start_all
    kafka_wait_ready_all
    log "kafka: restarted in $(elapsed "$t0") s (pid $(kafka_pids), $(kafka_servers))"
}

cmd_up_kafka() {
    local t0=$EPOCHREALTIME
    lock
    kafka_preflight_all
    if [[ $KAFKA_START -eq 1 ]]; then
        ensure_java
        ensure_kafka_libs
        kafka_start_all
    fi
    if [[ $KAFKA_WAIT -eq 1 ]]; then kafka_wait_ready_all; fi
    log "kafka: ready in $(elapsed "$t0") s (pid $(kafka_pids), $(kafka_servers))"
    print_kafka_env
}

# One node of the cluster, for fault tests: the others keep running.
cmd_kill_broker() {
    node_arg "${1:-}"
    lock
    kafka_kill
}

cmd_start_broker() {
    local t0=$EPOCHREALTIME
    node_arg "${1:-}"
    lock
    kafka_preflight
    if [[ -z $KAFKA_RUNNING_PID ]]; then
        ensure_java
        ensure_kafka_libs
        kafka_start
    fi
    kafka_wait_ready
    log "kafka node $NODE: ready in $(elapsed "$t0") s (pid $(kafka_pid), 127.0.0.1:$NODE_PORT)"
}

cmd_stop_broker() {
    node_arg "${1:-}"
    lock
    kafka_stop
}

# One line per node: number, node id, broker port, pid or -, running|starting|stopped, and the
# clock offset it was started with (0: none).
cmd_brokers() {
    local n pid state skew
    for n in $(kafka_nodes); do
        kafka_node "$n"
        if pid=$(kafka_pid); then
            state=starting
            if grep -q "$READY_LINE" "$KAFKA_OUT" 2>/dev/null && port_open "$NODE_PORT"; then state=running; fi
        else
            pid=- state=stopped
        fi
        skew=0
        if [[ $pid != - && -s "$NODE_DIR/faketime" ]]; then skew=$(<"$NODE_DIR/faketime"); fi
        printf '%s %s %s %s %s %s\n' "$n" "$n" "$NODE_PORT" "$pid" "$state" "$skew"
    done
}

cmd_restart_pg() {
    local t0=$EPOCHREALTIME
    lock
    pg_stop
    pg_preflight
    ensure_pg_bin
    pg_start
    pg_wait_ready
    log "postgres: restarted in $(elapsed "$t0") s (127.0.0.1:$PG_PORT)"
}

cmd_status() {
    local ok=0 pid libs version n name
    version=$(kafka_version)
    libs="no jar cache"
    if [[ -f "$KAFKA_LIBS/.stamp" ]]; then libs="jars: $(cut -d' ' -f1 "$KAFKA_LIBS/.stamp")"; fi
    for n in $(kafka_nodes); do
        kafka_node "$n"
        name=kafka
        if [[ $KAFKA_BROKERS != 1 ]]; then name="kafka-$n"; fi
        if pid=$(kafka_pid); then
            if port_open "$NODE_PORT"; then
                printf '%-9s running      pid %-7s 127.0.0.1:%s (controller %s)  %s\n' \
                    "$name" "$pid" "$NODE_PORT" "$NODE_CPORT" "$libs"
            else
                printf '%-9s starting     pid %-7s 127.0.0.1:%s not answering yet\n' "$name" "$pid" "$NODE_PORT"
                ok=3
            fi
        else
            printf '%-9s stopped      %s (want %s); data %s\n' "$name" "$libs" "$version" \
                "$([[ -f "$NODE_DIR/data/meta.properties" ]] && echo "kept in $NODE_DIR/data" || echo none)"
            ok=3
        fi
    done
    pg_dirs
    if pid=$(pg_pid); then
        if port_open "$(pg_running_port)"; then
            printf 'postgres  running      pid %-7s 127.0.0.1:%s  database %s (user %s)  data %s\n' \
                "$pid" "$(pg_running_port)" "$PG_DB" "$PG_USER" "$PG_DATA"
        else
            printf 'postgres  starting     pid %-7s 127.0.0.1:%s not answering yet\n' "$pid" "$(pg_running_port)"
            ok=3
        fi
    else
        printf 'postgres  stopped      data %s\n' \
            "$([[ -f "$PG_DATA/PG_VERSION" ]] && echo "kept in $PG_DATA" || echo none)"
        ok=3
    fi
    return "$ok"
}

usage() {
    sed -n '2,/^# Environment/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
}

main() {
    local cmd=${1:-}
    [[ $# -gt 0 ]] && shift
    case $cmd in
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        status) cmd_status "$@" ;;
        env) print_env ;;
        stop-kafka) cmd_stop_kafka ;;
        stop-pg) cmd_stop_pg ;;
        restart-kafka) cmd_restart_kafka ;;
        restart-pg) cmd_restart_pg ;;
        up-kafka) cmd_up_kafka ;;
        kill-broker) cmd_kill_broker "$@" ;;
        start-broker) cmd_start_broker "$@" ;;
        stop-broker) cmd_stop_broker "$@" ;;
        brokers) cmd_brokers ;;
        -h | --help | help) usage ;;
        *) usage ;;
    esac
}

main "$@"
