//! What several commands share: the async runtime, the progress bar, the
//! logging setup, the parser of `ID=HOST:PORT` lists and the single-replica
//! log of the local demo and benchmark.
//!
//! Invariants: every command's runtime comes from [`runtime`] or
//! [`runtime_with_workers`] (one builder); every flag that lists replicas as
//! `ID=HOST:PORT` goes through [`parse_replica_addresses`], so they all
//! accept and refuse the same items. This module imports no other module of
//! the crate (it sits below all of them).

use std::path::Path;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use replog_storage::{InitOptions, RocksStorage};

/// The async runtime of a command: multi-threaded (one worker per core),
/// with I/O and timers.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    build_runtime(None)
}

/// [`runtime`] with `worker_threads` workers (the embedded demo and the
/// local benchmark use two, beside the log's own threads).
pub fn runtime_with_workers(worker_threads: usize) -> Result<tokio::runtime::Runtime> {
    build_runtime(Some(worker_threads))
}

fn build_runtime(worker_threads: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A progress bar of long CLI work on stderr: hidden when `show` is false
/// (e.g. `--json`) or stderr is not a terminal (cron).
pub fn progress_bar(len: u64, what: &str, show: bool) -> ProgressBar {
    if !show || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Logs to stderr with `filter` (e.g. `info`, `replog=debug,raft=info`);
/// an invalid filter falls back to `warn`.
pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Whether the items of a replica list must name an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Address {
    /// `ID=HOST:PORT` only (`--peers`).
    Required,
    /// `ID=HOST:PORT` or a bare `ID` (`--members`), whose address is then
    /// empty.
    Optional,
}

/// Parses a flag's list of replicas, `ID=HOST:PORT` (or, with
/// [`Address::Optional`], `ID`), in the order given. `what` names an item
/// in errors (`peer`, `member`).
///
/// One rule for every such flag: items and their parts are trimmed, blank
/// items are skipped, an id is a non-zero number, an `=` is followed by an
/// address, and no id is listed twice.
pub fn parse_replica_addresses(
    items: &[String],
    what: &str,
    address: Address,
) -> Result<Vec<(u64, String)>> {
    let mut replicas: Vec<(u64, String)> = Vec::new();
    for s in items.iter().filter(|s| !s.trim().is_empty()) {
        let (id, addr) = match (s.split_once('='), address) {
            (Some((id, addr)), _) => (id, Some(addr.trim())),
            (None, Address::Optional) => (s.as_str(), None),
            (None, Address::Required) => bail!("{what} '{s}': expected ID=HOST:PORT"),
        };
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("{what} '{s}': the id must be a number"))?;
        if id == 0 || addr == Some("") {
            bail!("{what} '{s}': expected a non-zero id and an address");
        }
        if replicas.iter().any(|(listed, _)| *listed == id) {
            bail!("{what} {id} is listed twice");
        }
        replicas.push((id, addr.unwrap_or_default().to_string()));
    }
    Ok(replicas)
}

/// Turns `path` into a VOTING replica of a log of its own (cluster
/// `cluster_id`, replica 1 alone).
pub fn init_single_replica(path: &Path, cluster_id: &str) -> Result<()> {
    RocksStorage::initialize(path, &InitOptions::single_replica(cluster_id))
        .with_context(|| format!("cannot initialize {}", path.display()))?;
    Ok(())
}

/// Parses `argv` (its first item is the command's name) into one
/// subcommand's arguments, as the subcommand would parse them: for tests of
/// a module's flags without the whole command line.
#[cfg(test)]
pub fn parse_args<T: clap::Args + clap::FromArgMatches>(argv: &[&str]) -> Result<T, clap::Error> {
    let command = T::augment_args(clap::Command::new("replog-test"));
    let mut matches = command.try_get_matches_from(argv)?;
    T::from_arg_matches_mut(&mut matches)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn replica_lists_parse_in_order() {
        let got = parse_replica_addresses(
            &items(&[" 3=h3:1 ", "", "1 = h1:1"]),
            "peer",
            Address::Required,
        )
        .unwrap();
        assert_eq!(got, [(3, "h3:1".to_string()), (1, "h1:1".to_string())]);
        let got =
            parse_replica_addresses(&items(&["1", "2=h2:1"]), "member", Address::Optional).unwrap();
        assert_eq!(got, [(1, String::new()), (2, "h2:1".to_string())]);
        assert!(parse_replica_addresses(&[], "peer", Address::Required)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn one_validation_for_every_replica_list() {
        let err = |s: &[&str], address| {
            parse_replica_addresses(&items(s), "peer", address)
                .unwrap_err()
                .to_string()
        };
        for address in [Address::Required, Address::Optional] {
            assert!(err(&["x=h:1"], address).contains("the id must be a number"));
            assert!(err(&["0=h:1"], address).contains("non-zero id"));
            assert!(err(&["2="], address).contains("an address"));
            assert_eq!(err(&["2=h:1", "2=h:2"], address), "peer 2 is listed twice");
        }
        assert!(err(&["2"], Address::Required).contains("expected ID=HOST:PORT"));
        assert!(err(&["0"], Address::Optional).contains("non-zero id"));
        assert!(err(&["1", "1=h:1"], Address::Optional).contains("listed twice"));
    }
}
