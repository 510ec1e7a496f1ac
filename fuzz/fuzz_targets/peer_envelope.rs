//! The envelopes replicas send each other (`replog_log::peers`): the
//! protobuf `Envelope` as the transport receives it, then the checks and
//! decoding every envelope goes through before it reaches the core.
//!
//! Input: an encoded `replog.replica.v1.Envelope`, received by replica 1 of
//! cluster "c". Holds: nothing panics; an accepted envelope is of cluster
//! "c" and for replica 1, a Raft message in it names the same sender and
//! recipient as the envelope; what was accepted, sent again as this
//! replica's code sends it, is accepted as the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use replog_log::peers::{self, Inbound};
use replog_log::Envelope;

const CLUSTER: &str = "c";
const ME: u64 = 1;

fuzz_target!(|data: &[u8]| {
    let Ok(env) = Envelope::decode(data) else {
        return;
    };
    let (cluster, to, from) = (env.cluster_id.clone(), env.to, env.from);
    let Ok((sender, inbound)) = peers::decode(CLUSTER, ME, env) else {
        return;
    };
    assert_eq!((cluster.as_str(), to, sender), (CLUSTER, ME, from));
    match inbound {
        Inbound::Raft(m) => {
            assert_eq!((m.from, m.to), (sender, ME));
            let again = peers::decode(CLUSTER, ME, peers::raft_envelope(CLUSTER, &m));
            match again {
                Ok((s, Inbound::Raft(m2))) => {
                    assert_eq!(s, sender);
                    // Compared by their known fields (text format): the
                    // unknown fields rust-protobuf keeps may come back in
                    // another place (a singular message given twice is
                    // merged) and are never read.
                    assert_eq!(format!("{m2:?}"), format!("{m:?}"));
                }
                other => panic!("a re-sent raft message came back as {other:?}"),
            }
        }
        Inbound::Peer(p) => {
            let again = peers::decode(CLUSTER, ME, peers::peer_envelope(CLUSTER, sender, ME, &p));
            match again {
                Ok((s, Inbound::Peer(p2))) => {
                    assert_eq!(s, sender);
                    assert_eq!(p2, p);
                }
                other => panic!("a re-sent peer message came back as {other:?}"),
            }
        }
    }
});
