//! Fault campaigns against real `replog replica` processes.
//!
//! Each replica runs in its own network namespace ([`netns`]), behind a
//! bridge the test client reaches from the root namespace ([`cluster`]).
//! The [`nemesis`] kills, pauses, partitions, drops and delays packets
//! ([`delay`]) and wipes data directories; concurrent clients record a
//! [`history`] of operations and status polls ([`client`]); the
//! [`checker`] judges it; a [`campaign`] ties them together and reports.
//! With the repair option the replicas run the repair coordinator, a
//! [`repair`] watch follows its replicated history, and
//! [`repair_check`] judges the coordinator's limits.
//!
//! Everything needs root (namespaces, iptables): without it, or without a
//! working `ip netns`, setup fails with [`netns::NetError`] naming the
//! cause. `tools/setup.sh` installs iptables when it is missing.

pub mod campaign;
pub mod checker;
pub mod client;
pub mod cluster;
pub mod delay;
pub mod history;
pub mod nemesis;
pub mod netns;
pub mod repair;
pub mod repair_check;
pub mod state_client;
