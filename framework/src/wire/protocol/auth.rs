//! Authentication: HMAC-SHA256 challenge and response, both ways, before anything else is said.

use super::*;

pub(super) fn proof(
    key: &[u8],
    label: &[u8],
    first: &[u8],
    second: &[u8],
) -> Result<Hmac<Sha256>, ProtocolError> {
    // HMAC takes keys of any length; the error is unreachable, but not worth a panic.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .map_err(|e| ProtocolError::Auth(format!("the key cannot be used: {e}")))?;
    mac.update(label);
    mac.update(first);
    mac.update(second);
    Ok(mac)
}

pub(super) fn proof_bytes(mac: Hmac<Sha256>) -> [u8; NONCE_LEN] {
    mac.finalize().into_bytes().into()
}

/// 32 bytes from the kernel's random pool (getrandom(2), else /dev/urandom). Unlike
/// tokens, nonces must be unpredictable, so there is no weaker fallback.
pub(super) fn random_nonce() -> Result<[u8; NONCE_LEN], ProtocolError> {
    let mut buf = [0u8; NONCE_LEN];
    crate::random::fill(&mut buf).map_err(ProtocolError::Random)?;
    Ok(buf)
}

/// The client's side of authentication. With a key, proves we hold it and checks that
/// the daemon does too; without one, sends nothing (a daemon that wants a key then
/// refuses our `hello`).
pub fn authenticate_client<S: Read + Write + ?Sized>(
    stream: &mut S,
    key: Option<&[u8]>,
) -> Result<(), ProtocolError> {
    let Some(key) = key else {
        return Ok(());
    };
    let client_nonce = random_nonce()?;
    send(stream, &Message::AuthHello { client_nonce })?;
    let (server_nonce, server_proof) = match recv(stream)? {
        Message::AuthChallenge {
            server_nonce,
            server_proof,
        } => (server_nonce, server_proof),
        Message::Refused { reason } => return Err(ProtocolError::Refused(reason)),
        other => return Err(unexpected(&other, "auth_challenge")),
    };
    if proof(key, SERVER_LABEL, &client_nonce, &server_nonce)?
        .verify_slice(&server_proof)
        .is_err()
    {
        refuse(stream, REASON_AUTH_FAILED);
        return Err(ProtocolError::Auth(
            "the daemon does not know our key (authentication failed)".into(),
        ));
    }
    let client_proof = proof_bytes(proof(key, CLIENT_LABEL, &server_nonce, &client_nonce)?);
    send(stream, &Message::AuthProof { client_proof })?;
    match recv(stream)? {
        Message::AuthOk => Ok(()),
        Message::Refused { reason } => Err(ProtocolError::Refused(reason)),
        other => Err(unexpected(&other, "auth_ok")),
    }
}

/// The daemon's side of authentication. With a key, requires the client to prove it
/// holds it; without one, reads nothing ([`server_handshake`] refuses a client that
/// starts authenticating).
pub fn authenticate_server<S: Read + Write + ?Sized>(
    stream: &mut S,
    key: Option<&[u8]>,
) -> Result<(), ProtocolError> {
    let Some(key) = key else {
        return Ok(());
    };
    let client_nonce = match recv(stream)? {
        Message::AuthHello { client_nonce } => client_nonce,
        Message::Hello(_) => {
            refuse(stream, REASON_AUTH_REQUIRED);
            return Err(ProtocolError::Auth(
                "the client sent no key, but this daemon requires one (authentication required)"
                    .into(),
            ));
        }
        other => return Err(unexpected(&other, "auth_hello")),
    };
    let server_nonce = random_nonce()?;
    let server_proof = proof_bytes(proof(key, SERVER_LABEL, &client_nonce, &server_nonce)?);
    send(
        stream,
        &Message::AuthChallenge {
            server_nonce,
            server_proof,
        },
    )?;
    let failed =
        || ProtocolError::Auth("the client does not know the key (authentication failed)".into());
    match recv(stream)? {
        Message::AuthProof { client_proof } => {
            if proof(key, CLIENT_LABEL, &server_nonce, &client_nonce)?
                .verify_slice(&client_proof)
                .is_err()
            {
                refuse(stream, REASON_AUTH_FAILED);
                return Err(failed());
            }
        }
        // The client found our proof wrong: its key differs from ours.
        Message::Refused { .. } => return Err(failed()),
        other => return Err(unexpected(&other, "auth_proof")),
    }
    send(stream, &Message::AuthOk)
}

/// Reads the shared key from `path`: a file owned by root (or by us), not accessible to
/// group or others, holding at least [`MIN_KEY_LEN`] bytes (a trailing newline is not
/// part of the key).
pub fn load_key(path: &Path) -> Result<Vec<u8>, ProtocolError> {
    let fail = |reason: String| ProtocolError::Key {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| fail(format!("cannot open it: {e}")))?;
    // Checked on the open file, so the file cannot be swapped between check and read.
    let meta = file
        .metadata()
        .map_err(|e| fail(format!("cannot stat it: {e}")))?;
    if !meta.is_file() {
        return Err(fail("it is not a regular file".into()));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(fail(format!(
            "it is owned by uid {}; it must be owned by root{}",
            meta.uid(),
            if euid == 0 {
                String::new()
            } else {
                format!(" or uid {euid}")
            }
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(fail(format!(
            "its mode is {mode:04o}; group and others must have no access (chmod 600 it)"
        )));
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(fail(format!(
            "it is {} bytes, larger than a key file can be ({MAX_KEY_FILE})",
            meta.len()
        )));
    }
    let mut key = Vec::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut key)
        .map_err(|e| fail(format!("cannot read it: {e}")))?;
    if key.last() == Some(&b'\n') {
        key.pop();
        if key.last() == Some(&b'\r') {
            key.pop();
        }
    }
    if key.len() < MIN_KEY_LEN {
        return Err(fail(format!(
            "the key is {} bytes; it must be at least {MIN_KEY_LEN}",
            key.len()
        )));
    }
    Ok(key)
}
