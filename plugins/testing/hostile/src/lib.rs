//! A deliberately misbehaving plugin for the host's robustness tests. Its config picks the
//! misbehaviour (`mode`), the hook that misbehaves (`hook`, default "on_step") and when
//! (`at_steps`: list of steps, empty = every step). Between misbehaviours it counts the
//! steps it saw (state that survives recovery through snapshot/restore).
use lorahost_plugin::{
    decode_state, encode_state, export_plugin, host, Action, BatchRequest, Config, GradReport, GradVerdict,
    Hook, LossTerm, LrRequest, MicroBatchInfo, Plugin, RunInfo, SampleMeta, StepMetrics, TermWeight,
};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    mode: String,
    hook: Option<String>,
    at_steps: Vec<u64>,
}

/// See the crate docs.
pub struct Hostile {
    mode: String,
    hook: String,
    at_steps: Vec<u64>,
    seen: u64,
    hoard: Vec<Vec<u8>>,
}

impl Hostile {
    fn armed(&self, hook: &str, step: u64) -> bool {
        self.hook == hook && (self.at_steps.is_empty() || self.at_steps.contains(&step))
    }

    /// The misbehaviours that do not depend on the hook's answer type.
    fn misbehave(&mut self) {
        match self.mode.as_str() {
            "loop" => {
                let mut x: u64 = 1;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            // Reserve (without touching) 16 MiB at a time: the memory cap, not the CPU
            // budget, must be what stops it.
            "memory_bomb" => loop {
                let mut chunk = Vec::with_capacity(16 << 20);
                chunk.push(1u8);
                self.hoard.push(chunk);
            },
            "trap" => panic!("hostile plugin traps on purpose"),
            "log_flood" => {
                let line = "x".repeat(1 << 20);
                for _ in 0..64 {
                    host::info(&line);
                }
                let many: Vec<(&str, f64)> = (0..10_000).map(|_| ("flood", 1.0)).collect();
                host::emit_metrics(&many);
            }
            _ => {}
        }
    }
}

impl Plugin for Hostile {
    const NAME: &'static str = "hostile";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str = "test plugin that misbehaves on purpose";
    const HOOKS: &'static [Hook] =
        &[Hook::StepMetrics, Hook::GradInspect, Hook::LrSchedule, Hook::LossWeights, Hook::DataSampling];

    fn init(config: &Config, _run: &RunInfo) -> Result<Self, String> {
        let s: Settings = config.parse()?;
        match s.mode.as_str() {
            "init_error" => return Err("hostile plugin refuses to start".into()),
            "init_trap" => panic!("hostile plugin traps in init"),
            "init_loop" => loop {
                std::hint::black_box(());
            },
            _ => {}
        }
        Ok(Self {
            mode: s.mode,
            hook: s.hook.unwrap_or_else(|| "on_step".into()),
            at_steps: s.at_steps,
            seen: 0,
            hoard: Vec::new(),
        })
    }

    fn snapshot(&self) -> Vec<u8> {
        encode_state(&self.seen)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        self.seen = decode_state(state)?;
        Ok(())
    }

    fn on_step(&mut self, m: &StepMetrics) -> Action {
        if self.armed("on_step", m.step) {
            self.misbehave();
            match self.mode.as_str() {
                "bad_scale" => return Action::ScaleLr(f64::NAN),
                "huge_reason" => return Action::Stop("y".repeat(8 << 20)),
                _ => {}
            }
        }
        self.seen += 1;
        host::emit_metrics(&[("seen", self.seen as f64)]);
        Action::Continue
    }

    fn on_grads(&mut self, r: &GradReport) -> GradVerdict {
        if self.armed("on_grads", r.step) {
            self.misbehave();
        }
        GradVerdict::Accept
    }

    fn lr_for_step(&mut self, r: &LrRequest) -> Option<f64> {
        if self.armed("lr_for_step", r.step) {
            self.misbehave();
            match self.mode.as_str() {
                "nan_lr" => return Some(f64::NAN),
                "negative_lr" => return Some(-1e-3),
                "inf_lr" => return Some(f64::INFINITY),
                _ => {}
            }
        }
        None
    }

    fn loss_weights(&mut self, info: &MicroBatchInfo, terms: &[LossTerm]) -> Option<Vec<TermWeight>> {
        if self.armed("loss_weights", info.step) {
            self.misbehave();
            match self.mode.as_str() {
                "unknown_term" => return Some(vec![TermWeight { name: "no_such_loss".into(), factor: 2.0 }]),
                "nan_weight" => {
                    return Some(
                        terms.iter().map(|t| TermWeight { name: t.name.clone(), factor: f64::NAN }).collect(),
                    )
                }
                "negative_weight" => {
                    return Some(
                        terms.iter().map(|t| TermWeight { name: t.name.clone(), factor: -1.0 }).collect(),
                    )
                }
                _ => {}
            }
        }
        None
    }

    fn epoch_order(&mut self, epoch: u32, samples: &[SampleMeta]) -> Option<Vec<u32>> {
        if self.armed("epoch_order", epoch as u64) {
            self.misbehave();
            let n = samples.len() as u32;
            match self.mode.as_str() {
                "bad_indices" => return Some((0..n).map(|i| i + n).collect()),
                "wrong_length" => return Some((0..n / 2).collect()),
                "huge_list" => return Some(vec![0; 16 << 20]),
                _ => {}
            }
        }
        None
    }

    fn next_batch(&mut self, r: &BatchRequest) -> Option<Vec<u32>> {
        if self.armed("next_batch", r.step) {
            self.misbehave();
            match self.mode.as_str() {
                "bad_indices" => return Some(vec![r.dataset_size; r.batch_size as usize]),
                "wrong_length" => return Some(vec![0; r.batch_size as usize + 1]),
                _ => {}
            }
        }
        None
    }
}

export_plugin!(Hostile);
