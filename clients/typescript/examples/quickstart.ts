// Quickstart for the pipelined TypeScript client.
//
// Creates a pipeline, runs it idempotently, watches it (dropping the stream
// on purpose and resuming it from the last sequence seen), prints the
// result, and shows how to read the field violations of an INVALID_ARGUMENT
// error.
//
//   npx tsx examples/quickstart.ts --addr 127.0.0.1:50051   # or PIPELINED_ADDR
//
// Exits non-zero if anything does not go as described.

import { randomBytes } from "node:crypto";
import { parseArgs } from "node:util";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
// In your own project: import { ... } from "@pipelined/client";
import {
  BadRequestSchema,
  EventType,
  ExecutionStatus,
  PipelineService,
  type ExecutionEvent,
} from "../src/index.js";

type PipelineClient = Client<typeof PipelineService>;

function fail(message: string): never {
  console.error(`FAIL: ${message}`);
  process.exit(1);
}

// Spells a Connect code as in the gRPC spec: InvalidArgument -> INVALID_ARGUMENT.
function codeName(code: Code): string {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

// Stores a four-step pipeline: extract -> wait -> load, and report after both.
// A `set` step succeeds with fixed values; its output is merged into the
// execution data (google.protobuf.Struct fields are plain JSON objects here).
async function createPipeline(client: PipelineClient, name: string): Promise<void> {
  try {
    await client.createPipeline({
      pipeline: {
        name,
        description: "pipelined TypeScript quickstart",
        steps: [
          { name: "extract", kind: { case: "set", value: { values: { source: { table: "orders", rows: 42 } } } } },
          { name: "wait", needs: ["extract"], kind: { case: "sleep", value: { duration: { nanos: 500_000_000 } } } },
          { name: "load", needs: ["wait"], kind: { case: "set", value: { values: { load: { table: "orders_clean", rows: 40 } } } } },
          { name: "report", needs: ["extract", "load"], kind: { case: "set", value: { values: { report: { ok: true } } } } },
        ],
      },
    });
    console.log(`created pipeline ${name}`);
  } catch (err) {
    // CreatePipeline is safe to retry: a repeat answers ALREADY_EXISTS.
    if (ConnectError.from(err).code !== Code.AlreadyExists) throw err;
    console.log(`pipeline ${name} already exists; reusing it`);
  }
}

// Prints the events after `afterSequence`, checking that sequences are
// contiguous, until the stream ends or, with `stopAfter`, until that many
// events have arrived (then it drops the stream, as a lost connection
// would). Returns the last event seen.
async function watch(
  client: PipelineClient,
  executionId: string,
  afterSequence: bigint,
  stopAfter?: number,
): Promise<ExecutionEvent | undefined> {
  const abort = new AbortController();
  let expected = afterSequence + 1n;
  let last: ExecutionEvent | undefined;
  let received = 0;
  try {
    for await (const message of client.watchExecution({ executionId, afterSequence }, { signal: abort.signal })) {
      const event = message.event;
      if (event === undefined) continue; // a heartbeat on an idle stream
      if (event.sequence !== expected) fail(`expected sequence ${expected}, got ${event.sequence} (gap or duplicate)`);
      expected += 1n;
      console.log(`event ${event.sequence} ${EventType[event.type]} ${event.stepName}`.trimEnd());
      last = event;
      if (stopAfter !== undefined && ++received >= stopAfter) {
        abort.abort(); // drop the stream on purpose
        break;
      }
    }
  } catch (err) {
    if (!abort.signal.aborted) throw err;
  }
  return last;
}

async function main(): Promise<void> {
  const { values: args } = parseArgs({
    options: { addr: { type: "string", default: process.env.PIPELINED_ADDR ?? "127.0.0.1:50051" } },
  });
  // The gRPC protocol over HTTP/2 (not the Connect protocol): pipelined speaks gRPC.
  const transport = createGrpcTransport({ baseUrl: `http://${args.addr}` });
  const client = createClient(PipelineService, transport);
  const suffix = randomBytes(4).toString("hex");
  const name = `quickstart-typescript-${suffix}`;

  // 1. Create the pipeline (or reuse it).
  await createPipeline(client, name);

  // 2. Run it with a request id; the same id returns the same execution.
  const run = { pipelineName: name, input: { customer: "acme" }, requestId: `run-${suffix}` };
  const { execution } = await client.runPipeline(run);
  if (execution === undefined) fail("RunPipeline returned no execution");
  console.log(`started execution ${execution.id} (${ExecutionStatus[execution.status]})`);
  const again = await client.runPipeline(run);
  if (again.execution?.id !== execution.id) fail(`same request_id gave another execution: ${again.execution?.id}`);
  console.log(`same request_id -> same execution ${again.execution.id}`);

  // 3. Watch it, drop the stream after 3 events, resume from the last sequence seen.
  const seen = await watch(client, execution.id, 0n, 3);
  const last = seen?.sequence ?? 0n;
  console.log(`reconnected after sequence ${last}`);
  const final = await watch(client, execution.id, last);
  const terminal = [ExecutionStatus.SUCCEEDED, ExecutionStatus.FAILED, ExecutionStatus.CANCELLED];
  if (final === undefined || !terminal.includes(final.executionStatus)) {
    fail("the watch ended before the execution finished");
  }
  console.log(`watched sequences 1..${final.sequence} with no gap or duplicate`);

  // 4. The final state, with the input deep-merged with every step's output.
  const done = (await client.getExecution({ executionId: execution.id })).execution;
  if (done === undefined) fail("GetExecution returned no execution");
  console.log(`status: ${ExecutionStatus[done.status]}`);
  console.log(`execution_data: ${JSON.stringify(done.executionData)}`);

  // 5. An invalid pipeline: the error carries a google.rpc.BadRequest with
  //    one field violation per problem.
  try {
    await client.createPipeline({
      pipeline: {
        name: `quickstart-typescript-invalid-${suffix}`,
        steps: [
          { name: "extract", kind: { case: "noop", value: {} } },
          { name: "load", needs: ["transform"], kind: { case: "noop", value: {} } }, // no such step
          { name: "bad name", kind: { case: "noop", value: {} } }, // spaces are not allowed
        ],
      },
    });
    fail("the invalid pipeline was accepted");
  } catch (err) {
    const error = ConnectError.from(err);
    console.log(`error: ${codeName(error.code)}`);
    // findDetails decodes grpc-status-details-bin into typed messages.
    const violations = error.findDetails(BadRequestSchema).flatMap((badRequest) => badRequest.fieldViolations);
    for (const violation of violations) {
      console.log(`violation: ${violation.field}: ${violation.description}`);
    }
    if (error.code !== Code.InvalidArgument || violations.length === 0) {
      fail("expected INVALID_ARGUMENT with field violations");
    }
  }

  if (done.status !== ExecutionStatus.SUCCEEDED) fail(`execution ended ${ExecutionStatus[done.status]}`);
}

main().catch((err: unknown) => fail(String(err)));
