//! The leader's rounds: every `round_interval`, observe the members
//! (`Log::cluster_status`), judge them (`replog_repair::Detector`), decide
//! (`replog_repair::Coordinator`, on the replicated `RepairState`) and act.
//! A round writes its records one at a time and stops at the first that
//! fails (a lost leadership, say); the next round decides again from the
//! state as applied, so nothing is decided twice on a stale state.
//!
//! A step's command runs in a task of its own: here for scope `leader`,
//! through the sick replica's `Repair` RPC (op `run`) for scope `replica`
//! (a replica runs only the commands of its own `--repair-set`, by id).
//! Its outcome is written when it ends; a new leader that finds a step with
//! no outcome waits for its deadline and records it `unknown`.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts};
use replog_log::{ClusterStatus, Member, MembershipChange, Writer};
use replog_repair::coordinator::{Action, Coordinator, MemberView, View};
use replog_repair::record::{StepFinished, StepStarted};
use replog_repair::{failure_tolerance, Detector, Health, Observation, Record, RepairStep, Scope};
use serde::Deserialize;
use tracing::{info, warn};

use super::executor::{self, Outcome};
use super::intake::AdminError;
use super::{now_ms, Judgment, Repairs};

/// A member this close to the commit counts as caught up (a spare may
/// then replace the sick replica).
const CAUGHT_UP_LAG: u64 = 64;

/// The repair metrics (Prometheus).
pub(crate) struct RepairMetrics {
    records: IntCounterVec,
    steps: IntCounterVec,
    alarm: IntGauge,
    failure_tolerance: IntGauge,
    cases: IntGauge,
}

impl RepairMetrics {
    pub(crate) fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let m = RepairMetrics {
            records: IntCounterVec::new(
                Opts::new(
                    "replog_repair_records_total",
                    "repair records written by this leader, by kind",
                ),
                &["kind"],
            )?,
            steps: IntCounterVec::new(
                Opts::new(
                    "replog_repair_steps_total",
                    "repair steps run by this leader, by repair id and result",
                ),
                &["repair_id", "result"],
            )?,
            alarm: IntGauge::new(
                "replog_repair_alarm",
                "1 while the removal-limit alarm is raised",
            )?,
            failure_tolerance: IntGauge::new(
                "replog_failure_tolerance",
                "voters the cluster can still lose and keep a quorum (-1: no quorum or not judged)",
            )?,
            cases: IntGauge::new(
                "replog_repair_open_cases",
                "replicas with an open repair case",
            )?,
        };
        registry.register(Box::new(m.records.clone()))?;
        registry.register(Box::new(m.steps.clone()))?;
        registry.register(Box::new(m.alarm.clone()))?;
        registry.register(Box::new(m.failure_tolerance.clone()))?;
        registry.register(Box::new(m.cases.clone()))?;
        Ok(m)
    }
}

fn kind(record: &Record) -> &'static str {
    match record {
        Record::Signal(_) => "signal",
        Record::StepStarted(_) => "step_started",
        Record::StepFinished(_) => "step_finished",
        Record::Isolated(_) => "isolated",
        Record::Readmitted { .. } => "readmitted",
        Record::CaseClosed { .. } => "case_closed",
        Record::Cancelled { .. } => "cancelled",
        Record::AlarmRaised { .. } => "alarm_raised",
        Record::Reset { .. } => "reset",
        Record::Paused { .. } => "paused",
        Record::Resumed { .. } => "resumed",
    }
}

/// Writes `record` with a writer of the current term (started when the
/// term changed); fails when this replica does not lead.
pub(super) async fn write(r: &Repairs, record: &Record) -> Result<u64, AdminError> {
    let term = r.log.progress().term;
    let mut writer = r.writer.lock().await;
    if writer.as_ref().is_none_or(|(t, _)| *t != term) {
        let mut w: Writer = r.log.writer();
        w.start()
            .await
            .map_err(|e| AdminError::unavailable(format!("not the leader: {e}")))?;
        *writer = Some((w.term().unwrap_or(term), w));
    }
    let (_, w) = writer.as_ref().expect("set above");
    let position = w
        .append_repair(record)
        .await
        .map_err(|e| AdminError::unavailable(format!("writing the record failed: {e}")))?;
    r.metrics.records.with_label_values(&[kind(record)]).inc();
    info!(position = position.value(), record = %serde_json::to_string(record).unwrap_or_default(), "repair record written");
    Ok(position.value())
}

/// The rounds, while the server runs.
pub(super) async fn run(r: Arc<Repairs>, mut stopping: tokio::sync::watch::Receiver<bool>) {
    let mut detector = Detector::new(r.opts.detector);
    let mut led: Option<(u64, Coordinator)> = None;
    let mut tick = tokio::time::interval(r.opts.round_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopping.changed() => {}
        }
        if *stopping.borrow() {
            return;
        }
        let p = r.log.progress();
        if !(p.is_leader && p.leader_ready) {
            if led.take().is_some() {
                detector.on_leadership_lost();
                *r.judgment.lock() = Judgment::default();
                r.metrics.failure_tolerance.set(-1);
            }
            continue;
        }
        if led.as_ref().is_none_or(|(term, _)| *term != p.term) {
            detector.on_leadership(now_ms());
            info!(
                term = p.term,
                grace_ms = r.opts.detector.reregister_timeout.as_millis() as u64,
                "leading: the repair coordinator starts after the re-register grace"
            );
            led = Some((p.term, Coordinator::new(r.opts.config.clone(), r.limits)));
        }
        let (term, coordinator) = led.as_mut().expect("set above");
        if let Err(e) = round(&r, *term, coordinator, &mut detector).await {
            warn!(error = %e, "repair round stopped early");
        }
    }
}

/// One round.
async fn round(
    r: &Arc<Repairs>,
    term: u64,
    coordinator: &mut Coordinator,
    detector: &mut Detector,
) -> Result<(), String> {
    let status = r.log.cluster_status().await.map_err(|e| e.to_string())?;
    let now = now_ms();
    let me = r.me;
    let view = observe(&status, term, now, me, detector);
    judge(r, &view);
    let state = r.log.repair_state().map_err(|e| e.to_string())?;
    r.metrics.alarm.set(i64::from(state.alarm.is_some()));
    r.metrics.cases.set(state.cases.len() as i64);
    for action in coordinator.decide(&view, &state) {
        act(r, &status, action).await?;
    }
    Ok(())
}

/// The members as the detector judges them now.
fn observe(status: &ClusterStatus, term: u64, now: u64, me: u64, detector: &mut Detector) -> View {
    let observed: Vec<Observation> = status
        .members
        .iter()
        .map(|m| Observation {
            id: m.id,
            voter: m.voter,
            silence: m.last_heard,
            lag_entries: m.lag,
        })
        .collect();
    let health = detector.judge(now, me, &observed);
    View {
        now_ms: now,
        term,
        grace: detector.in_grace(now),
        members: status
            .members
            .iter()
            .map(|m| MemberView {
                id: m.id,
                address: m.address.clone(),
                voter: m.voter,
                health: health.get(&m.id).cloned().unwrap_or(Health::Grace),
                caught_up: m.lag <= CAUGHT_UP_LAG,
            })
            .collect(),
    }
}

/// Keeps what the round judged, for status, `GET /repairs` and metrics.
fn judge(r: &Repairs, view: &View) {
    let voters = view.members.iter().filter(|m| m.voter).count();
    let available = view
        .members
        .iter()
        .filter(|m| m.voter && m.health.is_healthy())
        .count();
    let tolerance = if view.grace {
        None
    } else {
        failure_tolerance(voters, available)
    };
    r.metrics
        .failure_tolerance
        .set(tolerance.map_or(-1, |t| t as i64));
    *r.judgment.lock() = Judgment {
        leader: true,
        term: view.term,
        grace: view.grace,
        health: view
            .members
            .iter()
            .map(|m| (m.id, m.health.clone()))
            .collect(),
        voters,
        available_voters: available,
        failure_tolerance: tolerance,
    };
}

async fn act(r: &Arc<Repairs>, status: &ClusterStatus, action: Action) -> Result<(), String> {
    match action {
        Action::Propose(record) => write(r, &record).await.map(|_| ()).map_err(|e| e.reason),
        Action::Run {
            started,
            step,
            address,
        } => {
            spawn_step(r.clone(), started, step, address);
            Ok(())
        }
        Action::AddLearner { id, address } => {
            info!(spare = id, %address, "adding the spare as a learner");
            let member = Member { id, address };
            change(r, vec![MembershipChange::AddLearner(id)], vec![member]).await;
            Ok(())
        }
        Action::Remove { id } | Action::Demote { id } if id == r.me => {
            // The leader cannot remove or demote itself (the log refuses it):
            // it hands its leadership to a healthy voter, whose coordinator
            // then acts on the isolation.
            hand_over(r, status, id);
            Ok(())
        }
        Action::Remove { id } => {
            info!(replica = id, "removing the replaced replica");
            change(r, vec![MembershipChange::Remove(id)], Vec::new()).await;
            Ok(())
        }
        Action::Demote { id } => {
            info!(
                replica = id,
                voters = status.members.iter().filter(|m| m.voter).count(),
                "demoting the isolated replica to a learner"
            );
            change(r, vec![MembershipChange::AddLearner(id)], Vec::new()).await;
            Ok(())
        }
    }
}

/// The leader is the isolated replica: transfers its leadership to a voter
/// the last round judged healthy, caught up and not isolated itself.
fn hand_over(r: &Repairs, status: &ClusterStatus, me: u64) {
    let judgment = r.judgment();
    let state = r.log.repair_state().unwrap_or_default();
    let to = status
        .members
        .iter()
        .filter(|m| m.id != me && m.voter && m.reachable && m.lag <= CAUGHT_UP_LAG)
        .filter(|m| judgment.health.get(&m.id).is_some_and(Health::is_healthy))
        .find(|m| !state.holds_isolated(m.id));
    match to {
        Some(m) => {
            info!(
                replica = me,
                to = m.id,
                "the isolated replica leads: transferring its leadership first"
            );
            if let Err(e) = r.log.transfer_leader(m.id) {
                warn!(error = %e, to = m.id, "the leadership transfer failed; the next round tries again");
            }
        }
        None => warn!(
            replica = me,
            "the isolated replica leads and no healthy voter can take over yet"
        ),
    }
}

/// A membership change of a decision. Its failure (another change in
/// progress, say) does not stop the round: the other cases' decisions do
/// not depend on it, and the next round asks for it again.
async fn change(r: &Repairs, changes: Vec<MembershipChange>, addresses: Vec<Member>) {
    if let Err(e) = r.log.change_membership(changes.clone(), addresses).await {
        warn!(error = %e, ?changes, "the membership change failed; the next round tries again");
    }
}

/// Runs a committed step and writes its outcome.
fn spawn_step(r: Arc<Repairs>, started: StepStarted, step: RepairStep, address: String) {
    tokio::spawn(async move {
        let remaining = Duration::from_millis(started.deadline_ms.saturating_sub(now_ms()).max(1));
        info!(replica = started.replica, attempt = started.attempt, repair = %step.id,
              scope = ?step.scope, "running a repair step");
        let env = executor::environment(&started, &address);
        let outcome = match step.scope {
            Scope::Leader => executor::run(&step.command, &env, remaining).await,
            Scope::Replica => {
                let run = RunBody {
                    repair_id: step.id.clone(),
                    env,
                    timeout_ms: remaining.as_millis() as u64,
                    deadline_ms: started.deadline_ms,
                };
                run_remote(&r, &address, &run, remaining).await
            }
        };
        r.metrics
            .steps
            .with_label_values(&[
                step.id.as_str(),
                &format!("{:?}", outcome.result).to_lowercase(),
            ])
            .inc();
        let record = Record::StepFinished(StepFinished {
            replica: started.replica,
            attempt: started.attempt,
            result: outcome.result,
            exit_code: outcome.exit_code,
            output: outcome.output,
            finished_at_ms: now_ms(),
        });
        if let Err(e) = write(&r, &record).await {
            warn!(error = %e, replica = started.replica, attempt = started.attempt,
                  "the step's outcome was not recorded; a later leader records it unknown at its deadline");
        }
    });
}

/// What the leader asks the sick replica to run.
#[derive(Debug, serde::Serialize, Deserialize)]
struct RunBody {
    repair_id: String,
    env: Vec<(String, String)>,
    timeout_ms: u64,
    /// The step's deadline (ms since the epoch, the leader's clock); the
    /// replica starts nothing at or past it. 0: none (an older leader).
    #[serde(default)]
    deadline_ms: u64,
}

/// Time the leader allows past a remote step's deadline for its answer to
/// travel back (the replica's executor kills the command at the deadline).
const ANSWER_MARGIN: Duration = Duration::from_secs(1);

/// Runs a step of scope `replica` through the sick replica's `Repair` RPC.
/// The call ends by the step's deadline plus [`ANSWER_MARGIN`]: a paused or
/// cut-off replica costs the escalation its step's timeout, never more,
/// and the command it might still receive late refuses to start
/// ([`run_budget`]).
async fn run_remote(r: &Repairs, address: &str, run: &RunBody, remaining: Duration) -> Outcome {
    let body = serde_json::to_vec(run).unwrap_or_default();
    let token = r.opts.admin_token.clone().unwrap_or_default();
    let within = remaining + ANSWER_MARGIN;
    match super::call(address, "run", &body, &token, false, within).await {
        Ok(resp) if resp.http_status == 200 => {
            serde_json::from_slice(&resp.body).unwrap_or_else(|e| {
                Outcome::failed(format!(
                    "replica {address} answered an unreadable outcome: {e}"
                ))
            })
        }
        Ok(resp) => Outcome::failed(format!(
            "replica {address} refused to run {}: {}",
            run.repair_id,
            super::error_reason(&resp.body)
        )),
        Err(e) => Outcome::failed(e.reason),
    }
}

/// How long the sick replica may run a step's command: the leader's
/// `timeout_ms`, capped by the step's own timeout here and by the time left
/// to the deadline on this replica's clock; `Err` when the deadline has
/// passed already (the request waited in a paused process or a slow
/// network): a late command never starts.
fn run_budget(
    now_ms: u64,
    deadline_ms: u64,
    timeout_ms: u64,
    step_timeout: Duration,
) -> Result<Duration, String> {
    let mut budget_ms = timeout_ms.clamp(1, (step_timeout.as_millis() as u64).max(1));
    if deadline_ms != 0 {
        let left_ms = deadline_ms.saturating_sub(now_ms);
        if left_ms == 0 {
            return Err(format!(
                "the request arrived {} ms after the step's deadline; not started",
                now_ms - deadline_ms
            ));
        }
        budget_ms = budget_ms.min(left_ms);
    }
    Ok(Duration::from_millis(budget_ms))
}

/// Op `run` on the sick replica: runs its own command for the repair id.
pub(super) async fn run_here(r: &Repairs, body: &[u8]) -> Result<Vec<u8>, AdminError> {
    let b: RunBody =
        serde_json::from_slice(body).map_err(|e| AdminError::bad_request(format!("body: {e}")))?;
    let Some(step) = r.opts.config.order.iter().find(|s| s.id == b.repair_id) else {
        return Err(AdminError::not_found(format!(
            "this replica's --repair-order has no repair `{}`",
            b.repair_id
        )));
    };
    if b.env.len() > 32
        || b.env
            .iter()
            .any(|(k, v)| !k.starts_with("REPLOG_") || v.len() > 1024)
    {
        return Err(AdminError::bad_request(
            "the environment must be REPLOG_* variables",
        ));
    }
    let timeout = run_budget(now_ms(), b.deadline_ms, b.timeout_ms, step.timeout)
        .map_err(AdminError::conflict)?;
    let outcome = executor::run(&step.command, &b.env, timeout).await;
    Ok(serde_json::to_vec(&outcome).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_budget_as_a_table() {
        let step = Duration::from_secs(10);
        // (now, deadline, the leader's timeout, budget in ms or refused)
        let rows: [(u64, u64, u64, Option<u64>); 7] = [
            (1_000, 5_000, 4_000, Some(4_000)),
            // Waited 3 s in a paused process: 1 s left, not 4.
            (4_000, 5_000, 4_000, Some(1_000)),
            // At or past the deadline: never started.
            (5_000, 5_000, 4_000, None),
            (9_000, 5_000, 4_000, None),
            // The leader may not ask for more than this replica's step timeout.
            (0, 60_000, 60_000, Some(10_000)),
            // An older leader sends no deadline: its timeout, capped.
            (9_000, 0, 4_000, Some(4_000)),
            (9_000, 0, 0, Some(1)),
        ];
        for (now, deadline, timeout, want) in rows {
            let got = run_budget(now, deadline, timeout, step);
            match want {
                Some(ms) => assert_eq!(got, Ok(Duration::from_millis(ms)), "{now} {deadline}"),
                None => {
                    let why = got.unwrap_err();
                    assert!(why.contains("after the step's deadline"), "{why}");
                }
            }
        }
    }
}
