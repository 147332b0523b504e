#!/usr/bin/env bash
# The README's main job: local stack, schema, topics, a worker, the gateway simulator, the summary.
#
#   scripts/demo.sh [minichat simulate options...]      (make demo ARGS="--tenants 8")
#
# The worker runs in the background with the demo policy (minichat/demo_policy.yaml: short usage
# grace, one tenant with tiny limits) and is stopped with SIGTERM at the end; its log is kept in
# .stack/demo-worker.log. Exit status: the simulator's (0 when every invariant of the summary holds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

make --no-print-directory venv >&2
exports=$(scripts/stack.sh up)
eval "$exports"
export MINICHAT_POLICY_FILE=${MINICHAT_POLICY_FILE:-$PWD/minichat/demo_policy.yaml}
export MINICHAT_WEB_ENABLED=${MINICHAT_WEB_ENABLED:-false}

.venv/bin/minichat db migrate
.venv/bin/minichat topics create >/dev/null

log=.stack/demo-worker.log
.venv/bin/minichat worker >"$log" 2>&1 &
worker=$!
stop_worker() {
    if kill -0 "$worker" 2>/dev/null; then
        kill -TERM "$worker"
        wait "$worker" || true
    fi
}
trap stop_worker EXIT
echo "worker started (pid $worker, log $log)" >&2

rc=0
.venv/bin/minichat simulate "$@" || rc=$?
exit "$rc"
