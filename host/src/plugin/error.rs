//! Typed errors of the plugin runtime.

use std::path::PathBuf;

/// Why a plugin could not be loaded, validated or started.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The plugin file could not be read.
    #[error("cannot read plugin {path}: {error}{hint}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error (in the message, not a separate cause: printed once).
        error: std::io::Error,
        /// What to do about it.
        hint: String,
    },
    /// The bytes are not a loadable component.
    #[error("{path} is not a valid plugin: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The component does not implement the contract (missing exports, unknown imports).
    #[error("{path} does not implement {contract}: {reason}\n  fix: build it against the wit/ folder of this lorahost (e.g. `lorahost plugin new` scaffolds one)")]
    Contract {
        /// The file.
        path: PathBuf,
        /// The contract id.
        contract: &'static str,
        /// What does not match.
        reason: String,
    },
    /// `describe` answered something unusable.
    #[error("{path}: bad manifest from describe(): {reason}")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `init` failed (returned an error, trapped or ran out of budget).
    #[error("plugin {name} ({path}) failed to initialize: {reason}{}", config_hint(name, reason))]
    Init {
        /// The plugin's name.
        name: String,
        /// The file.
        path: PathBuf,
        /// The plugin's error or the trap.
        reason: String,
    },
    /// Two plugins with the same name.
    #[error("two plugins are named {name}: {first} and {second}; plugin names must be unique")]
    Duplicate {
        /// The shared name.
        name: String,
        /// First file.
        first: PathBuf,
        /// Second file.
        second: PathBuf,
    },
    /// The wasmtime engine could not be set up.
    #[error("plugin runtime: {0}")]
    Engine(String),
}

impl PluginError {
    pub(crate) fn engine(e: wasmtime::Error) -> Self {
        PluginError::Engine(format!("{e:#}"))
    }
}

/// The fix for an `init` failure caused by the plugin's config section.
fn config_hint(name: &str, reason: &str) -> String {
    if reason.contains("plugin config") {
        format!(
            "\n  fix: the `{name}` config section (from --plugin-config FILE, --set {name}.KEY=VALUE, or the `config:` of its entry under `plugins:` in the training YAML)"
        )
    } else {
        String::new()
    }
}
