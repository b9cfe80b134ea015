//! The Proxy-Authorization parser and the policy file parser: no panic, and a secret never
//! appears in an error message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_server::auth::{Credentials, Policy};

fuzz_target!(|data: &[u8]| {
    let creds = Credentials::parse(Some(data));
    let _ = format!("{creds:?}");
    if let Ok(text) = std::str::from_utf8(data) {
        match Policy::parse(text) {
            Ok(policy) => {
                let _ = policy.authenticate(&creds, Some("ops"));
                let _ = policy.allows("ops", "alpha");
            }
            Err(err) => assert!(err.len() < 400),
        }
    }
});
