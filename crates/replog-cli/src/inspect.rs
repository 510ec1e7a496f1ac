//! `replog initialize`, `replog read` and `replog status`: operator commands
//! on a replica's data directory, and their arguments (`replog status
//! --endpoint` is answered by [`crate::cluster::status_endpoints`]).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::ArgAction;
use replog_log::application_entries;
use replog_storage::{InitOptions, LogStorage, Member, OpenOptions, RecoveryReport, RocksStorage};
use serde::Serialize;

use crate::support::{parse_replica_addresses, Address};

#[derive(Debug, clap::Args)]
pub struct InitializeArgs {
    /// The replica's data directory (must be empty or missing).
    #[arg(long)]
    pub path: PathBuf,
    /// Cluster id shared by all replicas of the log (letters, digits, . _ -).
    #[arg(long)]
    pub cluster_id: String,
    /// This replica's id (non-zero, unique in the cluster).
    #[arg(long)]
    pub replica_id: u64,
    /// Initial voting members: `1,2,3` or `1=host:port,2=host:port,...`.
    /// Defaults to this replica alone.
    #[arg(long, value_delimiter = ',')]
    pub members: Vec<String>,
    /// Disaster restore: found the log with the scheduler state of this
    /// backup file (checked whole first; staged here and committed through
    /// the log when this replica first leads with --state). Give the new
    /// cluster a new --cluster-id, so replicas of the damaged cluster can
    /// never rejoin; found it with this replica alone (--members of itself)
    /// and add the others, started EMPTY, with `replog members add`.
    #[arg(long)]
    pub from_backup: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    /// The replica's data directory.
    #[arg(long)]
    pub path: PathBuf,
    /// First position to print (default: the beginning of the log).
    #[arg(long)]
    pub from: Option<u64>,
    /// Last position to print (default: the last committed position).
    #[arg(long)]
    pub to: Option<u64>,
    /// Fail on any corruption (true), or print the intact prefix (false).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub strict: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: ReadFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ReadFormat {
    /// position, size and a printable preview per line
    Text,
    /// one JSON object per line with the data in hex
    Json,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The replica's data directory (a stopped or running replica).
    #[arg(
        long,
        required_unless_present = "endpoint",
        conflicts_with = "endpoint"
    )]
    pub path: Option<PathBuf>,
    /// Running replica servers (`host:port,...`): show each one's view.
    #[arg(long, env = "REPLOG_ENDPOINTS", value_delimiter = ',')]
    pub endpoint: Vec<String>,
    /// Fail on any corruption (true), or report it (false).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub strict: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Parses `1,2,3` or `1=host:port,...` member lists (see
/// [`parse_replica_addresses`]); none means this replica alone.
pub fn parse_members(items: &[String], replica_id: u64) -> Result<Vec<Member>> {
    let members = parse_replica_addresses(items, "member", Address::Optional)?;
    if members.is_empty() {
        return Ok(vec![Member {
            id: replica_id,
            address: String::new(),
        }]);
    }
    Ok(members
        .into_iter()
        .map(|(id, address)| Member { id, address })
        .collect())
}

pub fn initialize(a: InitializeArgs) -> Result<()> {
    let members = parse_members(&a.members, a.replica_id)?;
    // A backup is checked whole before anything is created: a bad file
    // changes nothing on disk.
    let backup = match &a.from_backup {
        Some(file) => Some(
            replog_store::backup::inspect(file, None)
                .with_context(|| format!("{} is not a sound backup", file.display()))?,
        ),
        None => None,
    };
    let s = RocksStorage::initialize(
        &a.path,
        &InitOptions {
            cluster_id: a.cluster_id.clone(),
            replica_id: a.replica_id,
            members: members.clone(),
        },
    )
    .with_context(|| format!("cannot initialize {}", a.path.display()))?;
    if let (Some(file), Some(b)) = (&a.from_backup, &backup) {
        // Staged, to be committed through the log as soon as this replica
        // leads: the restored state is then in the log, and replicas that
        // join later (EMPTY) replay it like any other write.
        drop(s);
        let loaded = (|| {
            // Reopened with the store's column families: a replica is
            // created with the log's own only.
            let opts = OpenOptions {
                column_families: replog_store::COLUMN_FAMILIES.map(String::from).to_vec(),
                ..Default::default()
            };
            let (s, _) = RocksStorage::open(&a.path, &opts)?;
            let staging = replog_store::Staging::open(s.shared_db(), &a.path)?;
            let f = std::fs::File::open(file)?;
            staging.stage_with(
                std::io::BufReader::with_capacity(1 << 20, f),
                None,
                replog_storage::now_unix_ms(),
                true,
            )?;
            staging.state().flush()?;
            anyhow::Ok(())
        })();
        if let Err(e) = loaded {
            let _ = std::fs::remove_dir_all(&a.path);
            return Err(e.context(format!(
                "cannot load {} into the new replica (nothing was kept)",
                file.display()
            )));
        }
        println!(
            "Initialized replica {} of the new cluster '{}' in VOTING status at {} with the state of {} \
             (backup of cluster '{}' at position {}: {} records), committed through the log when it \
             first leads (start it with --state). Start the other replicas EMPTY and add them with \
             `replog members add`: they catch up from the log.",
            a.replica_id,
            a.cluster_id,
            a.path.display(),
            file.display(),
            b.header.cluster_id,
            b.header.position,
            b.records
        );
        return Ok(());
    }
    let ids: Vec<String> = members.iter().map(|m| m.id.to_string()).collect();
    println!(
        "Initialized replica {} of cluster '{}' in VOTING status at {} (members: {})",
        a.replica_id,
        a.cluster_id,
        s.dir().display(),
        ids.join(",")
    );
    Ok(())
}

fn open_read_only(path: &std::path::Path, strict: bool) -> Result<(RocksStorage, RecoveryReport)> {
    let opts = OpenOptions {
        strict,
        read_only: true,
        ..Default::default()
    };
    let (s, report) = RocksStorage::open(path, &opts)
        .with_context(|| format!("cannot open the replica in {}", path.display()))?;
    for d in &report.damage {
        eprintln!("warning: damage found (non-strict): {d}");
    }
    Ok((s, report))
}

fn preview(data: &[u8]) -> String {
    let shown = &data[..data.len().min(48)];
    let mut s: String = shown.escape_ascii().to_string();
    if data.len() > shown.len() {
        s.push_str("...");
    }
    s
}

#[derive(Serialize)]
struct JsonEntry<'a> {
    position: u64,
    size: usize,
    data_hex: &'a str,
}

pub fn read(a: ReadArgs) -> Result<()> {
    let (s, _) = open_read_only(&a.path, a.strict)?;
    let meta = s.meta();
    let beginning = s.first_index_now();
    // Only committed entries. Open guarantees commit <= the last intact
    // position (strict refuses otherwise, non-strict lowers it).
    let committed = meta.hard_state.commit;
    let from = a.from.unwrap_or(beginning);
    let to = a.to.unwrap_or(committed);
    if from < beginning {
        bail!("position {from} is truncated; the log begins at {beginning}");
    }
    if to > committed {
        if to <= s.last_index() {
            bail!("position {to} is not committed (the log ends at {committed})");
        }
        bail!("position {to} is past the end of the log (last committed position {committed})");
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut next = from;
    const PAGE: u64 = 10_000;
    while next <= to {
        let high = (next + PAGE).min(to + 1);
        let entries = s
            .read_entries(next, high, None)
            .with_context(|| format!("reading positions {next}..{high}"))?;
        for e in application_entries(entries) {
            match a.format {
                ReadFormat::Text => writeln!(
                    out,
                    "{}\t{}\t{}",
                    e.position,
                    e.data.len(),
                    preview(&e.data)
                )?,
                ReadFormat::Json => {
                    let hex: String = e.data.iter().map(|b| format!("{b:02x}")).collect();
                    let j = JsonEntry {
                        position: e.position.value(),
                        size: e.data.len(),
                        data_hex: &hex,
                    };
                    writeln!(out, "{}", serde_json::to_string(&j)?)?;
                }
            }
        }
        next = high;
    }
    out.flush()?;
    Ok(())
}

#[derive(Serialize)]
struct StatusJson {
    path: String,
    status: String,
    cluster_id: String,
    replica_id: u64,
    format_version: u32,
    members: Vec<(u64, String)>,
    voters: Vec<u64>,
    learners: Vec<u64>,
    term: u64,
    vote: u64,
    beginning: u64,
    ending: u64,
    last_written: u64,
    applied: u64,
    disk_bytes: u64,
    damage: Vec<String>,
}

pub fn status(a: StatusArgs) -> Result<()> {
    let Some(path) = a.path.as_deref() else {
        bail!("give --path (a replica's directory) or --endpoint (running replicas)");
    };
    let (s, report) = open_read_only(path, a.strict)?;
    let m = s.meta();
    let j = StatusJson {
        path: path.display().to_string(),
        status: m.status.to_string(),
        cluster_id: m.cluster_id.clone(),
        replica_id: m.replica_id,
        format_version: m.format_version,
        members: m
            .members
            .iter()
            .map(|x| (x.id, x.address.clone()))
            .collect(),
        voters: m.conf_state.voters.clone(),
        learners: m.conf_state.learners.clone(),
        term: m.hard_state.term,
        vote: m.hard_state.vote,
        beginning: s.first_index_now(),
        ending: m.hard_state.commit,
        last_written: s.last_index(),
        applied: m.applied_index,
        disk_bytes: s.disk_usage()?,
        damage: report.damage.clone(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!("path            {}", j.path);
    println!("status          {}", j.status);
    println!("cluster id      {}", j.cluster_id);
    println!("replica id      {}", j.replica_id);
    println!("format version  {}", j.format_version);
    println!("voters          {:?}", j.voters);
    if !j.learners.is_empty() {
        println!("learners        {:?}", j.learners);
    }
    println!("term            {}", j.term);
    println!("beginning       {}", j.beginning);
    println!("ending          {}  (last committed position)", j.ending);
    println!("last written    {}", j.last_written);
    println!("applied         {}", j.applied);
    println!("disk usage      {} bytes", j.disk_bytes);
    for d in &j.damage {
        println!("damage          {d}");
    }
    Ok(())
}
