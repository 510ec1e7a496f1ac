//! The `replog` operator tool, as a library so that tests and benchmarks run
//! exactly the code the binary runs.

pub mod benchmark;
pub mod cli;
pub mod cluster;
mod cluster_demo;
mod demo;
pub mod grpc_unary;
mod inspect;
pub mod loadgen;
pub mod state_cmd;

pub use cli::main_entry;
