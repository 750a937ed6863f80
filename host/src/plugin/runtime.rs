//! The wasmtime side: one engine with epoch interruption, a linker that grants plugins
//! nothing but the contract's `host` interface and an empty WASI context, per-instance
//! stores with memory limits, and an on-disk cache of compiled components.

use super::bindings::{self, lorahost::plugin::host::Level, NamedValue};
use super::error::PluginError;
use crate::fsutil::hex;
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// How often the epoch ticker advances; CPU budgets are rounded up to this.
pub const TICK: Duration = Duration::from_millis(2);

/// Most log lines a plugin may write in one call; the rest are counted and dropped.
const MAX_LOG_LINES_PER_CALL: usize = 64;
/// Longest log line kept (longer ones are truncated).
const MAX_LOG_LINE: usize = 2048;
/// Most custom metrics recorded per call.
const MAX_METRICS_PER_CALL: usize = 256;

/// Per-plugin resource limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// CPU time of one hook call.
    pub call_budget: Duration,
    /// CPU time of `init` (and of restoring state).
    pub init_budget: Duration,
    /// Linear memory cap.
    pub memory_bytes: usize,
    /// Failures in a row after which the plugin is disabled.
    pub max_consecutive_failures: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            call_budget: Duration::from_millis(100),
            init_budget: Duration::from_secs(2),
            memory_bytes: 64 << 20,
            max_consecutive_failures: 3,
        }
    }
}

/// Memory limiter that remembers when it said no, so a trap can be explained.
pub(crate) struct MemoryCap {
    limit: usize,
    pub(crate) denied: Option<usize>,
}

impl MemoryCap {
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.denied = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// What a store carries: the (empty) WASI context, the memory cap, and what the plugin
/// sent through the `host` interface during the current call.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) cap: MemoryCap,
    plugin: Arc<str>,
    pub(crate) metrics: Vec<NamedValue>,
    log_lines: usize,
    dropped_lines: usize,
    /// The plugin's last stderr line (a Rust guest's panic message lands there).
    last_stderr: Arc<std::sync::Mutex<String>>,
}

impl HostState {
    /// The plugin's last line on stderr, if any (empty otherwise).
    pub(crate) fn last_stderr(&self) -> String {
        self.last_stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Reset the per-call budgets before a call.
    pub(crate) fn begin_call(&mut self) {
        self.log_lines = 0;
        self.dropped_lines = 0;
        if let Ok(mut l) = self.last_stderr.lock() {
            l.clear();
        }
        self.cap.denied = None;
    }

    /// Report what was dropped during the call just finished.
    pub(crate) fn end_call(&mut self) {
        if self.dropped_lines > 0 {
            tracing::warn!(plugin = %self.plugin, "dropped {} log lines (limit {MAX_LOG_LINES_PER_CALL} per call)", self.dropped_lines);
        }
    }

    fn log_line(&mut self, level: Level, message: &str) {
        if self.log_lines >= MAX_LOG_LINES_PER_CALL {
            self.dropped_lines += 1;
            return;
        }
        self.log_lines += 1;
        let msg = truncate(message, MAX_LOG_LINE);
        let p = &*self.plugin;
        match level {
            Level::Trace => tracing::trace!(plugin = p, "{msg}"),
            Level::Debug => tracing::debug!(plugin = p, "{msg}"),
            Level::Info => tracing::info!(plugin = p, "{msg}"),
            Level::Warn => tracing::warn!(plugin = p, "{msg}"),
            Level::Error => tracing::error!(plugin = p, "{msg}"),
        }
    }
}

/// Cut a string to at most `max` bytes on a char boundary, marking the cut.
pub(crate) fn truncate(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes truncated)", &s[..end], s.len() - end).into()
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl bindings::lorahost::plugin::types::Host for HostState {}

impl bindings::lorahost::plugin::host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        self.log_line(level, &message);
    }

    fn emit_metrics(&mut self, values: Vec<NamedValue>) {
        for v in values {
            if self.metrics.len() >= MAX_METRICS_PER_CALL {
                break;
            }
            if v.value.is_finite() && !v.name.is_empty() && v.name.len() <= 64 {
                self.metrics.push(v);
            }
        }
    }
}

/// A plugin's stdout/stderr: lines go to the host log, tagged with the plugin's name.
struct LogPipe {
    plugin: Arc<str>,
    stream: &'static str,
    line: Vec<u8>,
    /// Where the last complete line goes (stderr only).
    last: Option<Arc<std::sync::Mutex<String>>>,
}

impl LogPipe {
    fn flush_line(&mut self) {
        if !self.line.is_empty() {
            let text = String::from_utf8_lossy(&self.line);
            let text = truncate(text.trim_end(), MAX_LOG_LINE);
            tracing::info!(plugin = %self.plugin, stream = self.stream, "{}", text);
            // Rust's panic hook ends with a hint about RUST_BACKTRACE: keep the message before.
            let hint = text.starts_with("note: run with `RUST_BACKTRACE");
            if let Some(last) = self.last.as_ref().filter(|_| !hint) {
                if let Ok(mut l) = last.lock() {
                    *l = text.into_owned();
                }
            }
            self.line.clear();
        }
    }
}

impl OutputStream for LogPipe {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        for &b in bytes.iter() {
            if b == b'\n' || self.line.len() >= MAX_LOG_LINE {
                self.flush_line();
            }
            if b != b'\n' {
                self.line.push(b);
            }
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogPipe {
    async fn ready(&mut self) {}
}

impl Drop for LogPipe {
    fn drop(&mut self) {
        self.flush_line();
    }
}

#[derive(Clone)]
struct LogSink {
    plugin: Arc<str>,
    stream: &'static str,
    last: Option<Arc<std::sync::Mutex<String>>>,
}

impl IsTerminal for LogSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogSink {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only WASI 0.3 streams use this; plugins are linked against WASI 0.2.
        Box::new(tokio::io::sink())
    }
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LogPipe {
            plugin: self.plugin.clone(),
            stream: self.stream,
            line: Vec::new(),
            last: self.last.clone(),
        })
    }
}

/// A clock frozen at zero: plugins get no wall clock (time comes through the contract).
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// What a compile produced, for `plugin check` and the benchmarks.
#[derive(Debug, Clone)]
pub struct CompileInfo {
    /// sha-256 of the component bytes (hex).
    pub sha256: String,
    /// Time spent compiling or loading from the cache.
    pub elapsed: Duration,
    /// True when the compiled artifact came from the on-disk cache.
    pub cached: bool,
    /// Size of the `.wasm` file.
    pub size: usize,
}

/// The shared wasmtime state: engine, epoch ticker, linker, compile cache.
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<HostState>,
    cache_dir: Option<PathBuf>,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// A runtime whose compiled components are cached in `cache_dir` (None: no cache).
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Arc<Self>, PluginError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let engine = Engine::new(&config).map_err(PluginError::engine)?;

        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(PluginError::engine)?;
        bindings::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(PluginError::engine)?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.weak();
            let stop = stop_ticker.clone();
            std::thread::Builder::new()
                .name("lorahost-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                        match engine.upgrade() {
                            Some(e) => e.increment_epoch(),
                            None => break,
                        }
                    }
                })
                .map_err(|e| PluginError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        }

        let cache_dir = cache_dir.and_then(|d| match std::fs::create_dir_all(&d) {
            Ok(()) => Some(d),
            Err(e) => {
                tracing::warn!("component cache {} unusable ({e}); compiling without a cache", d.display());
                None
            }
        });
        Ok(Arc::new(Runtime { engine, linker, cache_dir, stop_ticker }))
    }

    /// The default cache directory: `$LORAHOST_CACHE_DIR`, else `$XDG_CACHE_HOME/lorahost/components`,
    /// else `~/.cache/lorahost/components`.
    pub fn default_cache_dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("LORAHOST_CACHE_DIR") {
            return Some(PathBuf::from(d));
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("lorahost").join("components"))
    }

    /// Compile component bytes, or load the compiled artifact from the cache.
    pub fn compile(&self, bytes: &[u8], origin: &Path) -> Result<(Component, CompileInfo), PluginError> {
        let start = Instant::now();
        let sha256 = hex(&Sha256::digest(bytes));
        let invalid = |e: wasmtime::Error| PluginError::Invalid {
            path: origin.to_path_buf(),
            reason: format!("{e:#}"),
        };
        if wasmparser_kind(bytes) != Some(Kind::Component) {
            return Err(PluginError::Invalid {
                path: origin.to_path_buf(),
                reason: match wasmparser_kind(bytes) {
                    Some(Kind::Module) => {
                        "this is a core wasm module, not a component; build the plugin with \
                         `cargo build --target wasm32-wasip2` (or wrap it with `wasm-tools component new`)"
                            .into()
                    }
                    _ => {
                        "not a WebAssembly component (bad magic/version header); is the file complete?".into()
                    }
                },
            });
        }
        let cache_path =
            self.cache_dir.as_ref().map(|d| d.join(format!("{sha256}-{}.cwasm", self.compat_key())));
        if let Some(p) = &cache_path {
            if p.exists() {
                // SAFETY: the cache directory holds only artifacts this runtime wrote with
                // `precompile_component` for an engine with the same compatibility hash.
                match unsafe { Component::deserialize_file(&self.engine, p) } {
                    Ok(c) => {
                        let info =
                            CompileInfo { sha256, elapsed: start.elapsed(), cached: true, size: bytes.len() };
                        return Ok((c, info));
                    }
                    Err(e) => {
                        tracing::warn!("discarding unreadable cache entry {}: {e}", p.display());
                        let _ = std::fs::remove_file(p);
                    }
                }
            }
        }
        let serialized = self.engine.precompile_component(bytes).map_err(invalid)?;
        // SAFETY: `serialized` was produced just above by this engine.
        let component = unsafe { Component::deserialize(&self.engine, &serialized) }.map_err(invalid)?;
        if let Some(p) = &cache_path {
            if let Err(e) = crate::fsutil::write_atomic(p, &serialized) {
                tracing::warn!("cannot write component cache {}: {e}", p.display());
            }
        }
        Ok((component, CompileInfo { sha256, elapsed: start.elapsed(), cached: false, size: bytes.len() }))
    }

    fn compat_key(&self) -> String {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        format!("{:016x}", h.finish())
    }

    /// A fresh store for one plugin instance.
    pub(crate) fn new_store(&self, plugin: &str, limits: &Limits) -> Store<HostState> {
        let name: Arc<str> = plugin.into();
        let last_stderr = Arc::new(std::sync::Mutex::new(String::new()));
        let wasi = WasiCtxBuilder::new()
            .stdout(LogSink { plugin: name.clone(), stream: "stdout", last: None })
            .stderr(LogSink { plugin: name.clone(), stream: "stderr", last: Some(last_stderr.clone()) })
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .secure_random(wasmtime_wasi::Deterministic::new(vec![0x5a, 0x17, 0xc3, 0x88]))
            .insecure_random(wasmtime_wasi::Deterministic::new(vec![0x2b, 0x91, 0x4e, 0xd6]))
            .insecure_random_seed(0)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            cap: MemoryCap { limit: limits.memory_bytes, denied: None },
            plugin: name,
            metrics: Vec::new(),
            log_lines: 0,
            dropped_lines: 0,
            last_stderr,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.cap);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(u64::MAX / 2);
        store
    }

    /// Ticks that cover `budget`.
    pub(crate) fn ticks(budget: Duration) -> u64 {
        (budget.as_micros() / TICK.as_micros()).max(1) as u64 + 1
    }
}

#[derive(PartialEq)]
enum Kind {
    Module,
    Component,
}

/// Tell a core module from a component by the header (magic, then version/layer).
fn wasmparser_kind(bytes: &[u8]) -> Option<Kind> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return None;
    }
    match (bytes[4], bytes[5], bytes[6], bytes[7]) {
        (1, 0, 0, 0) => Some(Kind::Module),
        (_, _, 1, 0) => Some(Kind::Component),
        _ => None,
    }
}
