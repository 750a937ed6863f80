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
                match read_verified(p) {
                    Ok(cached) => {
                        // SAFETY: `cached` is exactly the bytes `precompile_component` produced
                        // when the entry was written (its sha-256 matches the checksum written
                        // with it), for an engine with the same compatibility hash (in the name).
                        // They are deserialized from this buffer, not re-read from the file.
                        match unsafe { Component::deserialize(&self.engine, &cached) } {
                            Ok(c) => {
                                let info = CompileInfo {
                                    sha256,
                                    elapsed: start.elapsed(),
                                    cached: true,
                                    size: bytes.len(),
                                };
                                return Ok((c, info));
                            }
                            Err(e) => {
                                tracing::warn!("discarding unreadable cache entry {}: {e}", p.display());
                                discard_entry(p);
                            }
                        }
                    }
                    Err(reason) => {
                        tracing::warn!("discarding cache entry {}: {reason}; recompiling", p.display());
                        discard_entry(p);
                    }
                }
            }
        }
        let serialized = self.engine.precompile_component(bytes).map_err(invalid)?;
        // SAFETY: `serialized` was produced just above by this engine.
        let component = unsafe { Component::deserialize(&self.engine, &serialized) }.map_err(invalid)?;
        if let Some(p) = &cache_path {
            if let Err(e) = write_entry(p, &serialized) {
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

/// The checksum file of a cache entry: `<entry>.sha256`, the lower-case hex sha-256 of the
/// entry's exact bytes. wasmtime trusts a compiled artifact's machine code blindly, so an entry
/// whose bytes were damaged on disk would crash the process (SIGSEGV, SIGILL) instead of failing
/// to load; the checksum is what makes a damaged entry detectable.
fn checksum_path(entry: &Path) -> PathBuf {
    let mut name = entry.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

/// Read a cache entry whole and check it against its checksum file. `Err` says why the entry
/// must not be trusted: no checksum (an entry from before checksums, or a write cut short),
/// a malformed one, or bytes that do not match it.
fn read_verified(entry: &Path) -> Result<Vec<u8>, String> {
    let sum_path = checksum_path(entry);
    let expected = match std::fs::read(&sum_path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("it has no checksum ({} is missing)", sum_path.display()));
        }
        Err(e) => return Err(format!("cannot read its checksum {}: {e}", sum_path.display())),
    };
    let expected = expected.trim_ascii();
    if expected.len() != 64 || !expected.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!("its checksum {} is malformed", sum_path.display()));
    }
    let bytes = std::fs::read(entry).map_err(|e| format!("cannot read it: {e}"))?;
    let actual = hex(&Sha256::digest(&bytes));
    if actual.as_bytes() != expected {
        return Err(format!(
            "its sha-256 is {actual}, its checksum says {} (the file is corrupted)",
            String::from_utf8_lossy(expected)
        ));
    }
    Ok(bytes)
}

/// Write a cache entry and then its checksum, each atomically (temporary file, then rename).
/// A reader that comes between the two, or after a crash between them, finds a checksum that
/// is missing or does not match, and recompiles.
fn write_entry(entry: &Path, serialized: &[u8]) -> std::io::Result<()> {
    crate::fsutil::write_atomic(entry, serialized)?;
    let sum = format!("{}\n", hex(&Sha256::digest(serialized)));
    crate::fsutil::write_atomic(&checksum_path(entry), sum.as_bytes())
}

/// Remove a cache entry that cannot be trusted, with its checksum.
fn discard_entry(entry: &Path) {
    let _ = std::fs::remove_file(entry);
    let _ = std::fs::remove_file(checksum_path(entry));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::bindings::RunInfo;
    use std::process::Command;

    /// A real plugin component (the reference cosine schedule), built with the plugin workspace
    /// when it is not there yet (as the integration tests do).
    fn test_component() -> (PathBuf, Vec<u8>) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
        let path = root.join("target/wasm32-wasip2/release/cosine_schedule.wasm");
        if !path.exists() {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let out = Command::new(cargo)
                .args(["build", "--release", "--target", "wasm32-wasip2", "-p", "cosine_schedule"])
                .arg("--manifest-path")
                .arg(root.join("Cargo.toml"))
                .arg("--target-dir")
                .arg(root.join("target"))
                .env_remove("CARGO_TARGET_DIR")
                .env_remove("CARGO_BUILD_TARGET")
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .output()
                .expect("cannot run cargo to build the test plugin");
            assert!(
                out.status.success(),
                "building the test plugin failed (is the target installed? `rustup target add wasm32-wasip2`):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let bytes = std::fs::read(&path).unwrap();
        (path, bytes)
    }

    fn run_info() -> RunInfo {
        RunInfo {
            total_steps: 100,
            warmup_steps: 10,
            accumulation: 1,
            batch_size: 2,
            effective_batch_size: 2,
            base_lr: 1e-4,
            scheduler: "cosine".into(),
            dataset_size: 20,
            steps_per_epoch: 10,
            seed: 7,
            start_step: 1,
        }
    }

    /// The only `.cwasm` entry in `dir`.
    fn only_entry(dir: &Path) -> PathBuf {
        let entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .collect();
        assert_eq!(entries.len(), 1, "one cache entry expected in {}: {entries:?}", dir.display());
        entries.into_iter().next().unwrap()
    }

    /// The entry's checksum file holds the sha-256 of the entry's bytes as they are now.
    fn assert_checksum_valid(entry: &Path) {
        let sum = std::fs::read_to_string(checksum_path(entry)).expect("the entry has a checksum file");
        let bytes = std::fs::read(entry).unwrap();
        assert_eq!(sum.trim(), hex(&Sha256::digest(&bytes)), "checksum of {}", entry.display());
        assert!(read_verified(entry).is_ok());
    }

    /// Offset and size of the `.text` section (the machine code) of a 64-bit little-endian ELF.
    fn text_section(elf: &[u8]) -> (usize, usize) {
        assert_eq!(&elf[..4], b"\x7fELF", "a compiled component is an ELF file");
        assert_eq!((elf[4], elf[5]), (2, 1), "64-bit little-endian ELF expected");
        let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
        let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
        let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
        let (shoff, shentsize, shnum, shstrndx) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
        let header = |i: usize| shoff + i * shentsize;
        let strtab = u64_at(header(shstrndx) + 0x18);
        for i in 0..shnum {
            let h = header(i);
            let name_at = strtab + u32_at(h);
            let name_end = name_at + elf[name_at..].iter().position(|&b| b == 0).unwrap();
            if &elf[name_at..name_end] == b".text" {
                return (u64_at(h + 0x18), u64_at(h + 0x20));
            }
        }
        panic!("no .text section in the compiled component");
    }

    /// Bytes damaged inside the compiled machine code (where wasmtime's own checks of the
    /// artifact's metadata do not look) are caught by the checksum: the entry is discarded,
    /// the component recompiled and runs, and the entry is rewritten with a valid checksum.
    /// Without the checksum the damaged code would be loaded as is (and crash when run).
    #[test]
    fn corrupted_machine_code_in_cache_is_recompiled() {
        let (path, bytes) = test_component();
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");

        let rt = Runtime::new(Some(cache.clone())).unwrap();
        let (_, info) = rt.compile(&bytes, &path).unwrap();
        assert!(!info.cached, "first compile cannot come from the empty cache");
        let entry = only_entry(&cache);
        assert_checksum_valid(&entry);
        let (_, info) = rt.compile(&bytes, &path).unwrap();
        assert!(info.cached, "an intact entry is loaded from the cache");

        // Flip 64 bytes in the middle of the machine code, as a bad disk sector would.
        let mut damaged = std::fs::read(&entry).unwrap();
        let (text_at, text_len) = text_section(&damaged);
        assert!(text_len >= 1024, "the test component has code ({text_len} bytes)");
        let at = text_at + text_len / 2;
        for b in &mut damaged[at..at + 64] {
            *b = !*b;
        }
        std::fs::write(&entry, &damaged).unwrap();
        assert!(read_verified(&entry).is_err(), "the damage is detected");

        // A new process (fresh engine) loads the plugin fully: compile, instantiate, describe, init.
        drop(rt);
        let rt = Runtime::new(Some(cache.clone())).unwrap();
        let prepared =
            super::super::instance::prepare(&rt, &bytes, &path, "{}", &run_info(), &Limits::default())
                .expect("the plugin loads from a damaged cache");
        assert!(!prepared.compile.cached, "a damaged entry must be recompiled, not loaded");
        assert_eq!(prepared.manifest.name, "cosine_schedule");
        drop(prepared);

        // The entry was rewritten: intact bytes, a valid checksum, and a cache hit next time.
        assert_eq!(only_entry(&cache), entry);
        assert_ne!(std::fs::read(&entry).unwrap(), damaged, "the damaged entry was rewritten");
        assert_checksum_valid(&entry);
        let (_, info) = rt.compile(&bytes, &path).unwrap();
        assert!(info.cached, "the rewritten entry is loaded from the cache");
    }

    /// Entries without a checksum (written before checksums existed, or a write cut short) and
    /// entries with an unreadable one are stale: recompiled and rewritten, never trusted.
    #[test]
    fn cache_entry_without_valid_checksum_is_recompiled() {
        let (path, bytes) = test_component();
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let rt = Runtime::new(Some(cache.clone())).unwrap();
        let (_, info) = rt.compile(&bytes, &path).unwrap();
        assert!(!info.cached);
        let entry = only_entry(&cache);

        std::fs::remove_file(checksum_path(&entry)).unwrap();
        let (_, info) = rt.compile(&bytes, &path).unwrap();
        assert!(!info.cached, "an entry without a checksum is recompiled");
        assert_checksum_valid(&entry);

        std::fs::write(checksum_path(&entry), "not a checksum\n").unwrap();
        let (_, info) = rt.compile(&bytes, &path).unwrap();
        assert!(!info.cached, "an entry with a malformed checksum is recompiled");
        assert_checksum_valid(&entry);

        let (_, info) = rt.compile(&bytes, &path).unwrap();
        assert!(info.cached);
    }
}
