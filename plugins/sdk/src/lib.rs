//! # lorahost-plugin: write lorahost training plugins in Rust
//!
//! A plugin is a WebAssembly component (target `wasm32-wasip2`) that implements the
//! `lorahost:plugin@0.1.0` contract in `wit/lorahost-plugin.wit`. This crate hides the
//! bindings: implement [`Plugin`] (every hook has a no-op default), list the hooks you
//! implement in [`Plugin::HOOKS`], and call [`export_plugin!`].
//!
//! ```ignore
//! use lorahost_plugin::{export_plugin, Action, Config, Hook, Plugin, RunInfo, StepMetrics};
//!
//! #[derive(Default)]
//! struct StopAtLoss { target: f64 }
//!
//! impl Plugin for StopAtLoss {
//!     const NAME: &'static str = "stop_at_loss";
//!     const VERSION: &'static str = "0.1.0";
//!     const DESCRIPTION: &'static str = "stops once the loss is below a target";
//!     const HOOKS: &'static [Hook] = &[Hook::StepMetrics];
//!
//!     fn init(config: &Config, _run: &RunInfo) -> Result<Self, String> {
//!         Ok(Self { target: config.f64_or("target", 0.1)? })
//!     }
//!
//!     fn on_step(&mut self, m: &StepMetrics) -> Action {
//!         if m.loss < self.target { Action::Stop(format!("loss {} < {}", m.loss, self.target)) }
//!         else { Action::Continue }
//!     }
//! }
//!
//! export_plugin!(StopAtLoss);
//! ```
//!
//! The host calls a plugin from one thread, one call at a time. Each call runs under a CPU
//! and memory budget; a panic traps the call, the host answers the hook's default and
//! re-creates the plugin from its last [`Plugin::snapshot`].

use std::any::Any;
use std::cell::RefCell;

pub mod stats;

/// Generated bindings of the `plugin` world (used by [`export_plugin!`]).
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "lorahost_plugin::bindings",
    });
}

pub use bindings::lorahost::plugin::types::{
    Action, BatchRequest, GradGroup, GradReport, GradVerdict, Hook, LossTerm, LrRequest, Manifest,
    MicroBatchInfo, NamedValue, RunInfo, SampleMeta, StepMetrics, TermWeight,
};

/// A lorahost plugin. Implement the hooks you list in [`Plugin::HOOKS`]; the host never
/// calls the others, and their defaults answer "no change".
pub trait Plugin: Sized + 'static {
    /// Short unique name ("spike_guard").
    const NAME: &'static str;
    /// The plugin's version ("0.1.0").
    const VERSION: &'static str;
    /// One line saying what it does.
    const DESCRIPTION: &'static str;
    /// The hooks this plugin implements.
    const HOOKS: &'static [Hook];

    /// Create the plugin from its config section (a JSON object, `{}` when none) and the
    /// run's facts. An `Err` is shown to the user and disables the plugin.
    fn init(config: &Config, run: &RunInfo) -> Result<Self, String>;

    /// State to carry across hot reloads, crash recovery and checkpoints.
    /// See [`encode_state`] for a serde helper.
    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Restore a state produced by [`Plugin::snapshot`] (perhaps by an older version).
    /// An `Err` means "incompatible": the plugin keeps its fresh state.
    fn restore(&mut self, _state: &[u8]) -> Result<(), String> {
        Ok(())
    }

    /// After each optimizer step ([`Hook::StepMetrics`]).
    fn on_step(&mut self, _metrics: &StepMetrics) -> Action {
        Action::Continue
    }

    /// Before clipping and the update ([`Hook::GradInspect`]).
    fn on_grads(&mut self, _report: &GradReport) -> GradVerdict {
        GradVerdict::Accept
    }

    /// LR of the next optimizer step, `None` to defer ([`Hook::LrSchedule`]).
    fn lr_for_step(&mut self, _request: &LrRequest) -> Option<f64> {
        None
    }

    /// Weight multipliers for named loss terms, `None` to defer ([`Hook::LossWeights`]).
    fn loss_weights(&mut self, _info: &MicroBatchInfo, _terms: &[LossTerm]) -> Option<Vec<TermWeight>> {
        None
    }

    /// Visit order of an epoch: exactly `samples.len()` valid indices ([`Hook::DataSampling`]).
    fn epoch_order(&mut self, _epoch: u32, _samples: &[SampleMeta]) -> Option<Vec<u32>> {
        None
    }

    /// Indices of the next micro-batch: exactly `request.batch_size` ([`Hook::DataSampling`]).
    fn next_batch(&mut self, _request: &BatchRequest) -> Option<Vec<u32>> {
        None
    }

    /// Per-sample losses of the micro-batch just trained ([`Hook::DataSampling`]).
    fn observe(&mut self, _indices: &[u32], _losses: &[f64]) {}
}

/// A plugin's config section: a JSON object.
#[derive(Debug, Clone)]
pub struct Config {
    value: serde_json::Value,
}

impl Config {
    /// Parse the JSON the host passes to `init`.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(if text.trim().is_empty() { "{}" } else { text })
            .map_err(|e| format!("plugin config is not valid JSON: {e}"))?;
        if !(value.is_object() || value.is_null()) {
            return Err(format!("plugin config must be a mapping, got {value}"));
        }
        Ok(Self { value })
    }

    /// The raw JSON value.
    pub fn value(&self) -> &serde_json::Value {
        &self.value
    }

    /// Deserialize into a typed struct. Use `#[serde(default, deny_unknown_fields)]` on it
    /// so a misspelled key is an error that names the key.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        let v = if self.value.is_null() { serde_json::json!({}) } else { self.value.clone() };
        serde_json::from_value(v.clone()).map_err(|e| match culprit::<T>(&v) {
            Some(k) => format!("invalid plugin config: key `{k}`: {e}"),
            None => format!("invalid plugin config: {e}"),
        })
    }

    fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.value.get(key)
    }

    /// A number, or `default` when absent.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                .ok_or_else(|| format!("config key `{key}` must be a number, got {v}")),
        }
    }

    /// A boolean, or `default` when absent.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_bool().ok_or_else(|| format!("config key `{key}` must be true or false, got {v}"))
            }
        }
    }

    /// A string, or `default` when absent.
    pub fn str_or(&self, key: &str, default: &str) -> Result<String, String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("config key `{key}` must be a string, got {v}")),
        }
    }
}

/// Serialize plugin state for [`Plugin::snapshot`] (JSON, so states stay readable and
/// survive added fields with `#[serde(default)]`).
pub fn encode_state<T: serde::Serialize>(state: &T) -> Vec<u8> {
    serde_json::to_vec(state).unwrap_or_default()
}

/// Deserialize plugin state in [`Plugin::restore`]. An empty slice is an error.
pub fn decode_state<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("incompatible state: {e}"))
}

/// Logging and custom metrics through the host. Outside wasm (native unit tests) the
/// messages go to stderr and metrics are dropped.
pub mod host {
    pub use crate::bindings::lorahost::plugin::host::Level;
    use crate::NamedValue;

    /// Log a message at `level`; the host tags it with the plugin's name.
    pub fn log(level: Level, message: &str) {
        #[cfg(target_arch = "wasm32")]
        crate::bindings::lorahost::plugin::host::log(level, message);
        #[cfg(not(target_arch = "wasm32"))]
        eprintln!("[{level:?}] {message}");
    }

    /// Log at info level.
    pub fn info(message: &str) {
        log(Level::Info, message)
    }

    /// Log at warn level.
    pub fn warn(message: &str) {
        log(Level::Warn, message)
    }

    /// Record custom scalars (`plugin.<name>.<metric>` in the run's metrics).
    pub fn emit_metrics(values: &[(&str, f64)]) {
        let values: Vec<NamedValue> =
            values.iter().map(|(n, v)| NamedValue { name: (*n).to_string(), value: *v }).collect();
        #[cfg(target_arch = "wasm32")]
        crate::bindings::lorahost::plugin::host::emit_metrics(&values);
        #[cfg(not(target_arch = "wasm32"))]
        let _ = values;
    }
}

thread_local! {
    static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Glue between the generated bindings and a [`Plugin`]; used by [`export_plugin!`].
#[doc(hidden)]
pub struct Shim<P>(std::marker::PhantomData<P>);

impl<P: Plugin> Shim<P> {
    fn with<R>(default: R, f: impl FnOnce(&mut P) -> R) -> R {
        INSTANCE.with(|cell| {
            let mut slot = cell.borrow_mut();
            match slot.as_mut().and_then(|b| b.downcast_mut::<P>()) {
                Some(p) => f(p),
                None => default,
            }
        })
    }
}

use bindings::exports::lorahost::plugin as ex;

impl<P: Plugin> ex::lifecycle::Guest for Shim<P> {
    fn describe() -> Manifest {
        Manifest {
            name: P::NAME.to_string(),
            version: P::VERSION.to_string(),
            description: P::DESCRIPTION.to_string(),
            hooks: P::HOOKS.to_vec(),
        }
    }

    fn init(config: String, run: RunInfo) -> Result<(), String> {
        let config = Config::from_json(&config)?;
        let plugin = P::init(&config, &run)?;
        INSTANCE.with(|cell| *cell.borrow_mut() = Some(Box::new(plugin)));
        Ok(())
    }

    fn snapshot() -> Vec<u8> {
        Self::with(Vec::new(), |p| p.snapshot())
    }

    fn restore(state: Vec<u8>) -> Result<(), String> {
        Self::with(Err("restore called before init".to_string()), |p| p.restore(&state))
    }
}

impl<P: Plugin> ex::step_hook::Guest for Shim<P> {
    fn on_step(metrics: StepMetrics) -> Action {
        Self::with(Action::Continue, |p| p.on_step(&metrics))
    }
}

impl<P: Plugin> ex::grad_hook::Guest for Shim<P> {
    fn on_grads(report: GradReport) -> GradVerdict {
        Self::with(GradVerdict::Accept, |p| p.on_grads(&report))
    }
}

impl<P: Plugin> ex::lr_hook::Guest for Shim<P> {
    fn lr_for_step(request: LrRequest) -> Option<f64> {
        Self::with(None, |p| p.lr_for_step(&request))
    }
}

impl<P: Plugin> ex::loss_hook::Guest for Shim<P> {
    fn loss_weights(info: MicroBatchInfo, terms: Vec<LossTerm>) -> Option<Vec<TermWeight>> {
        Self::with(None, |p| p.loss_weights(&info, &terms))
    }
}

impl<P: Plugin> ex::sampling_hook::Guest for Shim<P> {
    fn epoch_order(epoch: u32, samples: Vec<SampleMeta>) -> Option<Vec<u32>> {
        Self::with(None, |p| p.epoch_order(epoch, &samples))
    }

    fn next_batch(request: BatchRequest) -> Option<Vec<u32>> {
        Self::with(None, |p| p.next_batch(&request))
    }

    fn observe(indices: Vec<u32>, losses: Vec<f64>) {
        Self::with((), |p| p.observe(&indices, &losses))
    }
}

/// Export a [`Plugin`] implementation as the component's `plugin` world.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        // Exported only in the wasm build: natively (unit tests) the component-model symbol
        // names are not valid linker symbols, and there is no host to call them.
        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        type __LorahostPluginShim = $crate::Shim<$plugin>;
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::__export_plugin_world!(__LorahostPluginShim with_types_in $crate::bindings);
    };
}

/// The first key of `v` that fails to deserialize into `T` on its own, when `T` has defaults for
/// every field (an empty mapping deserializes): serde_json's errors do not name the key.
fn culprit<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Option<String> {
    serde_json::from_value::<T>(serde_json::json!({})).ok()?;
    v.as_object()?
        .iter()
        .find(|(k, val)| {
            let one: serde_json::Map<String, serde_json::Value> =
                [((*k).clone(), (*val).clone())].into_iter().collect();
            serde_json::from_value::<T>(serde_json::Value::Object(one)).is_err()
        })
        .map(|(k, _)| k.clone())
}
