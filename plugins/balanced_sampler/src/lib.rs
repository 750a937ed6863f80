//! # balanced_sampler: stratified epoch order, optionally importance-sampled by loss
//!
//! Hook: `data-sampling` (`epoch-order` and `observe`; `next-batch` defers to the epoch
//! order). Images with no objects and images with dozens of objects give very different
//! gradients; a plain shuffle can put long runs of one kind next to each other. Mixing
//! every stretch of the epoch in the dataset's proportions lowers gradient variance
//! (Zhao & Zhang 2014, "Accelerating minibatch SGD using stratified sampling").
//!
//! ## Epoch order
//!
//! 1. **Strata.** Samples are grouped by object-count bin: 0, 1, 2–4, 5–15, 16+. With
//!    `by_category`, also by dominant category (the smallest category id in the sample;
//!    samples with no category form their own group).
//! 2. **Shuffle** within each stratum with a generator seeded from `seed` (default: the
//!    run's seed) mixed with the epoch number: deterministic for a seed, different each
//!    epoch.
//! 3. **Interleave.** The k-th of the n_s samples of stratum s is due at fraction
//!    (k + 0.5) / n_s of the epoch; the samples are visited in order of that due fraction
//!    (ties in a per-epoch random stratum order). Every prefix, and so every window of
//!    consecutive samples, holds each stratum within about one sample of its share.
//!
//! Without importance sampling the answer is a permutation of the sample indices.
//!
//! ## Importance sampling (`importance = true`)
//!
//! Once some samples have a known loss (through `observe`, or the host's `last-loss`),
//! the epoch is N draws *with replacement* with
//!
//! p_i ∝ (1 − `mix`) · loss_i / Σ loss + `mix` / N,
//!
//! where loss_i is the sample's loss EMA (samples never seen get the mean of the known
//! losses), and every p_i is clipped to at most `max_weight_ratio` / N (the excess goes to
//! the other samples, in proportion). The mix with uniform and the clip keep noisy or
//! mislabeled samples from taking over (see Loshchilov & Hutter 2015 for loss-ranked
//! selection). The draws are then interleaved by stratum as above. The contract has no
//! per-sample loss weights, so this over-weights hard samples on purpose (it is biased,
//! like online batch selection), rather than being an unbiased gradient estimator.
//!
//! ## Config (every key optional)
//!
//! | key | default | meaning |
//! |-----|---------|---------|
//! | `by_category` | false | also stratify by dominant (smallest) category id |
//! | `seed` | run seed | seed of the shuffles and draws |
//! | `importance` | false | draw samples in proportion to their recent loss |
//! | `mix` | 0.3 | weight of the uniform distribution in the mix (0..=1) |
//! | `max_weight_ratio` | 10.0 | cap of p_i as a multiple of 1/N (>= 1) |
//! | `loss_ema` | 0.5 | weight of the past in each sample's loss EMA (0..1) |
//!
//! A misspelled key is an error naming it.
//!
//! ## Metrics
//!
//! Per epoch: `strata` (number of non-empty strata), `importance` (1 when the epoch was
//! importance-sampled), `loss_coverage` (fraction of samples with a known loss).
//!
//! ## State
//!
//! The per-sample loss EMAs. The shuffles and draws are a pure function of seed and epoch,
//! so they need no state to resume identically.

use lorahost_plugin::stats::Rng;
use lorahost_plugin::{
    decode_state, encode_state, host, BatchRequest, Config, Hook, Plugin, RunInfo, SampleMeta,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Samples whose loss is tracked when the host does not say how many there are.
const DEFAULT_MAX_SAMPLES: usize = 1 << 20;

/// The plugin's config section; see the crate docs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Also stratify by dominant (smallest) category id (default false).
    pub by_category: bool,
    /// Seed of shuffles and draws (default: the run's seed).
    pub seed: Option<u64>,
    /// Draw samples in proportion to their recent loss (default false).
    pub importance: bool,
    /// Weight of the uniform distribution in the importance mix (default 0.3).
    pub mix: f64,
    /// Cap of a sample's probability, as a multiple of 1/N (default 10.0).
    pub max_weight_ratio: f64,
    /// Weight of the past in each sample's loss EMA (default 0.5).
    pub loss_ema: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            by_category: false,
            seed: None,
            importance: false,
            mix: 0.3,
            max_weight_ratio: 10.0,
            loss_ema: 0.5,
        }
    }
}

/// Object-count bin of a sample: 0 → 0, 1 → 1, 2–4 → 2, 5–15 → 3, 16+ → 4.
pub fn object_bin(object_count: u32) -> u8 {
    match object_count {
        0 => 0,
        1 => 1,
        2..=4 => 2,
        5..=15 => 3,
        _ => 4,
    }
}

/// Visit order that spreads every stratum evenly: the k-th of the n items of a stratum is
/// due at fraction (k + 0.5) / n; items are returned by due fraction, ties in stratum order.
pub fn interleave<T: Copy>(strata: &[Vec<T>]) -> Vec<T> {
    let mut due: Vec<(f64, usize, T)> = Vec::with_capacity(strata.iter().map(Vec::len).sum());
    for (s, items) in strata.iter().enumerate() {
        let n = items.len() as f64;
        due.extend(items.iter().enumerate().map(|(k, &item)| ((k as f64 + 0.5) / n, s, item)));
    }
    due.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    due.into_iter().map(|(_, _, item)| item).collect()
}

/// Clip probabilities (summing to 1) to at most `cap` and give the excess to the others in
/// proportion to their mass ("water filling"). Needs `cap * p.len() >= 1`.
pub fn cap_probabilities(p: &mut [f64], cap: f64) {
    let mut sorted = p.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    // Cap the largest entries one by one while, after rescaling the rest, they exceed the cap.
    let (mut capped, mut rest) = (0usize, sorted.iter().sum::<f64>());
    for &v in &sorted {
        if rest <= 0.0 || v * (1.0 - capped as f64 * cap) / rest <= cap {
            break;
        }
        capped += 1;
        rest -= v;
    }
    let scale = if rest > 0.0 { (1.0 - capped as f64 * cap) / rest } else { 0.0 };
    for x in p.iter_mut() {
        *x = (*x * scale).min(cap);
    }
}

/// Everything that must survive snapshot/restore.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct State {
    /// Loss EMA per sample index (`None`: never observed).
    loss_ema: Vec<Option<f64>>,
}

/// The balanced sampler; see the crate docs.
pub struct BalancedSampler {
    cfg: Settings,
    seed: u64,
    max_samples: usize,
    state: State,
}

impl BalancedSampler {
    /// Stratum of a sample: object-count bin, and the dominant category with `by_category`.
    fn stratum(&self, s: &SampleMeta) -> (u8, Option<u32>) {
        let category = if self.cfg.by_category { s.categories.iter().min().copied() } else { None };
        (object_bin(s.object_count), category)
    }

    /// Best known loss of a sample: our EMA, else the host's last loss.
    fn known_loss(&self, s: &SampleMeta) -> Option<f64> {
        let ema = self.state.loss_ema.get(s.index as usize).copied().flatten();
        ema.or(Some(s.last_loss).filter(|l| l.is_finite())).map(|l| l.max(0.0))
    }

    /// Sampling probabilities per position in `samples`, or `None` for a plain permutation.
    fn importance_probabilities(&self, samples: &[SampleMeta]) -> Option<Vec<f64>> {
        if !self.cfg.importance {
            return None;
        }
        let known: Vec<Option<f64>> = samples.iter().map(|s| self.known_loss(s)).collect();
        let seen: Vec<f64> = known.iter().flatten().copied().collect();
        if seen.is_empty() {
            return None;
        }
        let mean = seen.iter().sum::<f64>() / seen.len() as f64;
        let losses: Vec<f64> = known.iter().map(|l| l.unwrap_or(mean)).collect();
        let total: f64 = losses.iter().sum();
        let n = samples.len() as f64;
        let mut p: Vec<f64> = if total > 0.0 {
            losses.iter().map(|l| (1.0 - self.cfg.mix) * l / total + self.cfg.mix / n).collect()
        } else {
            vec![1.0 / n; samples.len()]
        };
        cap_probabilities(&mut p, self.cfg.max_weight_ratio / n);
        Some(p)
    }
}

/// N draws with replacement from the distribution `p` (positions 0..p.len()).
fn draw(p: &[f64], n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut total = 0.0;
    let cumulative: Vec<f64> = p
        .iter()
        .map(|&x| {
            total += x;
            total
        })
        .collect();
    (0..n)
        .map(|_| {
            let u = rng.next_f64() * total;
            cumulative.partition_point(|&c| c <= u).min(p.len() - 1)
        })
        .collect()
}

impl Plugin for BalancedSampler {
    const NAME: &'static str = "balanced_sampler";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str =
        "stratified epoch order by object count (and category), optionally importance-sampled by loss";
    const HOOKS: &'static [Hook] = &[Hook::DataSampling];

    fn init(config: &Config, run: &RunInfo) -> Result<Self, String> {
        let cfg: Settings = config.parse()?;
        if !(0.0..=1.0).contains(&cfg.mix) {
            return Err("`mix` must be in [0, 1]".into());
        }
        if !(cfg.max_weight_ratio.is_finite() && cfg.max_weight_ratio >= 1.0) {
            return Err("`max_weight_ratio` must be >= 1".into());
        }
        if !(0.0..1.0).contains(&cfg.loss_ema) {
            return Err("`loss_ema` must be in [0, 1)".into());
        }
        let max_samples = if run.dataset_size > 0 { run.dataset_size as usize } else { DEFAULT_MAX_SAMPLES };
        Ok(Self { seed: cfg.seed.unwrap_or(run.seed), cfg, max_samples, state: State::default() })
    }

    fn snapshot(&self) -> Vec<u8> {
        encode_state(&self.state)
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.state = decode_state(bytes)?;
        Ok(())
    }

    fn epoch_order(&mut self, epoch: u32, samples: &[SampleMeta]) -> Option<Vec<u32>> {
        if samples.is_empty() {
            return None;
        }
        let mut rng = Rng::new(self.seed ^ (epoch as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));

        // Stratum of every position in `samples` (strata numbered in key order).
        let mut ids = BTreeMap::new();
        for s in samples {
            ids.entry(self.stratum(s)).or_insert(0usize);
        }
        for (i, id) in ids.values_mut().enumerate() {
            *id = i;
        }
        let stratum_of: Vec<usize> = samples.iter().map(|s| ids[&self.stratum(s)]).collect();

        // Which positions this epoch visits: each once, or N importance draws.
        let probabilities = self.importance_probabilities(samples);
        let mut positions: Vec<usize> = match &probabilities {
            Some(p) => draw(p, samples.len(), &mut rng),
            None => (0..samples.len()).collect(),
        };
        rng.shuffle(&mut positions);

        // Group by stratum (keeping the random order within each), then interleave. The
        // stratum order, which only breaks ties, is drawn anew every epoch.
        let mut strata: Vec<Vec<usize>> = vec![Vec::new(); ids.len()];
        for p in positions {
            strata[stratum_of[p]].push(p);
        }
        rng.shuffle(&mut strata);
        let order: Vec<u32> = interleave(&strata).into_iter().map(|p| samples[p].index).collect();

        let coverage =
            samples.iter().filter(|s| self.known_loss(s).is_some()).count() as f64 / samples.len() as f64;
        host::emit_metrics(&[
            ("strata", ids.len() as f64),
            ("importance", if probabilities.is_some() { 1.0 } else { 0.0 }),
            ("loss_coverage", coverage),
        ]);
        if epoch == 0 {
            let sizes: Vec<String> = strata.iter().map(|s| s.len().to_string()).collect();
            host::info(&format!(
                "{} samples in {} strata (sizes {})",
                samples.len(),
                ids.len(),
                sizes.join(", ")
            ));
        }
        Some(order)
    }

    fn next_batch(&mut self, _request: &BatchRequest) -> Option<Vec<u32>> {
        None
    }

    fn observe(&mut self, indices: &[u32], losses: &[f64]) {
        let beta = self.cfg.loss_ema;
        for (&i, &loss) in indices.iter().zip(losses) {
            let i = i as usize;
            if !loss.is_finite() || i >= self.max_samples {
                continue;
            }
            if i >= self.state.loss_ema.len() {
                self.state.loss_ema.resize(i + 1, None);
            }
            let slot = &mut self.state.loss_ema[i];
            *slot = Some(match *slot {
                Some(ema) => beta * ema + (1.0 - beta) * loss,
                None => loss,
            });
        }
    }
}

lorahost_plugin::export_plugin!(BalancedSampler);

#[cfg(test)]
mod tests {
    use super::*;

    fn run_info(dataset_size: u32) -> RunInfo {
        RunInfo {
            total_steps: 1000,
            warmup_steps: 20,
            accumulation: 1,
            batch_size: 4,
            effective_batch_size: 4,
            base_lr: 1e-4,
            scheduler: "cosine".into(),
            dataset_size,
            steps_per_epoch: dataset_size as u64 / 4,
            seed: 42,
            start_step: 1,
        }
    }

    fn sample(index: u32, object_count: u32, categories: &[u32]) -> SampleMeta {
        SampleMeta {
            index,
            object_count,
            categories: categories.to_vec(),
            last_loss: f64::NAN,
            times_seen: 0,
        }
    }

    /// `counts[i]` is the object count of sample i.
    fn dataset(counts: &[u32]) -> Vec<SampleMeta> {
        counts.iter().enumerate().map(|(i, &c)| sample(i as u32, c, &[1])).collect()
    }

    fn sampler(config: &str, n: usize) -> BalancedSampler {
        BalancedSampler::init(&Config::from_json(config).unwrap(), &run_info(n as u32)).unwrap()
    }

    fn sorted(mut xs: Vec<u32>) -> Vec<u32> {
        xs.sort_unstable();
        xs
    }

    #[test]
    fn bins_follow_the_documented_edges() {
        let bins: Vec<u8> = [0, 1, 2, 4, 5, 15, 16, 200].iter().map(|&c| object_bin(c)).collect();
        assert_eq!(bins, vec![0, 1, 2, 2, 3, 3, 4, 4]);
    }

    #[test]
    fn order_is_a_permutation_without_importance() {
        let counts: Vec<u32> = (0..97).map(|i| (i * 7) % 23).collect();
        let samples = dataset(&counts);
        let mut s = sampler("{}", samples.len());
        let order = s.epoch_order(0, &samples).unwrap();
        assert_eq!(sorted(order), (0..97).collect::<Vec<_>>());
    }

    #[test]
    fn deterministic_per_seed_and_different_across_epochs() {
        let counts: Vec<u32> = (0..200).map(|i| i % 20).collect();
        let samples = dataset(&counts);
        let (mut a, mut b) = (sampler("{}", 200), sampler("{}", 200));
        let e0 = a.epoch_order(0, &samples).unwrap();
        assert_eq!(e0, b.epoch_order(0, &samples).unwrap());
        assert_ne!(e0, a.epoch_order(1, &samples).unwrap());
        let mut other = sampler(r#"{"seed": 7}"#, 200);
        assert_ne!(e0, other.epoch_order(0, &samples).unwrap());
    }

    #[test]
    fn empty_and_crowded_images_alternate() {
        // 50 images without objects, 50 with many, in blocks.
        let counts: Vec<u32> = (0..100).map(|i| if i < 50 { 0 } else { 30 }).collect();
        let samples = dataset(&counts);
        let mut s = sampler("{}", 100);
        for epoch in 0..3 {
            let order = s.epoch_order(epoch, &samples).unwrap();
            for pair in order.windows(2) {
                assert_ne!(pair[0] < 50, pair[1] < 50, "epoch {epoch}: {pair:?} are from the same stratum");
            }
        }
    }

    #[test]
    fn every_window_tracks_the_stratum_shares() {
        // Shares 50% / 30% / 20%, shuffled together.
        let counts: Vec<u32> =
            (0..100u32).map(|i| [0, 3, 0, 20, 0, 3, 0, 20, 3, 0][(i % 10) as usize]).collect();
        let samples = dataset(&counts);
        let mut s = sampler("{}", 100);
        let order = s.epoch_order(0, &samples).unwrap();
        for window in order.windows(10) {
            for (bin, expected) in [(0u8, 5i64), (2, 3), (4, 2)] {
                let got = window.iter().filter(|&&i| object_bin(counts[i as usize]) == bin).count() as i64;
                assert!((got - expected).abs() <= 1, "bin {bin}: {got} of 10 in {window:?}");
            }
        }
    }

    #[test]
    fn by_category_splits_strata() {
        // All samples have one object; half are category 3, half category 9.
        let samples: Vec<SampleMeta> =
            (0..60).map(|i| sample(i, 1, if i < 30 { &[3, 11] } else { &[9] })).collect();
        let mut s = sampler(r#"{"by_category": true}"#, 60);
        let order = s.epoch_order(0, &samples).unwrap();
        assert!(order.windows(2).all(|p| (p[0] < 30) != (p[1] < 30)));
        let mut plain = sampler("{}", 60);
        let order = plain.epoch_order(0, &samples).unwrap();
        assert!(!order.windows(2).all(|p| (p[0] < 30) != (p[1] < 30)), "one stratum: plain shuffle");
    }

    #[test]
    fn importance_without_losses_is_a_permutation() {
        let samples = dataset(&[0, 1, 2, 5, 16, 0, 1, 2]);
        let mut s = sampler(r#"{"importance": true}"#, 8);
        assert_eq!(sorted(s.epoch_order(0, &samples).unwrap()), (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn importance_draws_high_loss_samples_more_often() {
        let samples = dataset(&vec![2; 100]);
        let mut s = sampler(r#"{"importance": true}"#, 100);
        let losses: Vec<f64> = (0..100).map(|i| if i < 10 { 10.0 } else { 1.0 }).collect();
        s.observe(&(0..100).collect::<Vec<_>>(), &losses);
        let (mut hard, mut total) = (0, 0);
        for epoch in 0..5 {
            let order = s.epoch_order(epoch, &samples).unwrap();
            assert_eq!(order.len(), 100);
            assert!(order.iter().all(|&i| i < 100));
            hard += order.iter().filter(|&&i| i < 10).count();
            total += order.len();
        }
        // p(hard sample) = 0.7 * 10 / 190 + 0.3 / 100 ≈ 0.040, so ~40% of draws vs 10% uniform.
        let share = hard as f64 / total as f64;
        assert!(share > 0.3 && share < 0.5, "hard share {share}");
    }

    #[test]
    fn importance_uses_host_losses_and_caps_the_weight() {
        // One sample with an enormous loss (from the host) may take at most 10/N of the draws.
        let mut samples = dataset(&vec![1; 100]);
        for s in &mut samples {
            s.last_loss = if s.index == 0 { 1e6 } else { 1.0 };
        }
        let mut s = sampler(r#"{"importance": true}"#, 100);
        let draws: usize =
            (0..10).map(|e| s.epoch_order(e, &samples).unwrap().iter().filter(|&&i| i == 0).count()).sum();
        assert!((50..=150).contains(&draws), "sample 0 drawn {draws} times in 1000 draws, expected ~100");
    }

    #[test]
    fn capping_keeps_a_distribution() {
        let mut p = vec![0.5, 0.3, 0.1, 0.05, 0.05];
        cap_probabilities(&mut p, 0.25);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p.iter().all(|&x| x <= 0.25 + 1e-15));
        assert_eq!(p[0], 0.25);
        assert_eq!(p[1], 0.25);
        // The rest keep their proportions: 0.1 : 0.05 : 0.05 of the remaining 0.5.
        assert!((p[2] - 0.25).abs() < 1e-12 && (p[3] - 0.125).abs() < 1e-12);
    }

    #[test]
    fn observe_keeps_an_ema_and_ignores_junk() {
        let mut s = sampler(r#"{"loss_ema": 0.5}"#, 10);
        s.observe(&[3, 3, 4, 99], &[2.0, 4.0, f64::NAN, 1.0]);
        assert_eq!(s.state.loss_ema[3], Some(3.0));
        assert_eq!(s.state.loss_ema.get(4), None, "a NaN loss is not recorded");
        assert_eq!(s.state.loss_ema.len(), 4, "index 99 is outside the dataset");
    }

    #[test]
    fn snapshot_restore_keeps_the_loss_emas() {
        let samples = dataset(&(0..50).map(|i| i % 7).collect::<Vec<_>>());
        let mut a = sampler(r#"{"importance": true}"#, 50);
        a.observe(&(0..50).collect::<Vec<_>>(), &(0..50).map(|i| i as f64).collect::<Vec<_>>());
        let mut b = sampler(r#"{"importance": true}"#, 50);
        b.restore(&a.snapshot()).unwrap();
        assert_eq!(a.state, b.state);
        assert_eq!(a.epoch_order(3, &samples), b.epoch_order(3, &samples));
    }

    #[test]
    fn next_batch_defers_and_config_is_checked() {
        let mut s = sampler("{}", 10);
        let req = BatchRequest { step: 1, micro_step: 0, epoch: 0, batch_size: 4, dataset_size: 10 };
        assert_eq!(s.next_batch(&req), None);
        let err = BalancedSampler::init(&Config::from_json(r#"{"mixx": 0.1}"#).unwrap(), &run_info(10))
            .err()
            .unwrap();
        assert!(err.contains("mixx"), "{err}");
    }
}
