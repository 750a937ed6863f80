//! AdamW (decoupled weight decay, bias-corrected moments) over the LoRA variables, in f32,
//! with gradient statistics for the grad-inspection hook, global-norm clipping and a rollback
//! of the last update (for a plugin's `skip`).
//!
//! As `torch.optim.AdamW`: a parameter that got no gradient in a step (an adapter off the
//! loss path for that batch, e.g. a geometry box projection on a step without box prompts) is
//! left alone — no moment decay, no weight decay — and each parameter counts its own updates
//! for the bias correction.

use candle_core::{DType, Result, Tensor, Var};

/// Hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (applied as `p -= lr · wd · p`).
    pub weight_decay: f64,
}

/// One parameter, its moments and its own update count.
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    t: u64,
}

/// State to undo the last [`AdamW::step`].
struct Undo {
    params: Vec<Tensor>,
    moments: Vec<(Tensor, Tensor, u64)>,
    t: u64,
}

/// AdamW over named variables (updated in the order given).
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    t: u64,
    undo: Option<Undo>,
}

impl AdamW {
    /// An optimizer over `vars` (name, variable); moments start at zero.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let m = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
                Ok(Slot { name, v: m.clone(), m, var, t: 0 })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { cfg, slots, t: 0, undo: None })
    }

    /// Updates applied so far.
    pub fn updates(&self) -> u64 {
        self.t
    }

    /// Parameter names in update order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// The variables, in order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.slots.iter().map(|s| &s.var)
    }

    /// Apply one update with gradients `grads` (same order as the variables) at `lr`.
    /// The previous parameters and moments are kept until the next step for [`Self::rollback`].
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let all: Vec<Option<&Tensor>> = grads.iter().map(Some).collect();
        self.step_some(&all, lr)
    }

    /// [`Self::step`] where a parameter without a gradient (`None`) is not touched.
    pub fn step_some(&mut self, grads: &[Option<&Tensor>], lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`Self::step_some`] with every gradient multiplied by `grad_scale` first (global-norm
    /// clipping's factor; on the GPU applied inside the fused update instead of as ~700
    /// separate multiplications).
    pub fn step_scaled(&mut self, grads: &[Option<&Tensor>], lr: f64, grad_scale: f64) -> Result<()> {
        if grads.len() != self.slots.len() {
            candle_core::bail!("AdamW: {} gradients for {} parameters", grads.len(), self.slots.len());
        }
        if self.slots.iter().all(|s| super::adamw_cuda::serves(s.var.as_tensor())) {
            return self.step_fused(grads, lr, grad_scale);
        }
        let c = self.cfg;
        let mut undo = Undo { params: Vec::with_capacity(grads.len()), moments: Vec::new(), t: self.t };
        self.t += 1;
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let p = slot.var.as_tensor();
            undo.params.push(p.clone());
            undo.moments.push((slot.m.clone(), slot.v.clone(), slot.t));
            let Some(g) = g else { continue };
            let mut g = g.to_dtype(DType::F32)?;
            if grad_scale != 1.0 {
                g = (g * grad_scale)?;
            }
            slot.t += 1;
            let bc1 = 1.0 - c.beta1.powi(slot.t as i32);
            let bc2 = 1.0 - c.beta2.powi(slot.t as i32);
            // The parameter before this update (a copy: `set` below writes in place).
            *undo.params.last_mut().expect("pushed above") = p.copy()?;
            slot.m = ((&slot.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let mhat = (&slot.m / bc1)?;
            let denom = ((&slot.v / bc2)?.sqrt()? + c.eps)?;
            let decayed = (p * (1.0 - lr * c.weight_decay))?;
            let next = (decayed - (mhat / denom)? * lr)?;
            slot.var.set(&next.detach())?;
        }
        self.undo = Some(undo);
        Ok(())
    }

    /// The update of every parameter with a gradient in one CUDA kernel ([`super::adamw_cuda`]):
    /// same arithmetic and bookkeeping as the composed path (the old moments and a copy of the
    /// old parameters kept for [`Self::rollback`]).
    fn step_fused(&mut self, grads: &[Option<&Tensor>], lr: f64, grad_scale: f64) -> Result<()> {
        use super::adamw_cuda::{Entry, Hyper};
        let c = self.cfg;
        let undo = Undo {
            params: self.slots.iter().map(|s| s.var.as_tensor().clone()).collect(),
            moments: self.slots.iter().map(|s| (s.m.clone(), s.v.clone(), s.t)).collect(),
            t: self.t,
        };
        let grads32: Vec<Option<Tensor>> =
            grads.iter().map(|g| g.map(|g| g.to_dtype(DType::F32)).transpose()).collect::<Result<_>>()?;
        let mut entries = Vec::new();
        let mut which = Vec::new();
        for (i, (slot, g)) in self.slots.iter().zip(&grads32).enumerate() {
            let Some(g) = g else { continue };
            let t = slot.t as i32 + 1;
            entries.push(Entry {
                param: slot.var.as_tensor(),
                grad: g,
                m: &slot.m,
                v: &slot.v,
                bc1: 1.0 - c.beta1.powi(t),
                bc2: 1.0 - c.beta2.powi(t),
            });
            which.push(i);
        }
        self.t += 1;
        if entries.is_empty() {
            self.undo = Some(undo);
            return Ok(());
        }
        let h = Hyper {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            grad_scale,
        };
        let fused = super::adamw_cuda::step(&entries, h)?;
        drop(entries);
        let mut undo = undo;
        for (k, &i) in which.iter().enumerate() {
            let slot = &mut self.slots[i];
            let shape = slot.var.as_tensor().shape().clone();
            let (off, n) = (fused.offsets[k], shape.elem_count());
            slot.m = fused.m.narrow(0, off, n)?.reshape(&shape)?;
            slot.v = fused.v.narrow(0, off, n)?.reshape(&shape)?;
            slot.t += 1;
            undo.params[i] = fused.params_before.narrow(0, off, n)?.reshape(&shape)?;
        }
        self.undo = Some(undo);
        Ok(())
    }

    /// Undo the last [`Self::step`] (parameters, moments and the bias-correction counts).
    /// Returns false when there is nothing to undo.
    pub fn rollback(&mut self) -> Result<bool> {
        let Some(u) = self.undo.take() else { return Ok(false) };
        for ((slot, p), (m, v, t)) in self.slots.iter_mut().zip(u.params).zip(u.moments) {
            if slot.t != t {
                slot.var.set(&p)?;
            }
            slot.m = m;
            slot.v = v;
            slot.t = t;
        }
        self.t = u.t;
        Ok(true)
    }

    /// Moments by name (`<name>.exp_avg`, `<name>.exp_avg_sq`) and each parameter's update
    /// count (`<name>.step`, a scalar, as PyTorch's optimizer state) for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.slots.len() * 3);
        for s in &self.slots {
            out.push((format!("{}.exp_avg", s.name), s.m.clone()));
            out.push((format!("{}.exp_avg_sq", s.name), s.v.clone()));
            if let Ok(t) = Tensor::new(s.t as f64, &candle_core::Device::Cpu) {
                out.push((format!("{}.step", s.name), t));
            }
        }
        out
    }

    /// Restore moments saved by [`Self::state_tensors`] and the update count (each
    /// parameter's own count where the state has it; checkpoints from before per-parameter
    /// counts give every parameter `updates`).
    pub fn load_state(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        updates: u64,
    ) -> Result<()> {
        for s in &mut self.slots {
            let get = |k: String| -> Result<Tensor> {
                let t = tensors
                    .get(&k)
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state has no `{k}`")))?;
                if t.dims() != s.var.dims() {
                    candle_core::bail!(
                        "optimizer state `{k}` is {:?}, the parameter {:?}",
                        t.dims(),
                        s.var.dims()
                    );
                }
                t.to_device(s.var.device())?.to_dtype(DType::F32)
            };
            s.m = get(format!("{}.exp_avg", s.name))?;
            s.v = get(format!("{}.exp_avg_sq", s.name))?;
            s.t = match tensors.get(&format!("{}.step", s.name)) {
                Some(t) => t.to_dtype(DType::F64)?.to_scalar::<f64>()? as u64,
                None => updates,
            };
        }
        self.t = updates;
        self.undo = None;
        Ok(())
    }
}

/// Gradient statistics of one group, computed on the device with a handful of reductions.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupStats {
    /// Group name.
    pub name: String,
    /// Sum of squares.
    pub sum_sq: f64,
    /// Largest |g| over finite entries... and non-finite ones (NaN when any is NaN).
    pub max_abs: f64,
    /// NaN or infinite entries.
    pub nonfinite: u64,
    /// Entries.
    pub numel: u64,
}

/// Statistics of a group of gradients.
pub fn group_stats(name: &str, grads: &[&Tensor]) -> Result<GroupStats> {
    let mut v = group_stats_many(&[(name, grads)])?;
    Ok(v.remove(0))
}

/// Statistics of several groups of gradients: on CUDA one kernel launch and one read-back for
/// all of them ([`super::stats_cuda`]), else (or where the kernel does not serve them) the
/// composed statistics of each group.
pub fn group_stats_many(groups: &[(&str, &[&Tensor])]) -> Result<Vec<GroupStats>> {
    let tensors: Vec<&[&Tensor]> = groups.iter().map(|g| g.1).collect();
    let Some(fused) = super::stats_cuda::group_stats(&tensors)? else {
        return groups.iter().map(|(name, grads)| composed_group_stats(name, grads)).collect();
    };
    groups
        .iter()
        .zip(fused)
        .map(|((name, grads), (sum_sq, max_abs, nonfinite))| {
            if sum_sq.is_infinite() && nonfinite == 0 {
                // f32 partial sums overflowed: the composed path's rescaled sum.
                return composed_group_stats(name, grads);
            }
            let numel = grads.iter().map(|g| g.elem_count() as u64).sum();
            Ok(GroupStats { name: name.to_string(), sum_sq, max_abs, nonfinite, numel })
        })
        .collect()
}

/// [`group_stats`] composed of tensor operations (any device and dtype).
pub(crate) fn composed_group_stats(name: &str, grads: &[&Tensor]) -> Result<GroupStats> {
    if grads.is_empty() {
        return Ok(GroupStats { name: name.into(), sum_sq: 0.0, max_abs: 0.0, nonfinite: 0, numel: 0 });
    }
    let flat: Vec<Tensor> =
        grads.iter().map(|g| g.flatten_all().and_then(|g| g.to_dtype(DType::F32))).collect::<Result<_>>()?;
    let all = Tensor::cat(&flat, 0)?;
    let numel = all.elem_count() as u64;
    // NaN and ±inf are exactly the entries for which |x| <= f32::MAX is false. Count those (an
    // f32 sum is exact for them; counting the finite ones would stop at 2^24, below the size of
    // a full SAM3 ViT's adapters).
    let abs = all.abs()?;
    let bad = (1.0 - abs.le(f32::MAX)?.to_dtype(DType::F32)?)?.sum_all()?;
    let sum_sq = all.sqr()?.sum_all()?;
    let max_abs = abs.max(0)?;
    // One device-to-host transfer (one synchronisation) per group.
    let v = Tensor::stack(&[bad, sum_sq, max_abs], 0)?.to_vec1::<f32>()?;
    let mut sum_sq = v[1] as f64;
    if sum_sq.is_infinite() && v[0] == 0.0 {
        // Σx² of finite gradients above ~1e19 overflows f32 (a diverging run: the norm would
        // read inf and clipping by it would zero the update): sum over x / max|x| instead and
        // scale back in f64. Rare, so off the common path.
        let m = v[2] as f64;
        let scaled = (&all / m)?.sqr()?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        sum_sq = scaled * m * m;
    }
    Ok(GroupStats { name: name.into(), sum_sq, max_abs: v[2] as f64, nonfinite: v[0] as u64, numel })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The clipping factor given to `step_scaled` acts as if the gradients had been scaled
    /// first, a parameter without a gradient is untouched, and a rollback restores the state.
    #[test]
    fn scaled_step_equals_a_step_on_scaled_gradients() {
        // A large ε: Adam's update is otherwise almost invariant to the gradients' scale, and the
        // test would not see a factor that was dropped.
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 0.1, weight_decay: 0.05 };
        let make = || {
            let a = Var::from_tensor(&Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()).unwrap();
            let opt = AdamW::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())], cfg).unwrap();
            (opt, a, b)
        };
        let ga = Tensor::new(&[0.2f32, -0.7, 1.5], &Device::Cpu).unwrap();
        let gb = Tensor::new(&[1.0f32, -1.0], &Device::Cpu).unwrap();
        let (mut x, xa, xb) = make();
        let (mut y, ya, yb) = make();
        for _ in 0..3 {
            x.step_scaled(&[Some(&ga), None], 1e-2, 0.25).unwrap();
            y.step_some(&[Some(&(&ga * 0.25).unwrap()), None], 1e-2).unwrap();
        }
        let v = |t: &Var| t.as_tensor().to_vec1::<f32>().unwrap();
        assert_eq!(v(&xa), v(&ya));
        let (mut z, za, _) = make();
        for _ in 0..3 {
            z.step_some(&[Some(&ga), None], 1e-2).unwrap();
        }
        assert!(
            v(&za).iter().zip(v(&xa)).any(|(p, q)| (p - q).abs() > 1e-4),
            "the factor changes the update"
        );
        assert_eq!(v(&xb), vec![3.0, 4.0], "no gradient: untouched");
        assert_eq!(v(&yb), vec![3.0, 4.0]);
        let before = v(&xa);
        x.step_scaled(&[Some(&ga), Some(&gb)], 1e-2, 0.5).unwrap();
        assert_ne!(v(&xa), before);
        assert!(x.rollback().unwrap());
        assert_eq!((v(&xa), v(&xb)), (before, vec![3.0, 4.0]));
    }

    #[test]
    fn first_adamw_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        let p = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap()).unwrap();
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], cfg).unwrap();
        let g = Tensor::new(&[0.3f32, -4.0, 0.0], &Device::Cpu).unwrap();
        opt.step(&[g], 0.01).unwrap();
        let got: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        // Bias-corrected first step: m̂/√v̂ = sign(g); decay 0.01·0.1·p.
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01, 0.5 * (1.0 - 0.001)];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        assert!(opt.rollback().unwrap());
        assert_eq!(p.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, -2.0, 0.5]);
        assert_eq!(opt.updates(), 0);
        assert!(!opt.rollback().unwrap());
    }

    /// A parameter without a gradient is left alone (no moment decay, no weight decay) and its
    /// own update count starts with its first gradient, as `torch.optim.AdamW`; rollback
    /// restores both; the counts survive a save and load.
    #[test]
    fn a_parameter_without_a_gradient_is_not_touched_and_counts_its_own_steps() {
        let d = Device::Cpu;
        let p = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &d).unwrap()).unwrap();
        let q = Var::from_tensor(&Tensor::new(&[0.5f32, 3.0], &d).unwrap()).unwrap();
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(vec![("p".into(), p.clone()), ("q".into(), q.clone())], cfg).unwrap();
        let g = Tensor::new(&[0.3f32, -4.0], &d).unwrap();
        opt.step_some(&[Some(&g), None], 0.01).unwrap();
        assert_eq!(q.as_tensor().to_vec1::<f32>().unwrap(), vec![0.5, 3.0], "no gradient, no update");
        // q's first real update is a first step (bias-corrected: exactly lr against the sign).
        let h = Tensor::new(&[2.0f32, -0.1], &d).unwrap();
        opt.step_some(&[Some(&g), Some(&h)], 0.01).unwrap();
        let got = q.as_tensor().to_vec1::<f32>().unwrap();
        let want = [0.5 * (1.0 - 0.001) - 0.01, 3.0 * (1.0 - 0.001) + 0.01];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        let state: std::collections::HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        assert_eq!(state["p.step"].to_scalar::<f64>().unwrap(), 2.0);
        assert_eq!(state["q.step"].to_scalar::<f64>().unwrap(), 1.0);
        assert!(opt.rollback().unwrap());
        assert_eq!(q.as_tensor().to_vec1::<f32>().unwrap(), vec![0.5, 3.0]);
        let mut fresh = AdamW::new(vec![("p".into(), p.clone()), ("q".into(), q.clone())], cfg).unwrap();
        fresh.load_state(&state, 2).unwrap();
        assert_eq!(fresh.slots.iter().map(|s| s.t).collect::<Vec<_>>(), vec![2, 1]);
        // An older checkpoint without per-parameter counts: every parameter gets `updates`.
        let old: std::collections::HashMap<String, Tensor> =
            state.into_iter().filter(|(k, _)| !k.ends_with(".step")).collect();
        fresh.load_state(&old, 2).unwrap();
        assert_eq!(fresh.slots.iter().map(|s| s.t).collect::<Vec<_>>(), vec![2, 2]);
    }

    #[test]
    fn group_stats_count_non_finite_entries() {
        let d = Device::Cpu;
        let a = Tensor::new(&[3.0f32, -4.0], &d).unwrap();
        let b = Tensor::new(&[f32::NAN, f32::INFINITY, 0.0], &d).unwrap();
        let s = group_stats("g", &[&a]).unwrap();
        assert_eq!((s.sum_sq, s.max_abs, s.nonfinite, s.numel), (25.0, 4.0, 0, 2));
        assert_eq!(group_stats("g", &[&a, &b]).unwrap().nonfinite, 2);
        // Gradients whose squares overflow f32 still have a finite norm.
        let huge = Tensor::new(&[3e20f32, -4e20], &d).unwrap();
        let s = group_stats("g", &[&huge]).unwrap();
        assert!((s.sum_sq.sqrt() / 5e20 - 1.0).abs() < 1e-6 && s.nonfinite == 0, "{}", s.sum_sq);
        // More entries than an f32 counts exactly (a full SAM3 ViT has ~20 M adapter weights).
        let big = Tensor::zeros((1 << 24) + 3, DType::F32, &d).unwrap();
        let s = group_stats("g", &[&big, &a]).unwrap();
        assert_eq!((s.nonfinite, s.numel, s.max_abs), (0, (1 << 24) + 5, 4.0));
    }
}
