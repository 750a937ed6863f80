//! Plugin runtime benchmarks: `cargo bench --bench plugins` (build the plugins first:
//! `cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml`).
//!
//! Measures, with numbers recorded in BENCHMARKS.md:
//! 1. component compile time, cold (no cache) and cached (deserialized from the disk cache);
//! 2. hook-call overhead per optimizer step with all reference plugins loaded;
//! 3. hot-reload latency from the file write (rename) to the new version being active.

use lorahost::plugin::{
    BatchRequest, GradGroup, GradReport, LossTerm, LrRequest, MicroBatchInfo, PluginEvent, PluginSet,
    PluginSpec, RunInfo, Runtime, SampleMeta, StepMetrics,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn plugins_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/wasm32-wasip2/release")
}

fn wasm(name: &str) -> PathBuf {
    let p = plugins_dir().join(format!("{name}.wasm"));
    if !p.exists() {
        eprintln!(
            "{} missing: build the plugins first (cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml)",
            p.display()
        );
        std::process::exit(2);
    }
    p
}

const REFERENCE: [&str; 4] = ["spike_guard", "warmup_validator", "balanced_sampler", "cosine_schedule"];

fn run_info() -> RunInfo {
    RunInfo {
        total_steps: 100_000,
        warmup_steps: 100,
        accumulation: 4,
        batch_size: 2,
        effective_batch_size: 8,
        base_lr: 1e-4,
        scheduler: "cosine".into(),
        dataset_size: 1000,
        steps_per_epoch: 125,
        seed: 1,
        start_step: 1,
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn compile_times() {
    println!("## Component compile time");
    println!("| plugin | size | cold compile (median of 5) | cached load (median of 5) |");
    println!("|---|---|---|---|");
    for name in REFERENCE {
        let bytes = std::fs::read(wasm(name)).unwrap();
        let cold_rt = Runtime::new(None).unwrap();
        let cold: Vec<f64> = (0..5)
            .map(|_| cold_rt.compile(&bytes, Path::new(name)).unwrap().1.elapsed.as_secs_f64() * 1e3)
            .collect();
        let cache = tempfile::tempdir().unwrap();
        let rt = Runtime::new(Some(cache.path().to_path_buf())).unwrap();
        rt.compile(&bytes, Path::new(name)).unwrap();
        let cached: Vec<f64> = (0..5)
            .map(|_| {
                let (_, info) = rt.compile(&bytes, Path::new(name)).unwrap();
                assert!(info.cached);
                info.elapsed.as_secs_f64() * 1e3
            })
            .collect();
        println!(
            "| {name} | {:.0} KiB | {:.1} ms | {:.2} ms |",
            bytes.len() as f64 / 1024.0,
            median(cold),
            median(cached)
        );
    }
}

fn metrics(step: u64) -> StepMetrics {
    StepMetrics {
        step,
        micro_steps: 4,
        epoch: (step / 125) as u32,
        total_steps: 100_000,
        warmup_steps: 100,
        loss: 1.0 + 0.05 * ((step as f64) * 0.7).sin(),
        losses: terms(),
        lr: 1e-4,
        grad_norm: 1.0 + 0.1 * ((step as f64) * 1.3).cos(),
        grad_norm_clipped: 1.0,
        batch_size: 8,
        object_count: 20,
        step_time_ms: 500.0,
        memory_bytes: 20 << 30,
        extra: vec![],
    }
}

fn terms() -> Vec<LossTerm> {
    ["loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice", "presence_loss"]
        .iter()
        .map(|n| LossTerm { name: (*n).into(), value: 0.5, weight: 1.0 })
        .collect()
}

fn hook_overhead() {
    let runtime = Runtime::new(None).unwrap();
    let specs: Vec<PluginSpec> = REFERENCE.iter().map(|n| PluginSpec::new(wasm(n))).collect();
    let mut set = PluginSet::load(runtime, &specs, &run_info()).unwrap();
    let samples: Vec<SampleMeta> = (0..1000)
        .map(|i| SampleMeta {
            index: i,
            object_count: i % 17,
            categories: vec![i % 5],
            last_loss: f64::NAN,
            times_seen: 0,
        })
        .collect();
    let t = Instant::now();
    set.epoch_order(0, &samples).unwrap();
    let epoch_ms = t.elapsed().as_secs_f64() * 1e3;
    let groups: Vec<GradGroup> = ["vision", "text", "geometry", "encoder", "decoder", "mask"]
        .iter()
        .map(|n| GradGroup { name: (*n).into(), l2_norm: 0.3, max_abs: 0.01, nonfinite: 0, numel: 1 << 20 })
        .collect();
    let steps = 5_000u64;
    let mut per_step = Vec::new();
    let mut boundary = Vec::new();
    for step in 1..=steps {
        let t0 = Instant::now();
        set.step_boundary();
        let t1 = Instant::now();
        for micro in 0..4 {
            let req = BatchRequest { step, micro_step: micro, epoch: 0, batch_size: 2, dataset_size: 1000 };
            let _ = set.next_batch(&req);
            let _ = set.loss_weights(&MicroBatchInfo { step, micro_step: micro, epoch: 0 }, &terms());
            set.observe(&[1, 2], &[0.4, 0.6]);
        }
        let _ = set.on_grads(&GradReport { step, total_norm: 1.0, max_norm: 1.0, groups: groups.clone() });
        let _ = set.lr_for_step(&LrRequest {
            step,
            total_steps: 100_000,
            warmup_steps: 100,
            base_lr: 1e-4,
            scheduled_lr: 1e-4,
            last_loss: 1.0,
        });
        let _ = set.on_step(&metrics(step));
        let _ = set.take_metrics();
        let t2 = Instant::now();
        boundary.push((t1 - t0).as_secs_f64() * 1e6);
        per_step.push((t2 - t0).as_secs_f64() * 1e6);
    }
    assert!(set.take_events().iter().all(|e| !matches!(e, PluginEvent::Failed { .. })));
    println!("\n## Hook-call overhead per optimizer step (all 4 reference plugins, accumulation 4)");
    println!("| what | median | p99 |");
    println!("|---|---|---|");
    let p99 = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() * 99 / 100]
    };
    println!(
        "| whole step: boundary (reload poll + 4 snapshots) + 4x(next-batch, loss-weights, observe) + on-grads + lr + on-step | {:.1} µs | {:.1} µs |",
        median(per_step.clone()),
        p99(per_step)
    );
    println!("| of which the step boundary | {:.1} µs | {:.1} µs |", median(boundary.clone()), p99(boundary));
    println!("| epoch-order over 1000 samples (once per epoch) | {epoch_ms:.2} ms | |");
}

fn reload_latency() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("probe.wasm");
    let v1 = std::fs::read(wasm("reload_v1")).unwrap();
    let v2 = std::fs::read(wasm("reload_v2")).unwrap();
    std::fs::write(&live, &v1).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(Some(cache.path().to_path_buf())).unwrap();
    let mut set = PluginSet::load(runtime, &[PluginSpec::new(&live)], &run_info()).unwrap();
    set.enable_hot_reload().unwrap();
    let mut latencies = Vec::new();
    for round in 0..10 {
        let bytes = if round % 2 == 0 { &v2 } else { &v1 };
        let tmp = dir.path().join("probe.tmp");
        std::fs::write(&tmp, bytes).unwrap();
        let t = Instant::now();
        std::fs::rename(&tmp, &live).unwrap();
        // A training loop that polls at every step boundary; here a step is 1 ms.
        loop {
            set.step_boundary();
            if set.take_events().iter().any(|e| matches!(e, PluginEvent::Reloaded { .. })) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "reload did not happen");
            std::thread::sleep(Duration::from_millis(1));
        }
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        eprintln!("reload round {round}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        // Let late file events of this round settle so they cannot serve the next one.
        std::thread::sleep(Duration::from_millis(600));
        set.step_boundary();
        set.take_events();
    }
    println!("\n## Hot-reload latency (rename of a new .wasm -> active at a step boundary, 1 ms steps)");
    println!(
        "median {:.0} ms, min {:.0} ms, max {:.0} ms over 10 reloads (includes the 200 ms debounce; rounds 3+ hit the compile cache)",
        median(latencies.clone()),
        latencies.iter().cloned().fold(f64::INFINITY, f64::min),
        latencies.iter().cloned().fold(0.0, f64::max)
    );
}

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    println!(
        "machine: {} cores; {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        cpu_model()
    );
    compile_times();
    hook_overhead();
    reload_latency();
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
