//! Scheduler-state snapshots as files: backups, their checks, and loading
//! one into a state (staged recovery, disaster restore).
//!
//! A backup is one snapshot stream (`docs/snapshot-format.md`) whose
//! records are `replog.state.v1.Entity` messages, kind = the entity's kind
//! (`replog_state::KIND_*`), header content [`CONTENT`].
//!
//! Invariants:
//! - [`write_state`] reads through a RocksDB snapshot ([`StateStore::export`]):
//!   the stream is the state at exactly one applied position, and writers
//!   are never paused; memory stays at one chunk whatever the state's size;
//! - [`BackupDir::save`] never leaves a partial file under a backup name: it
//!   writes a temporary name, fsyncs the file, renames it, fsyncs the
//!   directory, and only then prunes to the newest `max_saved`;
//! - [`load_into`] checks the whole stream (every checksum, the counts, the
//!   cluster id when asked) while it writes a new generation of the state,
//!   and switches to it only when the stream checked out whole: a bad file
//!   changes nothing.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use replog_proto::snapshot::SnapshotHeader;
use replog_proto::state::{entity, Entity, ScheduleStatus};
use replog_snapshot::{
    check_cluster, ReaderOptions, SnapshotError, SnapshotReader, SnapshotWriter, WriterOptions,
};
use replog_state::{entity_kind, kind_name, StateError, StateStore};

/// The header `content` of a scheduler-state snapshot.
pub const CONTENT: &str = "replog.state.v1";

/// The header label with the state schema version of the writer
/// ([`replog_state::SCHEMA_VERSION`]); absent (read as 1) in older files.
pub const SCHEMA_LABEL: &str = "schema_version";

/// Checks that a snapshot header is of scheduler state of a schema this
/// build knows whole.
pub fn check_state_header(path: &Path, header: &SnapshotHeader) -> Result<(), BackupError> {
    if header.content != CONTENT {
        return Err(BackupError::WrongContent {
            path: path.to_path_buf(),
            found: header.content.clone(),
        });
    }
    let found = match header.labels.get(SCHEMA_LABEL) {
        None => 1,
        Some(v) => v.parse::<u32>().map_err(|_| BackupError::Snapshot {
            path: path.to_path_buf(),
            source: SnapshotError::InvalidInput {
                reason: format!("label {SCHEMA_LABEL} is '{v}', not a number"),
            },
        })?,
    };
    if found > replog_state::SCHEMA_VERSION {
        return Err(BackupError::NewerSchema {
            path: path.to_path_buf(),
            found,
            supported: replog_state::SCHEMA_VERSION,
        });
    }
    Ok(())
}
/// File names of backups: this prefix, then `YYYY-MM-DD-HH-MM` (UTC).
pub const BACKUP_PREFIX: &str = "scheduler-backup-";

/// Errors of backups and snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Snapshot {
        path: PathBuf,
        #[source]
        source: SnapshotError,
    },
    #[error("{path}: the stream holds '{found}', not scheduler state ('{CONTENT}')")]
    WrongContent { path: PathBuf, found: String },
    #[error(
        "{path}: written with state schema {found}, newer than this build's ({supported}): \
         use a replog at least as new as the one that wrote it"
    )]
    NewerSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path}: record {index} (kind {kind}) is not a valid entity: {reason}")]
    BadRecord {
        path: PathBuf,
        index: u64,
        kind: u32,
        reason: String,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn snap_err(path: &Path) -> impl Fn(SnapshotError) -> BackupError + '_ {
    move |source| BackupError::Snapshot {
        path: path.to_path_buf(),
        source,
    }
}

/// Bytes a backup writes between two writeback requests.
pub const WRITEBACK_STEP: u64 = 4 << 20;

/// A backup file being written: every [`WRITEBACK_STEP`] bytes it asks the
/// kernel to start writing that step out, without waiting (Linux
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`, like RocksDB's
/// `bytes_per_sync`). Without it a gigabyte of dirty pages can pile up and
/// be written back in one burst (on ext4 with data=ordered, the replicas'
/// WAL fsyncs on the same disk then wait behind it). The final `fsync`
/// still makes the whole file durable.
pub struct PacedFile {
    file: File,
    written: u64,
    requested: u64,
}

impl PacedFile {
    pub fn new(file: File) -> Self {
        PacedFile {
            file,
            written: 0,
            requested: 0,
        }
    }

    /// The file.
    pub fn into_inner(self) -> File {
        self.file
    }

    #[cfg(target_os = "linux")]
    fn write_back(&mut self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let (from, to) = (self.requested, self.written);
        // SAFETY: a system call on an open descriptor this value owns.
        let r = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                from as libc::off64_t,
                (to - from) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.requested = to;
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn write_back(&mut self) -> std::io::Result<()> {
        self.requested = self.written;
        Ok(())
    }
}

impl Write for PacedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.requested >= WRITEBACK_STEP {
            self.write_back()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Identity written into a snapshot's header.
#[derive(Debug, Clone, Default)]
pub struct SnapshotIdentity {
    pub cluster_id: String,
    pub term: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub labels: BTreeMap<String, String>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct WriteSummary {
    pub position: u64,
    pub records: u64,
    pub bytes: u64,
    pub counts_by_kind: BTreeMap<u32, u64>,
}

/// Writes the state as one snapshot stream into `w`, from a consistent
/// snapshot of it; `progress` is called with the records written so far.
pub fn write_state<W: Write>(
    state: &StateStore,
    id: &SnapshotIdentity,
    w: W,
    mut progress: impl FnMut(u64),
) -> Result<(W, WriteSummary), BackupError> {
    let here = Path::new("<stream>");
    let export = state.export()?;
    let header = SnapshotHeader {
        format_version: replog_snapshot::FORMAT_VERSION,
        cluster_id: id.cluster_id.clone(),
        position: export.position(),
        term: id.term,
        voters: id.voters.clone(),
        learners: id.learners.clone(),
        created_at_unix_ms: replog_storage::now_unix_ms(),
        content: CONTENT.to_string(),
        labels: id
            .labels
            .clone()
            .into_iter()
            .chain([(
                SCHEMA_LABEL.to_string(),
                replog_state::SCHEMA_VERSION.to_string(),
            )])
            .collect(),
    };
    let position = export.position();
    let mut sw =
        SnapshotWriter::new(w, &header, WriterOptions::default()).map_err(snap_err(here))?;
    let mut buf = Vec::new();
    let mut n = 0u64;
    for e in export {
        let e = e?;
        buf.clear();
        e.encode(&mut buf).expect("a Vec grows as needed");
        sw.push(entity_kind(&e), &buf).map_err(snap_err(here))?;
        n += 1;
        if n.is_multiple_of(4096) {
            progress(n);
        }
    }
    progress(n);
    let bytes = sw.bytes_written();
    let (w, trailer) = sw.finish().map_err(snap_err(here))?;
    Ok((
        w,
        WriteSummary {
            position,
            records: trailer.record_count,
            bytes,
            counts_by_kind: trailer.counts_by_kind.into_iter().collect(),
        },
    ))
}

/// A directory of backups, newest kept.
pub struct BackupDir {
    dir: PathBuf,
    max_saved: usize,
}

impl BackupDir {
    /// Backups in `dir` (created if missing); [`Self::save`] keeps the newest
    /// `max_saved` (at least 1).
    pub fn new(dir: impl Into<PathBuf>, max_saved: usize) -> Result<Self, BackupError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(BackupDir {
            dir,
            max_saved: max_saved.max(1),
        })
    }

    /// The backups there, oldest first.
    pub fn list(&self) -> Result<Vec<PathBuf>, BackupError> {
        let mut names: Vec<String> = fs::read_dir(&self.dir)
            .map_err(io_err(&self.dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_backup_name(n))
            .collect();
        names.sort_by_key(|n| backup_order(n));
        Ok(names.into_iter().map(|n| self.dir.join(n)).collect())
    }

    /// Writes a backup with `write` (given the open temporary file), makes
    /// it durable under its final name, prunes old ones, and returns its
    /// path with what `write` returned.
    pub fn save<T>(
        &self,
        now_unix_ms: u64,
        write: impl FnOnce(&mut BufWriter<PacedFile>) -> Result<T, BackupError>,
    ) -> Result<(PathBuf, T), BackupError> {
        let base = format!("{BACKUP_PREFIX}{}", minute_stamp(now_unix_ms));
        // Several backups in one minute: the new one takes a counter above
        // every one of that minute still here, so it sorts newest even
        // after pruning removed the lower ones (else pruning would take it).
        let stamp = &base[BACKUP_PREFIX.len()..];
        let mut n = 1;
        let mut name = base.clone();
        for p in self.list()? {
            let existing = p.file_name().unwrap_or_default().to_string_lossy();
            let (s, k) = backup_order(&existing);
            if s == stamp {
                n = n.max(k + 1);
                name = format!("{base}-{n}");
            }
        }
        while self.dir.join(&name).exists() {
            name = format!("{base}-{n}");
            n += 1;
        }
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let target = self.dir.join(&name);
        let result = (|| {
            // Readable too: the caller may check what it wrote before the
            // file gets its final name.
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            let mut w = BufWriter::with_capacity(1 << 20, PacedFile::new(f));
            let out = write(&mut w)?;
            let f = w
                .into_inner()
                .map_err(|e| io_err(&tmp)(e.into_error()))?
                .into_inner();
            f.sync_all().map_err(io_err(&tmp))?;
            drop(f);
            fs::rename(&tmp, &target).map_err(io_err(&target))?;
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&self.dir))?;
            Ok(out)
        })();
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let all = self.list()?;
        if all.len() > self.max_saved {
            for old in &all[..all.len() - self.max_saved] {
                fs::remove_file(old).map_err(io_err(old))?;
            }
        }
        Ok((target, out))
    }
}

impl BackupDir {
    /// [`Self::save`] for a snapshot stream: before the file gets its
    /// backup name, it is read back whole and checked
    /// ([`replog_snapshot::verify`]: every checksum, the counts, the end);
    /// a stream that does not check out, or that `check` (given what was
    /// read back and what `write` returned) refuses, is never saved.
    pub fn save_verified<T>(
        &self,
        now_unix_ms: u64,
        write: impl FnOnce(&mut BufWriter<PacedFile>) -> Result<T, BackupError>,
        check: impl FnOnce(&replog_snapshot::VerifySummary, &T) -> Result<(), BackupError>,
    ) -> Result<(PathBuf, replog_snapshot::VerifySummary, T), BackupError> {
        let io = io_err(&self.dir);
        let (path, (summary, out)) = self.save(now_unix_ms, |w| {
            let out = write(w)?;
            w.flush().map_err(&io)?;
            let mut f = w.get_ref().file.try_clone().map_err(&io)?;
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).map_err(&io)?;
            let summary = replog_snapshot::verify(
                BufReader::with_capacity(1 << 20, f),
                ReaderOptions::default(),
            )
            .map_err(snap_err(&self.dir))?;
            check(&summary, &out)?;
            Ok((summary, out))
        })?;
        Ok((path, summary, out))
    }
}

/// `YYYY-MM-DD-HH-MM` in UTC.
pub fn minute_stamp(unix_ms: u64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(unix_ms as i64).unwrap_or_default();
    t.format("%Y-%m-%d-%H-%M").to_string()
}

fn is_backup_name(n: &str) -> bool {
    let Some(rest) = n.strip_prefix(BACKUP_PREFIX) else {
        return false;
    };
    let (stamp, suffix) = rest.split_at(rest.len().min(16));
    stamp.len() == 16
        && stamp.bytes().enumerate().all(|(i, b)| {
            if [4, 7, 10, 13].contains(&i) {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        })
        && (suffix.is_empty()
            || suffix
                .strip_prefix('-')
                .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())))
}

/// Sort key: the stamp, then the clash counter as a number.
fn backup_order(n: &str) -> (String, u64) {
    let rest = &n[BACKUP_PREFIX.len()..];
    let (stamp, suffix) = rest.split_at(16);
    let k = suffix
        .strip_prefix('-')
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (stamp.to_string(), k)
}

/// What a snapshot file holds, after a full check.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub header: SnapshotHeader,
    pub records: u64,
    pub stream_bytes: u64,
    /// Entity kind name -> count.
    pub counts: BTreeMap<&'static str, u64>,
    /// Task status name -> count.
    pub tasks_by_status: BTreeMap<String, u64>,
}

/// The header of the snapshot stream at `path` (read, not the whole file).
pub fn header_of(path: &Path) -> Result<SnapshotHeader, BackupError> {
    open_stream(path).map(|(_, h)| h)
}

fn open_stream(
    path: &Path,
) -> Result<(SnapshotReader<BufReader<File>>, SnapshotHeader), BackupError> {
    let f = File::open(path).map_err(io_err(path))?;
    let (r, header) = SnapshotReader::open(
        BufReader::with_capacity(1 << 20, f),
        ReaderOptions::default(),
    )
    .map_err(snap_err(path))?;
    check_state_header(path, &header)?;
    Ok((r, header))
}

fn decode_entity(path: &Path, index: u64, kind: u32, data: &[u8]) -> Result<Entity, BackupError> {
    let bad = |reason: String| BackupError::BadRecord {
        path: path.to_path_buf(),
        index,
        kind,
        reason,
    };
    let e = Entity::decode(data).map_err(|e| bad(e.to_string()))?;
    if e.entity.is_none() {
        return Err(bad("the entity is empty".into()));
    }
    if entity_kind(&e) != kind {
        return Err(bad(format!(
            "it holds a {} under the kind of a {}",
            kind_name(entity_kind(&e)),
            kind_name(kind)
        )));
    }
    Ok(e)
}

/// Reads and checks a whole snapshot file (every checksum, the counts,
/// every record decoded) and sums it up. `expected_cluster` also checks the
/// cluster id.
pub fn inspect(path: &Path, expected_cluster: Option<&str>) -> Result<Inspection, BackupError> {
    let (mut r, header) = open_stream(path)?;
    if let Some(c) = expected_cluster {
        check_cluster(&header, c).map_err(snap_err(path))?;
    }
    let mut counts = BTreeMap::new();
    let mut tasks_by_status = BTreeMap::new();
    let mut index = 0u64;
    while let Some((kind, data)) = r.next_record().map_err(snap_err(path))? {
        let e = decode_entity(path, index, kind, &data)?;
        *counts.entry(kind_name(kind)).or_insert(0) += 1;
        if let Some(entity::Entity::Task(t)) = &e.entity {
            let s = ScheduleStatus::try_from(t.status)
                .map(|s| {
                    s.as_str_name()
                        .trim_start_matches("SCHEDULE_STATUS_")
                        .to_string()
                })
                .unwrap_or_else(|_| format!("UNKNOWN({})", t.status));
            *tasks_by_status.entry(s).or_insert(0) += 1;
        }
        index += 1;
    }
    Ok(Inspection {
        header,
        records: index,
        stream_bytes: r.offset(),
        counts,
        tasks_by_status,
    })
}

/// Loads the snapshot file at `path` into `state` as its whole new content
/// at `position` (see [`StateStore::replace_all`]), checking the cluster id
/// when `expected_cluster` is given. The state changes only if the whole
/// file checked out. Returns the file's header.
pub fn load_into(
    state: &StateStore,
    path: &Path,
    position: u64,
    expected_cluster: Option<&str>,
) -> Result<SnapshotHeader, BackupError> {
    let (r, header) = open_stream(path)?;
    if let Some(c) = expected_cluster {
        check_cluster(&header, c).map_err(snap_err(path))?;
    }
    load_stream(state, path, r, position)?;
    Ok(header)
}

/// Like [`load_into`] for a stream already opened.
pub fn load_stream<R: Read>(
    state: &StateStore,
    path: &Path,
    mut r: SnapshotReader<R>,
    position: u64,
) -> Result<(), BackupError> {
    let mut failure: Option<BackupError> = None;
    let mut index = 0u64;
    let entities = std::iter::from_fn(|| {
        if failure.is_some() {
            return None;
        }
        match r.next_record() {
            Ok(Some((kind, data))) => {
                let item = decode_entity(path, index, kind, &data);
                index += 1;
                match item {
                    Ok(e) => Some(Ok::<Entity, BackupError>(e)),
                    Err(e) => {
                        let msg = e.to_string();
                        failure = Some(e);
                        Some(Err(BackupError::BadRecord {
                            path: path.to_path_buf(),
                            index,
                            kind,
                            reason: msg,
                        }))
                    }
                }
            }
            Ok(None) => None,
            Err(e) => {
                let msg = e.to_string();
                failure = Some(snap_err(path)(e));
                Some(Err(BackupError::Snapshot {
                    path: path.to_path_buf(),
                    source: SnapshotError::InvalidInput { reason: msg },
                }))
            }
        }
    });
    let result = state.replace_all(position, entities);
    if let Some(f) = failure {
        return Err(f);
    }
    result?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_and_match() {
        assert_eq!(minute_stamp(0), "1970-01-01-00-00");
        assert_eq!(minute_stamp(1_795_000_000_000), "2026-11-18-11-06");
        assert!(is_backup_name("scheduler-backup-2026-11-22-06-15"));
        assert!(is_backup_name("scheduler-backup-2026-11-22-06-15-12"));
        assert!(!is_backup_name(".scheduler-backup-2026-11-22-06-15.tmp"));
        assert!(!is_backup_name("scheduler-backup-2026-11-22-06-1"));
        assert!(!is_backup_name("scheduler-backup-2026-11-22-06-15-"));
        assert!(!is_backup_name("scheduler-backup-2026-11-22-06-15x"));
        let mut v = vec![
            "scheduler-backup-2026-11-22-06-15-10",
            "scheduler-backup-2026-11-22-06-15-2",
            "scheduler-backup-2026-11-22-06-15",
            "scheduler-backup-2025-01-01-00-00",
        ];
        v.sort_by_key(|n| backup_order(n));
        assert_eq!(
            v,
            [
                "scheduler-backup-2025-01-01-00-00",
                "scheduler-backup-2026-11-22-06-15",
                "scheduler-backup-2026-11-22-06-15-2",
                "scheduler-backup-2026-11-22-06-15-10",
            ]
        );
    }

    /// Many backups in one minute, pruned to 2: each new one sorts newest,
    /// so pruning never removes the one just written.
    #[test]
    fn backups_in_one_minute_survive_pruning() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = BackupDir::new(tmp.path(), 2).unwrap();
        let now = 1_795_000_000_000;
        for i in 0..6u8 {
            let (path, ()) = dir
                .save(now, |w| {
                    w.write_all(&[i]).map_err(io_err(Path::new("<test>")))?;
                    Ok(())
                })
                .unwrap();
            assert!(path.exists(), "{} was pruned at once", path.display());
            let kept = dir.list().unwrap();
            assert!(kept.len() <= 2);
            assert_eq!(kept.last(), Some(&path));
            assert_eq!(fs::read(&path).unwrap(), [i]);
        }
    }

    /// A backup of a newer state schema is refused by everything that
    /// loads one (inspect, load, staging), with the reason; one of this
    /// schema, or of an older build without the label, loads.
    #[test]
    fn a_backup_of_a_newer_schema_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateStore::open_standalone(&tmp.path().join("s"), Default::default()).unwrap();
        let write = |labels: &[(&str, &str)], name: &str| {
            let id = SnapshotIdentity {
                cluster_id: "c".into(),
                ..Default::default()
            };
            let (bytes, _) = write_state(&state, &id, Vec::new(), |_| {}).unwrap();
            // Rewrite the header's labels through a reader/writer pair.
            let (mut r, mut header) =
                SnapshotReader::open(&bytes[..], ReaderOptions::default()).unwrap();
            header.labels.remove(SCHEMA_LABEL);
            for (k, v) in labels {
                header.labels.insert(k.to_string(), v.to_string());
            }
            let mut sw =
                SnapshotWriter::new(Vec::new(), &header, WriterOptions::default()).unwrap();
            while let Some((kind, data)) = r.next_record().unwrap() {
                sw.push(kind, &data).unwrap();
            }
            let (out, _) = sw.finish().unwrap();
            let path = tmp.path().join(name);
            fs::write(&path, out).unwrap();
            path
        };
        let current = write(&[(SCHEMA_LABEL, "1")], "current");
        let unlabelled = write(&[], "unlabelled");
        let newer_v = (replog_state::SCHEMA_VERSION + 1).to_string();
        let newer = write(&[(SCHEMA_LABEL, &newer_v)], "newer");
        let garbled = write(&[(SCHEMA_LABEL, "two")], "garbled");
        let target =
            StateStore::open_standalone(&tmp.path().join("t"), Default::default()).unwrap();
        load_into(&target, &current, 1, Some("c")).unwrap();
        load_into(&target, &unlabelled, 2, Some("c")).unwrap();
        match load_into(&target, &newer, 3, Some("c")) {
            Err(e @ BackupError::NewerSchema { .. }) => {
                assert!(e.to_string().contains("newer than this build"), "{e}")
            }
            other => panic!("expected NewerSchema, got {other:?}"),
        }
        assert_eq!(target.applied(), 2, "a refused file changed the state");
        assert!(header_of(&newer).is_err());
        assert!(matches!(
            load_into(&target, &garbled, 3, Some("c")),
            Err(BackupError::Snapshot { .. })
        ));
    }

    /// A paced backup file holds exactly what was written, across many
    /// writeback steps and a last partial one.
    #[test]
    fn a_paced_file_writes_everything_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("paced");
        let mut w = PacedFile::new(File::create(&path).unwrap());
        let mut expected = Vec::new();
        let mut i = 0u32;
        while (expected.len() as u64) < 3 * WRITEBACK_STEP + 12_345 {
            let chunk: Vec<u8> = (0..(70_001 + i % 3))
                .map(|k| k.wrapping_mul(31).wrapping_add(i) as u8)
                .collect();
            w.write_all(&chunk).unwrap();
            expected.extend_from_slice(&chunk);
            i += 1;
        }
        assert!(w.requested >= 3 * WRITEBACK_STEP && w.requested <= w.written);
        assert_eq!(w.written, expected.len() as u64);
        let f = w.into_inner();
        f.sync_all().unwrap();
        assert_eq!(fs::read(&path).unwrap(), expected);
    }
}
