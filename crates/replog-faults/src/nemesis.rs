//! The nemesis: faults injected into a [`Cluster`] and undone at heal.
//!
//! Process faults signal the replica processes (SIGKILL, SIGSTOP/SIGCONT)
//! or remove a data directory. Network faults are iptables rules in the
//! replicas' namespaces, all in one chain [`CHAIN`] hooked into INPUT and
//! OUTPUT, so that healing is one flush per namespace: partitions drop
//! every packet between two replicas on both of them; packet loss drops a
//! random share of what a replica receives (`-m statistic`); delay routes
//! a replica's peer connections through a userspace proxy
//! ([`crate::delay`]).
//!
//! Every fault is logged (tracing and [`FaultEvent`]) with the time it was
//! injected and the time it was undone, on the cluster's clock.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tracing::info;

use crate::cluster::{Cluster, ClusterError};
use crate::delay::DelayProxy;

/// The iptables chain of the faults, in every replica namespace.
pub const CHAIN: &str = "REPLOG_FAULTS";

/// One fault.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Fault {
    /// SIGKILL; heal restarts it on its data directory.
    Kill(u64),
    /// SIGSTOP; heal SIGCONTs it.
    Pause(u64),
    /// The replica cut off from every other one.
    Isolate(u64),
    /// The replicas in `minority` cut off from the others.
    Split { minority: Vec<u64> },
    /// Only the link between two replicas cut.
    CutLink(u64, u64),
    /// The others split in two halves that see `middle` but not each other.
    Bridge { middle: u64 },
    /// A share of the packets a replica receives dropped at random.
    PacketLoss { replica: u64, probability: f64 },
    /// The replica's peer connections (both ways) delayed, each way.
    Delay { replica: u64, delay_ms: u64 },
    /// SIGKILL, data directory removed, restarted EMPTY at once (it rejoins
    /// EMPTY -> RECOVERING -> VOTING by itself); nothing to heal.
    Wipe(u64),
}

impl Fault {
    /// The kind's name in reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill(_) => "kill",
            Fault::Pause(_) => "pause",
            Fault::Isolate(_) => "isolate",
            Fault::Split { .. } => "split",
            Fault::CutLink(..) => "cut-link",
            Fault::Bridge { .. } => "bridge",
            Fault::PacketLoss { .. } => "packet-loss",
            Fault::Delay { .. } => "delay",
            Fault::Wipe(_) => "wipe",
        }
    }
}

/// A fault as it happened, on the cluster's clock.
#[derive(Debug, Clone, Serialize)]
pub struct FaultEvent {
    pub fault: Fault,
    pub kind: &'static str,
    pub injected_us: u64,
    /// When it was undone (`None`: still active, or nothing to undo).
    pub healed_us: Option<u64>,
}

/// Injects faults into one cluster; see the module docs.
pub struct Nemesis {
    cluster: Arc<Cluster>,
    events: Mutex<Vec<FaultEvent>>,
    /// Indexes into `events` of the faults not yet undone.
    active: Mutex<Vec<usize>>,
    chains_ready: Mutex<BTreeSet<u64>>,
    delay: Mutex<Option<DelayProxy>>,
}

impl Nemesis {
    pub fn new(cluster: Arc<Cluster>) -> Nemesis {
        Nemesis {
            cluster,
            events: Mutex::new(Vec::new()),
            active: Mutex::new(Vec::new()),
            chains_ready: Mutex::new(BTreeSet::new()),
            delay: Mutex::new(None),
        }
    }

    fn now_us(&self) -> u64 {
        self.cluster.elapsed().as_micros() as u64
    }

    /// Every fault so far, in order.
    pub fn events(&self) -> Vec<FaultEvent> {
        self.events.lock().unwrap().clone()
    }

    /// Whether a fault is in force.
    pub fn any_active(&self) -> bool {
        !self.active.lock().unwrap().is_empty()
    }

    /// Creates [`CHAIN`] in replica `id`'s namespace and hooks it into
    /// INPUT and OUTPUT (once per namespace).
    fn ensure_chain(&self, id: u64) -> Result<(), ClusterError> {
        let mut ready = self.chains_ready.lock().unwrap();
        if ready.contains(&id) {
            return Ok(());
        }
        let net = self.cluster.net();
        net.iptables(id, &["-N", CHAIN])?;
        net.iptables(id, &["-I", "INPUT", "-j", CHAIN])?;
        net.iptables(id, &["-I", "OUTPUT", "-j", CHAIN])?;
        ready.insert(id);
        Ok(())
    }

    /// Drops every packet between replicas `a` and `b` (rules on both).
    fn block(&self, a: u64, b: u64) -> Result<(), ClusterError> {
        let net = self.cluster.net();
        for (me, other) in [(a, b), (b, a)] {
            self.ensure_chain(me)?;
            let addr = net.node_addr(other).to_string();
            net.iptables(me, &["-A", CHAIN, "-s", &addr, "-j", "DROP"])?;
            net.iptables(me, &["-A", CHAIN, "-d", &addr, "-j", "DROP"])?;
        }
        Ok(())
    }

    /// Cuts every link between a replica of `left` and one of `right`.
    fn cut(&self, left: &[u64], right: &[u64]) -> Result<(), ClusterError> {
        for &a in left {
            for &b in right {
                self.block(a, b)?;
            }
        }
        Ok(())
    }

    fn others(&self, of: &[u64]) -> Vec<u64> {
        self.cluster
            .ids()
            .into_iter()
            .filter(|id| !of.contains(id))
            .collect()
    }

    /// Injects `fault` and records it.
    pub async fn inject(&self, fault: Fault) -> Result<(), ClusterError> {
        let c = &self.cluster;
        let net = c.net();
        // The time the fault starts to act (a wipe's data is gone from here).
        let injected_us = self.now_us();
        match &fault {
            Fault::Kill(id) => c.kill(*id)?,
            Fault::Pause(id) => c.pause(*id)?,
            Fault::Isolate(id) => self.cut(&[*id], &self.others(&[*id]))?,
            Fault::Split { minority } => self.cut(minority, &self.others(minority))?,
            Fault::CutLink(a, b) => self.block(*a, *b)?,
            Fault::Bridge { middle } => {
                let rest = self.others(&[*middle]);
                let (left, right) = rest.split_at(rest.len() / 2);
                self.cut(left, right)?;
            }
            Fault::PacketLoss {
                replica,
                probability,
            } => {
                self.ensure_chain(*replica)?;
                let p = format!("{probability:.4}");
                net.iptables(
                    *replica,
                    &[
                        "-A",
                        CHAIN,
                        "-i",
                        "eth0",
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &p,
                        "-j",
                        "DROP",
                    ],
                )?;
            }
            Fault::Delay { replica, delay_ms } => {
                let mut slot = self.delay.lock().unwrap();
                if slot.is_none() {
                    *slot = Some(DelayProxy::start(c.clone())?);
                }
                let proxy = slot.as_ref().expect("just set");
                for id in c.ids() {
                    self.ensure_chain(id)?;
                }
                proxy.delay_replica(*replica, Duration::from_millis(*delay_ms))?;
            }
            Fault::Wipe(id) => {
                c.wipe(*id)?;
                c.start_replica(*id)?;
            }
        }
        info!(fault = ?fault, at_s = injected_us as f64 / 1e6, "fault injected");
        let heals = !matches!(fault, Fault::Wipe(_));
        let mut events = self.events.lock().unwrap();
        events.push(FaultEvent {
            kind: fault.kind(),
            fault,
            injected_us,
            healed_us: None,
        });
        if heals {
            self.active.lock().unwrap().push(events.len() - 1);
        }
        Ok(())
    }

    /// Undoes every fault in force: restarts killed replicas, resumes paused
    /// ones, flushes the fault chain of every namespace, ends delays.
    pub async fn heal(&self) -> Result<(), ClusterError> {
        self.heal_where(|_| true).await
    }

    /// Undoes the network faults in force only (partitions, packet loss,
    /// delays); killed replicas stay down, paused ones stopped.
    pub async fn heal_network(&self) -> Result<(), ClusterError> {
        self.heal_where(|f| !matches!(f, Fault::Kill(_) | Fault::Pause(_)))
            .await
    }

    async fn heal_where(&self, which: impl Fn(&Fault) -> bool) -> Result<(), ClusterError> {
        let chosen: Vec<(usize, Fault)> = {
            let events = self.events.lock().unwrap();
            let mut active = self.active.lock().unwrap();
            let (chosen, kept): (Vec<usize>, Vec<usize>) =
                active.iter().partition(|i| which(&events[**i].fault));
            *active = kept;
            chosen
                .into_iter()
                .map(|i| (i, events[i].fault.clone()))
                .collect()
        };
        if chosen.is_empty() {
            return Ok(());
        }
        let c = &self.cluster;
        let mut network = false;
        for (_, f) in &chosen {
            match f {
                Fault::Kill(id) if !c.is_running(*id) => c.start_replica(*id)?,
                Fault::Pause(id) if c.is_paused(*id) => c.resume(*id)?,
                Fault::Kill(_) | Fault::Pause(_) => {}
                Fault::Delay { .. } => {
                    if let Some(p) = self.delay.lock().unwrap().as_ref() {
                        p.clear()?;
                    }
                    network = true;
                }
                _ => network = true,
            }
        }
        if network {
            let ready: Vec<u64> = self.chains_ready.lock().unwrap().iter().copied().collect();
            for id in ready {
                c.net().iptables(id, &["-F", CHAIN])?;
            }
        }
        let healed_us = self.now_us();
        let mut events = self.events.lock().unwrap();
        for (i, f) in chosen {
            events[i].healed_us = Some(healed_us);
            info!(fault = ?f, at_s = healed_us as f64 / 1e6, "healed");
        }
        Ok(())
    }
}
