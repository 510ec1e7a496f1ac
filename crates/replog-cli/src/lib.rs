//! The `replog` operator tool, as a library so that tests and benchmarks run
//! exactly the code the binary runs.
//!
//! `cli` composes the command line from the subcommands' modules; shared
//! helpers are in `support`. Modules depend on `support`, never on `cli`.

pub mod benchmark;
pub mod cli;
pub mod cluster;
mod cluster_demo;
mod demo;
mod inspect;
pub mod repair_cmd;
pub mod state_cmd;
pub mod support;

pub use cli::main_entry;
