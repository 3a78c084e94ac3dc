//! pipelined: a pipeline execution service spoken to over gRPC.
//!
//! Layers, outermost first: [`transport`] (gRPC handlers and conversions),
//! [`engine`] (executor, runners, watchers) over [`domain`] (definitions,
//! state machines, data merging), and [`storage`] (SeaORM entities and
//! queries). [`server`] wires them together; [`cli`] is the command line,
//! [`config`] its configuration file.

pub mod cli;
pub mod config;
pub mod domain;
pub mod engine;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod transport;

/// Code generated from `proto/`.
pub mod proto {
    pub mod v1 {
        tonic::include_proto!("pipeline.v1");
    }

    /// Descriptors of our protos, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/pipeline_descriptor.bin"));
}
