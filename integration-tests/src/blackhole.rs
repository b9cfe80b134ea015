//! Packets that vanish: iptables rules on loopback that drop them silently (no RST, no ICMP),
//! as a NAT timeout, a sleeping laptop or a black-holed route would. Each rule is removed when
//! its guard drops. Needs root and the Debian package `iptables` (`.ci/run` installs it).

use std::net::SocketAddr;
use std::process::Command;

/// An iptables `INPUT` rule that drops matching packets, removed on drop.
#[derive(Debug)]
pub struct Blackhole(Vec<String>);

impl Blackhole {
    /// Drops every packet from `from` to `to` (e.g. everything a client sends, its ACKs
    /// included).
    pub fn between(from: SocketAddr, to: SocketAddr) -> Self {
        Self::insert(&[
            "-s",
            &from.ip().to_string(),
            "--sport",
            &from.port().to_string(),
            "-d",
            &to.ip().to_string(),
            "--dport",
            &to.port().to_string(),
        ])
    }

    /// Drops every packet to `to`: a connect to it hangs, retrying its SYN, as to a host that
    /// went away.
    pub fn to(to: SocketAddr) -> Self {
        Self::insert(&[
            "-d",
            &to.ip().to_string(),
            "--dport",
            &to.port().to_string(),
        ])
    }

    fn insert(matches: &[&str]) -> Self {
        let spec: Vec<String> = ["INPUT", "-p", "tcp"]
            .iter()
            .chain(matches)
            .chain(&["-j", "DROP"])
            .map(|s| (*s).to_owned())
            .collect();
        let status = Command::new("iptables")
            .arg("-I")
            .args(&spec)
            .status()
            .expect("iptables (Debian package `iptables`; .ci/run installs it)");
        assert!(status.success(), "iptables -I failed (needs root)");
        Self(spec)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = Command::new("iptables").arg("-D").args(&self.0).status();
    }
}
