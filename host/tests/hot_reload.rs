//! Hot reload: replacing a plugin file mid-run swaps the new version in at the next step
//! boundary with its state carried over; a broken replacement leaves the old one running.
mod common;

use common::*;
use lorahost::plugin::{Action, PluginEvent, PluginSet, PluginSpec};
use std::path::Path;
use std::time::Duration;

/// Replace `dst` the way compilers do: write a temp file, then rename it over.
fn replace(dst: &Path, bytes: &[u8]) {
    let tmp = dst.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

fn step(set: &mut PluginSet, n: u64) -> (Action, Option<f64>, Option<f64>) {
    set.step_boundary();
    let d = set.on_step(&metrics(n, 1.0));
    let ms = set.take_metrics();
    (d.action, metric(&ms, "plugin.reload_probe.seen"), metric(&ms, "plugin.reload_probe.version"))
}

fn wait_reload(set: &PluginSet) {
    assert!(set.wait_for_reload(Duration::from_secs(30)), "no reload within 30 s of the file change");
}

#[test]
fn replaced_plugin_takes_over_at_the_next_step_with_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("probe.wasm");
    std::fs::copy(plugin("reload_v1"), &live).unwrap();
    let v2 = std::fs::read(plugin("reload_v2")).unwrap();

    let mut set = PluginSet::load(runtime(), &[PluginSpec::new(&live)], &run_info()).unwrap();
    set.enable_hot_reload().unwrap();
    for n in 1..=3 {
        let (a, seen, version) = step(&mut set, n);
        assert!(matches!(a, Action::Continue));
        assert_eq!((seen, version), (Some(n as f64), Some(1.0)));
    }

    // A new version arrives while training runs.
    replace(&live, &v2);
    wait_reload(&set);
    let (a, seen, version) = step(&mut set, 4);
    assert!(matches!(a, Action::ScaleLr(f) if f == 0.5), "new behaviour from the next step, got {a:?}");
    assert_eq!(version, Some(2.0));
    assert_eq!(seen, Some(4.0), "state carried over from v1");
    let events = set.take_events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, PluginEvent::Reloaded { from_version, to_version, state_carried: true, .. }
            if from_version == "1.0.0" && to_version == "2.0.0")),
        "{events:?}"
    );

    // A broken replacement is rejected and v2 keeps running.
    replace(&live, b"\0asm\x0d\0\x01\0 definitely not a component");
    wait_reload(&set);
    let (a, seen, version) = step(&mut set, 5);
    assert!(matches!(a, Action::ScaleLr(_)), "old version must keep running, got {a:?}");
    assert_eq!((seen, version), (Some(5.0), Some(2.0)));
    let events = set.take_events();
    assert!(events.iter().any(|e| matches!(e, PluginEvent::ReloadRejected { .. })), "{events:?}");

    // Writing in place (truncate + write, as some editors do) also reloads.
    std::fs::write(&live, std::fs::read(plugin("reload_v1")).unwrap()).unwrap();
    wait_reload(&set);
    let (a, seen, version) = step(&mut set, 6);
    assert!(matches!(a, Action::Continue), "{a:?}");
    assert_eq!((seen, version), (Some(6.0), Some(1.0)));
}

#[test]
fn touching_a_file_without_changing_it_does_not_reload() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("probe.wasm");
    let bytes = std::fs::read(plugin("reload_v1")).unwrap();
    std::fs::write(&live, &bytes).unwrap();
    let mut set = PluginSet::load(runtime(), &[PluginSpec::new(&live)], &run_info()).unwrap();
    set.enable_hot_reload().unwrap();
    step(&mut set, 1);
    replace(&live, &bytes);
    assert!(!set.wait_for_reload(Duration::from_secs(2)), "same content must not trigger a reload");
    step(&mut set, 2);
    assert!(set.take_events().iter().all(|e| !matches!(e, PluginEvent::Reloaded { .. })));
}
