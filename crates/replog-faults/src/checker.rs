//! Checks of a [`History`]: pure functions, one per rule, each returning
//! the violations it found (an empty list: the rule held).
//!
//! The reference log is the longest of the replicas' logs after healing
//! (they must all be equal: [`replicas_identical`] checks that apart).
//! Append payloads are unique per operation, so a value identifies the
//! append that proposed it.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::history::{Call, History, Op, Outcome, Ret, StatusSample};

/// The rules, as reports name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Rule {
    /// Every acknowledged append is in the healed log at its position with
    /// its bytes.
    AcknowledgedAppendKept,
    /// Every entry of the log was proposed by an append not known to have
    /// failed.
    NoPhantom,
    /// No value is in the log twice.
    NoDuplicate,
    /// An append acknowledged before another was invoked has the lower
    /// position.
    RealTimeOrder,
    /// A linearizable read sees every append acknowledged before it was
    /// invoked (in its range).
    LinearizableReadNotStale,
    /// Every read returned exactly the log's entries of its range.
    ReadMatchesLog,
    /// Every replica holds the same log after healing.
    ReplicasIdentical,
    /// No two replicas lead in one term.
    OneLeaderPerTerm,
    /// A wiped replica reports VOTING only once the leader counts it a
    /// voter and it holds everything acknowledged before its wipe.
    RejoinVotesOnlyWhenPromoted,
    /// The state store's puts and gets are linearizable (per key).
    StateLinearizable,
    /// The repair rules ([`crate::repair_check`]): never more replicas
    /// under repair at once than `--num-allowed-repairs`.
    RepairsAtOnce,
    /// Isolations within the removal limit since each reset and within
    /// the rate limit in every window.
    RemovalLimits,
    /// No step start or isolation applied while the alarm is raised.
    AlarmStopsDecisions,
    /// Replicas isolated at once leave voters that survive one more failure.
    IsolationsKeepQuorum,
    /// Applied decisions never go back in term.
    DecisionsFencedByTerm,
    /// Every repair command ran for an applied step start, at most once.
    StepsRunAsDecided,
    /// Every poll shows the same repair record at each log position.
    RepairHistoriesAgree,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Violation {
    pub rule: Rule,
    pub detail: String,
    /// Operation ids involved, for a history excerpt.
    pub ops: Vec<u64>,
}

fn violation(rule: Rule, ops: Vec<u64>, detail: String) -> Violation {
    Violation { rule, detail, ops }
}

/// Every rule over `h`.
pub fn check_all(h: &History) -> Vec<Violation> {
    let mut v = Vec::new();
    v.extend(acknowledged_appends_kept(h));
    if !h.state_mode {
        v.extend(no_phantom_or_duplicate(h));
    }
    v.extend(real_time_order(h));
    v.extend(linearizable_reads_not_stale(h));
    v.extend(reads_match_log(h));
    v.extend(replicas_identical(h));
    v.extend(one_leader_per_term(&h.statuses));
    v.extend(rejoin_votes_only_when_promoted(h));
    v.extend(state_linearizable(h));
    v
}

/// The longest healed log (empty when none was read).
pub fn reference_log(h: &History) -> BTreeMap<u64, Vec<u8>> {
    h.final_logs
        .values()
        .max_by_key(|l| (l.len(), l.keys().next_back().copied()))
        .cloned()
        .unwrap_or_default()
}

fn acked_appends(h: &History) -> impl Iterator<Item = (&Op, u64, &[u8])> {
    h.ops
        .iter()
        .filter_map(|o| Some((o, o.appended_at()?, o.append_data()?)))
}

/// [`Rule::AcknowledgedAppendKept`].
pub fn acknowledged_appends_kept(h: &History) -> Vec<Violation> {
    let log = reference_log(h);
    let mut out = Vec::new();
    if h.final_logs.is_empty() && acked_appends(h).next().is_some() {
        out.push(violation(
            Rule::AcknowledgedAppendKept,
            vec![],
            "no replica's log was read after healing".into(),
        ));
        return out;
    }
    for (op, pos, data) in acked_appends(h) {
        match log.get(&pos) {
            None => out.push(violation(
                Rule::AcknowledgedAppendKept,
                vec![op.id],
                format!(
                    "append {} acknowledged at {pos} is lost (no entry there)",
                    op.id
                ),
            )),
            Some(d) if d.as_slice() != data => out.push(violation(
                Rule::AcknowledgedAppendKept,
                vec![op.id],
                format!(
                    "append {} acknowledged at {pos}: the log holds other bytes there",
                    op.id
                ),
            )),
            Some(_) => {}
        }
    }
    out
}

/// [`Rule::NoPhantom`] and [`Rule::NoDuplicate`] over the reference log.
pub fn no_phantom_or_duplicate(h: &History) -> Vec<Violation> {
    let proposed: HashMap<&[u8], &Op> = h
        .ops
        .iter()
        .filter_map(|o| Some((o.append_data()?, o)))
        .collect();
    let mut seen: HashMap<&[u8], u64> = HashMap::new();
    let mut out = Vec::new();
    let log = reference_log(h);
    for (pos, data) in &log {
        match proposed.get(data.as_slice()) {
            None => out.push(violation(
                Rule::NoPhantom,
                vec![],
                format!("position {pos} holds {} bytes nobody appended", data.len()),
            )),
            Some(op) if matches!(op.outcome, Outcome::Failed(_)) => out.push(violation(
                Rule::NoPhantom,
                vec![op.id],
                format!(
                    "position {pos} holds append {}, which failed (definitely not applied)",
                    op.id
                ),
            )),
            Some(_) => {}
        }
        if let Some(first) = seen.insert(data, *pos) {
            let ids = proposed.get(data.as_slice()).map(|o| vec![o.id]);
            out.push(violation(
                Rule::NoDuplicate,
                ids.unwrap_or_default(),
                format!("the same value is at positions {first} and {pos}"),
            ));
        }
    }
    out
}

/// [`Rule::RealTimeOrder`].
pub fn real_time_order(h: &History) -> Vec<Violation> {
    let mut by_complete: Vec<(&Op, u64)> = acked_appends(h).map(|(o, p, _)| (o, p)).collect();
    let mut by_invoke = by_complete.clone();
    by_complete.sort_by_key(|(o, _)| o.complete_us);
    by_invoke.sort_by_key(|(o, _)| o.invoke_us);
    let mut out = Vec::new();
    // The highest position acknowledged before the current invoke time.
    let mut best: Option<(&Op, u64)> = None;
    let mut i = 0;
    for (b, pb) in by_invoke {
        while i < by_complete.len() && by_complete[i].0.complete_us < b.invoke_us {
            if best.is_none_or(|(_, p)| by_complete[i].1 > p) {
                best = Some(by_complete[i]);
            }
            i += 1;
        }
        if let Some((a, pa)) = best {
            if pa >= pb {
                out.push(violation(
                    Rule::RealTimeOrder,
                    vec![a.id, b.id],
                    format!(
                        "append {} was acknowledged at {pa} before append {} was invoked, which got {pb}",
                        a.id, b.id
                    ),
                ));
            }
        }
    }
    out
}

fn read_result(op: &Op) -> Option<(u64, u64, bool, &[crate::history::ReadEntry])> {
    match (&op.call, &op.outcome) {
        (
            Call::Read {
                from,
                to,
                linearizable,
                ..
            },
            Outcome::Ok(Ret::Read { entries }),
        ) => Some((*from, *to, *linearizable, entries)),
        _ => None,
    }
}

/// [`Rule::LinearizableReadNotStale`].
pub fn linearizable_reads_not_stale(h: &History) -> Vec<Violation> {
    // Acknowledged appends by position (several, if the log broke).
    let mut acked: BTreeMap<u64, Vec<(&Op, &[u8])>> = BTreeMap::new();
    for (a, pos, data) in acked_appends(h) {
        acked.entry(pos).or_default().push((a, data));
    }
    let mut out = Vec::new();
    for op in &h.ops {
        let Some((from, to, true, entries)) = read_result(op) else {
            continue;
        };
        let got: HashMap<u64, &[u8]> = entries
            .iter()
            .map(|e| (e.position, e.data.as_slice()))
            .collect();
        let in_range = acked
            .range(from..=to)
            .flat_map(|(p, v)| v.iter().map(move |(a, d)| (*a, *p, *d)));
        for (a, pos, data) in in_range {
            if a.complete_us < op.invoke_us && got.get(&pos) != Some(&data) {
                out.push(violation(
                    Rule::LinearizableReadNotStale,
                    vec![a.id, op.id],
                    format!(
                        "linearizable read {} of {from}..={to} misses append {} acknowledged at {pos} before it was invoked",
                        op.id, a.id
                    ),
                ));
            }
        }
    }
    out
}

/// [`Rule::ReadMatchesLog`].
pub fn reads_match_log(h: &History) -> Vec<Violation> {
    let log = reference_log(h);
    let mut out = Vec::new();
    if log.is_empty() {
        return out;
    }
    for op in &h.ops {
        let Some((from, to, _, entries)) = read_result(op) else {
            continue;
        };
        let got: BTreeMap<u64, &[u8]> = entries
            .iter()
            .map(|e| (e.position, e.data.as_slice()))
            .collect();
        let want: BTreeMap<u64, &[u8]> = log
            .range(from..=to)
            .map(|(p, d)| (*p, d.as_slice()))
            .collect();
        if got != want {
            let differ: Vec<u64> = want
                .keys()
                .chain(got.keys())
                .filter(|p| want.get(p) != got.get(p))
                .copied()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .take(5)
                .collect();
            out.push(violation(
                Rule::ReadMatchesLog,
                vec![op.id],
                format!(
                    "read {} of {from}..={to} returned {} entries, the log holds {} there; they differ at {differ:?}",
                    op.id,
                    got.len(),
                    want.len()
                ),
            ));
        }
    }
    out
}

/// [`Rule::ReplicasIdentical`].
pub fn replicas_identical(h: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut logs = h.final_logs.iter();
    let Some((first_id, first)) = logs.next() else {
        return out;
    };
    for (id, log) in logs {
        if log != first {
            let differ = first
                .iter()
                .zip(log.iter())
                .find(|(a, b)| a != b)
                .map(|(a, _)| *a.0);
            out.push(violation(
                Rule::ReplicasIdentical,
                vec![],
                format!(
                    "replicas {first_id} and {id} differ: {} and {} entries, first difference at {differ:?}",
                    first.len(),
                    log.len()
                ),
            ));
        }
    }
    out
}

/// [`Rule::OneLeaderPerTerm`].
pub fn one_leader_per_term(statuses: &[StatusSample]) -> Vec<Violation> {
    let mut leaders: BTreeMap<u64, std::collections::BTreeSet<u64>> = BTreeMap::new();
    for s in statuses.iter().filter(|s| s.is_leader) {
        leaders.entry(s.term).or_default().insert(s.replica);
    }
    leaders
        .into_iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(term, ids)| {
            violation(
                Rule::OneLeaderPerTerm,
                vec![],
                format!("replicas {ids:?} all reported leading in term {term}"),
            )
        })
        .collect()
}

/// [`Rule::RejoinVotesOnlyWhenPromoted`]: for every wipe of a replica, its
/// VOTING reports after the wipe (until its next wipe) must come with
/// everything acknowledged before the wipe in its log, and no leader of
/// that term or a later one, having applied at least what the replica had
/// applied when it first said VOTING, may list it as a learner in a poll
/// begun after that report completed, and before the repair coordinator
/// isolated it (its demotion lists it as a learner by design; after a
/// first isolation of the wiped replica the rule looks no further).
pub fn rejoin_votes_only_when_promoted(h: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    for w in &h.wipes {
        let next_wipe = h
            .wipes
            .iter()
            .filter(|n| n.replica == w.replica && n.at_us > w.at_us)
            .map(|n| n.at_us)
            .min()
            .unwrap_or(u64::MAX);
        let isolated = h
            .isolations
            .iter()
            .filter(|i| i.replica == w.replica && i.at_us > w.at_us)
            .map(|i| i.at_us)
            .min()
            .unwrap_or(u64::MAX);
        let acked_before = acked_appends(h)
            .filter(|(o, _, _)| o.complete_us < w.at_us)
            .map(|(_, p, _)| p)
            .max()
            .unwrap_or(0);
        let in_window = |s: &&StatusSample| s.invoke_us > w.at_us && s.complete_us < next_wipe;
        let voting: Vec<&StatusSample> = h
            .statuses
            .iter()
            .filter(in_window)
            .filter(|s| s.replica == w.replica && s.status == crate::cluster::VOTING)
            .collect();
        if let Some(v) = voting.iter().find(|v| v.last_index < acked_before) {
            out.push(violation(
                Rule::RejoinVotesOnlyWhenPromoted,
                vec![],
                format!(
                    "replica {} reported VOTING at {} us after its wipe at {} us holding up to {}, \
                     but {acked_before} was acknowledged before the wipe",
                    w.replica, v.complete_us, w.at_us, v.last_index
                ),
            ));
        }
        let Some(first) = voting.iter().min_by_key(|s| s.complete_us) else {
            continue;
        };
        // The leader applies a promotion a little after it commits it, and
        // the promoted replica may apply it first: only a leader that had
        // applied at least as much as the replica when it said VOTING, and
        // still lists it as a learner, contradicts a real promotion.
        let learner_later = h.statuses.iter().filter(in_window).find(|l| {
            l.is_leader
                && l.replica != w.replica
                && l.invoke_us > first.complete_us
                && l.invoke_us < isolated
                && l.term >= first.term
                && l.applied >= first.applied
                && l.members.iter().any(|m| m.id == w.replica && !m.voter)
        });
        if let Some(l) = learner_later {
            out.push(violation(
                Rule::RejoinVotesOnlyWhenPromoted,
                vec![],
                format!(
                    "replica {} reported VOTING (term {}) at {} us after its wipe at {} us, while leader {} \
                     still listed it as a learner at {} us (term {})",
                    w.replica, first.term, first.complete_us, w.at_us, l.replica, l.invoke_us, l.term
                ),
            ));
        }
    }
    out
}

/// One state operation on one key, as the register search sees it.
#[derive(Debug, Clone, Copy)]
struct RegOp {
    id: u64,
    invoke_us: u64,
    /// `u64::MAX` for an outcome-unknown put (it may take effect any time
    /// after its invoke, or never).
    complete_us: u64,
    /// `Some(v)`: a put of v; `None`: a get.
    put: Option<u64>,
    /// What a get returned.
    got: Option<u64>,
    /// An acknowledged operation must be linearized; an unknown put may be
    /// left out.
    required: bool,
}

/// Most operations on one key the search takes (a bitmask of them).
pub const MAX_OPS_PER_KEY: usize = 64;

/// [`Rule::StateLinearizable`]: per key, a Wing-Gong search for an order
/// of the operations that respects real time and a register's semantics
/// (a get returns the last put's value, `None` before any). Failed
/// operations and unknown gets are left out; unknown puts are optional.
pub fn state_linearizable(h: &History) -> Vec<Violation> {
    let mut keys: BTreeMap<&str, Vec<RegOp>> = BTreeMap::new();
    for op in &h.ops {
        let (key, put) = match &op.call {
            Call::StatePut { key, value } => (key.as_str(), Some(*value)),
            Call::StateGet { key } => (key.as_str(), None),
            _ => continue,
        };
        let reg = match (&op.outcome, put) {
            (Outcome::Failed(_), _) | (Outcome::Unknown(_), None) => continue,
            (Outcome::Unknown(_), Some(_)) => RegOp {
                id: op.id,
                invoke_us: op.invoke_us,
                complete_us: u64::MAX,
                put,
                got: None,
                required: false,
            },
            (Outcome::Ok(ret), _) => RegOp {
                id: op.id,
                invoke_us: op.invoke_us,
                complete_us: op.complete_us,
                put,
                got: match ret {
                    Ret::StateValue { value } => *value,
                    _ => None,
                },
                required: true,
            },
        };
        keys.entry(key).or_default().push(reg);
    }
    let mut out = Vec::new();
    for (key, ops) in keys {
        if ops.len() > MAX_OPS_PER_KEY {
            out.push(violation(
                Rule::StateLinearizable,
                vec![],
                format!(
                    "key {key}: {} operations, more than the search takes ({MAX_OPS_PER_KEY})",
                    ops.len()
                ),
            ));
            continue;
        }
        if !linearizable_register(&ops) {
            out.push(violation(
                Rule::StateLinearizable,
                ops.iter().map(|o| o.id).collect(),
                format!(
                    "key {key}: no linearization of its {} operations",
                    ops.len()
                ),
            ));
        }
    }
    out
}

fn linearizable_register(ops: &[RegOp]) -> bool {
    let required: u64 = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| o.required)
        .fold(0, |m, (i, _)| m | (1 << i));
    let mut seen: HashSet<(u64, Option<u64>)> = HashSet::new();
    search(ops, 0, None, required, &mut seen)
}

/// Depth-first: `done` is the set linearized so far, `value` the register.
fn search(
    ops: &[RegOp],
    done: u64,
    value: Option<u64>,
    required: u64,
    seen: &mut HashSet<(u64, Option<u64>)>,
) -> bool {
    if done & required == required {
        return true;
    }
    if !seen.insert((done, value)) {
        return false;
    }
    // An operation may go next only if it was invoked before every
    // remaining required operation completed.
    let horizon = ops
        .iter()
        .enumerate()
        .filter(|(i, o)| done & (1 << i) == 0 && o.required)
        .map(|(_, o)| o.complete_us)
        .min()
        .unwrap_or(u64::MAX);
    for (i, o) in ops.iter().enumerate() {
        if done & (1 << i) != 0 || o.invoke_us > horizon {
            continue;
        }
        let next = match o.put {
            Some(v) => Some(v),
            None if o.got == value => value,
            None => continue,
        };
        if search(ops, done | (1 << i), next, required, seen) {
            return true;
        }
    }
    false
}
