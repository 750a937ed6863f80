//! `lorahost plugin new NAME`: a plugin crate that builds as-is.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The SDK directory compiled into this binary (the repo's `plugins/sdk`), if it still exists.
pub fn default_sdk_dir() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk");
    p.join("Cargo.toml").exists().then(|| std::fs::canonicalize(&p).unwrap_or(p))
}

/// `spike_guard` -> `SpikeGuard`.
fn type_name(name: &str) -> String {
    name.split(['_', '-'])
        .filter(|s| !s.is_empty())
        .map(|s| {
            let mut c = s.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect()
}

/// Create `parent/name` with a minimal plugin. Returns the crate directory.
pub fn new_plugin(name: &str, parent: &Path, sdk: Option<&Path>) -> Result<PathBuf> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        bail!("plugin name {name:?} must be snake_case: lower-case letters, digits and '_', starting with a letter (e.g. `my_scheduler`)");
    }
    let sdk = match sdk {
        Some(p) => p.to_path_buf(),
        None => default_sdk_dir().context(
            "cannot find the lorahost-plugin SDK; pass --sdk PATH (the plugins/sdk folder of the lorahost repository)",
        )?,
    };
    if !sdk.join("Cargo.toml").exists() {
        bail!(
            "{} is not the lorahost-plugin SDK (no Cargo.toml there); pass --sdk PATH to plugins/sdk",
            sdk.display()
        );
    }
    let sdk = std::fs::canonicalize(&sdk).unwrap_or(sdk);
    let dir = parent.join(name);
    if dir.exists() {
        bail!("{} already exists; choose another name or remove it", dir.display());
    }
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("cannot create {}", dir.display()))?;
    let cargo = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
description = "A lorahost training plugin"

[lib]
crate-type = ["cdylib"]

[dependencies]
lorahost-plugin = {{ path = "{sdk}" }}
serde = {{ version = "1", features = ["derive"] }}

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
strip = true
panic = "abort"

# A standalone crate, not part of an enclosing workspace.
[workspace]
"#,
        sdk = sdk.display().to_string().replace('\\', "/")
    );
    let ty = type_name(name);
    let lib = format!(
        r#"//! {name}: a lorahost plugin.
//!
//! Build:  cargo build --release --target wasm32-wasip2
//! Check:  lorahost plugin check target/wasm32-wasip2/release/{name}.wasm
//! Try it: lorahost plugin replay target/wasm32-wasip2/release/{name}.wasm --trace METRICS.jsonl
use lorahost_plugin::{{decode_state, encode_state, export_plugin, host, Action, Config, Hook, Plugin, RunInfo, StepMetrics}};
use serde::{{Deserialize, Serialize}};

/// Config keys (the plugin's section in the training YAML); unknown keys are an error.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Settings {{
    /// Stop when the loss falls below this value (0 = never).
    stop_below: f64,
}}

impl Default for Settings {{
    fn default() -> Self {{
        Settings {{ stop_below: 0.0 }}
    }}
}}

/// Everything that must survive a hot reload or a resume goes in here.
#[derive(Default, Serialize, Deserialize)]
struct State {{
    best_loss: Option<f64>,
}}

struct {ty} {{
    settings: Settings,
    state: State,
}}

impl Plugin for {ty} {{
    const NAME: &'static str = "{name}";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str = "tracks the best loss and stops below a target";
    // List exactly the hooks you implement; the host calls only these.
    const HOOKS: &'static [Hook] = &[Hook::StepMetrics];

    fn init(config: &Config, _run: &RunInfo) -> Result<Self, String> {{
        Ok(Self {{ settings: config.parse()?, state: State::default() }})
    }}

    fn snapshot(&self) -> Vec<u8> {{
        encode_state(&self.state)
    }}

    fn restore(&mut self, state: &[u8]) -> Result<(), String> {{
        self.state = decode_state(state)?;
        Ok(())
    }}

    fn on_step(&mut self, m: &StepMetrics) -> Action {{
        let best = self.state.best_loss.map_or(m.loss, |b| b.min(m.loss));
        self.state.best_loss = Some(best);
        host::emit_metrics(&[("best_loss", best)]);
        if self.settings.stop_below > 0.0 && m.loss < self.settings.stop_below {{
            host::info(&format!("loss {{:.4}} is below {{}}", m.loss, self.settings.stop_below));
            return Action::Stop(format!("loss reached {{:.4}}", m.loss));
        }}
        Action::Continue
    }}
}}

export_plugin!({ty});
"#
    );
    std::fs::write(dir.join("Cargo.toml"), cargo)?;
    std::fs::write(dir.join("src/lib.rs"), lib)?;
    std::fs::write(dir.join(".gitignore"), "/target\n")?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(type_name("spike_guard"), "SpikeGuard");
        assert_eq!(type_name("x"), "X");
        let tmp = std::env::temp_dir();
        assert!(new_plugin("Bad-Name", &tmp, None).is_err());
        assert!(new_plugin("", &tmp, None).is_err());
    }
}
