//! Integration tests: a real server on port 0 with a SQLite file in a temp
//! dir, spoken to with the generated tonic client over TCP.

mod admission;
mod auth;
mod cancel_retry;
mod cli;
mod conditions;
mod crash;
mod durability;
mod egress;
mod executions;
mod grpc_steps;
mod grpc_web;
mod helpers;
mod http_steps;
mod malformed;
mod mesh;
mod outage;
mod pipelines;
mod process;
mod replicas;
mod secrets;
mod service;
mod telemetry;
mod tls;
mod validation;
mod watch;
