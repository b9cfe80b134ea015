//! Decoding what an agent or server may send, and the server's validation of a control stream's
//! first message: no panic, and nothing but a well-formed registration for the certificate's own
//! cluster is ever accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use proxy_proto::{AgentMessage, Chunk, ServerMessage};

fuzz_target!(|data: &[u8]| {
    let _ = Chunk::decode(data);
    let _ = ServerMessage::decode(data);
    let first = AgentMessage::decode(data).ok();
    if let Ok(reg) = proxy_server::tunnel::registration(first, "alpha") {
        assert_eq!(reg.cluster, "alpha");
        assert!(!reg.agent_id.is_empty() && reg.agent_id.len() <= proxy_server::tunnel::MAX_AGENT_FIELD);
    }
});
