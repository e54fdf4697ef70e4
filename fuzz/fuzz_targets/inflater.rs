//! The permessage-deflate inflater on arbitrary bytes: it must never panic nor make more than
//! its limit, and what the compressor makes it must give back exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sockworker_core::deflate::{compress, inflate, InflateError};

const LIMIT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    match inflate(data, LIMIT) {
        Ok(out) => assert!(out.len() <= LIMIT),
        Err(InflateError::TooBig | InflateError::Invalid) => {}
    }
    let compressed = compress(data);
    assert_eq!(inflate(&compressed, data.len()).as_deref(), Ok(data));
    if !data.is_empty() {
        assert_eq!(inflate(&compressed, data.len() - 1), Err(InflateError::TooBig));
    }
});
