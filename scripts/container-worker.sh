#!/bin/sh
# The worker container's entry point: schema, topics, then the worker until SIGTERM.
#
# Exit status 2 is a setup error (schema or topics missing, a topic not on LogAppendTime, a bad
# policy file): restarting cannot fix it, so this script then exits 0 and `restart: on-failure`
# leaves the container stopped, with the reason as the last log line. Any other failure (a
# dependency away for too long: 70) exits non-zero and is restarted.
set -u
setup_error() {
    echo "minichat: setup error (exit 2): fix it and start the container again; not restarting" >&2
    exit 0
}
minichat db migrate || { rc=$?; [ "$rc" -eq 2 ] && setup_error; exit "$rc"; }
minichat topics create || { rc=$?; [ "$rc" -eq 2 ] && setup_error; exit "$rc"; }
minichat worker &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
wait "$pid"
rc=$?
if [ "$rc" -gt 128 ]; then  # interrupted by the trap: wait for the worker's own exit status
    wait "$pid"
    rc=$?
fi
[ "$rc" -eq 2 ] && setup_error
exit "$rc"
