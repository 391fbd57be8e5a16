//! The messages of an event once the handshake is done: JSON objects that travel
//! through the medium's `command` (`send`/`recv`) beside the plugins' streams — the
//! destination's `ready`, the `plan`, pre-copy's `synced`, post-copy's `want` and
//! `present`, and the verdicts of [`super::protocol::Verdict`].

use std::time::Duration;

use abi_stable::std_types::RStr;
use ferry_plugin_api::MediumBox;

use super::protocol::Verdict;

/// The kind of the framework's record that closes a round on a stream; the
/// destination's record source answers it and never hands it to the plugin.
pub const SYNC_KIND: &str = "ferry.sync";

/// A control message through the medium.
pub fn send_json(medium: &mut MediumBox, msg: serde_json::Value) -> Result<(), String> {
    let cmd = serde_json::json!({"op": "send", "msg": msg}).to_string();
    medium.command(RStr::from_str(&cmd)).into_result().map(|_| ()).map_err(|e| e.message.into_string())
}

pub fn recv_json(medium: &mut MediumBox, timeout: Duration) -> Result<serde_json::Value, String> {
    let cmd = serde_json::json!({"op": "recv", "timeout_ms": timeout.as_millis() as u64}).to_string();
    let reply = medium.command(RStr::from_str(&cmd)).into_result().map_err(|e| e.message.into_string())?;
    let mut v: serde_json::Value = serde_json::from_str(reply.as_str()).map_err(|e| format!("bad reply from the medium: {e}"))?;
    Ok(v["msg"].take())
}

/// The destination's answer to a `sync` record.
pub fn synced(stream: u32, round: u64) -> serde_json::Value {
    serde_json::json!({"type": "synced", "stream": stream, "round": round})
}

/// A verdict (rebuilt, failed, commit, abort, released) through the medium.
pub fn send_verdict(medium: &mut MediumBox, v: &Verdict) -> Result<(), String> {
    send_json(medium, serde_json::from_str(&v.to_json()).map_err(|e| e.to_string())?)
}

pub fn recv_verdict(medium: &mut MediumBox, timeout: Duration) -> Result<Verdict, String> {
    Verdict::from_json(&recv_json(medium, timeout)?.to_string()).map_err(|e| e.to_string())
}
