// @pipelined/client: the pipeline.v1 messages and the PipelineService
// descriptor, generated from proto/ by scripts/proto.sh gen (see src/gen/),
// plus the google.rpc error details that the server attaches to errors.
//
//   import { createClient } from "@connectrpc/connect";
//   import { createGrpcTransport } from "@connectrpc/connect-node";
//   import { PipelineService } from "@pipelined/client";
//
//   const client = createClient(PipelineService, createGrpcTransport({ baseUrl: "http://127.0.0.1:50051" }));

export * from "./gen/pipeline/v1/pipeline_pb.js";
export * from "./gen/pipeline/v1/worker_pb.js";
export * from "./gen/google/rpc/error_details_pb.js";
