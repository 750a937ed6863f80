// Shared body of the reload probes; `VERSION` and `V2` are defined by the including crate.
use lorahost_plugin::{decode_state, encode_state, export_plugin, host, Action, Config, Hook, Plugin, RunInfo, StepMetrics};

/// Counts the steps it has seen (state carried across reloads via snapshot/restore).
#[derive(Default)]
pub struct Probe {
    seen: u64,
}

impl Plugin for Probe {
    const NAME: &'static str = "reload_probe";
    const VERSION: &'static str = VERSION;
    const DESCRIPTION: &'static str = "test plugin: counts steps; v2 also halves the LR";
    const HOOKS: &'static [Hook] = &[Hook::StepMetrics];

    fn init(_config: &Config, _run: &RunInfo) -> Result<Self, String> {
        Ok(Self::default())
    }

    fn snapshot(&self) -> Vec<u8> {
        encode_state(&self.seen)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        self.seen = decode_state(state)?;
        Ok(())
    }

    fn on_step(&mut self, _m: &StepMetrics) -> Action {
        self.seen += 1;
        host::emit_metrics(&[("seen", self.seen as f64), ("version", if V2 { 2.0 } else { 1.0 })]);
        if V2 {
            Action::ScaleLr(0.5)
        } else {
            Action::Continue
        }
    }
}

export_plugin!(Probe);
