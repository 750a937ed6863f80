//! Host-side bindings of the `lorahost:plugin@0.1.0` world (`wit/lorahost-plugin.wit`).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
});

pub use self::lorahost::plugin::types::{
    Action, BatchRequest, GradGroup, GradReport, GradVerdict, Hook, LossTerm, LrRequest, Manifest,
    MicroBatchInfo, NamedValue, RunInfo, SampleMeta, StepMetrics, TermWeight,
};

/// The contract's package id, as printed to users.
pub const CONTRACT: &str = "lorahost:plugin@0.1.0";

impl Hook {
    /// Every hook point, in contract order.
    pub const ALL: [Hook; 5] =
        [Hook::StepMetrics, Hook::GradInspect, Hook::LrSchedule, Hook::LossWeights, Hook::DataSampling];

    /// The hook's name as written in the WIT and in logs.
    pub fn wit_name(self) -> &'static str {
        match self {
            Hook::StepMetrics => "step-metrics",
            Hook::GradInspect => "grad-inspect",
            Hook::LrSchedule => "lr-schedule",
            Hook::LossWeights => "loss-weights",
            Hook::DataSampling => "data-sampling",
        }
    }
}

impl Action {
    /// The action's name in `plugin replay --json` and in the metrics log.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Continue => "continue",
            Action::Skip(_) => "skip",
            Action::ScaleLr(_) => "scale_lr",
            Action::Checkpoint => "checkpoint",
            Action::Stop(_) => "stop",
        }
    }

    /// How severe an action is when several plugins answer: the most severe one is what the
    /// step reports (stop > skip > scale_lr > checkpoint > continue).
    pub fn severity(&self) -> u8 {
        match self {
            Action::Continue => 0,
            Action::Checkpoint => 1,
            Action::ScaleLr(_) => 2,
            Action::Skip(_) => 3,
            Action::Stop(_) => 4,
        }
    }
}

impl RunInfo {
    /// A run description for tools that have no real run (replay, check): values the plugin
    /// can live with.
    pub fn placeholder() -> Self {
        RunInfo {
            total_steps: 0,
            warmup_steps: 0,
            accumulation: 1,
            batch_size: 1,
            effective_batch_size: 1,
            base_lr: 0.0,
            scheduler: "constant".into(),
            dataset_size: 0,
            steps_per_epoch: 0,
            seed: 0,
            start_step: 1,
        }
    }

    /// A typical run, for `plugin check`: 1,000 optimizer steps of batch 2 × accumulation 8
    /// over 1,000 images (63 steps per epoch), 50 warmup steps, cosine from 1e-4, seed 42.
    pub fn sample() -> Self {
        RunInfo {
            total_steps: 1000,
            warmup_steps: 50,
            accumulation: 8,
            batch_size: 2,
            effective_batch_size: 16,
            base_lr: 1e-4,
            scheduler: "cosine".into(),
            dataset_size: 1000,
            steps_per_epoch: 63,
            seed: 42,
            start_step: 1,
        }
    }
}
