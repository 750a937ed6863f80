//! A test plugin that implements all five hooks and answers as its config says, so the host's
//! training tests can check that each answer takes effect: `lr` (a fixed LR from step
//! `lr_from`), `mask_factor` (a loss-weight factor for `loss_mask`), `veto_at` (grad-inspect
//! vetoes), `skip_at` / `stop_at` (step actions), `scale_lr` (a scale-lr factor answered at
//! every step), `reverse_epochs` (epoch order reversed),
//! `batch` (fixed indices for every micro-batch). It emits how often each hook was called (its
//! state) and the `base_lr` its `init` was given (`init_base_lr`).
use lorahost_plugin::{
    decode_state, encode_state, export_plugin, host, Action, BatchRequest, Config, GradReport, GradVerdict,
    Hook, LossTerm, LrRequest, MicroBatchInfo, Plugin, RunInfo, SampleMeta, StepMetrics, TermWeight,
};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    lr: Option<f64>,
    lr_from: u64,
    mask_factor: Option<f64>,
    veto_at: Vec<u64>,
    skip_at: Vec<u64>,
    stop_at: Option<u64>,
    scale_lr: Option<f64>,
    reverse_epochs: bool,
    batch: Option<Vec<u32>>,
}

/// See the crate docs.
pub struct Steer {
    s: Settings,
    /// Calls per hook: on_step, on_grads, lr, loss_weights, epoch_order, next_batch, observe.
    calls: [u64; 7],
    /// `run.base_lr` at `init`.
    init_base_lr: f64,
}

const NAMES: [&str; 7] =
    ["on_step", "on_grads", "lr", "loss_weights", "epoch_order", "next_batch", "observe"];

impl Plugin for Steer {
    const NAME: &'static str = "steer";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str = "test plugin that drives every hook";
    const HOOKS: &'static [Hook] =
        &[Hook::StepMetrics, Hook::GradInspect, Hook::LrSchedule, Hook::LossWeights, Hook::DataSampling];

    fn init(config: &Config, run: &RunInfo) -> Result<Self, String> {
        Ok(Self { s: config.parse()?, calls: [0; 7], init_base_lr: run.base_lr })
    }

    fn snapshot(&self) -> Vec<u8> {
        encode_state(&self.calls.to_vec())
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        let v: Vec<u64> = decode_state(state)?;
        for (c, x) in self.calls.iter_mut().zip(v) {
            *c = x;
        }
        Ok(())
    }

    fn on_step(&mut self, m: &StepMetrics) -> Action {
        self.calls[0] += 1;
        let mut metrics: Vec<(&str, f64)> =
            NAMES.iter().zip(self.calls).map(|(n, c)| (*n, c as f64)).collect();
        metrics.push(("init_base_lr", self.init_base_lr));
        host::emit_metrics(&metrics);
        if self.s.stop_at == Some(m.step) {
            return Action::Stop("steer: stop_at".into());
        }
        if self.s.skip_at.contains(&m.step) {
            return Action::Skip("steer: skip_at".into());
        }
        if let Some(f) = self.s.scale_lr {
            return Action::ScaleLr(f);
        }
        Action::Continue
    }

    fn on_grads(&mut self, r: &GradReport) -> GradVerdict {
        self.calls[1] += 1;
        if self.s.veto_at.contains(&r.step) {
            GradVerdict::Veto("steer: veto_at".into())
        } else {
            GradVerdict::Accept
        }
    }

    fn lr_for_step(&mut self, r: &LrRequest) -> Option<f64> {
        self.calls[2] += 1;
        self.s.lr.filter(|_| r.step >= self.s.lr_from)
    }

    fn loss_weights(&mut self, _info: &MicroBatchInfo, _terms: &[LossTerm]) -> Option<Vec<TermWeight>> {
        self.calls[3] += 1;
        self.s.mask_factor.map(|f| vec![TermWeight { name: "loss_mask".into(), factor: f }])
    }

    fn epoch_order(&mut self, _epoch: u32, samples: &[SampleMeta]) -> Option<Vec<u32>> {
        self.calls[4] += 1;
        self.s.reverse_epochs.then(|| (0..samples.len() as u32).rev().collect())
    }

    fn next_batch(&mut self, r: &BatchRequest) -> Option<Vec<u32>> {
        self.calls[5] += 1;
        self.s.batch.clone().filter(|b| b.len() == r.batch_size as usize)
    }

    fn observe(&mut self, _indices: &[u32], _losses: &[f64]) {
        self.calls[6] += 1;
    }
}

export_plugin!(Steer);
