//! Small numeric helpers plugins keep needing: a rolling window with robust statistics,
//! an exponential moving average and a seeded random generator. All are serde-serializable
//! so they can live in a plugin's snapshot.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// The last `capacity` values, with median and median absolute deviation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollingWindow {
    capacity: usize,
    values: VecDeque<f64>,
}

impl RollingWindow {
    /// An empty window holding at most `capacity` values (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), values: VecDeque::new() }
    }

    /// Add a value, dropping the oldest when full. Non-finite values are ignored.
    pub fn push(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        if self.values.len() == self.capacity {
            self.values.pop_front();
        }
        self.values.push_back(v);
    }

    /// The most values the window holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Change the capacity (at least 1), dropping the oldest values if there are now too
    /// many. Useful after `restore` when the configured window size changed.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        while self.values.len() > self.capacity {
            self.values.pop_front();
        }
    }

    /// Number of values held.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when no value is held.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The values, oldest first.
    pub fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.values.iter().copied()
    }

    /// Median of the window (NaN when empty).
    pub fn median(&self) -> f64 {
        median(self.values.iter().copied().collect())
    }

    /// Median absolute deviation from the median (NaN when empty).
    pub fn mad(&self) -> f64 {
        let m = self.median();
        median(self.values.iter().map(|v| (v - m).abs()).collect())
    }

    /// Arithmetic mean (NaN when empty).
    pub fn mean(&self) -> f64 {
        if self.values.is_empty() {
            return f64::NAN;
        }
        self.values.iter().sum::<f64>() / self.values.len() as f64
    }
}

/// Median of a list (NaN when empty).
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

/// Exponential moving average with bias correction (as in Adam), so early values are not
/// pulled towards zero.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ema {
    beta: f64,
    raw: f64,
    count: u64,
}

impl Ema {
    /// `beta` in [0, 1): weight of the past.
    pub fn new(beta: f64) -> Self {
        Self { beta: beta.clamp(0.0, 0.999_999), raw: 0.0, count: 0 }
    }

    /// Add a value (non-finite values are ignored).
    pub fn update(&mut self, v: f64) {
        if v.is_finite() {
            self.raw = self.beta * self.raw + (1.0 - self.beta) * v;
            self.count += 1;
        }
    }

    /// The bias-corrected average (NaN before the first value).
    pub fn value(&self) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        self.raw / (1.0 - self.beta.powi(self.count.min(i32::MAX as u64) as i32))
    }

    /// How many values were added.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// SplitMix64: a tiny, seedable, serializable generator (not for cryptography).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator from a seed; equal seeds give equal sequences.
    pub fn new(seed: u64) -> Self {
        Self { state: seed ^ 0x9E37_79B9_7F4A_7C15 }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            xs.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_mad() {
        let mut w = RollingWindow::new(4);
        for v in [5.0, 1.0, 3.0, 100.0, 2.0] {
            w.push(v);
        }
        // window holds 1, 3, 100, 2
        assert_eq!(w.len(), 4);
        assert_eq!(w.median(), 2.5);
        // deviations 1.5, 0.5, 97.5, 0.5 -> median 1.0
        assert_eq!(w.mad(), 1.0);
    }

    #[test]
    fn shrinking_capacity_drops_oldest() {
        let mut w = RollingWindow::new(5);
        for v in [1.0, 2.0, 3.0, 4.0, 5.0] {
            w.push(v);
        }
        w.set_capacity(2);
        assert_eq!(w.capacity(), 2);
        assert_eq!(w.values().collect::<Vec<_>>(), vec![4.0, 5.0]);
        w.set_capacity(3);
        w.push(6.0);
        assert_eq!(w.values().collect::<Vec<_>>(), vec![4.0, 5.0, 6.0]);
    }

    #[test]
    fn ema_is_bias_corrected() {
        let mut e = Ema::new(0.9);
        e.update(10.0);
        assert!((e.value() - 10.0).abs() < 1e-12);
        e.update(10.0);
        assert!((e.value() - 10.0).abs() < 1e-12);
    }

    #[test]
    fn rng_is_deterministic_and_shuffles() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        assert_eq!(a.next_u64(), b.next_u64());
        let mut xs: Vec<u32> = (0..100).collect();
        a.shuffle(&mut xs);
        let mut sorted = xs.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(xs, sorted);
    }
}
