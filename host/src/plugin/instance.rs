//! One loaded plugin: its compiled component, its live instance, and the guard around every
//! call (budget, trap capture, answer validation, recovery from the last good state).

use super::bindings::{self, Hook, Manifest, NamedValue, RunInfo};
use super::error::PluginError;
use super::runtime::{truncate, CompileInfo, HostState, Limits, Runtime};
use super::PluginEvent;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::Store;

/// A live instance: a store (which a trap poisons) and the bound exports.
pub(crate) struct Live {
    pub(crate) store: Store<HostState>,
    pub(crate) api: bindings::Plugin,
}

/// Everything needed to (re)create instances of one plugin version.
pub(crate) struct Prepared {
    pub(crate) pre: bindings::PluginPre<HostState>,
    pub(crate) manifest: Manifest,
    pub(crate) compile: CompileInfo,
    pub(crate) live: Live,
}

/// Compile, type-check against the contract, instantiate, describe and init: the full
/// validation a plugin version must pass before it may run.
pub(crate) fn prepare(
    runtime: &Runtime,
    bytes: &[u8],
    path: &Path,
    config_json: &str,
    run: &RunInfo,
    limits: &Limits,
) -> Result<Prepared, PluginError> {
    let (component, compile) = runtime.compile(bytes, path)?;
    let contract = |e: wasmtime::Error| PluginError::Contract {
        path: path.to_path_buf(),
        contract: bindings::CONTRACT,
        reason: first_line(&format!("{e:#}")),
    };
    let instance_pre = runtime.linker.instantiate_pre(&component).map_err(contract)?;
    let pre = bindings::PluginPre::new(instance_pre).map_err(contract)?;
    let fallback_name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut live = instantiate(runtime, &pre, &fallback_name, limits).map_err(|reason| {
        PluginError::Init { name: fallback_name.clone(), path: path.to_path_buf(), reason }
    })?;
    let manifest = guarded_call(&mut live, limits.init_budget, |api, store| {
        api.lorahost_plugin_lifecycle().call_describe(store)
    })
    .map_err(|reason| PluginError::Manifest { path: path.to_path_buf(), reason })?;
    validate_manifest(&manifest)
        .map_err(|reason| PluginError::Manifest { path: path.to_path_buf(), reason })?;
    // Re-create the store under the plugin's own name so its log lines are tagged with it.
    let mut live = instantiate(runtime, &pre, &manifest.name, limits).map_err(|reason| {
        PluginError::Init { name: manifest.name.clone(), path: path.to_path_buf(), reason }
    })?;
    init(&mut live, config_json, run, limits).map_err(|reason| PluginError::Init {
        name: manifest.name.clone(),
        path: path.to_path_buf(),
        reason: super::runtime::truncate(&reason, 1024).into_owned(),
    })?;
    Ok(Prepared { pre, manifest, compile, live })
}

fn instantiate(
    runtime: &Runtime,
    pre: &bindings::PluginPre<HostState>,
    name: &str,
    limits: &Limits,
) -> Result<Live, String> {
    let mut store = runtime.new_store(name, limits);
    store.set_epoch_deadline(Runtime::ticks(limits.init_budget));
    store.data_mut().begin_call();
    let api = pre.instantiate(&mut store).map_err(|e| explain(&e, store.data(), limits.init_budget))?;
    Ok(Live { store, api })
}

fn init(live: &mut Live, config_json: &str, run: &RunInfo, limits: &Limits) -> Result<(), String> {
    guarded_call(live, limits.init_budget, |api, store| {
        api.lorahost_plugin_lifecycle().call_init(store, config_json, run)
    })?
}

/// Run one call into the guest with a CPU deadline; a trap becomes an explained `Err`.
pub(crate) fn guarded_call<R>(
    live: &mut Live,
    budget: Duration,
    f: impl FnOnce(&bindings::Plugin, &mut Store<HostState>) -> wasmtime::Result<R>,
) -> Result<R, String> {
    live.store.set_epoch_deadline(Runtime::ticks(budget));
    live.store.data_mut().begin_call();
    let result = f(&live.api, &mut live.store);
    live.store.data_mut().end_call();
    // Out of a call, a runaway guest can not run; park the deadline far away.
    live.store.set_epoch_deadline(u64::MAX / 2);
    result.map_err(|e| explain(&e, live.store.data(), budget))
}

/// A user-facing reason for a failed call.
fn explain(err: &wasmtime::Error, state: &HostState, budget: Duration) -> String {
    if let Some(&wasmtime::Trap::Interrupt) = err.downcast_ref::<wasmtime::Trap>() {
        return format!("ran past its CPU budget of {} ms", budget.as_millis());
    }
    if let Some(asked) = state.cap.denied {
        return format!(
            "ran out of memory: asked to grow its memory to {:.1} MiB, the limit is {} MiB",
            asked as f64 / (1 << 20) as f64,
            state_limit_mib(state)
        );
    }
    // The trap's kind (e.g. "wasm `unreachable` instruction executed", what a Rust panic
    // becomes) and the plugin's last stderr line (the panic message), not wasmtime's first
    // line ("error while executing at wasm backtrace:").
    let what = match err.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => err
            .chain()
            .last()
            .map(|c| first_line(&c.to_string()))
            .unwrap_or_else(|| first_line(&format!("{err:#}"))),
    };
    let said = state.last_stderr();
    if said.is_empty() {
        format!("trapped: {what}")
    } else {
        format!("trapped: {what}; its last stderr line: {}", truncate(&said, 300))
    }
}

fn state_limit_mib(state: &HostState) -> usize {
    state.cap_limit() >> 20
}

fn first_line(s: &str) -> String {
    let line = s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s);
    truncate(line.trim(), 400).into_owned()
}

fn validate_manifest(m: &Manifest) -> Result<(), String> {
    let ok_name = !m.name.is_empty()
        && m.name.len() <= 64
        && m.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok_name {
        return Err(format!(
            "name {:?} must be 1-64 characters of letters, digits, '_' or '-'",
            truncate(&m.name, 80)
        ));
    }
    if m.version.is_empty() || m.version.len() > 64 {
        return Err("version must be a non-empty string of at most 64 characters".into());
    }
    if m.description.len() > 1024 {
        return Err("description longer than 1024 characters".into());
    }
    let mut seen = Vec::new();
    for h in &m.hooks {
        if seen.contains(h) {
            return Err(format!("hook {} listed twice", h.wit_name()));
        }
        seen.push(*h);
    }
    Ok(())
}

/// A plugin in a [`super::PluginSet`]: calls are guarded, failures recovered from.
pub struct LoadedPlugin {
    pub(crate) path: PathBuf,
    pub(crate) config_json: String,
    pub(crate) limits: Limits,
    pub(crate) manifest: Manifest,
    pub(crate) compile: CompileInfo,
    pub(crate) run: RunInfo,
    pre: bindings::PluginPre<HostState>,
    live: Option<Live>,
    last_good: Option<Vec<u8>>,
    /// Failures in a row, per hook: a hook that fails on every call is not excused by
    /// another hook that works in between.
    consecutive_failures: std::collections::BTreeMap<&'static str, u32>,
    failures_total: u64,
    disabled: Option<String>,
    runtime: Arc<Runtime>,
    pub(crate) events: Vec<PluginEvent>,
    pub(crate) metrics: Vec<NamedValue>,
}

impl LoadedPlugin {
    /// Load, validate and initialize the plugin at `path`.
    pub(crate) fn load(
        runtime: Arc<Runtime>,
        path: &Path,
        config_json: String,
        run: RunInfo,
        limits: Limits,
    ) -> Result<Self, PluginError> {
        let bytes = std::fs::read(path).map_err(|error| PluginError::Read {
            path: path.to_path_buf(),
            hint: read_hint(path, &error),
            error,
        })?;
        let prepared = prepare(&runtime, &bytes, path, &config_json, &run, &limits)?;
        Ok(Self::from_prepared(runtime, path.to_path_buf(), config_json, run, limits, prepared))
    }

    pub(crate) fn from_prepared(
        runtime: Arc<Runtime>,
        path: PathBuf,
        config_json: String,
        run: RunInfo,
        limits: Limits,
        p: Prepared,
    ) -> Self {
        LoadedPlugin {
            path,
            config_json,
            limits,
            manifest: p.manifest,
            compile: p.compile,
            run,
            pre: p.pre,
            live: Some(p.live),
            last_good: None,
            consecutive_failures: Default::default(),
            failures_total: 0,
            disabled: None,
            runtime,
            events: Vec::new(),
            metrics: Vec::new(),
        }
    }

    /// The plugin's name from its manifest.
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// Its manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Where it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How it was compiled.
    pub fn compile_info(&self) -> &CompileInfo {
        &self.compile
    }

    /// Whether the manifest lists `hook`.
    pub fn implements(&self, hook: Hook) -> bool {
        self.manifest.hooks.contains(&hook)
    }

    /// Why the plugin was disabled, if it was.
    pub fn disabled(&self) -> Option<&str> {
        self.disabled.as_deref()
    }

    /// Failed calls so far (traps, timeouts, invalid answers).
    pub fn failures(&self) -> u64 {
        self.failures_total
    }

    /// Call a hook: `None` when the plugin is disabled, trapped, or answered something
    /// `validate` rejects (each reported and counted; a trap re-instantiates the plugin).
    pub(crate) fn call<R>(
        &mut self,
        hook: &'static str,
        f: impl FnOnce(&bindings::Plugin, &mut Store<HostState>) -> wasmtime::Result<R>,
        validate: impl FnOnce(&R) -> Result<(), String>,
    ) -> Option<R> {
        self.call_inner(hook, f, validate, true)
    }

    /// `call`, where a success resets the failure streak only if `is_hook` (a successful
    /// snapshot says nothing about whether the plugin's hooks work).
    fn call_inner<R>(
        &mut self,
        hook: &'static str,
        f: impl FnOnce(&bindings::Plugin, &mut Store<HostState>) -> wasmtime::Result<R>,
        validate: impl FnOnce(&R) -> Result<(), String>,
        is_hook: bool,
    ) -> Option<R> {
        if self.disabled.is_some() {
            return None;
        }
        let live = self.live.as_mut()?;
        let outcome = guarded_call(live, self.limits.call_budget, f);
        self.metrics.append(&mut live.store.data_mut().metrics);
        match outcome {
            Ok(answer) => match validate(&answer) {
                Ok(()) => {
                    if is_hook {
                        self.consecutive_failures.remove(hook);
                    }
                    Some(answer)
                }
                Err(reason) => {
                    self.fail(hook, format!("invalid answer: {reason}"), false);
                    None
                }
            },
            Err(reason) => {
                self.fail(hook, reason, true);
                None
            }
        }
    }

    fn fail(&mut self, hook: &'static str, reason: String, trapped: bool) {
        self.failures_total += 1;
        let streak = self.consecutive_failures.entry(hook).or_default();
        *streak += 1;
        let streak = *streak;
        tracing::warn!(
            plugin = %self.manifest.name,
            "{hook} failed: {reason}; using the hook's default answer{}",
            if trapped { " and re-instantiating the plugin from its last good state" } else { "" }
        );
        self.events.push(PluginEvent::Failed {
            plugin: self.manifest.name.clone(),
            hook,
            reason: reason.clone(),
        });
        if streak >= self.limits.max_consecutive_failures {
            self.disable(format!("{streak} failures in a row of {hook} (last: {reason})"));
            return;
        }
        if trapped {
            self.live = None;
            match self.reinstantiate() {
                Ok(restored) => self.events.push(PluginEvent::Recovered {
                    plugin: self.manifest.name.clone(),
                    state_restored: restored,
                }),
                Err(e) => self.disable(format!("could not be re-instantiated after a failure: {e}")),
            }
        }
    }

    fn disable(&mut self, reason: String) {
        tracing::error!(plugin = %self.manifest.name, "disabled: {reason}; training goes on without it");
        self.events
            .push(PluginEvent::Disabled { plugin: self.manifest.name.clone(), reason: reason.clone() });
        self.disabled = Some(reason);
        self.live = None;
    }

    /// Fresh instance, init, and restore of the last good snapshot. Ok(true) when state was restored.
    fn reinstantiate(&mut self) -> Result<bool, String> {
        let mut live = instantiate(&self.runtime, &self.pre, &self.manifest.name, &self.limits)?;
        init(&mut live, &self.config_json, &self.run, &self.limits)?;
        let mut restored = false;
        if let Some(state) = &self.last_good {
            match guarded_call(&mut live, self.limits.init_budget, |api, store| {
                api.lorahost_plugin_lifecycle().call_restore(store, state)
            })? {
                Ok(()) => restored = true,
                Err(e) => {
                    tracing::warn!(plugin = %self.manifest.name, "could not restore its last state: {e}")
                }
            }
        }
        self.live = Some(live);
        Ok(restored)
    }

    /// Ask for a snapshot and keep it as the last good state. Returns it.
    pub(crate) fn take_snapshot(&mut self) -> Option<Vec<u8>> {
        let state = self.call_inner(
            "snapshot",
            |api, store| api.lorahost_plugin_lifecycle().call_snapshot(store),
            |_| Ok(()),
            false,
        )?;
        self.last_good = Some(state.clone());
        Some(state)
    }

    /// The last snapshot taken (or restored).
    pub fn last_snapshot(&self) -> Option<&[u8]> {
        self.last_good.as_deref()
    }

    /// Restore a state into the live instance (resume, hot reload). Ok(false) when the
    /// plugin refused it as incompatible.
    pub(crate) fn restore(&mut self, state: &[u8]) -> Result<bool, String> {
        let budget = self.limits.init_budget;
        let live = self.live.as_mut().ok_or("plugin is not running")?;
        match guarded_call(live, budget, |api, store| {
            api.lorahost_plugin_lifecycle().call_restore(store, state)
        }) {
            Ok(Ok(())) => {
                self.last_good = Some(state.to_vec());
                Ok(true)
            }
            Ok(Err(e)) => {
                tracing::warn!(plugin = %self.manifest.name, "refused the carried-over state ({e}); starting fresh");
                Ok(false)
            }
            Err(trap) => {
                self.fail("restore", trap.clone(), true);
                Err(trap)
            }
        }
    }

    /// Replace this plugin by a new, already initialized version; carry state over.
    pub(crate) fn swap(&mut self, prepared: Prepared) -> bool {
        let state = self.take_snapshot().or_else(|| self.last_good.clone());
        let old_version = std::mem::take(&mut self.manifest.version);
        let old_name = self.manifest.name.clone();
        self.manifest = prepared.manifest;
        self.compile = prepared.compile;
        self.pre = prepared.pre;
        self.live = Some(prepared.live);
        self.disabled = None;
        self.consecutive_failures.clear();
        self.last_good = None;
        let carried = match &state {
            Some(s) => self.restore(s).unwrap_or(false),
            None => false,
        };
        tracing::info!(
            plugin = %self.manifest.name,
            "hot-reloaded {old_name} {old_version} -> {} (sha256 {}..., {} in {:.1} ms), state {}",
            self.manifest.version,
            &self.compile.sha256[..12],
            if self.compile.cached { "loaded from cache" } else { "compiled" },
            self.compile.elapsed.as_secs_f64() * 1e3,
            if carried { "carried over" } else { "not carried over" }
        );
        self.events.push(PluginEvent::Reloaded {
            plugin: self.manifest.name.clone(),
            from_version: old_version,
            to_version: self.manifest.version.clone(),
            sha256: self.compile.sha256.clone(),
            state_carried: carried,
            at: Instant::now(),
        });
        carried
    }
}

impl HostState {
    pub(crate) fn cap_limit(&self) -> usize {
        self.cap.limit()
    }
}

/// The fix for a plugin file that cannot be read.
fn read_hint(path: &Path, error: &std::io::Error) -> String {
    if path.is_dir() {
        return " (it is a directory: name the .wasm component file)".into();
    }
    if error.kind() != std::io::ErrorKind::NotFound {
        return String::new();
    }
    let mut hint = String::new();
    if path.is_relative() {
        let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
        hint.push_str(&format!(" (a relative path is resolved from the working directory, {cwd})"));
    }
    if path.to_string_lossy().contains("plugins/target") {
        hint.push_str("; build the plugins first: make plugins");
    }
    hint
}
