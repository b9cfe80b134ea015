//! Text an agent sends reaches the server's log, its CONNECT clients and its status page only
//! sanitized: a dial-failure reason with CR/LF cannot forge a log line or split a response body,
//! and an agent id or version with a bidirectional override (U+202E) or a line separator
//! (U+2028) is refused at registration like one with a control character.

use std::net::SocketAddr;
use std::time::Duration;

use integration_tests::procs::admin_get;
use integration_tests::{ServerProc, Testbed, rogue};
use proxy_proto::{
    AgentMessage, DialFailed, Register, ServerMessage, agent_message, server_message,
};
use tokio::sync::mpsc;
use tonic::{Code, Streaming};

/// The listener serving the status pages.
fn ops_addr(server: &ServerProc) -> SocketAddr {
    server.operator_addr
}

/// What an agent under an attacker's control answers a dial with: a fake log line after a CR/LF,
/// a fake header, a line separator and a right-to-left override.
const FORGED: &str = "refused\r\n2026-01-01T00:00:00.000000Z  INFO proxy_server: operator logged in\r\nX-Injected: 1\u{2028}next line\u{202E}desrever";

/// The start of the forged log line, which must never begin a line of the server's log.
const FORGED_LINE: &str = "2026-01-01T00:00:00.000000Z  INFO proxy_server: operator logged in";

/// Waits for the next dial request on a rogue agent's control stream; its id and destination.
async fn next_dial(control: &mut Streaming<ServerMessage>) -> (u64, String) {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), control.message())
            .await
            .expect("a dial request within 10 s")
            .expect("control stream")
            .expect("control stream open");
        if let Some(server_message::Msg::Dial(dial)) = msg.msg {
            return (dial.dial_id, dial.destination);
        }
    }
}

async fn fail_dial(tx: &mpsc::Sender<AgentMessage>, dial_id: u64, not_allowed: bool) {
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::DialFailed(DialFailed {
            dial_id,
            reason: FORGED.to_owned(),
            not_allowed,
        })),
    })
    .await
    .unwrap();
}

/// The body of an HTTP response read to its end.
fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

fn assert_printable(what: &str, text: &str) {
    assert!(
        !text.contains(['\r', '\u{2028}', '\u{2029}', '\u{202E}', '\u{85}']),
        "{what} holds an unprintable character: {text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_failure_reason_with_line_breaks_stays_on_one_line() {
    let bed = Testbed::builder(&["alpha"])
        .server_args(&["--dial-timeout", "5s"])
        .start()
        .await;
    let mut agent = rogue::client(bed.pki(), "alpha", bed.server.agent_addr)
        .await
        .unwrap();
    let (tx, mut control) = rogue::control(&mut agent, vec![rogue::register("alpha", "rogue")])
        .await
        .unwrap();
    let registered = control.message().await.unwrap().unwrap();
    assert!(
        matches!(registered.msg, Some(server_message::Msg::Registered(_))),
        "{registered:?}"
    );

    // A dial of the API server, failed with the forged reason: 502.
    let frontend = bed.frontend();
    let client = tokio::spawn(integration_tests::client::raw_exchange(
        frontend,
        b"CONNECT alpha:443 HTTP/1.1\r\nHost: alpha:443\r\n\r\n",
    ));
    let (dial_id, _) = next_dial(&mut control).await;
    fail_dial(&tx, dial_id, false).await;
    let answer = client.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer:?}");
    let status_line = answer.split("\r\n").next().unwrap();
    assert!(status_line.contains("operator logged in"), "{answer:?}");
    let text = body(&answer);
    assert!(
        text.ends_with('\n') && text.lines().count() == 1,
        "the 502 body is not one line: {text:?}"
    );
    assert_printable("the 502 body", text);
    assert!(text.contains("refused"), "{text:?}");

    // A destination the agent refuses, with the same reason: 403, and the reason only logged.
    let client = tokio::spawn(integration_tests::client::raw_exchange(
        frontend,
        b"CONNECT alpha:443 HTTP/1.1\r\nProxy-Destination: metrics.monitoring.svc:9090\r\n\r\n",
    ));
    let (dial_id, destination) = next_dial(&mut control).await;
    assert_eq!(destination, "metrics.monitoring.svc:9090");
    fail_dial(&tx, dial_id, true).await;
    let answer = client.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer:?}");
    assert_eq!(
        body(&answer),
        "destination not allowed for cluster \"alpha\"\n",
        "{answer:?}"
    );

    // The server's text log: each reason on the line of the event it belongs to, nothing
    // forged at the start of a line.
    let logs = bed.server.proc.logs_with("operator logged in", 2).await;
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("operator logged in"))
        .collect();
    assert!(lines.len() >= 2, "the reasons are not logged:\n{logs}");
    for line in &lines {
        assert!(
            line.contains("connect refused") || line.contains("agent refused the destination"),
            "a reason on a line of its own: {line:?}\n{logs}"
        );
    }
    for line in logs.lines() {
        assert!(
            !line.trim_start().starts_with(FORGED_LINE) && !line.starts_with("X-Injected"),
            "forged log line: {line:?}\n{logs}"
        );
    }
    assert_printable("the server's log", &logs);

    // The status page's JSON and HTML show the last failure, sanitized.
    let (status, json) = admin_get(ops_addr(&bed.server), "/api/v1/clusters")
        .await
        .unwrap();
    assert_eq!(status, 200, "{json}");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let reason = json["clusters"][0]["last_failure"]["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("no last failure: {json}"));
    assert!(reason.contains("operator logged in"), "{reason:?}");
    assert!(!reason.contains('\n'), "{reason:?}");
    assert_printable("the JSON's last failure", reason);
    let (status, html) = admin_get(ops_addr(&bed.server), "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(html.contains("operator logged in"), "{html}");
    assert_printable("the status page", &html);
}

/// A registration as `rogue::register` makes it, with its own agent id and version.
fn register(agent_id: &str, version: &str) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Register(Register {
            cluster: "alpha".into(),
            agent_id: agent_id.into(),
            version: version.into(),
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_ids_and_versions_with_format_or_line_separator_characters_are_refused() {
    let bed = Testbed::builder(&["alpha"]).start().await;
    let mut agent = rogue::client(bed.pki(), "alpha", bed.server.agent_addr)
        .await
        .unwrap();
    for (id, version) in [
        ("agent\u{202E}lanimret", "1.0"),
        ("agent\u{2028}INFO forged", "1.0"),
        ("agent\u{2029}", "1.0"),
        ("\u{FEFF}agent", "1.0"),
        ("agent\u{200B}", "1.0"),
        ("agent\u{85}", "1.0"),
        ("agent\r\nforged", "1.0"),
        ("agent", "1.0\u{202E}"),
        ("agent", "1.0\u{2028}forged"),
    ] {
        let err = rogue::control(&mut agent, vec![register(id, version)])
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{id:?} {version:?}: {err:?}"
        );
        assert!(
            err.message().contains("format or line-separator"),
            "{id:?} {version:?}: {err:?}"
        );
    }
    // Nothing was registered, and the same connection registers a plain id.
    let (status, json) = admin_get(ops_addr(&bed.server), "/api/v1/clusters")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["clusters"], serde_json::json!([]), "{json}");
    let (_tx, mut control) = rogue::control(&mut agent, vec![register("agent-é", "1.0 (ok)")])
        .await
        .unwrap();
    let registered = control.message().await.unwrap().unwrap();
    assert!(
        matches!(registered.msg, Some(server_message::Msg::Registered(_))),
        "{registered:?}"
    );
    let logs = bed
        .server
        .proc
        .logs_with("agent registration refused", 9)
        .await;
    assert_printable("the server's log", &logs);
}
