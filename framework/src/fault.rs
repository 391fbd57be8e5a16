//! Fault injection for tests, in the manner of CRIU_FAULT: with `FERRY_FAULT=<point>`
//! in its environment, a ferry process dies by SIGKILL when it reaches that point —
//! no destructor runs, exactly as if it had been killed from outside. Points:
//! `after-handshake`, `mid-pages` (after the first MiB of pages is restored),
//! `before-commit` (the destination holds the rebuilt process), `checkpoint-mid` (after
//! the first subsystem of a checkpoint wrote its records), `post-copy-mid` (the source,
//! after answering a few page requests of the resumed process), `post-copy-dest-mid`
//! (the destination, once the resumed process has had some of its pages), `inject`
//! (while a system call ferry injected from its scratch area runs in the target; the
//! target must survive ferry's death there), `precopy-round` (the source, after each
//! pre-copy round, hybrid's one included), `frozen` (the source of a migration, once the
//! process is quiesced, before the plan), `commit-sent` (the source, after it sent the
//! commit — post-copy and hybrid: `run`, past their commit point — before the
//! destination's `released`), `commit-received` (the destination, after the commit,
//! before it lets its copy run — post-copy and hybrid: before it says `ready`),
//! `run-received` (post-copy and hybrid, the destination, after `run`, before its copy
//! runs: the source has given itself up), `restore-restart` (a local restore,
//! before the rebuilt process is let go). `<point>@<n>` dies at the n-th time the point
//! is reached. `hang:<point>[@<n>]` stops there for good instead (a step that never
//! returns, for the watchdog to end).

/// Dies here if the environment asks for a fault at `point`.
pub fn point(point: &str) {
    static REACHED: std::sync::Mutex<Vec<(String, u64)>> = std::sync::Mutex::new(Vec::new());
    let Ok(spec) = std::env::var("FERRY_FAULT") else { return };
    let (hang, spec) = match spec.strip_prefix("hang:") {
        Some(rest) => (true, rest),
        None => (false, spec.as_str()),
    };
    let (name, nth) = match spec.split_once('@') {
        Some((name, n)) => (name, n.parse::<u64>().unwrap_or(1)),
        None => (spec, 1),
    };
    if name != point {
        return;
    }
    let mut reached = REACHED.lock().unwrap_or_else(|p| p.into_inner());
    let count = match reached.iter_mut().find(|(p, _)| p == point) {
        Some((_, n)) => {
            *n += 1;
            *n
        }
        None => {
            reached.push((point.to_string(), 1));
            1
        }
    };
    if count == nth && hang {
        drop(reached);
        loop {
            std::thread::park();
        }
    }
    if count == nth {
        eprintln!("ferry: injected fault at {point}");
        // SAFETY: raising SIGKILL on ourselves has no preconditions.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

/// Waits here, for tests, if the environment says `FERRY_PAUSE=<point>:<file>`: creates
/// `<file>` and goes on once it is removed (or after a minute). Lets a test act at a
/// precise moment of an event, such as signalling a process while it is frozen.
pub fn pause(point: &str) {
    let Ok(spec) = std::env::var("FERRY_PAUSE") else { return };
    let Some((p, file)) = spec.split_once(':') else { return };
    if p != point || std::fs::write(file, b"").is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::path::Path::new(file).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
