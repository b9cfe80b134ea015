//! Reaching servers through a corporate HTTP proxy: `--https-proxy`, or the standard
//! `HTTPS_PROXY` / `https_proxy` and `NO_PROXY` / `no_proxy` variables. The agent opens a TCP
//! connection to the proxy, asks it for `CONNECT host:port`, and runs TLS to the server through
//! the tunnel it gets; the proxy sees only the server's address and encrypted bytes.
//!
//! Credentials may be given in the URL (`http://user:password@proxy:3128`) and are sent as
//! `Proxy-Authorization: Basic`. They are never logged: [`HttpProxy`]'s `Debug` and `Display`
//! show the proxy's address only.

use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest proxy answer head read.
const MAX_HEAD: usize = 8 * 1024;

/// A proxy to reach servers through.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpProxy {
    /// HOST:PORT of the proxy.
    pub addr: String,
    /// `user:password`, percent-decoded, if the URL had them.
    credentials: Option<String>,
}

impl std::fmt::Debug for HttpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for HttpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = if self.credentials.is_some() {
            " (with credentials)"
        } else {
            ""
        };
        write!(f, "http://{}{auth}", self.addr)
    }
}

/// Why a proxy URL was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyUrlError {
    /// Not `http://[user:password@]host[:port][/]`.
    #[error("not an http:// proxy URL (http://[user:password@]host[:port]): {0}")]
    Malformed(&'static str),
}

/// Why a tunnel through a proxy could not be opened. Each message names the proxy (its address
/// only, never its credentials).
// Variant fields are described by each variant's #[error] message, not by
// one-word doc lines.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Connecting to the proxy, or talking to it, failed.
    #[error("proxy {proxy}")]
    Io {
        proxy: HttpProxy,
        source: std::io::Error,
    },
    /// The proxy's answer head did not end within [`MAX_HEAD`] bytes.
    #[error("proxy {proxy}: answer head over {MAX_HEAD} bytes")]
    HeadTooLarge { proxy: HttpProxy },
    /// The proxy closed the connection before its answer head ended.
    #[error("proxy {proxy} closed the connection during CONNECT")]
    Closed { proxy: HttpProxy },
    /// The proxy answered with a status other than 2xx.
    #[error("proxy {proxy} refused CONNECT {target}: {status_line}")]
    Refused {
        proxy: HttpProxy,
        /// What was asked for (HOST:PORT).
        target: String,
        /// The proxy's status line.
        status_line: String,
    },
    /// The proxy did not answer in time.
    #[error("proxy {proxy}: no answer to CONNECT within {timeout:?}")]
    Timeout {
        proxy: HttpProxy,
        /// How long it was given.
        timeout: Duration,
    },
}

impl HttpProxy {
    /// Parses `http://[user:password@]host[:port][/]` (port 80 if absent; a bare `host:port` is
    /// read as http://, as curl does).
    pub fn parse(url: &str) -> Result<Self, ProxyUrlError> {
        let rest = match url.split_once("://") {
            Some(("http" | "HTTP", rest)) => rest,
            Some(_) => {
                return Err(ProxyUrlError::Malformed(
                    "only http:// proxies are supported (TLS to the server runs inside the tunnel)",
                ));
            }
            None => url,
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') || authority.contains('?') || authority.contains('#') {
            return Err(ProxyUrlError::Malformed("a proxy URL has no path"));
        }
        let (credentials, host_port) = match authority.rsplit_once('@') {
            // `user` alone is `user:` (an empty password), as curl sends it.
            Some((userinfo, host_port)) => {
                let mut credentials = percent_decode(userinfo)?;
                if !userinfo.contains(':') {
                    credentials.push(':');
                }
                (Some(credentials), host_port)
            }
            None => (None, authority),
        };
        if host_port.is_empty() {
            return Err(ProxyUrlError::Malformed("no host"));
        }
        let has_port = match host_port.rsplit_once(':') {
            // `[::1]` alone has a colon but no port.
            Some((host, port)) if !port.contains(']') => {
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(ProxyUrlError::Malformed("bad host or port"));
                }
                true
            }
            _ => false,
        };
        let addr = if has_port {
            host_port.to_owned()
        } else {
            format!("{host_port}:80")
        };
        Ok(Self { addr, credentials })
    }

    /// The proxy to use for `server` (HOST:PORT): `flag` if given, else the `HTTPS_PROXY`
    /// variables unless `NO_PROXY` exempts the host. `env` reads a variable (the process
    /// environment in production, a map in tests).
    pub fn for_server(
        flag: Option<&HttpProxy>,
        server: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<HttpProxy>, ProxyUrlError> {
        if let Some(proxy) = flag {
            return Ok(Some(proxy.clone()));
        }
        let var = |upper: &str, lower: &str| {
            env(upper)
                .or_else(|| env(lower))
                .filter(|v| !v.trim().is_empty())
        };
        let Some(url) = var("HTTPS_PROXY", "https_proxy") else {
            return Ok(None);
        };
        let host = host_of(server);
        if let Some(no_proxy) = var("NO_PROXY", "no_proxy")
            && exempt(&no_proxy, host)
        {
            return Ok(None);
        }
        Self::parse(url.trim()).map(Some)
    }

    /// A TCP connection to `target` (HOST:PORT) through the proxy, ready for TLS.
    pub async fn connect(&self, target: &str, timeout: Duration) -> Result<TcpStream, ProxyError> {
        let io = |source| ProxyError::Io {
            proxy: self.clone(),
            source,
        };
        let setup = async {
            let mut tcp = TcpStream::connect(&self.addr).await.map_err(io)?;
            let mut request = format!(
                "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: proxy-agent\r\n"
            );
            if let Some(credentials) = &self.credentials {
                let token = base64::engine::general_purpose::STANDARD.encode(credentials);
                request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
            }
            request.push_str("\r\n");
            tcp.write_all(request.as_bytes()).await.map_err(io)?;
            // Byte by byte, once per tunnel: nothing past the head may be consumed, it belongs
            // to TLS (though a server sends nothing before our ClientHello).
            let mut head = Vec::with_capacity(128);
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if head.len() >= MAX_HEAD {
                    return Err(ProxyError::HeadTooLarge {
                        proxy: self.clone(),
                    });
                }
                if tcp.read(&mut byte).await.map_err(io)? == 0 {
                    return Err(ProxyError::Closed {
                        proxy: self.clone(),
                    });
                }
                head.push(byte[0]);
            }
            let text = String::from_utf8_lossy(&head);
            let status_line = text.lines().next().unwrap_or_default().to_owned();
            let status = status_line.split_whitespace().nth(1).unwrap_or_default();
            if !status.starts_with('2') {
                return Err(ProxyError::Refused {
                    proxy: self.clone(),
                    target: target.to_owned(),
                    status_line,
                });
            }
            Ok(tcp)
        };
        tokio::time::timeout(timeout, setup)
            .await
            .map_err(|_| ProxyError::Timeout {
                proxy: self.clone(),
                timeout,
            })?
    }
}

/// The host of HOST:PORT, `[IPv6]:PORT`, or a bare host or IPv6 address (brackets removed).
fn host_of(server: &str) -> &str {
    if let Some(rest) = server.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match server.split_once(':') {
        // One colon: HOST:PORT. More: a bare IPv6 address.
        Some((host, port)) if !port.contains(':') => host,
        _ => server,
    }
}

/// Whether `host` is an IP address inside `cidr` (`10.0.0.0/8`, `fd00::/8`).
fn in_cidr(cidr: &str, host: &str) -> bool {
    let Some((net, bits)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(net), Ok(ip), Ok(bits)) = (
        net.parse::<std::net::IpAddr>(),
        host.parse::<std::net::IpAddr>(),
        bits.parse::<u32>(),
    ) else {
        return false;
    };
    let (net, ip, width) = match (net, ip) {
        (std::net::IpAddr::V4(n), std::net::IpAddr::V4(i)) => {
            (u128::from(u32::from(n)), u128::from(u32::from(i)), 32)
        }
        (std::net::IpAddr::V6(n), std::net::IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
        _ => return false,
    };
    if bits > width {
        return false;
    }
    let shift = width - bits;
    shift >= 128 || (net >> shift) == (ip >> shift)
}

/// Whether `NO_PROXY` (comma-separated: `*`, host names matching themselves and their
/// subdomains, with or without a leading dot, IP addresses exactly, CIDR ranges) exempts `host`.
pub fn exempt(no_proxy: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    no_proxy
        .split(',')
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" || in_cidr(&entry, &host) {
                return true;
            }
            // An entry may carry a port; the port does not narrow it here.
            let entry = host_of(&entry).to_owned();
            let bare = entry.trim_start_matches('.');
            host == bare || host.ends_with(&format!(".{bare}"))
        })
}

fn percent_decode(text: &str) -> Result<String, ProxyUrlError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(ProxyUrlError::Malformed(
                    "bad percent-encoding in credentials",
                ))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ProxyUrlError::Malformed("credentials are not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_never_show_credentials() {
        let p = HttpProxy::parse("http://alice:s%40cret@proxy.corp:3128/").unwrap();
        assert_eq!(p.addr, "proxy.corp:3128");
        assert_eq!(p.credentials.as_deref(), Some("alice:s@cret"));
        let shown = format!("{p} {p:?}");
        assert!(
            !shown.contains("alice") && !shown.contains("cret"),
            "{shown}"
        );
        assert_eq!(HttpProxy::parse("proxy:8080").unwrap().addr, "proxy:8080");
        assert_eq!(HttpProxy::parse("http://proxy").unwrap().addr, "proxy:80");
        assert_eq!(
            HttpProxy::parse("http://[::1]:3128").unwrap().addr,
            "[::1]:3128"
        );
        assert_eq!(
            HttpProxy::parse("http://bob@p:1")
                .unwrap()
                .credentials
                .as_deref(),
            Some("bob:")
        );
        for bad in [
            "http://u:%+f@proxy:1",
            "https://proxy:443",
            "socks5://proxy:1080",
            "http://proxy:port",
            "http://proxy:3128/path",
            "http://",
            "http://u:%zz@proxy:1",
        ] {
            assert!(HttpProxy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_flag_wins_then_https_proxy_unless_no_proxy_exempts_the_server() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let flag = HttpProxy::parse("http://flag:1").unwrap();
        let vars: &[(&str, &str)] = &[("HTTPS_PROXY", "http://env:2"), ("NO_PROXY", "*")];
        assert_eq!(
            HttpProxy::for_server(Some(&flag), "s:443", env(vars)).unwrap(),
            Some(flag)
        );
        let got = |server: &str, vars: &'static [(&'static str, &'static str)]| {
            HttpProxy::for_server(None, server, env(vars))
                .unwrap()
                .map(|p| p.addr)
        };
        assert_eq!(got("s:443", &[]), None);
        assert_eq!(
            got("s:443", &[("https_proxy", "env:2")]),
            Some("env:2".into())
        );
        let corp: &[(&str, &str)] = &[
            ("HTTPS_PROXY", "http://env:2"),
            (
                "no_proxy",
                "localhost, .internal.corp,10.0.0.7,svc:443,192.168.0.0/16,::1,fd00::/8",
            ),
        ];
        assert_eq!(got("192.168.4.5:443", corp), None);
        assert_eq!(got("192.169.0.1:443", corp), Some("env:2".into()));
        assert_eq!(got("[::1]:443", corp), None);
        assert_eq!(got("[fd12::7]:443", corp), None);
        assert_eq!(got("[fe80::1]:443", corp), Some("env:2".into()));
        assert_eq!(got("proxy.example.com:443", corp), Some("env:2".into()));
        assert_eq!(got("a.internal.corp:443", corp), None);
        assert_eq!(got("internal.corp:443", corp), None);
        assert_eq!(got("notinternal.corp:443", corp), Some("env:2".into()));
        assert_eq!(got("10.0.0.7:8091", corp), None);
        assert_eq!(got("svc:8091", corp), None);
        assert_eq!(got("LOCALHOST:1", corp), None);
        assert!(HttpProxy::for_server(None, "s:1", env(&[("HTTPS_PROXY", "ftp://x")])).is_err());
    }
}
