//! The `replog` operator tool, as a library so that tests and benchmarks run
//! exactly the code the binary runs.

pub mod benchmark;
pub mod cli;
mod demo;
mod inspect;

pub use cli::main_entry;
