//! The CONNECT request-head parser: no panic, and a parsed head is a valid CONNECT whose length
//! lies within the input and the limit, and whose `Proxy-Destination`, if any, is a HOST:PORT an
//! agent could dial (no spaces, no control bytes, a port from 1 to 65535).
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
            if let Some(dest) = &req.destination {
                let (host, port) = dest.rsplit_once(':').expect("HOST:PORT");
                assert!(!host.is_empty() && dest.len() <= 261);
                assert!(port.parse::<u16>().is_ok_and(|p| p != 0));
                assert!(dest.bytes().all(|b| b.is_ascii_graphic()));
            }
        }
        Ok(None) => {}
        Err(RequestError::TooLarge(l)) => assert_eq!(l, limit),
        Err(_) => {}
    }
});
