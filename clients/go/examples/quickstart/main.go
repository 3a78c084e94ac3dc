// Quickstart for the pipelined Go client.
//
// Creates a pipeline, runs it idempotently, watches it (dropping the stream
// on purpose and resuming it from the last sequence seen), prints the
// result, and shows how to read the field violations of an INVALID_ARGUMENT
// error.
//
//	go run ./examples/quickstart -addr 127.0.0.1:50051   # or PIPELINED_ADDR
//
// Exits non-zero if anything does not go as described.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"

	pipelinev1 "github.com/pipelined/pipelined/clients/go/pipeline/v1"
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("FAIL: ")
	defaultAddr := os.Getenv("PIPELINED_ADDR")
	if defaultAddr == "" {
		defaultAddr = "127.0.0.1:50051"
	}
	addr := flag.String("addr", defaultAddr, "server address host:port (default: $PIPELINED_ADDR or 127.0.0.1:50051)")
	flag.Parse()

	conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	client := pipelinev1.NewPipelineServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	suffix := randomSuffix()
	name := "quickstart-go-" + suffix

	// 1. Create the pipeline (or reuse it).
	createPipeline(ctx, client, name)

	// 2. Run it with a request id; the same id returns the same execution.
	run := &pipelinev1.RunPipelineRequest{
		PipelineName: name,
		Input:        mustStruct(map[string]any{"customer": "acme"}),
		RequestId:    "run-" + suffix,
	}
	first, err := client.RunPipeline(ctx, run)
	if err != nil {
		log.Fatalf("RunPipeline: %v", err)
	}
	execution := first.GetExecution()
	fmt.Printf("started execution %s (%s)\n", execution.GetId(), shortStatus(execution.GetStatus()))
	again, err := client.RunPipeline(ctx, run)
	if err != nil {
		log.Fatalf("RunPipeline again: %v", err)
	}
	if again.GetExecution().GetId() != execution.GetId() {
		log.Fatalf("same request_id gave another execution: %s", again.GetExecution().GetId())
	}
	fmt.Printf("same request_id -> same execution %s\n", again.GetExecution().GetId())

	// 3. Watch it, drop the stream after 3 events, resume from the last sequence seen.
	last, _ := watch(ctx, client, execution.GetId(), 0, 3)
	fmt.Printf("reconnected after sequence %d\n", last)
	last, final := watch(ctx, client, execution.GetId(), last, 0)
	if final == nil || !isTerminal(final.GetExecutionStatus()) {
		log.Fatal("the watch ended before the execution finished")
	}
	fmt.Printf("watched sequences 1..%d with no gap or duplicate\n", last)

	// 4. The final state, with the input deep-merged with every step's output.
	got, err := client.GetExecution(ctx, &pipelinev1.GetExecutionRequest{ExecutionId: execution.GetId()})
	if err != nil {
		log.Fatalf("GetExecution: %v", err)
	}
	execution = got.GetExecution()
	fmt.Printf("status: %s\n", shortStatus(execution.GetStatus()))
	data, err := json.Marshal(execution.GetExecutionData().AsMap())
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("execution_data: %s\n", data)

	// 5. An invalid pipeline: the error carries a google.rpc.BadRequest with
	//    one field violation per problem.
	_, err = client.CreatePipeline(ctx, &pipelinev1.CreatePipelineRequest{Pipeline: &pipelinev1.Pipeline{
		Name: "quickstart-go-invalid-" + suffix,
		Steps: []*pipelinev1.Step{
			{Name: "extract", Kind: &pipelinev1.Step_Noop{Noop: &pipelinev1.NoopStep{}}},
			{Name: "load", Needs: []string{"transform"}, Kind: &pipelinev1.Step_Noop{Noop: &pipelinev1.NoopStep{}}}, // no such step
			{Name: "bad name", Kind: &pipelinev1.Step_Noop{Noop: &pipelinev1.NoopStep{}}},                           // spaces are not allowed
		},
	}})
	if err == nil {
		log.Fatal("the invalid pipeline was accepted")
	}
	st, _ := status.FromError(err) // decodes grpc-status-details-bin
	fmt.Printf("error: %s\n", codeName(st.Code()))
	violations := 0
	for _, detail := range st.Details() {
		if badRequest, ok := detail.(*errdetails.BadRequest); ok {
			for _, v := range badRequest.GetFieldViolations() {
				fmt.Printf("violation: %s: %s\n", v.GetField(), v.GetDescription())
				violations++
			}
		}
	}
	if st.Code() != codes.InvalidArgument || violations == 0 {
		log.Fatal("expected INVALID_ARGUMENT with field violations")
	}

	if execution.GetStatus() != pipelinev1.ExecutionStatus_EXECUTION_STATUS_SUCCEEDED {
		log.Fatalf("execution ended %s", shortStatus(execution.GetStatus()))
	}
}

// createPipeline stores a four-step pipeline: extract -> wait -> load, and
// report after both.
func createPipeline(ctx context.Context, client pipelinev1.PipelineServiceClient, name string) {
	set := func(values map[string]any) *pipelinev1.Step_Set {
		// A `set` step succeeds with fixed values; its output is merged
		// into the execution data.
		return &pipelinev1.Step_Set{Set: &pipelinev1.SetStep{Values: mustStruct(values)}}
	}
	pipeline := &pipelinev1.Pipeline{
		Name:        name,
		Description: "pipelined Go quickstart",
		Steps: []*pipelinev1.Step{
			{Name: "extract", Kind: set(map[string]any{"source": map[string]any{"table": "orders", "rows": 42}})},
			{Name: "wait", Needs: []string{"extract"}, Kind: &pipelinev1.Step_Sleep{Sleep: &pipelinev1.SleepStep{Duration: durationpb.New(500 * time.Millisecond)}}},
			{Name: "load", Needs: []string{"wait"}, Kind: set(map[string]any{"load": map[string]any{"table": "orders_clean", "rows": 40}})},
			{Name: "report", Needs: []string{"extract", "load"}, Kind: set(map[string]any{"report": map[string]any{"ok": true}})},
		},
	}
	_, err := client.CreatePipeline(ctx, &pipelinev1.CreatePipelineRequest{Pipeline: pipeline})
	switch status.Code(err) {
	case codes.OK:
		fmt.Printf("created pipeline %s\n", name)
	case codes.AlreadyExists: // CreatePipeline is safe to retry: a repeat answers ALREADY_EXISTS.
		fmt.Printf("pipeline %s already exists; reusing it\n", name)
	default:
		log.Fatalf("CreatePipeline: %v", err)
	}
}

// watch prints the events after afterSequence, checking that sequences are
// contiguous, until the stream ends or, with stopAfter > 0, until it has
// seen that many events (then it drops the stream, as a lost connection
// would). It returns the last sequence seen and the last event.
func watch(ctx context.Context, client pipelinev1.PipelineServiceClient, executionID string, afterSequence int64, stopAfter int) (int64, *pipelinev1.ExecutionEvent) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // cancelling the context closes the stream
	stream, err := client.WatchExecution(ctx, &pipelinev1.WatchExecutionRequest{ExecutionId: executionID, AfterSequence: afterSequence})
	if err != nil {
		log.Fatalf("WatchExecution: %v", err)
	}
	last := afterSequence
	var lastEvent *pipelinev1.ExecutionEvent
	for received := 0; stopAfter == 0 || received < stopAfter; {
		message, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break // the server closes the stream after the terminal event
		}
		if err != nil {
			log.Fatalf("WatchExecution: %v", err)
		}
		event := message.GetEvent()
		if event == nil { // a heartbeat on an idle stream
			continue
		}
		if event.GetSequence() != last+1 {
			log.Fatalf("expected sequence %d, got %d (gap or duplicate)", last+1, event.GetSequence())
		}
		fmt.Println(strings.TrimSpace(fmt.Sprintf("event %d %s %s", event.GetSequence(),
			strings.TrimPrefix(event.GetType().String(), "EVENT_TYPE_"), event.GetStepName())))
		last, lastEvent = event.GetSequence(), event
		received++
	}
	return last, lastEvent
}

func isTerminal(s pipelinev1.ExecutionStatus) bool {
	return s == pipelinev1.ExecutionStatus_EXECUTION_STATUS_SUCCEEDED ||
		s == pipelinev1.ExecutionStatus_EXECUTION_STATUS_FAILED ||
		s == pipelinev1.ExecutionStatus_EXECUTION_STATUS_CANCELLED
}

// shortStatus turns EXECUTION_STATUS_SUCCEEDED into SUCCEEDED.
func shortStatus(s pipelinev1.ExecutionStatus) string {
	return strings.TrimPrefix(s.String(), "EXECUTION_STATUS_")
}

// codeName spells a gRPC code as in the spec: InvalidArgument -> INVALID_ARGUMENT.
func codeName(c codes.Code) string {
	var b strings.Builder
	var prev rune
	for _, r := range c.String() {
		if r >= 'A' && r <= 'Z' && prev >= 'a' && prev <= 'z' {
			b.WriteByte('_')
		}
		b.WriteRune(r)
		prev = r
	}
	return strings.ToUpper(b.String())
}

func mustStruct(m map[string]any) *structpb.Struct {
	s, err := structpb.NewStruct(m)
	if err != nil {
		log.Fatal(err)
	}
	return s
}

func randomSuffix() string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		log.Fatal(err)
	}
	return hex.EncodeToString(b)
}
