//! The CONNECT request-head parser: no panic, and a parsed head is a valid CONNECT whose length
//! lies within the input and the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_server::connect::{RequestError, parse};

fuzz_target!(|data: &[u8]| {
    let limit = 1 + (data.first().copied().unwrap_or(0) as usize) * 64;
    match parse(data, limit) {
        Ok(Some((req, len))) => {
            assert!(len <= data.len() && len <= limit);
            assert!(req.port != 0 && !req.host.is_empty());
            assert!(!req.host.contains(':') && req.host == req.host.to_ascii_lowercase());
        }
        Ok(None) => {}
        Err(RequestError::TooLarge(l)) => assert_eq!(l, limit),
        Err(_) => {}
    }
});
