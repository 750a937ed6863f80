//! The `lorahost` command line, run as a user would.
mod common;

use common::*;
use std::process::Command;

fn lorahost() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lorahost"));
    c.env(
        "LORAHOST_CACHE_DIR",
        std::env::temp_dir().join(format!("lorahost-cli-cache-{}", std::process::id())),
    );
    c
}

fn run(c: &mut Command) -> (bool, String, String) {
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_prints_what_the_plugin_is() {
    let (ok, out, err) = run(lorahost().args(["plugin", "check"]).arg(plugin("spike_guard")));
    assert!(ok, "{err}");
    assert!(out.contains("lorahost:plugin@0.1.0"), "{out}");
    assert!(out.contains("spike_guard") && out.contains("step-metrics"), "{out}");
    assert!(out.contains("compile"), "{out}");
    let (ok, out, _) = run(lorahost().args(["plugin", "check", "--json"]).arg(plugin("cosine_schedule")));
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["name"], "cosine_schedule");
    assert_eq!(v["hooks"], serde_json::json!(["lr-schedule"]));
}

#[test]
fn check_rejects_broken_files_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.wasm");
    std::fs::write(&bad, b"garbage").unwrap();
    let (ok, _, err) = run(lorahost().args(["plugin", "check"]).arg(&bad));
    assert!(!ok);
    assert!(err.contains("broken.wasm") && err.contains("not a WebAssembly component"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // --json answers on stdout either way.
    let (ok, out, _) = run(lorahost().args(["plugin", "check", "--json"]).arg(&bad));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!ok && v["ok"] == false && v["error"].as_str().unwrap().contains("not a WebAssembly component"));
    let (ok, _, err) = run(lorahost().args(["plugin", "check", "nope.wasm"]));
    assert!(!ok && err.contains("nope.wasm") && err.contains("not found"), "{err}");
}

#[test]
fn replay_json_reports_step_and_action() {
    let trace = repo().join("examples/traces/diagnosis.jsonl");
    let (ok, out, err) = run(lorahost()
        .args(["plugin", "replay"])
        .arg(plugin("spike_guard"))
        .arg(plugin("warmup_validator"))
        .arg("--trace")
        .arg(&trace)
        .arg("--json"));
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 16);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"], i as u64 + 1);
        let a = l["action"].as_str().unwrap();
        assert!(["continue", "skip", "scale_lr", "checkpoint", "stop"].contains(&a), "{a}");
    }
    assert_eq!(lines[3]["action"], "skip");
    assert_eq!(lines[3]["decided_by"], "spike_guard");
    assert!(lines.iter().enumerate().all(|(i, l)| i == 3 || l["action"] == "continue"), "{out}");
}

#[test]
fn replay_takes_plugin_config_from_the_command_line() {
    let trace = repo().join("examples/traces/diagnosis.jsonl");
    // Ask spike_guard to lower the LR instead of skipping.
    let (ok, out, err) = run(lorahost()
        .args(["plugin", "replay"])
        .arg(plugin("spike_guard"))
        .arg("--trace")
        .arg(&trace)
        .args(["--json", "--set", "spike_guard.action=scale_lr"]));
    assert!(ok, "{err}");
    let step4: serde_json::Value = serde_json::from_str(out.lines().nth(3).unwrap()).unwrap();
    assert_eq!(step4["action"], "scale_lr", "{out}");
    // A misspelled key is refused, naming it.
    let (ok, _, err) = run(lorahost()
        .args(["plugin", "replay"])
        .arg(plugin("spike_guard"))
        .arg("--trace")
        .arg(&trace)
        .args(["--set", "spike_guard.z_treshold=3"]));
    assert!(!ok && err.contains("z_treshold"), "{err}");
}

#[test]
fn replay_reports_a_bad_trace_line() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("run.jsonl");
    std::fs::write(&t, "{\"step\": 1, \"loss\": 1, \"lr\": 0.1, \"grad_norm\": 1}\n{\"step\": 2, oops}\n")
        .unwrap();
    let (ok, _, err) =
        run(lorahost().args(["plugin", "replay"]).arg(plugin("spike_guard")).arg("--trace").arg(&t));
    assert!(!ok);
    assert!(err.contains("run.jsonl:2"), "{err}");
}

#[test]
fn new_scaffolds_a_plugin_that_builds_and_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    // With the SDK vendored into the crate: what a third-party author gets, buildable anywhere.
    let (ok, out, err) =
        run(lorahost().args(["plugin", "new", "my_guard", "--vendor-sdk", "--dir"]).arg(dir.path()));
    assert!(ok, "{err}");
    assert!(out.contains("my_guard"));
    let krate = dir.path().join("my_guard");
    // Share the plugin workspace's compiled dependencies.
    let target = repo().join("plugins/target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .current_dir(&krate)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", String::from_utf8_lossy(&build.stderr));
    let wasm = target.join("wasm32-wasip2/release/my_guard.wasm");
    let (ok, out, err) = run(lorahost().args(["plugin", "check"]).arg(&wasm));
    assert!(ok, "{err}");
    assert!(out.contains("my_guard") && out.contains("step-metrics"), "{out}");
    // And it runs.
    let (ok, out, err) = run(lorahost()
        .args(["plugin", "replay"])
        .arg(&wasm)
        .arg("--trace")
        .arg(repo().join("examples/traces/diagnosis.jsonl"))
        .args(["--set", "my_guard.stop_below=150", "--json"]));
    assert!(ok, "{err}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!((last["step"].as_u64(), last["action"].as_str()), (Some(2), Some("stop")), "{out}");
    let _ = plugins_dir();
}
