//! kubectl, the client platform teams actually use, through the proxy with a kubeconfig
//! `proxy-url`, verifying the member API server's certificate end to end.

use std::process::Stdio;
use std::time::{Duration, Instant};

use integration_tests::Testbed;
use integration_tests::apiserver::{WATCH_EVENTS, WATCH_INTERVAL};
use integration_tests::client::write_kubeconfig;
use tokio::io::{AsyncBufReadExt, BufReader};

fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--request-timeout", "20s"])
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .output()
        .expect("kubectl is installed")
}

fn stdout_ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "kubectl failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_reaches_members_through_proxy_url_and_streams_a_watch() {
    let bed = Testbed::builder(&["alpha", "beta"])
        .member("alpha")
        .member("beta")
        .start()
        .await;
    let proxy_url = format!("http://{}", bed.frontend());
    let alpha = write_kubeconfig(bed.dir(), bed.pki(), "alpha", &proxy_url).unwrap();
    let beta = write_kubeconfig(bed.dir(), bed.pki(), "beta", &proxy_url).unwrap();

    let version = stdout_ok(&kubectl(&alpha, &["get", "--raw", "/version"]));
    assert!(version.contains("v1.32.0+alpha"), "{version}");

    // Server-side printing (a Table) and the full list, each from the right member.
    let table = stdout_ok(&kubectl(&alpha, &["get", "namespaces"]));
    assert!(
        table.contains("NAME") && table.contains("alpha-only") && !table.contains("beta-only"),
        "{table}"
    );
    let names = stdout_ok(&kubectl(&beta, &["get", "namespaces", "-o", "name"]));
    assert!(
        names.contains("namespace/beta-only") && !names.contains("alpha"),
        "{names}"
    );

    // A watch streams: events arrive while the response is still open.
    let mut watch = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&alpha)
        .args(["get", "--raw", "/api/v1/namespaces?watch=true"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut arrivals = Vec::new();
    let started = Instant::now();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap()
        .unwrap()
    {
        assert!(
            line.contains("\"ADDED\"") && line.contains("alpha-watch"),
            "{line}"
        );
        arrivals.push(started.elapsed());
    }
    let status = watch.wait().await.unwrap();
    assert!(status.success(), "kubectl watch failed");
    assert_eq!(arrivals.len(), WATCH_EVENTS);
    let spread = arrivals[WATCH_EVENTS - 1] - arrivals[0];
    assert!(
        spread >= WATCH_INTERVAL * (WATCH_EVENTS as u32 - 2),
        "watch events arrived together ({arrivals:?}): the stream was buffered, not streamed"
    );
}

// Multi-threaded: kubectl runs as a blocking child while the fake API server needs a thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_refuses_a_member_whose_certificate_does_not_verify() {
    let bed = Testbed::builder(&["alpha", "beta"])
        .member("alpha")
        .start()
        .await;
    // A kubeconfig for alpha that trusts beta's API-server CA: the proxy must not be able to
    // make this work, because TLS runs end to end between kubectl and the member.
    let path = write_kubeconfig(
        bed.dir(),
        bed.pki(),
        "alpha",
        &format!("http://{}", bed.frontend()),
    )
    .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let beta_ca =
        integration_tests::client::base64(&std::fs::read(bed.pki().apiserver_ca("beta")).unwrap());
    let alpha_ca =
        integration_tests::client::base64(&std::fs::read(bed.pki().apiserver_ca("alpha")).unwrap());
    std::fs::write(&path, text.replace(&alpha_ca, &beta_ca)).unwrap();
    let out = kubectl(&path, &["get", "--raw", "/version"]);
    assert!(
        !out.status.success(),
        "kubectl accepted a certificate from the wrong CA"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("certificate") || err.contains("x509"),
        "unexpected error: {err}"
    );
}
