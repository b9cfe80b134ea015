//! Code shared by `proxy-server` and `proxy-agent`, kept in one place rather than copied.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod pump;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
