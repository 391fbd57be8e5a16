//! The daemon's doorway: connections that have not yet authenticated and shaken hands
//! are bounded in number and in time, so that idle or slow peers (a port scan, a
//! slowloris) cannot hold the daemon's threads and descriptors, and a real migration
//! still gets through while they try. The newest connection is always let in; when
//! too many wait, the one that has waited longest is closed. One that takes longer than
//! [`HANDSHAKE_DEADLINE`] is closed.

use std::{
    collections::VecDeque,
    net::{Shutdown, TcpStream},
    sync::{Condvar, Mutex},
    time::{Duration, Instant},
};

/// How many connections may be authenticating or shaking hands at once.
pub const MAX_WAITING: usize = 64;
/// How long a peer has to authenticate and shake hands (both take milliseconds).
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

struct Waiting {
    id: u64,
    until: Instant,
    stream: TcpStream,
}

#[derive(Default)]
pub struct Doorway {
    waiting: Mutex<VecDeque<Waiting>>,
    changed: Condvar,
    /// Connections closed for waiting too long or for crowding, since the last report.
    closed: Mutex<u64>,
}

impl Doorway {
    /// Lets connection `id` in, closing the longest-waiting one if too many wait.
    pub fn admit(&self, id: u64, stream: &TcpStream) {
        let Ok(clone) = stream.try_clone() else {
            // Without a handle to close it by, it is closed now rather than unbounded.
            let _ = stream.shutdown(Shutdown::Both);
            return;
        };
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        while waiting.len() >= MAX_WAITING {
            if let Some(old) = waiting.pop_front() {
                self.close(old);
            }
        }
        waiting.push_back(Waiting { id, until: Instant::now() + HANDSHAKE_DEADLINE, stream: clone });
        self.changed.notify_one();
    }

    /// Connection `id` is through the handshake (or gone): no deadline any more.
    pub fn passed(&self, id: u64) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.retain(|w| w.id != id);
    }

    fn close(&self, w: Waiting) {
        let _ = w.stream.shutdown(Shutdown::Both);
        *self.closed.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    /// How many connections were closed at the door since the last call.
    pub fn take_closed(&self) -> u64 {
        std::mem::take(&mut *self.closed.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Closes connections past their deadline, forever (the daemon's doorkeeper
    /// thread), and says every `every` how many it closed, if any.
    pub fn keep(&self, every: Duration, report: impl Fn(u64)) {
        let mut reported = Instant::now();
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            while waiting.front().is_some_and(|w| w.until <= now) {
                if let Some(w) = waiting.pop_front() {
                    self.close(w);
                }
            }
            if reported.elapsed() >= every {
                let closed = self.take_closed();
                if closed > 0 {
                    report(closed);
                }
                reported = now;
            }
            let next = waiting.front().map_or(every, |w| w.until - now).min(every);
            waiting = self.changed.wait_timeout(waiting, next).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn the_longest_waiting_connection_makes_room_and_one_through_keeps_its_place() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let door = Doorway::default();
        let mut conns = Vec::new();
        for id in 0..MAX_WAITING as u64 + 1 {
            let (client, server) = pair(&listener);
            door.admit(id, &server);
            conns.push((client, server));
        }
        // The first was closed to let the last in: its peer reads the end.
        use std::io::Read;
        let mut buf = [0u8; 1];
        assert_eq!(conns[0].0.read(&mut buf).unwrap(), 0, "the oldest is closed");
        assert_eq!(door.take_closed(), 1);
        // One through the handshake is never closed for others.
        door.passed(1);
        for id in 100..100 + MAX_WAITING as u64 {
            let (client, server) = pair(&listener);
            door.admit(id, &server);
            conns.push((client, server));
        }
        conns[1].0.set_nonblocking(true).unwrap();
        assert_eq!(conns[1].0.read(&mut buf).unwrap_err().kind(), std::io::ErrorKind::WouldBlock, "still open");
    }
}
