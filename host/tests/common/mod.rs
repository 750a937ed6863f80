//! Shared test helpers: build the plugin workspace (once per test binary) and find its outputs.
#![allow(dead_code)]

use lorahost::plugin::{LossTerm, PluginSet, PluginSpec, RunInfo, Runtime, StepMetrics};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Build every plugin (reference and test plugins) for wasm32-wasip2 and return the output dir.
pub fn plugins_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = repo().join("plugins");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
            .arg(root.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(root.join("target"))
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .output()
            .expect("cannot run cargo to build the plugins");
        assert!(
            out.status.success(),
            "building the plugins failed (is the target installed? `rustup target add wasm32-wasip2`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        root.join("target/wasm32-wasip2/release")
    })
    .clone()
}

/// Path of a built plugin by crate name.
pub fn plugin(name: &str) -> PathBuf {
    let p = plugins_dir().join(format!("{name}.wasm"));
    assert!(p.exists(), "{} was not built", p.display());
    p
}

/// The tests' compile cache: under cargo's scratch folder for integration tests (kept with
/// `target/`, shared by the test binaries and runs; entries are written atomically), not one
/// folder per process left behind in the system's temp folder.
pub fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("component-cache")
}

/// A runtime with the tests' compile cache.
pub fn runtime() -> Arc<Runtime> {
    Runtime::new(Some(cache_dir())).unwrap()
}

/// A plausible run.
pub fn run_info() -> RunInfo {
    RunInfo {
        total_steps: 100,
        warmup_steps: 10,
        accumulation: 2,
        batch_size: 2,
        effective_batch_size: 4,
        base_lr: 1e-4,
        scheduler: "cosine".into(),
        dataset_size: 20,
        steps_per_epoch: 5,
        seed: 7,
        start_step: 1,
    }
}

/// Metrics of a quiet step.
pub fn metrics(step: u64, loss: f64) -> StepMetrics {
    StepMetrics {
        step,
        micro_steps: 2,
        epoch: ((step - 1) / 5) as u32,
        total_steps: 100,
        warmup_steps: 10,
        loss,
        losses: terms(),
        lr: 1e-4 * (step.min(10) as f64 / 10.0),
        grad_norm: 1.0,
        grad_norm_clipped: 1.0,
        batch_size: 4,
        object_count: 9,
        step_time_ms: 100.0,
        memory_bytes: 1 << 30,
        extra: vec![],
    }
}

/// Two loss terms.
pub fn terms() -> Vec<LossTerm> {
    vec![
        LossTerm { name: "loss_mask".into(), value: 0.5, weight: 200.0 },
        LossTerm { name: "loss_dice".into(), value: 0.3, weight: 10.0 },
    ]
}

/// Load a set of (crate name, config) plugins.
pub fn load(plugins: &[(&str, serde_json::Value)]) -> PluginSet {
    let specs: Vec<PluginSpec> =
        plugins.iter().map(|(n, c)| PluginSpec { config: c.clone(), ..PluginSpec::new(plugin(n)) }).collect();
    PluginSet::load(runtime(), &specs, &run_info()).unwrap()
}

/// The value of an emitted metric, if any.
pub fn metric(ms: &[(String, f64)], name: &str) -> Option<f64> {
    ms.iter().rev().find(|(n, _)| n == name).map(|(_, v)| *v)
}

/// Run `f` on another thread and fail (instead of hanging) after `secs`.
pub fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("did not finish within {secs} s: the host hung"))
}
