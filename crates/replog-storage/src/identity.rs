//! The identity file (`REPLICA-IDENTITY`): cluster id, replica id and format version of a replica,
//! framed with a crc32c, written atomically (temp file, fsync, rename,
//! directory fsync).
//!
//! It is read before RocksDB is opened, so a replica of another cluster or of
//! an unknown format version is refused without a single byte changing on
//! disk, and it survives a corrupt metadata record.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, StorageError};
use crate::model::ReplicaIdentity;
use crate::records;

/// File name of the identity record inside a replica directory.
/// (Not `IDENTITY`: RocksDB keeps a file of that name for its own id.)
pub const IDENTITY_FILE: &str = "REPLICA-IDENTITY";

pub(crate) fn path(dir: &Path) -> PathBuf {
    dir.join(IDENTITY_FILE)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the identity; `Ok(None)` if the file does not exist.
pub fn read(dir: &Path) -> Result<Option<ReplicaIdentity>> {
    let p = path(dir);
    let bytes = match fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&p)(e)),
    };
    records::decode_identity(&bytes, &p.display().to_string()).map(Some)
}

/// Writes the identity atomically and durably.
pub(crate) fn write(dir: &Path, id: &ReplicaIdentity) -> Result<()> {
    let p = path(dir);
    let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
    let framed = records::encode_identity(id);
    {
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&framed).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, &p).map_err(io(&p))?;
    sync_dir(dir)
}

/// fsyncs a directory so that a rename or create inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}
