//! The plugin runtime: load WebAssembly plugins that implement `wit/lorahost-plugin.wit`,
//! call their hooks under CPU and memory budgets, validate every answer, compose the answers
//! of several plugins, recover from traps, and hot-reload plugin files while training runs.
//!
//! # Composition of several plugins
//! Plugins are called in the order given. Their answers combine as follows:
//! - **step metrics**: every plugin sees every step. The step's action is the most severe
//!   answer (stop > skip > scale_lr > checkpoint > continue); LR scale factors multiply;
//!   a checkpoint is written if any plugin asks.
//! - **gradient inspection**: every plugin sees the report; one veto vetoes the update.
//! - **LR schedule**: a chain. Each plugin gets the LR the previous one settled on as
//!   `scheduled-lr` (the first gets the config scheduler's); a deferring plugin passes it on.
//! - **loss weights**: the factors of all plugins multiply, per term.
//! - **data sampling**: the first plugin that answers (does not defer) decides; every
//!   plugin is told the per-sample losses through `observe`.
//!
//! # Failure handling
//! A trap, a call past its CPU budget, memory exhaustion or an invalid answer is replaced
//! by the hook's default (continue / accept / the scheduled LR / factor 1 / the host's own
//! order), reported with the plugin's name and the reason, and counted. A trap poisons the
//! instance, so the plugin is re-instantiated and restored from its last good snapshot
//! (taken at every step boundary). After `max_consecutive_failures` failures in a row of one
//! hook (other hooks answering in between do not reset it) the plugin is disabled; training
//! goes on.

mod bindings;
mod error;
mod instance;
mod reload;
mod runtime;

pub use bindings::{
    Action, BatchRequest, GradGroup, GradReport, GradVerdict, Hook, LossTerm, LrRequest, Manifest,
    MicroBatchInfo, NamedValue, RunInfo, SampleMeta, StepMetrics, TermWeight, CONTRACT,
};
pub use error::PluginError;
pub use instance::LoadedPlugin;
pub use runtime::{CompileInfo, Limits, Runtime};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest LR factor a `scale-lr` action may ask for.
pub const MAX_LR_SCALE: f64 = 10.0;
/// Largest learning rate a plugin may set.
pub const MAX_LR: f64 = 10.0;
/// Largest loss-weight factor a plugin may set.
pub const MAX_WEIGHT_FACTOR: f64 = 1e6;
/// Longest reason string kept from a plugin's answer.
const MAX_REASON: usize = 1024;

/// How to load one plugin.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    /// The `.wasm` component.
    pub path: PathBuf,
    /// The plugin's own config section (passed to `init` as JSON).
    pub config: serde_json::Value,
    /// Resource limits.
    pub limits: Limits,
}

impl PluginSpec {
    /// A plugin with an empty config and default limits.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        PluginSpec { path: path.into(), config: serde_json::json!({}), limits: Limits::default() }
    }
}

/// The name a plugin's settings are given under: its file stem (`spike_guard` for
/// `plugins/spike_guard.wasm`).
pub fn spec_name(path: &std::path::Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Plugin settings given beside the plugins' own entries (the command line's `--set`,
/// `--plugin-config`, `--budget-ms`, `--memory-mb`), applied to every plugin of a run: the
/// config's `plugins:` and `--plugin` alike.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PluginOverrides {
    /// Config keys by plugin name ([`spec_name`]), merged over each plugin's own section
    /// (key by key; a key given here wins).
    pub sections: std::collections::BTreeMap<String, serde_json::Value>,
    /// CPU budget per hook call, for every plugin.
    pub call_budget: Option<Duration>,
    /// Memory cap, for every plugin.
    pub memory_bytes: Option<usize>,
}

impl PluginOverrides {
    /// Apply to `specs`. A section that names no plugin of `specs` is an error (with the
    /// names there are), so a typo is not silently ignored.
    pub fn apply(&self, specs: &mut [PluginSpec]) -> Result<(), String> {
        let names: Vec<String> = specs.iter().map(|s| spec_name(&s.path)).collect();
        if let Some(name) = self.sections.keys().find(|k| !names.contains(k)) {
            return Err(format!(
                "config given for plugin {name:?}, but no plugin file is named {name}.wasm (plugins: {})",
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            ));
        }
        for (spec, name) in specs.iter_mut().zip(&names) {
            if let Some(over) = self.sections.get(name) {
                match (spec.config.as_object_mut(), over.as_object()) {
                    (Some(base), Some(over)) => base.extend(over.iter().map(|(k, v)| (k.clone(), v.clone()))),
                    _ => spec.config = over.clone(),
                }
            }
            if let Some(b) = self.call_budget {
                spec.limits.call_budget = b;
            }
            if let Some(m) = self.memory_bytes {
                spec.limits.memory_bytes = m;
            }
        }
        Ok(())
    }
}

/// Something that happened to a plugin, for logs, tests and the metrics file.
#[derive(Debug, Clone)]
pub enum PluginEvent {
    /// A call failed; the default answer was used.
    Failed {
        /// Plugin name.
        plugin: String,
        /// The hook.
        hook: &'static str,
        /// Why.
        reason: String,
    },
    /// The plugin was re-instantiated after a trap.
    Recovered {
        /// Plugin name.
        plugin: String,
        /// Whether the last good snapshot was restored.
        state_restored: bool,
    },
    /// The plugin was switched off.
    Disabled {
        /// Plugin name.
        plugin: String,
        /// Why.
        reason: String,
    },
    /// A new version of the plugin file is now active.
    Reloaded {
        /// Plugin name.
        plugin: String,
        /// Version before.
        from_version: String,
        /// Version now.
        to_version: String,
        /// sha-256 of the new file.
        sha256: String,
        /// Whether the old version's state was restored into the new one.
        state_carried: bool,
        /// When the swap happened.
        at: Instant,
    },
    /// A changed plugin file was rejected; the old version keeps running.
    ReloadRejected {
        /// Plugin name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
}

/// The combined answer of all plugins to one optimizer step.
#[derive(Debug, Clone)]
pub struct StepDecision {
    /// The most severe action (see the module docs).
    pub action: Action,
    /// The plugin that gave `action` (None for continue).
    pub decided_by: Option<String>,
    /// Product of all `scale-lr` factors.
    pub lr_scale: f64,
    /// Whether any plugin asked for a checkpoint.
    pub checkpoint: bool,
    /// Each plugin's own (validated) answer, in call order.
    pub answers: Vec<(String, Action)>,
}

/// The combined verdict on a step's gradients.
#[derive(Debug, Clone)]
pub struct GradDecision {
    /// None: accept. Some((plugin, reason)): the first veto.
    pub veto: Option<(String, String)>,
}

/// A set of loaded plugins, called in order, with optional hot reload.
pub struct PluginSet {
    runtime: Arc<Runtime>,
    plugins: Vec<LoadedPlugin>,
    reloader: Option<reload::Reloader>,
    events: Vec<PluginEvent>,
    metrics: Vec<(String, f64)>,
}

impl PluginSet {
    /// Load every plugin (in order); `run` is what `init` is told about the run.
    pub fn load(runtime: Arc<Runtime>, specs: &[PluginSpec], run: &RunInfo) -> Result<Self, PluginError> {
        let mut plugins: Vec<LoadedPlugin> = Vec::with_capacity(specs.len());
        for spec in specs {
            let config = serde_json::to_string(&spec.config).unwrap_or_else(|_| "{}".into());
            let p = LoadedPlugin::load(runtime.clone(), &spec.path, config, run.clone(), spec.limits)?;
            if let Some(other) = plugins.iter().find(|o| o.name() == p.name()) {
                return Err(PluginError::Duplicate {
                    name: p.name().to_string(),
                    first: other.path().to_path_buf(),
                    second: p.path().to_path_buf(),
                });
            }
            tracing::info!(
                plugin = %p.name(),
                "loaded {} {} from {} (hooks: {}; {} in {:.1} ms)",
                p.name(),
                p.manifest().version,
                p.path().display(),
                hook_list(p.manifest()),
                if p.compile_info().cached { "cached" } else { "compiled" },
                p.compile_info().elapsed.as_secs_f64() * 1e3
            );
            plugins.push(p);
        }
        let mut set = PluginSet { runtime, plugins, reloader: None, events: Vec::new(), metrics: Vec::new() };
        set.step_boundary();
        Ok(set)
    }

    /// Watch the plugins' files and swap in new versions at step boundaries.
    pub fn enable_hot_reload(&mut self) -> Result<(), PluginError> {
        let watched = self
            .plugins
            .iter()
            .map(|p| reload::Watched {
                path: p.path.clone(),
                sha256: p.compile.sha256.clone(),
                config_json: p.config_json.clone(),
                run: p.run.clone(),
                limits: p.limits,
                name: p.name().to_string(),
                reported_gone: false,
            })
            .collect();
        self.reloader = Some(reload::Reloader::start(self.runtime.clone(), watched)?);
        Ok(())
    }

    /// The plugins, in call order.
    pub fn plugins(&self) -> &[LoadedPlugin] {
        &self.plugins
    }

    /// True when no plugin is loaded.
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// Take the events recorded since the last call.
    pub fn take_events(&mut self) -> Vec<PluginEvent> {
        self.collect();
        std::mem::take(&mut self.events)
    }

    /// Take the custom metrics plugins emitted since the last call, named
    /// `plugin.<plugin>.<metric>`.
    pub fn take_metrics(&mut self) -> Vec<(String, f64)> {
        self.collect();
        std::mem::take(&mut self.metrics)
    }

    fn collect(&mut self) {
        for p in &mut self.plugins {
            self.events.append(&mut p.events);
            let name = p.manifest.name.clone();
            self.metrics.extend(p.metrics.drain(..).map(|m| (format!("plugin.{name}.{}", m.name), m.value)));
        }
    }

    /// Call between optimizer steps: swaps in reloaded plugins (never mid-step) and takes
    /// every plugin's snapshot as its last good state.
    pub fn step_boundary(&mut self) {
        if let Some(r) = &self.reloader {
            for msg in r.poll() {
                match msg {
                    reload::Message::Ready { index, prepared } => {
                        let Some(p) = self.plugins.get_mut(index) else { continue };
                        // Another plugin written over the watched file: its state, hooks and
                        // config section are not this plugin's. Keep the running one.
                        if prepared.manifest.name != p.name() {
                            let reason = format!(
                                "the new file is plugin `{}`, not `{}`: a different plugin (its state and config section do not carry over); restart training to switch plugins",
                                prepared.manifest.name,
                                p.name()
                            );
                            tracing::error!(plugin = %p.name(), "new version of {} rejected, the running version stays: {reason}", p.path().display());
                            self.events.push(PluginEvent::ReloadRejected {
                                plugin: p.name().to_string(),
                                path: p.path().to_path_buf(),
                                reason,
                            });
                            continue;
                        }
                        p.swap(*prepared);
                    }
                    reload::Message::Rejected { index, reason } => {
                        if let Some(p) = self.plugins.get(index) {
                            tracing::warn!(
                                plugin = %p.name(),
                                "new version of {} rejected, the running version stays: {reason}",
                                p.path().display()
                            );
                            self.events.push(PluginEvent::ReloadRejected {
                                plugin: p.name().to_string(),
                                path: p.path().to_path_buf(),
                                reason,
                            });
                        }
                    }
                }
            }
        }
        for p in &mut self.plugins {
            p.take_snapshot();
        }
    }

    /// Snapshots of every plugin, by name (for checkpoints).
    pub fn snapshots(&mut self) -> HashMap<String, Vec<u8>> {
        self.plugins.iter_mut().filter_map(|p| p.take_snapshot().map(|s| (p.name().to_string(), s))).collect()
    }

    /// Start every plugin afresh with a new run description, as a resumed training does: each
    /// is loaded again from its file (the compiled component is cached), `init` gets `run`, and
    /// the state each had is restored into it. Returns the names whose state was restored.
    /// On an error the running plugins stay.
    pub fn reinit(&mut self, run: &RunInfo) -> Result<Vec<String>, PluginError> {
        let states = self.snapshots();
        let mut fresh = Vec::with_capacity(self.plugins.len());
        for p in &self.plugins {
            fresh.push(LoadedPlugin::load(
                self.runtime.clone(),
                &p.path,
                p.config_json.clone(),
                run.clone(),
                p.limits,
            )?);
        }
        self.collect();
        self.plugins = fresh;
        let restored = self.restore(&states);
        self.step_boundary();
        Ok(restored)
    }

    /// Restore snapshots by plugin name (on resume). Returns the names that were restored.
    pub fn restore(&mut self, states: &HashMap<String, Vec<u8>>) -> Vec<String> {
        let mut done = Vec::new();
        for p in &mut self.plugins {
            if let Some(s) = states.get(p.name()) {
                if let Ok(true) = p.restore(s) {
                    done.push(p.name().to_string());
                }
            }
        }
        done
    }

    fn implementing(&mut self, hook: Hook) -> impl Iterator<Item = &mut LoadedPlugin> {
        self.plugins.iter_mut().filter(move |p| p.implements(hook))
    }

    /// Step-metrics hook: after each optimizer step.
    pub fn on_step(&mut self, metrics: &StepMetrics) -> StepDecision {
        let mut decision = StepDecision {
            action: Action::Continue,
            decided_by: None,
            lr_scale: 1.0,
            checkpoint: false,
            answers: Vec::new(),
        };
        for p in self.implementing(Hook::StepMetrics) {
            let answer = p.call(
                "on-step",
                |api, store| api.lorahost_plugin_step_hook().call_on_step(store, metrics),
                |a| match a {
                    Action::ScaleLr(f) if !(f.is_finite() && *f > 0.0 && *f <= MAX_LR_SCALE) => {
                        Err(format!("scale-lr factor {f} is not in (0, {MAX_LR_SCALE}]"))
                    }
                    _ => Ok(()),
                },
            );
            let answer = match answer {
                Some(Action::Skip(r)) => Action::Skip(runtime::truncate(&r, MAX_REASON).into_owned()),
                Some(Action::Stop(r)) => Action::Stop(runtime::truncate(&r, MAX_REASON).into_owned()),
                Some(a) => a,
                None => Action::Continue,
            };
            match &answer {
                Action::ScaleLr(f) => decision.lr_scale *= f,
                Action::Checkpoint => decision.checkpoint = true,
                _ => {}
            }
            if answer.severity() > decision.action.severity() {
                decision.action = answer.clone();
                decision.decided_by = Some(p.name().to_string());
            }
            decision.answers.push((p.name().to_string(), answer));
        }
        decision
    }

    /// Gradient-inspection hook: before clipping and the update.
    pub fn on_grads(&mut self, report: &GradReport) -> GradDecision {
        let mut veto = None;
        for p in self.implementing(Hook::GradInspect) {
            let v = p.call(
                "on-grads",
                |api, store| api.lorahost_plugin_grad_hook().call_on_grads(store, report),
                |_| Ok(()),
            );
            if let Some(GradVerdict::Veto(reason)) = v {
                if veto.is_none() {
                    veto = Some((p.name().to_string(), runtime::truncate(&reason, MAX_REASON).into_owned()));
                }
            }
        }
        GradDecision { veto }
    }

    /// LR-schedule hook: the LR of the next step. `request.scheduled_lr` is the config
    /// scheduler's answer; the result is what the chain of plugins settles on.
    pub fn lr_for_step(&mut self, request: &LrRequest) -> f64 {
        let mut req = *request;
        for p in self.implementing(Hook::LrSchedule) {
            let lr = p.call(
                "lr-for-step",
                |api, store| api.lorahost_plugin_lr_hook().call_lr_for_step(store, req),
                |a| match a {
                    Some(lr) if !(lr.is_finite() && *lr >= 0.0 && *lr <= MAX_LR) => {
                        Err(format!("learning rate {lr} is not a finite value in [0, {MAX_LR}]"))
                    }
                    _ => Ok(()),
                },
            );
            if let Some(Some(lr)) = lr {
                req.scheduled_lr = lr;
            }
        }
        req.scheduled_lr
    }

    /// Loss-weights hook: one factor per term (1.0 where no plugin says otherwise).
    pub fn loss_weights(&mut self, info: &MicroBatchInfo, terms: &[LossTerm]) -> Vec<f64> {
        let mut factors = vec![1.0; terms.len()];
        for p in self.implementing(Hook::LossWeights) {
            let answer = p.call(
                "loss-weights",
                |api, store| api.lorahost_plugin_loss_hook().call_loss_weights(store, *info, terms),
                |a| validate_weights(a.as_deref().unwrap_or(&[]), terms),
            );
            for w in answer.flatten().unwrap_or_default() {
                if let Some(i) = terms.iter().position(|t| t.name == w.name) {
                    factors[i] *= w.factor;
                }
            }
        }
        factors
    }

    /// Data-sampling hook at an epoch start: the visit order, or None for the host's own.
    pub fn epoch_order(&mut self, epoch: u32, samples: &[SampleMeta]) -> Option<Vec<u32>> {
        let n = samples.len();
        for p in self.implementing(Hook::DataSampling) {
            let answer = p.call(
                "epoch-order",
                |api, store| api.lorahost_plugin_sampling_hook().call_epoch_order(store, epoch, samples),
                |a| match a {
                    Some(order) => validate_indices(order, n, n as u32),
                    None => Ok(()),
                },
            );
            if let Some(Some(order)) = answer {
                return Some(order);
            }
        }
        None
    }

    /// Data-sampling hook before a micro-batch: its indices, or None to use the epoch order.
    pub fn next_batch(&mut self, request: &BatchRequest) -> Option<Vec<u32>> {
        for p in self.implementing(Hook::DataSampling) {
            let answer = p.call(
                "next-batch",
                |api, store| api.lorahost_plugin_sampling_hook().call_next_batch(store, *request),
                |a| match a {
                    Some(ids) => validate_indices(ids, request.batch_size as usize, request.dataset_size),
                    None => Ok(()),
                },
            );
            if let Some(Some(ids)) = answer {
                return Some(ids);
            }
        }
        None
    }

    /// Data-sampling feedback after a micro-batch.
    pub fn observe(&mut self, indices: &[u32], losses: &[f64]) {
        for p in self.implementing(Hook::DataSampling) {
            p.call(
                "observe",
                |api, store| api.lorahost_plugin_sampling_hook().call_observe(store, indices, losses),
                |_| Ok(()),
            );
        }
    }

    /// Wait (up to `timeout`) until the reloader has something for the next step boundary.
    /// For tests and tools; training never waits.
    pub fn wait_for_reload(&self, timeout: Duration) -> bool {
        match &self.reloader {
            Some(r) => r.wait(timeout),
            None => false,
        }
    }
}

fn validate_indices(ids: &[u32], expected_len: usize, bound: u32) -> Result<(), String> {
    if ids.len() != expected_len {
        return Err(format!("{} indices, expected exactly {expected_len}", ids.len()));
    }
    if let Some((pos, bad)) = ids.iter().enumerate().find(|(_, &i)| i >= bound) {
        return Err(format!("index {bad} at position {pos} is out of range (dataset has {bound} samples)"));
    }
    Ok(())
}

fn validate_weights(weights: &[TermWeight], terms: &[LossTerm]) -> Result<(), String> {
    let mut seen: Vec<&str> = Vec::new();
    for w in weights {
        if !terms.iter().any(|t| t.name == w.name) {
            let known: Vec<&str> = terms.iter().map(|t| t.name.as_str()).collect();
            return Err(format!(
                "unknown loss term {:?} (terms: {})",
                runtime::truncate(&w.name, 64),
                known.join(", ")
            ));
        }
        if seen.contains(&w.name.as_str()) {
            return Err(format!("loss term {:?} weighted twice", w.name));
        }
        seen.push(&w.name);
        if !(w.factor.is_finite() && w.factor >= 0.0 && w.factor <= MAX_WEIGHT_FACTOR) {
            return Err(format!(
                "factor {} for {:?} is not a finite value in [0, {MAX_WEIGHT_FACTOR}]",
                w.factor, w.name
            ));
        }
    }
    Ok(())
}

/// "step-metrics, lr-schedule" for a manifest.
pub fn hook_list(m: &Manifest) -> String {
    if m.hooks.is_empty() {
        return "none".into();
    }
    m.hooks.iter().map(|h| h.wit_name()).collect::<Vec<_>>().join(", ")
}

/// Load a single plugin for inspection (`plugin check`): compile, validate, describe, init.
pub fn check(runtime: Arc<Runtime>, spec: &PluginSpec, run: &RunInfo) -> Result<LoadedPlugin, PluginError> {
    let config = serde_json::to_string(&spec.config).unwrap_or_else(|_| "{}".into());
    LoadedPlugin::load(runtime, &spec.path, config, run.clone(), spec.limits)
}
