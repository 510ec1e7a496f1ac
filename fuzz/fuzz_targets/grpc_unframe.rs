//! The gRPC length-prefixed message of a unary answer, as the load
//! generator's caller parses it (`replog_bench::grpc_unary::unframe`).
//!
//! Input: the answer's body bytes. Holds: no panic; an accepted body is an
//! uncompressed frame whose length is exactly what follows it; the message
//! framed again is accepted as the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replog_bench::grpc_unary::{frame, unframe};
use replog_proto::client::AppendResponse;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = unframe::<AppendResponse>(data, "/fuzz") else {
        return;
    };
    assert_eq!(data[0], 0);
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    assert_eq!(len, data.len() - 5);
    let again: AppendResponse = unframe(&frame(&m), "/fuzz").unwrap();
    assert_eq!(again, m);
});
