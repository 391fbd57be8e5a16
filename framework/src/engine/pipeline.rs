//! A writer thread in front of a medium, so that an event reads the next block of the
//! process while the last one is still being written (pipelining). Pushes are copied
//! into recycled buffers and written in order; a bounded queue holds the reader back
//! when the medium is slower. The first write error is reported by the next call.

use std::{
    sync::{Arc, Mutex},
    thread::JoinHandle,
};

use abi_stable::std_types::RSlice;
use crossbeam::channel::{bounded, Receiver, Sender};
use ferry_plugin_api::MediumBox;

/// Blocks in flight between the reader and the writer.
const DEPTH: usize = 16;
/// Buffers at least this big are recycled rather than freed.
const RECYCLE: usize = 64 << 10;

enum Msg {
    Push(u32, Vec<u8>),
    Flush(Sender<Result<(), String>>),
}

pub struct Pipeline {
    /// Written on the caller's thread: no queue, no copy.
    direct: Option<MediumBox>,
    tx: Option<Sender<Msg>>,
    free: Receiver<Vec<u8>>,
    error: Arc<Mutex<Option<String>>>,
    writer: Option<JoinHandle<MediumBox>>,
}

impl Pipeline {
    pub fn new(mut medium: MediumBox) -> Pipeline {
        let (tx, rx) = bounded::<Msg>(DEPTH);
        let (free_tx, free) = bounded::<Vec<u8>>(DEPTH + 1);
        let error = Arc::new(Mutex::new(None::<String>));
        let seen = error.clone();
        let writer = std::thread::Builder::new()
            .name("ferry-writer".into())
            .spawn(move || {
                for msg in rx {
                    let failed = seen.lock().map(|e| e.is_some()).unwrap_or(true);
                    match msg {
                        Msg::Push(stream, data) => {
                            if !failed {
                                if let Err(e) = medium.pushdata(stream, RSlice::from_slice(&data)).into_result() {
                                    *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                                }
                            }
                            if data.capacity() >= RECYCLE {
                                let _ = free_tx.try_send(data);
                            }
                        }
                        Msg::Flush(done) => {
                            let r = match seen.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                                Some(e) => Err(e),
                                None => medium.flush().into_result().map_err(|e| e.to_string()),
                            };
                            let _ = done.send(r);
                        }
                    }
                }
                medium
            })
            .ok();
        let tx = if writer.is_some() { Some(tx) } else { None };
        Pipeline { direct: None, tx, free, error, writer }
    }

    /// No writer thread: each push is written before it returns, straight from the
    /// caller's buffer while it is still in the CPU's cache.
    pub fn direct(medium: MediumBox) -> Pipeline {
        let (_, free) = bounded::<Vec<u8>>(1);
        Pipeline { direct: Some(medium), tx: None, free, error: Arc::new(Mutex::new(None)), writer: None }
    }

    fn failure(&self) -> Result<(), String> {
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn send(&self, msg: Msg) -> Result<(), String> {
        let tx = self.tx.as_ref().ok_or("the writer thread could not be started")?;
        tx.send(msg).map_err(|_| "the writer thread stopped".to_string())
    }

    /// Queues `data` for `stream`.
    pub fn push(&mut self, stream: u32, data: &[u8]) -> Result<(), String> {
        if let Some(m) = self.direct.as_mut() {
            return m.pushdata(stream, RSlice::from_slice(data)).into_result().map_err(|e| e.to_string());
        }
        self.failure()?;
        let mut buf = if data.len() >= RECYCLE { self.free.try_recv().unwrap_or_default() } else { Vec::new() };
        buf.clear();
        buf.extend_from_slice(data);
        self.send(Msg::Push(stream, buf))
    }

    /// Waits until everything queued is written and the medium flushed.
    pub fn flush(&mut self) -> Result<(), String> {
        if let Some(m) = self.direct.as_mut() {
            return m.flush().into_result().map_err(|e| e.to_string());
        }
        let (done_tx, done) = bounded(1);
        self.send(Msg::Flush(done_tx))?;
        done.recv().map_err(|_| "the writer thread stopped".to_string())?
    }

    /// The medium itself, for commands between pushes (direct pipelines only).
    pub fn medium_mut(&mut self) -> Option<&mut MediumBox> {
        self.direct.as_mut()
    }

    /// Stops the writer and hands the medium back.
    pub fn finish(mut self) -> Option<MediumBox> {
        if let Some(m) = self.direct.take() {
            return Some(m);
        }
        self.tx = None;
        self.writer.take().and_then(|w| w.join().ok())
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}
