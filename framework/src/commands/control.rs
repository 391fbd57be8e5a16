//! The daemon's control socket: a Unix socket, root only, one JSON request per line
//! and one JSON reply per line. `ferry plugins load/unload` use it to register and
//! unregister plugins in a running daemon.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::{
        fs::{DirBuilderExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde::{Deserialize, Serialize};

use crate::engine::manager::{Manager, PluginMeta};

/// The longest request line accepted; a request is a few hundred bytes.
const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Check and register the plugin file at `path`.
    Load { path: PathBuf },
    /// Unregister plugin `name`, waiting up to `wait_ms` for its events to end.
    Unload { name: String, wait_ms: u64 },
    /// The registered plugins.
    List,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<PluginMeta>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no daemon is listening on {path}: {source}")]
    NoDaemon { path: PathBuf, source: std::io::Error },
    #[error("control socket {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("a daemon is already listening on {0}")]
    InUse(PathBuf),
}

fn io_err(path: &Path, message: impl std::fmt::Display) -> ControlError {
    ControlError::Io { path: path.to_path_buf(), message: message.to_string() }
}

/// Sends one request to the daemon at `path` and waits for its reply.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Reply, ControlError> {
    let mut stream =
        UnixStream::connect(path).map_err(|source| ControlError::NoDaemon { path: path.into(), source })?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| io_err(path, e))?;
    let mut line = serde_json::to_string(req).map_err(|e| io_err(path, e))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(|e| io_err(path, format!("sending the request: {e}")))?;
    let mut answer = String::new();
    BufReader::new(stream.take(MAX_REQUEST))
        .read_line(&mut answer)
        .map_err(|e| io_err(path, format!("waiting for the reply: {e}")))?;
    serde_json::from_str(&answer).map_err(|e| io_err(path, format!("bad reply from the daemon: {e}")))
}

/// Whether a daemon answers on `path`.
pub fn daemon_running(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Binds the control socket at `path` (mode 0600, parent made 0700 if missing). A
/// socket file left by a dead daemon is replaced; a live one is an error.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| io_err(dir, e))?;
    }
    if path.exists() {
        if daemon_running(path) {
            return Err(ControlError::InUse(path.into()));
        }
        std::fs::remove_file(path).map_err(|e| io_err(path, format!("removing a stale socket: {e}")))?;
    }
    // Bind under a umask that leaves no window where others could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|e| io_err(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| io_err(path, e))?;
    Ok(listener)
}

/// Serves control requests on `listener` against `manager`, one connection at a time
/// (each is a single short request). Returns when the listener fails.
pub fn serve(listener: UnixListener, manager: Manager) {
    let me = nix::unistd::geteuid().as_raw();
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        // The socket mode already keeps others out; the credential check also covers a
        // socket file whose mode someone loosened.
        let allowed = getsockopt(&stream, PeerCredentials).map(|c| c.uid() == 0 || c.uid() == me).unwrap_or(false);
        let reply = if allowed {
            handle(&stream, &manager)
        } else {
            Reply { ok: false, error: Some("permission denied: the control socket is for root only".into()), ..Default::default() }
        };
        let mut line = serde_json::to_string(&reply).unwrap_or_else(|_| r#"{"ok":false}"#.into());
        line.push('\n');
        let _ = (&stream).write_all(line.as_bytes());
    }
}

fn handle(stream: &UnixStream, manager: &Manager) -> Reply {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    if let Err(e) = BufReader::new(stream.take(MAX_REQUEST)).read_line(&mut line) {
        return failure(format!("reading the request: {e}"));
    }
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => return failure(format!("bad request: {e}")),
    };
    // The registry changes on the fly: each change is a line of the daemon's log.
    let outcome = match req {
        Request::Load { path } => manager.register(&path).map(|m| {
            crate::trace::daemon_log(format!("registered {} plugin {} {} from {}", m.kind, m.name, m.version, m.path.display()));
            vec![m]
        }),
        Request::Unload { name, wait_ms } => manager.unregister(&name, Duration::from_millis(wait_ms)).map(|m| {
            crate::trace::daemon_log(format!("unregistered plugin {} {}", m.name, m.version));
            vec![m]
        }),
        Request::List => Ok(manager.list()),
    };
    match outcome {
        Ok(plugins) => Reply { ok: true, error: None, plugins },
        Err(e) => failure(e.to_string()),
    }
}

fn failure(error: String) -> Reply {
    Reply { ok: false, error: Some(error), plugins: Vec::new() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let req = Request::Unload { name: "memory".into(), wait_ms: 5 };
        let text = serde_json::to_string(&req).unwrap();
        assert_eq!(text, r#"{"op":"unload","name":"memory","wait_ms":5}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
        assert!(serde_json::from_str::<Request>(r#"{"op":"format","disk":"sda"}"#).is_err());
    }

    #[test]
    fn socket_is_private_and_answers_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/control.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&path), Err(ControlError::InUse(_))));
        std::thread::spawn(move || serve(listener, Manager::new()));
        let reply = request(&path, &Request::List, Duration::from_secs(5)).unwrap();
        assert!(reply.ok);
        assert!(reply.plugins.is_empty());
        let reply = request(&path, &Request::Unload { name: "nope".into(), wait_ms: 0 }, Duration::from_secs(5)).unwrap();
        assert!(!reply.ok);
        assert!(reply.error.unwrap().contains("nope"));
    }
}
