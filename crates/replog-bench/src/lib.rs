//! Benchmark tooling of replog, kept out of the product (`replog`,
//! `replog-proto`): the closed-loop load generator (`loadgen`), its targets
//! (`replog_target`: a replog cluster; `etcd`: an etcd cluster, with the
//! subset of etcd's API it uses), the unary gRPC caller over h2 both go
//! through (`grpc_unary`), and the `replog-bench` command line (`cli`,
//! `cluster`). It reuses the product's report, size parser and CLI helpers
//! (`replog_cli::benchmark`, `replog_cli::support`), so that its output is
//! the local `replog benchmark`'s.

pub mod cli;
pub mod cluster;
pub mod etcd;
pub mod grpc_unary;
pub mod loadgen;
pub mod replog_target;

pub use cli::main_entry;
