//! The README's quickstart: `proxy-demo` comes up and the commands it prints work as printed.

use std::process::Command;

#[test]
fn demo_comes_up_and_its_printed_commands_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_proxy-demo"))
        .args([
            "--check",
            "--frontend-addr",
            "127.0.0.1:0",
            "--dir",
            "demo-certs",
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Three through the demo's own kubeconfigs and curl, one through the kubeconfig the server
    // generated from the CAs the agents reported.
    assert_eq!(stdout.matches("ok: ").count(), 4, "{stdout}");
    assert!(
        stdout.contains("Status page: http://127.0.0.1:"),
        "{stdout}"
    );
    assert!(
        stdout.contains("alpha-only")
            && stdout.contains("v1.32.0+beta")
            && stdout.contains("v1.32.0+alpha"),
        "{stdout}"
    );
}
