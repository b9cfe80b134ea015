//! Agents behind a corporate HTTP proxy: a real squid (Debian's, installed by CI) that allows
//! CONNECT only to the server's agent port, with and without credentials; the standard
//! `HTTPS_PROXY` / `NO_PROXY` variables; a proxy that refuses, with the reason in the agent's log.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use integration_tests::client::banner_via;
use integration_tests::fleet::free_port;
use integration_tests::procs::metric;
use integration_tests::upstream::BannerServer;
use integration_tests::{AgentProc, Bed, ServerProc, eventually};

/// A squid on 127.0.0.1 allowing CONNECT to `allowed_port` only, optionally only for `user`.
struct Squid {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    /// squid's service name, the prefix of its shared-memory segments in `/dev/shm`: unique per
    /// instance, or two tests' squids running at once collide there ("File exists").
    name: String,
    child: tokio::process::Child,
}

impl Squid {
    async fn start(allowed_port: u16, user: Option<(&str, &str)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // squid drops to its own user: it must be able to write its logs here.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let path = |name: &str| dir.path().join(name).display().to_string();
        let auth = match user {
            Some((name, password)) => {
                let hash = std::process::Command::new("openssl")
                    .args(["passwd", "-apr1", password])
                    .output()
                    .unwrap();
                assert!(hash.status.success());
                let hash = String::from_utf8(hash.stdout).unwrap();
                std::fs::write(path("passwd"), format!("{name}:{}", hash.trim())).unwrap();
                format!(
                    "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\n\
auth_param basic realm corporate\nacl authed proxy_auth REQUIRED\nhttp_access deny !authed\n",
                    path("passwd")
                )
            }
            None => String::new(),
        };
        let config = format!(
            "http_port {addr}\npid_filename {pid}\naccess_log stdio:{access}\ncache_log {cache}\n\
cache deny all\ncache_mem 8 MB\nshutdown_lifetime 0 seconds\n\
acl agent_port port {allowed_port}\nacl CONNECT method CONNECT\n{auth}\
http_access allow CONNECT agent_port\nhttp_access deny all\n",
            pid = path("squid.pid"),
            access = path("access.log"),
            cache = path("cache.log"),
        );
        std::fs::write(path("squid.conf"), config).unwrap();
        let name = format!("t{}p{}", std::process::id(), addr.port());
        let child = tokio::process::Command::new("squid")
            .args(["-N", "-n", &name, "-f", &path("squid.conf")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("squid (Debian package `squid`; .ci/run installs it)");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "squid did not start: {}",
                std::fs::read_to_string(path("cache.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            addr,
            dir,
            name,
            child,
        }
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }
}

impl Drop for Squid {
    /// Killed, squid cannot remove its shared-memory segments: they are removed here (unlinking
    /// is fine while it may still have them mapped).
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let prefix = format!("{}-", self.name);
        if let Ok(entries) = std::fs::read_dir("/dev/shm") {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reaches_its_server_through_squid_with_credentials_never_logged() {
    let bed = Bed::new(&["alpha"]);
    let up = BannerServer::start("through squid").await.unwrap();
    let server = ServerProc::start(&bed.pki, None, &[]).await.unwrap();
    let squid = Squid::start(server.agent_addr.port(), Some(("alice", "s3cret-pw"))).await;
    let proxy_url = format!("http://alice:s3cret-pw@{}", squid.addr);
    let agent = AgentProc::start_ready_with(
        &bed.pki,
        &[server.agent_addr],
        "alpha",
        up.addr,
        &["--https-proxy", &proxy_url],
    )
    .await
    .unwrap();
    assert_eq!(
        banner_via(server.frontend_addr, "alpha").await,
        "through squid"
    );
    let logs = agent
        .proc
        .logs_with("reaching this server through an HTTP proxy", 1)
        .await;
    assert!(
        logs.contains("reaching this server through an HTTP proxy"),
        "{logs}"
    );
    assert!(
        !logs.contains("s3cret-pw"),
        "credentials in the log:\n{logs}"
    );
    assert_eq!(
        metric(agent.admin_addr, "proxy_agent_servers_connected").await,
        1.0
    );
    // squid logs a tunnel when it ends.
    drop(agent);
    eventually(
        "squid logged the tunnel",
        Duration::from_secs(10),
        || async {
            squid.access_log().lines().any(|l| {
                l.contains("TCP_TUNNEL/200")
                    && l.contains(&format!("CONNECT {}", server.agent_addr))
                    && l.contains(" alice ")
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_from_the_environment_and_a_proxy_that_refuses() {
    let bed = Bed::new(&["alpha"]);
    let up = BannerServer::start("via env").await.unwrap();
    let server = ServerProc::start(&bed.pki, None, &[]).await.unwrap();

    // Allowed: the standard variable alone routes the agent through squid.
    let open = Squid::start(server.agent_addr.port(), None).await;
    let proxy = format!("http://{}", open.addr);
    let agent = AgentProc::start_with_env(
        &bed.pki,
        &[server.agent_addr],
        "alpha",
        up.addr,
        &[],
        &[("HTTPS_PROXY", &proxy)],
    )
    .await
    .unwrap();
    agent
        .wait_registered(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(banner_via(server.frontend_addr, "alpha").await, "via env");
    // squid logs a tunnel when it ends.
    drop(agent);
    eventually(
        "squid logged the tunnel",
        Duration::from_secs(10),
        || async {
            open.access_log().lines().any(|l| {
                l.contains("TCP_TUNNEL/200")
                    && l.contains(&format!("CONNECT {}", server.agent_addr))
            })
        },
    )
    .await;

    // NO_PROXY exempts the server: reached directly even though the proxy is dead.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let direct = AgentProc::start_with_env(
        &bed.pki,
        &[server.agent_addr],
        "alpha",
        up.addr,
        &[],
        &[("https_proxy", &dead), ("NO_PROXY", "localhost,127.0.0.1")],
    )
    .await
    .unwrap();
    direct
        .wait_registered(Duration::from_secs(10))
        .await
        .unwrap();
    drop(direct);

    // A proxy that refuses the server's port: not registered, and the log says why.
    let strict = Squid::start(1, None).await;
    let refused = AgentProc::start(
        &bed.pki,
        &[server.agent_addr],
        "alpha",
        up.addr,
        &["--https-proxy", &format!("http://{}", strict.addr)],
    )
    .await
    .unwrap();
    eventually("the refusal is logged", Duration::from_secs(10), || async {
        refused.proc.logs().contains(&format!(
            "refused CONNECT {}: HTTP/1.1 403",
            server.agent_addr
        ))
    })
    .await;
    assert_eq!(
        metric(refused.admin_addr, "proxy_agent_servers_connected").await,
        0.0
    );
    // squid writes its access line after the reply the agent already read: wait for it.
    let denied = format!("CONNECT {}", server.agent_addr);
    eventually(
        "squid logged the denial",
        Duration::from_secs(10),
        || async {
            strict
                .access_log()
                .lines()
                .any(|l| l.contains("TCP_DENIED/403") && l.contains(&denied))
        },
    )
    .await;
}
