//! Operations telemetry: Prometheus metrics ([`metrics`]) and logs and
//! OpenTelemetry traces ([`tracing`]).

pub mod metrics;
pub mod tracing;
