//! The history of a campaign: every client operation with its invoke and
//! complete times and outcome, every status poll of every replica, every
//! fault and wipe, and each replica's log after healing. Times are
//! microseconds on the cluster's clock. The checker ([`crate::checker`])
//! is a set of pure functions over this type.
//!
//! Outcomes: `Ok` (acknowledged, with its result), `Failed` (the operation
//! definitely did not take effect: refused before it was executed) and
//! `Unknown` (it may or may not have: a timeout, `OutcomeUnknown`, a
//! broken connection).

use std::collections::BTreeMap;

use serde::{Serialize, Serializer};

/// Bytes in JSON: their length and the hex of their first 12 bytes (an
/// append's payload starts with the client id and sequence number that
/// determine the rest; whole payloads would make a long campaign's history
/// gigabytes).
fn hex<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
    let head: String = data.iter().take(12).map(|b| format!("{b:02x}")).collect();
    s.serialize_str(&format!("{}:{head}", data.len()))
}

/// What an operation asked for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Call {
    Append {
        #[serde(serialize_with = "hex")]
        data: Vec<u8>,
    },
    /// A read of `from..=to`; `replica` is the one asked (local reads go to
    /// one replica; linearizable reads to the leader, `None`).
    Read {
        from: u64,
        to: u64,
        linearizable: bool,
        replica: Option<u64>,
    },
    /// A state-store transaction writing `value` under `key` (a task id).
    StatePut { key: String, value: u64 },
    /// A linearizable state-store query of `key`.
    StateGet { key: String },
}

impl Call {
    /// The kind's name in reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Call::Append { .. } => "append",
            Call::Read {
                linearizable: true, ..
            } => "read-linearizable",
            Call::Read { .. } => "read-local",
            Call::StatePut { .. } => "state-put",
            Call::StateGet { .. } => "state-get",
        }
    }
}

/// One entry a read returned.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReadEntry {
    pub position: u64,
    #[serde(serialize_with = "hex")]
    pub data: Vec<u8>,
}

/// What an acknowledged operation returned.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Ret {
    Appended {
        position: u64,
        term: u64,
    },
    Read {
        entries: Vec<ReadEntry>,
    },
    /// A state write's position.
    StateWritten {
        position: u64,
    },
    /// The value a state query found (`None`: no such key).
    StateValue {
        value: Option<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Outcome {
    Ok(Ret),
    Failed(String),
    Unknown(String),
}

impl Outcome {
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Ok(_) => "ok",
            Outcome::Failed(_) => "failed",
            Outcome::Unknown(_) => "unknown",
        }
    }
}

/// One client operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Op {
    pub id: u64,
    pub client: u32,
    pub invoke_us: u64,
    pub complete_us: u64,
    pub call: Call,
    pub outcome: Outcome,
}

impl Op {
    /// The position of an acknowledged append.
    pub fn appended_at(&self) -> Option<u64> {
        match (&self.call, &self.outcome) {
            (Call::Append { .. }, Outcome::Ok(Ret::Appended { position, .. })) => Some(*position),
            _ => None,
        }
    }

    pub fn append_data(&self) -> Option<&[u8]> {
        match &self.call {
            Call::Append { data } => Some(data),
            _ => None,
        }
    }
}

/// A member as a replica's status listed it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Member {
    pub id: u64,
    pub voter: bool,
}

/// One answered status poll of one replica.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusSample {
    pub replica: u64,
    pub invoke_us: u64,
    pub complete_us: u64,
    /// Replica status (1 EMPTY, 2 STARTING, 3 RECOVERING, 4 VOTING).
    pub status: i32,
    pub term: u64,
    pub leader: u64,
    pub is_leader: bool,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    pub members: Vec<Member>,
}

/// A replica's data directory removed (it was down from then until its
/// restart; it restarts EMPTY).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Wipe {
    pub replica: u64,
    pub at_us: u64,
}

/// A replica the repair coordinator isolated (demoted to a learner), at
/// the time of the decision: from then on a leader may list it as a
/// learner without any rejoin being wrong.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Isolation {
    pub replica: u64,
    pub at_us: u64,
}

/// A fault as the history keeps it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultRecord {
    pub kind: String,
    pub detail: String,
    pub injected_us: u64,
    pub healed_us: Option<u64>,
}

/// Everything a campaign recorded; see the module docs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct History {
    pub ops: Vec<Op>,
    pub statuses: Vec<StatusSample>,
    pub faults: Vec<FaultRecord>,
    pub wipes: Vec<Wipe>,
    /// The repair coordinator's isolations (empty without `--repair`).
    pub isolations: Vec<Isolation>,
    /// The log holds state-store records (`--state`), not raw appends: the
    /// rules about appended values do not apply to its entries.
    pub state_mode: bool,
    /// Each replica's application entries after healing, by position.
    #[serde(skip)]
    pub final_logs: BTreeMap<u64, BTreeMap<u64, Vec<u8>>>,
}

impl History {
    /// Operations whose time window overlaps `[from_us, to_us]`, for a
    /// report's excerpt.
    pub fn excerpt(&self, from_us: u64, to_us: u64) -> Vec<&Op> {
        self.ops
            .iter()
            .filter(|o| o.complete_us >= from_us && o.invoke_us <= to_us)
            .collect()
    }
}
