//! The control messages the server sends an agent besides its registration answer. Built here,
//! below everything that sends them: the frontend asks for dials, a dropped `DialGuard` cancels
//! one, the control stream pings and tells the fleet's size; the registry only queues them.

use proxy_proto::{DialCancel, DialRequest, Fleet, Ping, ServerMessage, server_message::Msg};

fn message(msg: Msg) -> ServerMessage {
    ServerMessage { msg: Some(msg) }
}

/// Asks the agent to dial `destination` (`None`: its upstream) and open a data stream for
/// `dial_id`.
pub fn dial(dial_id: u64, destination: Option<&str>) -> ServerMessage {
    message(Msg::Dial(DialRequest {
        dial_id,
        destination: destination.unwrap_or_default().to_owned(),
    }))
}

/// Tells the agent the client of `dial_id` gave up: no data stream is wanted for it.
pub fn cancel_dial(dial_id: u64) -> ServerMessage {
    message(Msg::CancelDial(DialCancel { dial_id }))
}

/// A ping the agent answers with a pong carrying `seq`.
pub fn ping(seq: u64) -> ServerMessage {
    message(Msg::Ping(Ping { seq }))
}

/// The fleet now has `count` servers.
pub fn fleet(count: u32) -> ServerMessage {
    message(Msg::Fleet(Fleet {
        server_count: count,
    }))
}
