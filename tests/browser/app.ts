// A page that speaks to pipelined from the browser with gRPC-Web: it creates
// a pipeline, runs it, follows it with the server-streaming WatchExecution
// until the stream ends, reads it back with GetExecution, lists pipelines,
// and asks for an unknown execution to see a gRPC error arrive with its code.
// Everything it learns goes into the DOM: a table for people, and JSON in
// #result for the test (run-test.mjs). body[data-state] ends as "done" or
// "error".
//
// Query string: ?server=http://127.0.0.1:50051 (required) and, for the CORS
// check, &expect=refused: the first call must then fail.

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import {
  EventType,
  ExecutionStatus,
  PipelineService,
  StepStatus,
} from "../../clients/typescript/src/gen/pipeline/v1/pipeline_pb.ts";

const params = new URLSearchParams(location.search);
const server = params.get("server");
const expectRefused = params.get("expect") === "refused";

function show(state: "done" | "error", summary: string, result: unknown) {
  document.getElementById("summary")!.textContent = summary;
  document.getElementById("result")!.textContent = JSON.stringify(result, null, 2);
  document.body.dataset.state = state;
}

function describe(err: unknown) {
  const e = ConnectError.from(err);
  return { code: Code[e.code], rawMessage: e.rawMessage };
}

async function main() {
  if (!server) {
    throw new Error("missing ?server=http://host:port");
  }
  const client = createClient(
    PipelineService,
    createGrpcWebTransport({ baseUrl: server }),
  );

  if (expectRefused) {
    try {
      await client.listPipelines({});
    } catch (err) {
      show("done", `Refused, as expected: ${String(err)}`, { refused: true, ...describe(err) });
      return;
    }
    show("error", "The call went through from an origin that should be refused", { refused: false });
    return;
  }

  const name = `browser-${Date.now()}`;
  const created = await client.createPipeline({
    pipeline: {
      name,
      description: "Created by a browser over gRPC-Web",
      steps: [
        { name: "hello", kind: { case: "set", value: { values: { greeting: "hello" } } } },
        {
          name: "nap",
          needs: ["hello"],
          kind: { case: "sleep", value: { duration: { seconds: 0n, nanos: 300_000_000 } } },
        },
        { name: "done", needs: ["nap"], kind: { case: "noop", value: {} } },
      ],
    },
  });

  const run = await client.runPipeline({
    pipelineName: name,
    input: { from: "chromium" },
    labels: { client: "browser" },
  });
  const id = run.execution!.id;

  // Server streaming over gRPC-Web: the stream ends after the terminal event.
  const events: { sequence: number; type: string; step: string }[] = [];
  for await (const response of client.watchExecution({ executionId: id })) {
    const event = response.event;
    if (event) {
      events.push({
        sequence: Number(event.sequence),
        type: EventType[event.type],
        step: event.stepName,
      });
    }
  }

  const execution = (await client.getExecution({ executionId: id })).execution!;
  const listed = (await client.listPipelines({})).pipelines.map((p) => p.name);

  let notFound: unknown = null;
  try {
    await client.getExecution({ executionId: "01a20b24-9a0f-776b-9371-6dee82053214" });
  } catch (err) {
    notFound = describe(err);
  }

  const table = document.getElementById("steps") as HTMLTableElement;
  table.innerHTML = "<tr><th>step</th><th>status</th><th>attempt</th></tr>";
  for (const step of execution.steps) {
    const row = table.insertRow();
    row.insertCell().textContent = step.name;
    row.insertCell().textContent = StepStatus[step.status];
    row.insertCell().textContent = String(step.attempt);
  }
  const status = ExecutionStatus[execution.status];
  show("done", `Execution ${id} of ${name}: ${status} after ${events.length} events`, {
    pipeline: created.pipeline!.name,
    version: Number(created.pipeline!.version),
    executionId: id,
    status,
    steps: execution.steps.map((s) => ({ name: s.name, status: StepStatus[s.status] })),
    executionData: execution.executionData,
    labels: execution.labels,
    events,
    listed: listed.includes(name),
    notFound,
  });
}

main().catch((err) => {
  console.error(err);
  show("error", `Failed: ${String(err)}`, { error: String(err), ...describe(err) });
});
