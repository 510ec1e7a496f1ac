//! `replog initialize`, `replog read` and `replog status`: operator commands
//! on a replica's data directory.

use std::io::Write;

use anyhow::{bail, Context, Result};
use replog_log::application_entries;
use replog_storage::{InitOptions, LogStorage, Member, OpenOptions, RecoveryReport, RocksStorage};
use serde::Serialize;

use crate::cli::{InitializeArgs, ReadArgs, ReadFormat, StatusArgs};

/// Parses `1,2,3` or `1=host:port,...` member lists.
pub fn parse_members(items: &[String], replica_id: u64) -> Result<Vec<Member>> {
    if items.is_empty() {
        return Ok(vec![Member {
            id: replica_id,
            address: String::new(),
        }]);
    }
    items
        .iter()
        .map(|s| {
            let (id, addr) = match s.split_once('=') {
                Some((id, addr)) => (id, addr.to_string()),
                None => (s.as_str(), String::new()),
            };
            let id: u64 = id
                .trim()
                .parse()
                .with_context(|| format!("member '{s}': the id must be a number"))?;
            Ok(Member { id, address: addr })
        })
        .collect()
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
        let loaded = (|| {
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
        drop(s);
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
