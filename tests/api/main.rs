//! Integration tests: a real server on port 0 with a SQLite file in a temp
//! dir, spoken to with the generated tonic client over TCP.

mod admission;
mod cancel_retry;
mod cli;
mod crash;
mod executions;
mod helpers;
mod pipelines;
mod process;
mod service;
mod validation;
mod watch;
