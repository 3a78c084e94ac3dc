#!/usr/bin/env bash
# The README's grpcurl walkthrough, runnable: every command below is one a
# user would type, against a real `pipelined serve` on a free loopback port,
# with nothing but gRPC reflection (no proto files) and proto3 JSON. Each
# response is checked with jq for what a person would look at: statuses,
# step statuses, execution data, error codes. Any surprise stops the script
# with the command and the response that was not as expected.
#
#   scripts/grpcurl-test.sh
#
# grpcurl comes pinned from tools/go.mod (scripts/tools.sh); jq is Debian's
# (on the machine image; installed with apt-get if missing). The server is
# target/debug/pipelined, built first if stale.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/tools.sh
source scripts/tools.sh
# shellcheck source=scripts/live-server.sh
source scripts/live-server.sh
tools_install
cargo build --locked --quiet
if ! command -v jq >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends jq >/dev/null
fi

WORK="$(mktemp -d)"
cleanup() {
    live_server_stop
    rm -rf "$WORK"
}
trap cleanup EXIT
live_server_start "$WORK/server"
ADDR="$LIVE_SERVER_ADDR"

# ---------------------------------------------------------------- helpers --
# The last command and what it printed, for the assertions and for errors.
LAST_CMD=""
OUT=""

fail() {
    {
        echo
        echo "!!! FAILED: $*"
        echo "--- command:"
        echo "$LAST_CMD"
        echo "--- response:"
        printf '%s\n' "$OUT"
        echo "--- server log (last 30 lines):"
        tail -n 30 "$WORK/server/server.log"
    } >&2
    exit 1
}

# show CMD...: the command as one would type it (arguments with spaces or
# quotes in single quotes).
show() {
    local arg line="\$"
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./:@=-]+$ ]]; then
            line+=" $arg"
        else
            line+=" '${arg//\'/\'\\\'\'}'"
        fi
    done
    printf '%s\n' "$line"
}

# run CMD...: runs a grpcurl command (echoed as `$ ...`), which must succeed;
# its output is kept in OUT. Streams are bounded by a 60 s timeout so a
# stream that never ends fails instead of hanging.
run() {
    LAST_CMD="$(show "$@")"
    echo "$LAST_CMD"
    local rc=0
    OUT="$(timeout 60 "$@" 2>&1)" || rc=$?
    [ "$rc" -eq 0 ] || fail "exit code $rc"
}

# run_err CODE NAME CMD...: like run, but the call must fail with gRPC status
# CODE (grpcurl exits with 64 + CODE and, with -format-error, prints the
# status as JSON on stderr).
run_err() {
    local code="$1" name="$2"
    shift 2
    LAST_CMD="$(show "$@")"
    echo "$LAST_CMD"
    local rc=0
    OUT="$(timeout 60 "$@" 2>&1)" || rc=$?
    [ "$rc" -eq $((64 + code)) ] || fail "expected $name: exit code $((64 + code)), got $rc"
    expect ".code == $code" "status $name ($code)"
}

# expect FILTER [WHAT]: FILTER, a jq expression over the response (several
# JSON values for a stream are slurped into one array), must be true.
expect() {
    local filter="$1" what="${2:-$1}"
    jq -e -s "(if length == 1 then .[0] else . end) | $filter" <<<"$OUT" >/dev/null 2>&1 ||
        fail "expected $what"
    echo "    ok: $what"
}

# value FILTER: prints one value of the response.
value() {
    jq -r -s "(if length == 1 then .[0] else . end) | $1" <<<"$OUT"
}

section() {
    echo
    echo "==> $*"
}

# ------------------------------------------------------------ walkthrough --
section "What the server offers (reflection)"
run grpcurl -plaintext "$ADDR" list
[ "$OUT" = "grpc.health.v1.Health
grpc.reflection.v1.ServerReflection
pipeline.v1.PipelineService" ] || fail "expected the three services, one a line"
echo "    ok: Health, ServerReflection and PipelineService"

run grpcurl -plaintext "$ADDR" describe pipeline.v1.PipelineService
grep -qF 'rpc RunPipeline ( .pipeline.v1.RunPipelineRequest ) returns ( .pipeline.v1.RunPipelineResponse );' <<<"$OUT" ||
    fail "expected RunPipeline in the service"
grep -qF 'rpc WatchExecution ( .pipeline.v1.WatchExecutionRequest ) returns ( stream .pipeline.v1.WatchExecutionResponse )' <<<"$OUT" ||
    fail "expected WatchExecution to stream"
echo "    ok: RunPipeline, and WatchExecution streams"

run grpcurl -plaintext "$ADDR" describe pipeline.v1.CommandStep
grep -qF 'repeated string args = 2;' <<<"$OUT" || fail "expected the args field"
echo "    ok: CommandStep has program, args, env, working_dir"

section "Create a pipeline: set a value, run a program that sleeps 2 s, finish"
run grpcurl -plaintext -d '{
  "pipeline": {
    "name": "greet",
    "description": "Say hello, wait, finish",
    "steps": [
      {"name": "hello", "set": {"values": {"greeting": "hello"}}},
      {"name": "wait", "needs": ["hello"], "timeout": "10s",
       "command": {"program": "sh", "args": ["-c", "sleep 2; echo {\\\"waited\\\": true}"]}},
      {"name": "done", "needs": ["wait"], "noop": {}}
    ]
  }
}' "$ADDR" pipeline.v1.PipelineService/CreatePipeline
expect '.pipeline.name == "greet"' 'pipeline "greet"'
expect '.pipeline.version == "1"' "version 1 (int64 is a JSON string)"
expect '[.pipeline.steps[].name] == ["hello", "wait", "done"]' "steps hello, wait, done"

section "Run it, watch it to the end, read the result"
run grpcurl -plaintext -d '{"pipeline_name": "greet", "input": {"name": "world"}, "correlation_id": "msg-42", "labels": {"team": "data"}}' \
    "$ADDR" pipeline.v1.PipelineService/RunPipeline
expect '.execution.status == "EXECUTION_STATUS_PENDING" or .execution.status == "EXECUTION_STATUS_RUNNING"' "status PENDING (or RUNNING already)"
expect '.execution.pipelineVersion == "1" and .execution.correlationId == "msg-42" and .execution.labels.team == "data"' \
    "version, correlation id and labels as given"
ID="$(value .execution.id)"
echo "    execution $ID"

# The stream replays every event so far, follows new ones and ends by itself
# after the terminal event.
run grpcurl -plaintext -d "{\"execution_id\": \"$ID\"}" "$ADDR" pipeline.v1.PipelineService/WatchExecution
expect '[.[].event.sequence | tonumber] == [range(1; length + 1)]' "gapless sequences 1..n"
expect '.[0].event.type == "EVENT_TYPE_EXECUTION_STARTED"' "first event EXECUTION_STARTED"
expect '[.[].event | select(.type == "EVENT_TYPE_STEP_SUCCEEDED") | .stepName] == ["hello", "wait", "done"]' \
    "steps succeeded in order hello, wait, done"
expect '.[-1].event.type == "EVENT_TYPE_EXECUTION_SUCCEEDED" and .[-1].event.executionStatus == "EXECUTION_STATUS_SUCCEEDED"' \
    "last event EXECUTION_SUCCEEDED, then the stream ended"
expect '.[-1].event.progress == {"stepsDone": 3, "stepsTotal": 3, "percent": 100}' "progress 3/3, 100%"
LAST_SEQ="$(value '.[-1].event.sequence')"
expect '.[-1].event.executionData == {"greeting": "hello", "name": "world", "waited": true}' \
    "execution data: the input merged with the step outputs"

run grpcurl -plaintext -d "{\"execution_id\": \"$ID\"}" "$ADDR" pipeline.v1.PipelineService/GetExecution
expect '.execution.status == "EXECUTION_STATUS_SUCCEEDED"' "status SUCCEEDED"
expect '[.execution.steps[] | [.name, .status]] == [["hello", "STEP_STATUS_SUCCEEDED"], ["wait", "STEP_STATUS_SUCCEEDED"], ["done", "STEP_STATUS_SUCCEEDED"]]' \
    "every step SUCCEEDED"
expect '(.execution.steps[] | select(.name == "wait") | .output) == {"waited": true}' \
    'wait output {"waited": true} (the last line its program printed)'
expect '.execution.executionData == {"greeting": "hello", "name": "world", "waited": true}' "execution data"
expect ".execution.lastSequence == \"$LAST_SEQ\"" "last sequence $LAST_SEQ, as the stream's last event"

run grpcurl -plaintext -d '{"pipeline_name": "greet", "statuses": ["EXECUTION_STATUS_SUCCEEDED", "EXECUTION_STATUS_FAILED"], "page_size": 10}' \
    "$ADDR" pipeline.v1.PipelineService/ListExecutions
expect "[.executions[].id] == [\"$ID\"]" "the one execution, listed"

section "Run again, terminate it while wait sleeps, then retry it"
run grpcurl -plaintext -d '{"pipeline_name": "greet"}' "$ADDR" pipeline.v1.PipelineService/RunPipeline
ID="$(value .execution.id)"
echo "    execution $ID"
# Poll until `wait` is running, so the cancel has a running program to stop.
for try in $(seq 100); do
    run grpcurl -plaintext -d "{\"execution_id\": \"$ID\"}" "$ADDR" pipeline.v1.PipelineService/GetExecution
    [ "$(value '.execution.steps[] | select(.name == "wait") | .status')" = STEP_STATUS_RUNNING ] && break
    [ "$try" -lt 100 ] || fail "expected step wait to be RUNNING within 10 s"
    sleep 0.1
done
echo "    ok: wait is RUNNING"
SEQ="$(value .execution.lastSequence)"

run grpcurl -plaintext -d "{\"execution_id\": \"$ID\", \"mode\": \"CANCEL_MODE_TERMINATE\"}" \
    "$ADDR" pipeline.v1.PipelineService/CancelExecution
expect '.execution.status == "EXECUTION_STATUS_TERMINATING" or .execution.status == "EXECUTION_STATUS_CANCELLED"' \
    "status TERMINATING (or CANCELLED already)"

run grpcurl -plaintext -d "{\"execution_id\": \"$ID\", \"after_sequence\": $SEQ}" "$ADDR" pipeline.v1.PipelineService/WatchExecution
expect ".[0].event.sequence == \"$((SEQ + 1))\"" "events after sequence $SEQ only"
expect 'any(.[]; .event.type == "EVENT_TYPE_EXECUTION_CANCEL_REQUESTED" and .event.message == "terminate")' "CANCEL_REQUESTED (terminate)"
expect 'any(.[]; .event.type == "EVENT_TYPE_STEP_CANCELLED" and .event.stepName == "wait" and .event.message == "terminated")' \
    "wait CANCELLED: terminated"
expect '.[-1].event.type == "EVENT_TYPE_EXECUTION_CANCELLED" and .[-1].event.executionStatus == "EXECUTION_STATUS_CANCELLED"' \
    "last event EXECUTION_CANCELLED"

run grpcurl -plaintext -d "{\"execution_id\": \"$ID\"}" "$ADDR" pipeline.v1.PipelineService/GetExecution
expect '.execution.status == "EXECUTION_STATUS_CANCELLED"' "status CANCELLED"
expect '[.execution.steps[] | [.name, .status]] == [["hello", "STEP_STATUS_SUCCEEDED"], ["wait", "STEP_STATUS_CANCELLED"], ["done", "STEP_STATUS_CANCELLED"]]' \
    "hello SUCCEEDED, wait and done CANCELLED"
expect '.execution.executionData == {"greeting": "hello"}' "execution data: hello's output only"
SEQ="$(value .execution.lastSequence)"

# A retry keeps what succeeded and runs the rest again.
run grpcurl -plaintext -d "{\"execution_id\": \"$ID\"}" "$ADDR" pipeline.v1.PipelineService/RetryExecution
expect '.execution.status == "EXECUTION_STATUS_RUNNING"' "status RUNNING"
expect '[.execution.steps[] | [.name, .status]] == [["hello", "STEP_STATUS_SUCCEEDED"], ["wait", "STEP_STATUS_PENDING"], ["done", "STEP_STATUS_PENDING"]]' \
    "hello still SUCCEEDED, wait and done PENDING"

run grpcurl -plaintext -d "{\"execution_id\": \"$ID\", \"after_sequence\": $SEQ}" "$ADDR" pipeline.v1.PipelineService/WatchExecution
expect '.[0].event.type == "EVENT_TYPE_EXECUTION_RETRIED"' "EXECUTION_RETRIED first"
expect '[.[].event | select(.type == "EVENT_TYPE_STEP_STARTED") | .stepName] == ["wait", "done"]' "only wait and done ran again"
expect '.[-1].event.type == "EVENT_TYPE_EXECUTION_SUCCEEDED"' "last event EXECUTION_SUCCEEDED"

run grpcurl -plaintext -d "{\"execution_id\": \"$ID\"}" "$ADDR" pipeline.v1.PipelineService/GetExecution
expect '.execution.status == "EXECUTION_STATUS_SUCCEEDED"' "status SUCCEEDED"
expect '[.execution.steps[] | .status] == ["STEP_STATUS_SUCCEEDED", "STEP_STATUS_SUCCEEDED", "STEP_STATUS_SUCCEEDED"]' \
    "every step SUCCEEDED"
expect '[.execution.steps[] | .attempt] == [1, 2, 1]' "wait on attempt 2, hello not run again"
expect '.execution.executionData == {"greeting": "hello", "waited": true}' "execution data complete"

section "Errors: a gRPC status, and grpcurl's exit code 64 + status code"
run_err 9 FAILED_PRECONDITION grpcurl -plaintext -format-error -d "{\"execution_id\": \"$ID\"}" "$ADDR" pipeline.v1.PipelineService/RetryExecution
expect '.message | startswith("cannot retry an execution that is succeeded")' "message says why"

run_err 5 NOT_FOUND grpcurl -plaintext -format-error -d '{"execution_id": "01a20b24-9a0f-776b-9371-6dee82053214"}' \
    "$ADDR" pipeline.v1.PipelineService/GetExecution
expect '.message == "execution '"'"'01a20b24-9a0f-776b-9371-6dee82053214'"'"' not found"' "message names the id"

run_err 3 INVALID_ARGUMENT grpcurl -plaintext -format-error -d '{"execution_id": "nope"}' "$ADDR" pipeline.v1.PipelineService/GetExecution
expect '.details[0]["@type"] == "type.googleapis.com/google.rpc.BadRequest" and .details[0].fieldViolations[0].field == "execution_id"' \
    "a BadRequest detail names the field"

section "Health"
run grpcurl -plaintext "$ADDR" grpc.health.v1.Health/Check
expect '.status == "SERVING"' "SERVING"
run grpcurl -plaintext -d '{"service": "pipeline.v1.PipelineService"}' "$ADDR" grpc.health.v1.Health/Check
expect '.status == "SERVING"' "pipeline.v1.PipelineService SERVING"

echo
echo "grpcurl walkthrough: every response as expected"
