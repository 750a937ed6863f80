//! `lorahost plugin new NAME`: a plugin crate that builds as-is.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The SDK this binary was built with, embedded: `plugin new --vendor-sdk` (or a binary whose
/// source tree is gone) writes it into the new crate, which then builds anywhere.
const SDK_LIB: &str = include_str!("../../plugins/sdk/src/lib.rs");
const SDK_STATS: &str = include_str!("../../plugins/sdk/src/stats.rs");
const SDK_WIT: &str = include_str!("../../wit/lorahost-plugin.wit");
/// The SDK's dependencies (as in `plugins/Cargo.toml`'s `[workspace.dependencies]`).
const SDK_CARGO: &str = r#"[package]
name = "lorahost-plugin"
description = "SDK for lorahost training plugins (vendored by `lorahost plugin new`)"
version = "0.1.0"
edition = "2021"
license = "Apache-2.0"

[dependencies]
serde = { version = "1", features = ["derive"] }
serde_json = "1"
wit-bindgen = "0.61.1"
"#;
/// Where the vendored SDK goes inside the new crate.
const VENDORED: &str = "lorahost-plugin";

/// Write the embedded SDK (and the contract it implements) to `dir`.
fn write_vendored_sdk(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::create_dir_all(dir.join("wit"))?;
    // The repo's SDK reads the contract from the repo's wit/; the copy carries its own.
    let lib = SDK_LIB.replace(r#"path: "../../wit","#, r#"path: "wit","#);
    if lib == SDK_LIB {
        bail!("internal: the SDK's WIT path changed; update scaffold.rs");
    }
    std::fs::write(dir.join("Cargo.toml"), SDK_CARGO)?;
    std::fs::write(dir.join("src/lib.rs"), lib)?;
    std::fs::write(dir.join("src/stats.rs"), SDK_STATS)?;
    std::fs::write(dir.join("wit/lorahost-plugin.wit"), SDK_WIT)?;
    Ok(())
}

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

/// Why `name` (valid snake_case) would not build as the scaffold's crate, if it would not: a
/// Rust keyword or a crate name Cargo refuses, or a type name the template defines, imports
/// or uses from the prelude.
fn reserved(name: &str) -> Option<String> {
    const KEYWORDS: &[&str] = &[
        "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern",
        "false", "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref",
        "return", "self", "static", "struct", "super", "trait", "true", "type", "unsafe", "use", "where",
        "while", "abstract", "become", "box", "do", "final", "gen", "macro", "override", "priv", "try",
        "typeof", "unsized", "virtual", "yield",
    ];
    const CRATES: &[&str] = &["std", "core", "alloc", "proc_macro", "test", "lorahost_plugin", "wit_bindgen"];
    const TYPES: &[&str] = &[
        "Settings",
        "State",
        "Config",
        "Plugin",
        "Action",
        "Hook",
        "RunInfo",
        "StepMetrics",
        "Result",
        "Option",
        "Vec",
        "String",
        "Default",
        "Box",
        "Some",
        "None",
        "Ok",
        "Err",
    ];
    if KEYWORDS.contains(&name) {
        return Some("it is a Rust keyword".into());
    }
    if CRATES.contains(&name) {
        return Some(format!("a crate named `{name}` clashes with one the plugin builds with"));
    }
    let ty = type_name(name);
    TYPES
        .contains(&ty.as_str())
        .then(|| format!("the scaffold's type `{ty}` would clash with the template's or the SDK's `{ty}`"))
}

/// Where a new plugin gets its SDK from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdkSource {
    /// The repository's `plugins/sdk` this binary was built from when it still exists, else a
    /// vendored copy.
    Default,
    /// This SDK directory (a path dependency).
    Path(PathBuf),
    /// A copy of the SDK embedded in this binary, inside the new crate (`lorahost-plugin/`):
    /// the crate builds on any machine.
    Vendored,
}

/// Create `parent/name` with a minimal plugin. Returns the crate directory.
pub fn new_plugin(name: &str, parent: &Path, sdk: SdkSource) -> Result<PathBuf> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        bail!("plugin name {name:?} must be snake_case: lower-case letters, digits and '_', starting with a letter (e.g. `my_scheduler`)");
    }
    if let Some(why) = reserved(name) {
        bail!(
            "plugin name {name:?} cannot be used: {why}; pick another (e.g. `{name}_plugin` or `my_{name}`)"
        );
    }
    let sdk = match sdk {
        SdkSource::Path(p) => Some(p),
        SdkSource::Default => default_sdk_dir(),
        SdkSource::Vendored => None,
    };
    if let Some(sdk) = &sdk {
        if !sdk.join("Cargo.toml").exists() {
            bail!(
                "{} is not the lorahost-plugin SDK (no Cargo.toml there); pass --sdk PATH to plugins/sdk, or --vendor-sdk for a copy of the SDK inside the new crate",
                sdk.display()
            );
        }
        // The repo's SDK reads the contract from the repo's wit/ and its versions from the
        // plugin workspace: a copied SDK folder does not build on its own.
        if !sdk.join("../../wit/lorahost-plugin.wit").exists() {
            bail!(
                "{} is not inside a lorahost repository (no ../../wit/lorahost-plugin.wit beside it), so it does not build on its own; use --vendor-sdk for a self-contained copy of the SDK inside the new crate",
                sdk.display()
            );
        }
    }
    let sdk = sdk.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
    let dir = parent.join(name);
    if dir.exists() {
        bail!("{} already exists; choose another name or remove it", dir.display());
    }
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("cannot create {}", dir.display()))?;
    let sdk_dep = match &sdk {
        Some(p) => p.display().to_string().replace('\\', "/"),
        None => {
            write_vendored_sdk(&dir.join(VENDORED))
                .with_context(|| format!("writing the SDK into {}", dir.join(VENDORED).display()))?;
            VENDORED.to_string()
        }
    };
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
        sdk = sdk_dep
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
        assert!(new_plugin("Bad-Name", &tmp, SdkSource::Default).is_err());
        assert!(new_plugin("", &tmp, SdkSource::Default).is_err());
        // Names whose crate would not build: a keyword, a clashing crate, a clashing type.
        for name in ["self", "fn", "std", "settings", "state", "config", "step_metrics", "run_info", "result"]
        {
            let e = new_plugin(name, &tmp, SdkSource::Default).unwrap_err().to_string();
            assert!(e.contains("cannot be used"), "{name}: {e}");
        }
        assert!(reserved("my_scheduler").is_none() && reserved("settings_guard").is_none());
    }

    /// The vendored SDK declares the versions the plugin workspace builds the SDK with.
    #[test]
    fn vendored_sdk_matches_the_plugin_workspace() {
        let ws = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/Cargo.toml"))
            .unwrap();
        for dep in SDK_CARGO.lines().skip_while(|l| *l != "[dependencies]").skip(1).filter(|l| !l.is_empty())
        {
            assert!(ws.contains(dep), "plugins/Cargo.toml has no `{dep}`: update SDK_CARGO");
        }
        let sdk =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk/Cargo.toml"))
                .unwrap();
        for dep in ["serde", "serde_json", "wit-bindgen"] {
            assert!(
                sdk.contains(&format!("{dep}.workspace")),
                "the SDK's dependencies changed: update SDK_CARGO"
            );
        }
        let src = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk/src"))
            .unwrap()
            .count();
        assert_eq!(src, 2, "the SDK has other source files now: embed them too");
        let tmp = tempfile::tempdir().unwrap();
        let krate = new_plugin("vendored_x", tmp.path(), SdkSource::Vendored).unwrap();
        let toml = std::fs::read_to_string(krate.join("Cargo.toml")).unwrap();
        assert!(toml.contains(r#"lorahost-plugin = { path = "lorahost-plugin" }"#), "{toml}");
        assert!(krate.join("lorahost-plugin/wit/lorahost-plugin.wit").is_file());
        // A copied SDK folder (outside a repository) is refused with the way out.
        let copy = tmp.path().join("sdk");
        std::fs::create_dir_all(&copy).unwrap();
        std::fs::write(copy.join("Cargo.toml"), "").unwrap();
        let e = new_plugin("y", tmp.path(), SdkSource::Path(copy)).unwrap_err().to_string();
        assert!(e.contains("--vendor-sdk"), "{e}");
    }
}
