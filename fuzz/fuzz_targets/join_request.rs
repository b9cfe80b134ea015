//! What a joining agent sends before it is authenticated: the `JoinRequest` message, its token
//! and its CSR, through the server's checks and signer. No panic; a refused CSR's error stays
//! short; a certificate is issued only for a CSR naming the cluster asked for (or none).
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use proxy_server::join::signer::{self, Signer};
use proxy_server::join::tokens;

/// One signer for the whole run: an agent CA made once, in a folder of its own.
fn signer() -> &'static Signer {
    static SIGNER: OnceLock<Signer> = OnceLock::new();
    SIGNER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("proxy-fuzz-join-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca = proxy_certs::Ca::new("fuzz-agent-ca").expect("CA");
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
        std::fs::write(&cert, ca.cert_pem()).expect("write");
        std::fs::write(&key, ca.key_pem()).expect("write");
        Signer::load(&cert, &key, &cert, Duration::from_secs(3600)).expect("signer")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = proxy_proto::JoinRequest::decode(data) else {
        return;
    };
    let _ = tokens::split(&req.token);
    match signer::parse_csr(&req.csr) {
        Ok(csr) => {
            let cn = signer::subject_cn(&csr).unwrap_or_default();
            match signer().issue(&csr, "alpha") {
                Ok(pem) => assert!(cn.is_empty() || cn == "alpha", "issued for CN {cn:?}: {pem}"),
                Err(err) => assert!(err.to_string().len() < 400),
            }
        }
        Err(err) => assert!(err.to_string().len() < 400),
    }
});
