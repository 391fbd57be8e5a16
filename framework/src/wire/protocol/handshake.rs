//! The handshake: `hello` and `welcome`, and what each side checks of the other before anything is frozen.

use super::*;

/// What the destination has, against which a [`Hello`] is checked.
#[derive(Debug, Clone)]
pub struct Local {
    pub arch: String,
    pub page_size: u64,
    pub protocol_max: u32,
    /// Plugins registered here, media and subsystems alike.
    pub plugins: Vec<PluginRef>,
    /// Kernel features present here.
    pub features: Vec<String>,
    /// Tokens of events this daemon has already seen: a hello that reuses one (a
    /// replayed or confused source) is refused.
    pub seen_tokens: Vec<String>,
    /// Claims a hello's token for its event as the welcome goes out (atomically, across
    /// the daemon's connections: a token checked by two at once is welcomed once);
    /// false: already taken.
    pub claim_token: Option<fn(&str) -> bool>,
}

impl Local {
    /// This machine and build, with the plugins and kernel features found here.
    pub fn this_machine(plugins: Vec<PluginRef>, features: Vec<String>) -> Self {
        Local {
            arch: std::env::consts::ARCH.to_string(),
            page_size: page_size(),
            protocol_max: PROTOCOL_VERSION,
            plugins,
            features,
            seen_tokens: Vec::new(),
            claim_token: None,
        }
    }
}

pub(super) fn page_size() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(size)) if size > 0 => size as u64,
        _ => 4096,
    }
}

/// Whether this destination can take the migration `hello` describes; if not, one line
/// naming the first thing that differs.
pub fn check_hello(hello: &Hello, local: &Local) -> Result<(), String> {
    if hello.protocol > local.protocol_max {
        return Err(format!(
            "protocol version {} is newer than this daemon's {}",
            hello.protocol, local.protocol_max
        ));
    }
    if hello.protocol < PROTOCOL_MIN {
        return Err(format!(
            "protocol version {} is older than this daemon accepts ({PROTOCOL_MIN} to {})",
            hello.protocol, local.protocol_max
        ));
    }
    if let Some(p) = hello.plugin_params.keys().find(|p| !hello.subsystems.iter().any(|s| &s.name == *p)) {
        return Err(format!("options are given for plugin {p}, which the request does not use"));
    }
    if hello.arch != local.arch {
        return Err(format!(
            "architecture {} on the source, {} here",
            hello.arch, local.arch
        ));
    }
    if hello.page_size != local.page_size {
        return Err(format!(
            "page size {} on the source, {} here",
            hello.page_size, local.page_size
        ));
    }
    if hello.token.len() != 32
        || !hello
            .token
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "the source sent a malformed token {:?} (expected 32 lowercase hex characters)",
            hello.token
        ));
    }
    if local.seen_tokens.contains(&hello.token) {
        return Err(format!("token {} names an event this daemon has already seen", hello.token));
    }
    if hello.pid <= 0 {
        return Err(format!("the source names no process (pid {})", hello.pid));
    }
    if !crate::config::Strategy::NAMES.contains(&hello.strategy.as_str()) {
        return Err(format!(
            "unknown strategy {:?} (this daemon knows {})",
            hello.strategy,
            crate::config::Strategy::NAMES.join(", ")
        ));
    }
    check_plugin("medium", &hello.medium, &local.plugins)?;
    for plugin in &hello.subsystems {
        check_plugin("subsystem", plugin, &local.plugins)?;
    }
    if let Some(missing) = hello.features.iter().find(|f| !local.features.contains(f)) {
        return Err(format!("destination lacks kernel feature {missing}"));
    }
    Ok(())
}

pub(super) fn check_plugin(kind: &str, wanted: &PluginRef, here: &[PluginRef]) -> Result<(), String> {
    if here.contains(wanted) {
        return Ok(());
    }
    match here.iter().find(|p| p.name == wanted.name) {
        Some(other) => Err(format!(
            "destination has {kind} plugin {other}, the source uses {}",
            wanted.version
        )),
        None => Err(format!("destination lacks {kind} plugin {wanted}")),
    }
}

/// The client's handshake, after [`authenticate_client`]: sends `hello`, returns the
/// daemon's `welcome`. A refusal becomes [`ProtocolError::Refused`] with its reason.
pub fn client_handshake<S: Read + Write + ?Sized>(
    stream: &mut S,
    hello: &Hello,
) -> Result<Welcome, ProtocolError> {
    send(stream, &Message::Hello(hello.clone()))?;
    let welcome = match recv(stream)? {
        Message::Welcome(welcome) => welcome,
        Message::Refused { reason } => return Err(ProtocolError::Refused(reason)),
        other => return Err(unexpected(&other, "welcome")),
    };
    if welcome.token != hello.token {
        return Err(ProtocolError::Violation(format!(
            "it answered for token {}, ours is {}",
            welcome.token, hello.token
        )));
    }
    if welcome.protocol < PROTOCOL_MIN || welcome.protocol > hello.protocol {
        return Err(ProtocolError::Violation(format!(
            "it chose protocol version {}, we speak {PROTOCOL_MIN} to {}",
            welcome.protocol, hello.protocol
        )));
    }
    Ok(welcome)
}

/// The daemon's handshake, after [`authenticate_server`]: reads `hello`, checks it
/// against `local`, answers `welcome` (with `next_request_id` as our id for the event)
/// or `refused`. Returns the client's hello.
pub fn server_handshake<S: Read + Write + ?Sized>(
    stream: &mut S,
    local: &Local,
    next_request_id: u64,
) -> Result<Hello, ProtocolError> {
    let body = match read_frame(stream) {
        Ok(body) => body,
        // Not a ferry peer, or a frame too large to read: it is told why before the close.
        Err(e @ (ProtocolError::TooLarge(_) | ProtocolError::NotFerry(_))) => {
            refuse(stream, &e.to_string());
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let hello = match parse(&body) {
        Ok(Message::Hello(hello)) => hello,
        Ok(Message::AuthHello { .. }) => {
            refuse(stream, REASON_NO_KEY_HERE);
            return Err(ProtocolError::Auth(
                "the client uses a key, but this daemon has none configured".into(),
            ));
        }
        Ok(other) => {
            let error = unexpected(&other, "hello");
            refuse(stream, &error.to_string());
            return Err(error);
        }
        // A newer client's hello may not parse as ours; its version still gets a clear
        // refusal.
        Err(ProtocolError::Garbage(e)) => {
            let reason = match newer_version(&body, local) {
                Some(reason) => reason,
                None => format!("the daemon could not read the hello: {e}"),
            };
            refuse(stream, &reason);
            return Err(ProtocolError::Incompatible(reason));
        }
        Err(e) => return Err(e),
    };
    if let Err(reason) = check_hello(&hello, local) {
        refuse(stream, &reason);
        return Err(ProtocolError::Incompatible(reason));
    }
    if local.claim_token.is_some_and(|claim| !claim(&hello.token)) {
        let reason = format!("token {} names an event this daemon has already seen", hello.token);
        refuse(stream, &reason);
        return Err(ProtocolError::Incompatible(reason));
    }
    send(
        stream,
        &Message::Welcome(Welcome {
            protocol: hello.protocol,
            token: hello.token.clone(),
            request_id: next_request_id,
        }),
    )?;
    Ok(hello)
}

/// The refusal line for a `hello` of a protocol newer than ours, if it is one.
pub(super) fn newer_version(body: &[u8], local: &Local) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    if value.get("type")?.as_str()? != "hello" {
        return None;
    }
    let protocol = value.get("protocol")?.as_u64()?;
    (protocol > u64::from(local.protocol_max)).then(|| {
        format!(
            "protocol version {protocol} is newer than this daemon's {}",
            local.protocol_max
        )
    })
}

// ---------------------------------------------------------------------------------------
