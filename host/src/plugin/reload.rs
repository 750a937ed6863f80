//! Hot reload: watch the plugins' directories (a compiler or editor replaces a file by
//! rename, so a watch on the file itself would be lost), debounce, and act only when the
//! content hash changes. New versions are compiled, validated and initialized on a worker
//! thread; the training thread picks them up at the next step boundary and never waits.

use super::error::PluginError;
use super::instance::{prepare, Prepared};
use super::runtime::{Limits, Runtime};
use super::RunInfo;
use crate::fsutil::hex;
use notify_debouncer_mini::{new_debouncer, notify::RecursiveMode, DebounceEventResult, Debouncer};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Quiet time after the last file event before a change is looked at.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// A plugin file under watch, with what is needed to rebuild it.
pub(crate) struct Watched {
    pub(crate) path: PathBuf,
    pub(crate) sha256: String,
    pub(crate) config_json: String,
    pub(crate) run: RunInfo,
    pub(crate) limits: Limits,
    pub(crate) name: String,
    /// Whether the file's absence or emptiness was already reported (once per occurrence).
    pub(crate) reported_gone: bool,
}

/// What the worker hands to the training thread.
pub(crate) enum Message {
    /// A validated, initialized new version for plugin `index`.
    Ready { index: usize, prepared: Box<Prepared> },
    /// A changed file that failed to compile, validate or init.
    Rejected { index: usize, reason: String },
}

/// The watcher and its worker.
pub(crate) struct Reloader {
    rx: Mutex<Receiver<Message>>,
    buffered: Mutex<VecDeque<Message>>,
    _debouncer: Debouncer<notify_debouncer_mini::notify::RecommendedWatcher>,
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    })
}

impl Reloader {
    pub(crate) fn start(runtime: Arc<Runtime>, mut watched: Vec<Watched>) -> Result<Self, PluginError> {
        for w in &mut watched {
            w.path = absolute(&w.path);
        }
        let (event_tx, event_rx) = channel::<Vec<PathBuf>>();
        let mut debouncer = new_debouncer(DEBOUNCE, move |res: DebounceEventResult| match res {
            Ok(events) => {
                let _ = event_tx.send(events.into_iter().map(|e| e.path).collect());
            }
            Err(e) => tracing::warn!("plugin file watcher: {e}"),
        })
        .map_err(|e| PluginError::Engine(format!("cannot start the plugin file watcher: {e}")))?;
        let mut dirs: Vec<PathBuf> =
            watched.iter().filter_map(|w| w.path.parent().map(Path::to_path_buf)).collect();
        dirs.sort();
        dirs.dedup();
        for d in &dirs {
            debouncer
                .watcher()
                .watch(d, RecursiveMode::NonRecursive)
                .map_err(|e| PluginError::Engine(format!("cannot watch {}: {e}", d.display())))?;
            tracing::info!("watching {} for plugin changes", d.display());
        }

        let (tx, rx) = channel::<Message>();
        std::thread::Builder::new()
            .name("lorahost-reload".into())
            .spawn(move || {
                while let Ok(mut paths) = event_rx.recv() {
                    // Coalesce bursts that arrived while the last compile ran.
                    while let Ok(more) = event_rx.try_recv() {
                        paths.extend(more);
                    }
                    for (index, w) in watched.iter_mut().enumerate() {
                        if !paths.iter().any(|p| absolute(p) == w.path || p == &w.path) {
                            continue;
                        }
                        let Some(msg) = rebuild(&runtime, index, w) else { continue };
                        if tx.send(msg).is_err() {
                            return;
                        }
                    }
                }
            })
            .map_err(|e| PluginError::Engine(format!("cannot start the reload worker: {e}")))?;
        Ok(Reloader { rx: Mutex::new(rx), buffered: Mutex::new(VecDeque::new()), _debouncer: debouncer })
    }

    /// Messages ready now (non-blocking).
    pub(crate) fn poll(&self) -> Vec<Message> {
        let mut out: Vec<Message> =
            self.buffered.lock().map(|mut b| b.drain(..).collect()).unwrap_or_default();
        if let Ok(rx) = self.rx.lock() {
            out.extend(rx.try_iter());
        }
        out
    }

    /// Block until a message is ready or `timeout` passes; the message stays queued for `poll`.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        if self.buffered.lock().map(|b| !b.is_empty()).unwrap_or(false) {
            return true;
        }
        let Ok(rx) = self.rx.lock() else { return false };
        match rx.recv_timeout(timeout) {
            Ok(m) => {
                if let Ok(mut b) = self.buffered.lock() {
                    b.push_back(m);
                }
                true
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => false,
        }
    }
}

/// How long a file that fails to load is given to settle before it is judged: editors and
/// build tools that write in place (truncate, then write) are caught mid-write otherwise.
const SETTLE: Duration = Duration::from_millis(250);

/// Look at a changed file: None when it is gone, empty (being written) or unchanged, else the
/// new version or why not.
fn rebuild(runtime: &Runtime, index: usize, w: &mut Watched) -> Option<Message> {
    let read = |w: &mut Watched, path: &Path| match std::fs::read(path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !std::mem::replace(&mut w.reported_gone, true) {
                tracing::warn!(
                    plugin = %w.name,
                    "{} was removed; the loaded version keeps running (put the file back before a --resume, which loads it)",
                    path.display()
                );
            }
            None
        }
        Err(e) => {
            tracing::debug!("{} not readable ({e}); keeping the loaded version", path.display());
            None
        }
    };
    let path = w.path.clone();
    let mut bytes = read(w, &path)?;
    if bytes.is_empty() {
        // Truncated and not yet written: the write's own event follows. A file that stays
        // empty is said once.
        std::thread::sleep(SETTLE);
        bytes = read(w, &path)?;
        if bytes.is_empty() {
            if !std::mem::replace(&mut w.reported_gone, true) {
                tracing::warn!(plugin = %w.name, "{} is empty; the loaded version keeps running", path.display());
            }
            return None;
        }
    }
    w.reported_gone = false;
    let mut attempts = 0;
    loop {
        if bytes.is_empty() {
            return None;
        }
        let sha = hex(&Sha256::digest(&bytes));
        if sha == w.sha256 {
            return None;
        }
        if attempts == 0 {
            tracing::info!(plugin = %w.name, "{} changed; compiling the new version in the background", w.path.display());
        }
        attempts += 1;
        match prepare(runtime, &bytes, &w.path, &w.config_json, &w.run, &w.limits) {
            Ok(prepared) => {
                w.sha256 = sha;
                return Some(Message::Ready { index, prepared: Box::new(prepared) });
            }
            Err(e) => {
                // A half-written file fails too: judge it only once it stopped changing.
                std::thread::sleep(SETTLE);
                match read(w, &path) {
                    Some(again) if again != bytes && attempts < 8 => bytes = again,
                    _ => {
                        w.sha256 = sha;
                        // A file that does not decode may still be mid-write; one whose
                        // plugin refused to start is complete.
                        let partial = !matches!(e, PluginError::Init { .. } | PluginError::Manifest { .. });
                        let reason = if partial {
                            format!(
                                "{e} (if the file was still being written, it is loaded at its next change)"
                            )
                        } else {
                            e.to_string()
                        };
                        return Some(Message::Rejected { index, reason });
                    }
                }
            }
        }
    }
}
