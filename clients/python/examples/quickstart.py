"""Quickstart for the pipelined Python client.

Creates a pipeline, runs it idempotently, watches it (dropping the stream on
purpose and resuming it from the last sequence seen), prints the result, and
shows how to read the field violations of an INVALID_ARGUMENT error.

    python examples/quickstart.py --addr 127.0.0.1:50051   # or PIPELINED_ADDR

Exits non-zero if anything does not go as described.
"""

import argparse
import json
import os
import sys
import uuid

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pipeline.v1 import pipeline_pb2 as pb
from pipeline.v1 import pipeline_pb2_grpc as pb_grpc

TERMINAL_STATUSES = {
    pb.EXECUTION_STATUS_SUCCEEDED,
    pb.EXECUTION_STATUS_FAILED,
    pb.EXECUTION_STATUS_CANCELLED,
}


def fail(message: str) -> None:
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def short(enum_type, value: int) -> str:
    """EXECUTION_STATUS_SUCCEEDED -> SUCCEEDED, EVENT_TYPE_STEP_STARTED -> STEP_STARTED."""
    name = enum_type.Name(value)
    prefix = {"ExecutionStatus": "EXECUTION_STATUS_", "EventType": "EVENT_TYPE_"}[enum_type.DESCRIPTOR.name]
    return name.removeprefix(prefix)


def create_pipeline(client: pb_grpc.PipelineServiceStub, name: str) -> None:
    """Stores a four-step pipeline: extract -> wait -> load, and report after both."""
    pipeline = pb.Pipeline(
        name=name,
        description="pipelined Python quickstart",
        steps=[
            # A `set` step succeeds with fixed values; its output is merged
            # into the execution data.
            pb.Step(name="extract", set=pb.SetStep(values={"source": {"table": "orders", "rows": 42}})),
            pb.Step(name="wait", needs=["extract"], sleep=pb.SleepStep(duration={"nanos": 500_000_000})),
            pb.Step(name="load", needs=["wait"], set=pb.SetStep(values={"load": {"table": "orders_clean", "rows": 40}})),
            pb.Step(name="report", needs=["extract", "load"], set=pb.SetStep(values={"report": {"ok": True}})),
        ],
    )
    try:
        client.CreatePipeline(pb.CreatePipelineRequest(pipeline=pipeline))
        print(f"created pipeline {name}")
    except grpc.RpcError as err:
        # CreatePipeline is safe to retry: a repeat answers ALREADY_EXISTS.
        if err.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        print(f"pipeline {name} already exists; reusing it")


def watch(client, execution_id: str, after_sequence: int, stop_after: int | None = None):
    """Yields the events after `after_sequence`, checking that sequences are
    contiguous. With `stop_after`, cancels the stream after that many events
    (as a dropped connection would)."""
    stream = client.WatchExecution(
        pb.WatchExecutionRequest(execution_id=execution_id, after_sequence=after_sequence)
    )
    expected = after_sequence + 1
    received = 0
    for message in stream:
        if not message.HasField("event"):  # a heartbeat on an idle stream
            continue
        event = message.event
        if event.sequence != expected:
            fail(f"expected sequence {expected}, got {event.sequence} (gap or duplicate)")
        expected += 1
        received += 1
        yield event
        if stop_after is not None and received >= stop_after:
            stream.cancel()  # drop the stream on purpose
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default=os.environ.get("PIPELINED_ADDR", "127.0.0.1:50051"),
                        help="server address host:port (default: $PIPELINED_ADDR or 127.0.0.1:50051)")
    args = parser.parse_args()

    with grpc.insecure_channel(args.addr) as channel:
        client = pb_grpc.PipelineServiceStub(channel)
        suffix = uuid.uuid4().hex[:8]
        name = f"quickstart-python-{suffix}"

        # 1. Create the pipeline (or reuse it).
        create_pipeline(client, name)

        # 2. Run it with a request id; the same id returns the same execution.
        run = pb.RunPipelineRequest(pipeline_name=name, input={"customer": "acme"}, request_id=f"run-{suffix}")
        execution = client.RunPipeline(run).execution
        print(f"started execution {execution.id} ({short(pb.ExecutionStatus, execution.status)})")
        again = client.RunPipeline(run).execution
        if again.id != execution.id:
            fail(f"same request_id gave another execution: {again.id}")
        print(f"same request_id -> same execution {again.id}")

        # 3. Watch it, drop the stream after 3 events, resume from the last sequence seen.
        last = 0
        for event in watch(client, execution.id, after_sequence=0, stop_after=3):
            print(f"event {event.sequence} {short(pb.EventType, event.type)} {event.step_name}".rstrip())
            last = event.sequence
        print(f"reconnected after sequence {last}")
        final_event = None
        for event in watch(client, execution.id, after_sequence=last):
            print(f"event {event.sequence} {short(pb.EventType, event.type)} {event.step_name}".rstrip())
            final_event = event
        if final_event is None or final_event.execution_status not in TERMINAL_STATUSES:
            fail("the watch ended before the execution finished")
        print(f"watched sequences 1..{final_event.sequence} with no gap or duplicate")

        # 4. The final state, with the input deep-merged with every step's output.
        execution = client.GetExecution(pb.GetExecutionRequest(execution_id=execution.id)).execution
        print(f"status: {short(pb.ExecutionStatus, execution.status)}")
        # (Struct numbers are doubles, so 40 comes back as 40.0.)
        data = json_format.MessageToDict(execution.execution_data)
        print(f"execution_data: {json.dumps(data, sort_keys=True)}")

        # 5. An invalid pipeline: the error carries a google.rpc.BadRequest
        #    with one field violation per problem.
        invalid = pb.Pipeline(
            name=f"quickstart-python-invalid-{suffix}",
            steps=[
                pb.Step(name="extract", noop=pb.NoopStep()),
                pb.Step(name="load", needs=["transform"], noop=pb.NoopStep()),  # no such step
                pb.Step(name="bad name", noop=pb.NoopStep()),  # spaces are not allowed
            ],
        )
        try:
            client.CreatePipeline(pb.CreatePipelineRequest(pipeline=invalid))
            fail("the invalid pipeline was accepted")
        except grpc.RpcError as err:
            print(f"error: {err.code().name}")
            status = rpc_status.from_call(err)  # decodes grpc-status-details-bin
            violations = 0
            for detail in status.details if status else []:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad_request = error_details_pb2.BadRequest()
                    detail.Unpack(bad_request)
                    for violation in bad_request.field_violations:
                        print(f"violation: {violation.field}: {violation.description}")
                        violations += 1
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT or violations == 0:
                fail("expected INVALID_ARGUMENT with field violations")

        if execution.status != pb.EXECUTION_STATUS_SUCCEEDED:
            fail(f"execution ended {short(pb.ExecutionStatus, execution.status)}")


if __name__ == "__main__":
    main()
