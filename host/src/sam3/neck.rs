//! The FPN neck (transformers' `Sam3VisionNeck` / Meta's `Sam3DualViTDetNeck`, VarBuilder path
//! `vision_encoder.neck`): one branch per scale factor, each turning the ViT's single-scale map into
//! an `fpn_hidden_size`-channel map at `scale × grid`.
//!
//! | scale | ops (keys under `fpn_layers.{i}`) |
//! |---|---|
//! | 4   | `scale_layers.0` ConvT k2 s2 (C→C/2) → exact GELU → `scale_layers.2` ConvT k2 s2 (C/2→C/4) → `proj1` 1×1 → `proj2` 3×3 |
//! | 2   | `scale_layers.0` ConvT k2 s2 (C→C/2) → `proj1` → `proj2` |
//! | 1   | `proj1` → `proj2` |
//! | 0.5 | MaxPool 2×2 s2 → `proj1` → `proj2` |
//!
//! Everything here has a backward in candle 0.11 and avoids candle's slow paths: the k=2, s=2
//! transposed convolutions are one frozen linear (C_in → 4·C_out, no weight gradient:
//! [`super::frozen::frozen_linear`]) followed by a pixel shuffle (reshape + permute), the 1×1
//! convolutions are frozen linears, and the max-pool is a reshape + max.
//! Branches run channels-last (B, H, W, C) until `proj2`, the only real convolution (candle's
//! `conv2d`, stride 1, as an op that differentiates only its input:
//! [`super::frozen::frozen_conv3x3`]), which returns transformers' (B, C, H, W).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::VisionConfig;
use super::nn::Activation;
use super::position;

/// A `ConvTranspose2d(kernel_size=2, stride=2)` with bias, computed as a matmul + pixel shuffle.
#[derive(Debug, Clone)]
pub struct ConvTranspose2x2 {
    /// PyTorch layout (C_in, C_out, 2, 2).
    pub weight: Tensor,
    /// (C_out).
    pub bias: Tensor,
}

impl ConvTranspose2x2 {
    /// Load `{path}.weight` (C_in, C_out, 2, 2) and `{path}.bias` (C_out).
    pub fn load(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Self> {
        Ok(Self { weight: vb.get((c_in, c_out, 2, 2), "weight")?, bias: vb.get(c_out, "bias")? })
    }

    /// Channels-last input (B, H, W, C_in) → (B, 2H, 2W, C_out):
    /// `out[b, 2i+ki, 2j+kj, o] = bias[o] + Σ_c x[b, i, j, c] · W[c, o, ki, kj]` (PyTorch's
    /// transposed convolution for k = s = 2, padding 0, where the kernel taps never overlap).
    pub fn forward_nhwc(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c_in) = x.dims4()?;
        let c_out = self.weight.dim(1)?;
        // (C_in, C_out, ki, kj) → (ki, kj, C_out, C_in): output row (ki·2 + kj)·C_out + o of a
        // linear layer, so one row of the product is the 2×2 patch; the bias repeats per tap.
        let wl = self.weight.permute((2, 3, 1, 0))?.reshape((4 * c_out, c_in))?;
        let bl = self.bias.repeat(4)?;
        let rows = x.contiguous()?.reshape((b * h * w, c_in))?;
        // A frozen linear: on a training graph no weight gradient (candle's matmul computes one).
        let y = super::frozen::frozen_linear(&rows, &wl, Some(&bl), None, None, None)?; // (BHW, ki·kj·C_out)
        y.reshape((b, h, w, 2, 2, c_out))?
            .permute((0, 1, 3, 2, 4, 5))? // (B, H, ki, W, kj, C_out)
            .reshape((b, 2 * h, 2 * w, c_out))
    }
}

/// A 1×1 `Conv2d` with bias, computed as a matmul over channels-last input.
#[derive(Debug, Clone)]
pub struct Conv1x1 {
    /// PyTorch layout (C_out, C_in, 1, 1).
    pub weight: Tensor,
    /// (C_out).
    pub bias: Tensor,
}

impl Conv1x1 {
    /// Load `{path}.weight` (C_out, C_in, 1, 1) and `{path}.bias` (C_out).
    pub fn load(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Self> {
        Ok(Self { weight: vb.get((c_out, c_in, 1, 1), "weight")?, bias: vb.get(c_out, "bias")? })
    }

    /// Channels-last (B, H, W, C_in) → (B, H, W, C_out).
    pub fn forward_nhwc(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c_in) = x.dims4()?;
        let c_out = self.weight.dim(0)?;
        let wm = self.weight.reshape((c_out, c_in))?;
        let rows = x.contiguous()?.reshape((b * h * w, c_in))?;
        super::frozen::frozen_linear(&rows, &wm, Some(&self.bias), None, None, None)?
            .reshape((b, h, w, c_out))
    }
}

/// A 3×3 `Conv2d` (stride 1, padding 1) with bias.
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    /// PyTorch layout (C_out, C_in, 3, 3).
    pub weight: Tensor,
    /// (C_out).
    pub bias: Tensor,
}

impl Conv3x3 {
    /// Load `{path}.weight` (C_out, C_in, 3, 3) and `{path}.bias` (C_out).
    pub fn load(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Self> {
        Ok(Self { weight: vb.get((c_out, c_in, 3, 3), "weight")?, bias: vb.get(c_out, "bias")? })
    }

    /// (B, C_in, H, W) → (B, C_out, H, W); on a training graph an op that differentiates only
    /// the input ([`super::frozen::frozen_conv3x3`]).
    pub fn forward_nchw(&self, x: &Tensor) -> Result<Tensor> {
        super::frozen::frozen_conv3x3(x, &self.weight, &self.bias)
    }
}

/// The resampling part of one FPN branch (transformers' `scale_layers`).
#[derive(Debug, Clone)]
pub enum Resample {
    /// ×4: `scale_layers.0` (C→C/2), exact GELU (`scale_layers.1`), `scale_layers.2` (C/2→C/4).
    Up4(ConvTranspose2x2, ConvTranspose2x2),
    /// ×2: `scale_layers.0` (C→C/2).
    Up2(ConvTranspose2x2),
    /// ×1: nothing.
    Identity,
    /// ×0.5: `MaxPool2d(2, 2)` (odd trailing rows/columns dropped, as PyTorch does).
    MaxPool2,
}

/// One FPN branch (transformers' `Sam3FPNLayer`).
#[derive(Debug, Clone)]
pub struct FpnLayer {
    /// The scale factor of this level.
    pub scale_factor: f64,
    /// Up/down-sampling before the projections.
    pub resample: Resample,
    /// 1×1 conv to `fpn_hidden_size`.
    pub proj1: Conv1x1,
    /// 3×3 conv, padding 1.
    pub proj2: Conv3x3,
}

impl FpnLayer {
    /// Load from `vision_encoder.neck.fpn_layers.{i}`; `in_channels` is the ViT width.
    pub fn load(vb: VarBuilder, in_channels: usize, fpn_dim: usize, scale_factor: f64) -> Result<Self> {
        let sl = vb.pp("scale_layers");
        let (resample, mid) = if scale_factor == 4.0 {
            let a = ConvTranspose2x2::load(sl.pp("0"), in_channels, in_channels / 2)?;
            let b = ConvTranspose2x2::load(sl.pp("2"), in_channels / 2, in_channels / 4)?;
            (Resample::Up4(a, b), in_channels / 4)
        } else if scale_factor == 2.0 {
            (
                Resample::Up2(ConvTranspose2x2::load(sl.pp("0"), in_channels, in_channels / 2)?),
                in_channels / 2,
            )
        } else if scale_factor == 1.0 {
            (Resample::Identity, in_channels)
        } else if scale_factor == 0.5 {
            (Resample::MaxPool2, in_channels)
        } else {
            candle_core::bail!("unsupported FPN scale factor {scale_factor} (SAM3 uses 4, 2, 1, 0.5)")
        };
        Ok(Self {
            scale_factor,
            resample,
            proj1: Conv1x1::load(vb.pp("proj1"), mid, fpn_dim)?,
            proj2: Conv3x3::load(vb.pp("proj2"), fpn_dim, fpn_dim)?,
        })
    }

    /// Channels-last ViT map (B, H, W, C) → this level (B, fpn_dim, h, w), h = scale·H.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.proj1.weight.dtype())?;
        let x = match &self.resample {
            Resample::Up4(a, b) => b.forward_nhwc(&Activation::Gelu.apply(&a.forward_nhwc(&x)?)?)?,
            Resample::Up2(a) => a.forward_nhwc(&x)?,
            Resample::Identity => x,
            Resample::MaxPool2 => max_pool_2x2_nhwc(&x)?,
        };
        let x = self.proj1.forward_nhwc(&x)?.permute((0, 3, 1, 2))?;
        self.proj2.forward_nchw(&x)
    }
}

/// `MaxPool2d(kernel_size=2, stride=2)` on channels-last input (B, H, W, C) → (B, ⌊H/2⌋, ⌊W/2⌋, C),
/// as a reshape + two max reductions (differentiable; tied maxima all receive the gradient).
pub fn max_pool_2x2_nhwc(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let (ho, wo) = (h / 2, w / 2);
    let x = x.narrow(1, 0, 2 * ho)?.narrow(2, 0, 2 * wo)?.contiguous()?;
    x.reshape((b, ho, 2, wo, 2, c))?.max(4)?.max(2)
}

/// The sine position maps already built, keyed by (h, w, dtype): each (1, fpn_dim, h, w).
type PosCache = Arc<Mutex<HashMap<(usize, usize, DType), Tensor>>>;

/// transformers' `Sam3VisionNeck` at `vision_encoder.neck`.
#[derive(Debug, Clone)]
pub struct VisionNeck {
    /// One branch per `scale_factors` entry, in that order.
    pub fpn_layers: Vec<FpnLayer>,
    /// Channels of every level (`fpn_hidden_size`); the sine encodings use half of it per axis.
    pub fpn_dim: usize,
    /// Position maps are constants (a function of the level size only): built once on the CPU
    /// and kept on the device (at 1008² the ×4 map alone is 21M sin/cos evaluations).
    pos_cache: PosCache,
}

impl VisionNeck {
    /// Load `fpn_layers.{i}` for every scale factor of `cfg`.
    pub fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let c = cfg.backbone_config.hidden_size;
        let fpn_layers = cfg
            .scale_factors
            .iter()
            .enumerate()
            .map(|(i, &s)| FpnLayer::load(vb.pp("fpn_layers").pp(i.to_string()), c, cfg.fpn_hidden_size, s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { fpn_layers, fpn_dim: cfg.fpn_hidden_size, pos_cache: PosCache::default() })
    }

    /// The sine position map of an `h`×`w` level (transformers'
    /// `Sam3SinePositionEmbedding(fpn_dim / 2, normalize=True)`), (batch, fpn_dim, h, w), channels
    /// [pos_y, pos_x], identical for every batch entry; a constant (no graph).
    pub fn position_encoding(
        &self,
        batch: usize,
        h: usize,
        w: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let mut cache =
            self.pos_cache.lock().map_err(|_| candle_core::Error::Msg("pos cache poisoned".into()))?;
        let one = match cache.get(&(h, w, dtype)) {
            Some(t) if t.device().same_device(device) => t.clone(),
            _ => {
                let t = position::image_encoding(1, h, w, self.fpn_dim / 2, device)?.to_dtype(dtype)?;
                cache.insert((h, w, dtype), t.clone());
                t
            }
        };
        if batch == 1 {
            Ok(one)
        } else {
            one.repeat((batch, 1, 1, 1))
        }
    }

    /// Channels-last ViT output (B, H, W, C) → (levels, position encodings): level i is
    /// (B, fpn_dim, hᵢ, wᵢ) in `scale_factors` order, and its sine position map
    /// ([`VisionNeck::position_encoding`]) has the same shape and dtype.
    pub fn forward(&self, x: &Tensor) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let mut fpn = Vec::with_capacity(self.fpn_layers.len());
        let mut pos = Vec::with_capacity(self.fpn_layers.len());
        for layer in &self.fpn_layers {
            let y = layer.forward(x)?;
            let (b, _, h, w) = y.dims4()?;
            pos.push(self.position_encoding(b, h, w, y.dtype(), y.device())?);
            fpn.push(y);
        }
        Ok((fpn, pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn conv_transpose_as_matmul_matches_candle_conv_transpose2d() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 6, 3, 5), &dev)?; // NCHW, non-square
        let conv = ConvTranspose2x2 {
            weight: Tensor::randn(0f32, 1.0, (6, 4, 2, 2), &dev)?,
            bias: Tensor::randn(0f32, 1.0, 4, &dev)?,
        };
        let want =
            x.conv_transpose2d(&conv.weight, 0, 0, 2, 1)?.broadcast_add(&conv.bias.reshape((1, 4, 1, 1))?)?;
        let got = conv.forward_nhwc(&x.permute((0, 2, 3, 1))?)?.permute((0, 3, 1, 2))?;
        assert_eq!(got.dims(), &[2, 4, 6, 10]);
        assert!(max_abs_diff(&got, &want) < 1e-5);
        // On a training graph (tracked input, the frozen-linear op): the same output and the
        // input gradient of candle's conv_transpose2d autograd.
        let xv = candle_core::Var::from_tensor(&x)?;
        let target = Tensor::randn(0f32, 1.0, (2, 4, 6, 10), &dev)?;
        let want = xv.as_tensor().conv_transpose2d(&conv.weight, 0, 0, 2, 1)?;
        let want = want.broadcast_add(&conv.bias.reshape((1, 4, 1, 1))?)?;
        let got = conv.forward_nhwc(&xv.as_tensor().permute((0, 2, 3, 1))?)?.permute((0, 3, 1, 2))?;
        assert!(max_abs_diff(&got, &want) < 1e-5);
        let gw = (want * &target)?.sum_all()?.backward()?;
        let gg = (got * &target)?.sum_all()?.backward()?;
        assert!(max_abs_diff(gw.get(xv.as_tensor()).unwrap(), gg.get(xv.as_tensor()).unwrap()) < 1e-4);
        Ok(())
    }

    #[test]
    fn conv1x1_and_max_pool_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 6, 5, 4), &dev)?; // NCHW, odd height
        let conv = Conv1x1 {
            weight: Tensor::randn(0f32, 1.0, (3, 6, 1, 1), &dev)?,
            bias: Tensor::randn(0f32, 1.0, 3, &dev)?,
        };
        let want = x.conv2d(&conv.weight, 0, 1, 1, 1)?.broadcast_add(&conv.bias.reshape((1, 3, 1, 1))?)?;
        let nhwc = x.permute((0, 2, 3, 1))?;
        let got = conv.forward_nhwc(&nhwc)?.permute((0, 3, 1, 2))?;
        assert!(max_abs_diff(&got, &want) < 1e-5);
        // Tracked input: the input gradient of candle's conv2d autograd.
        let xv = candle_core::Var::from_tensor(&x)?;
        let target = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &dev)?;
        let want = xv.as_tensor().conv2d(&conv.weight, 0, 1, 1, 1)?;
        let want = want.broadcast_add(&conv.bias.reshape((1, 3, 1, 1))?)?;
        let got = conv.forward_nhwc(&xv.as_tensor().permute((0, 2, 3, 1))?)?.permute((0, 3, 1, 2))?;
        let gw = (want * &target)?.sum_all()?.backward()?;
        let gg = (got * &target)?.sum_all()?.backward()?;
        assert!(max_abs_diff(gw.get(xv.as_tensor()).unwrap(), gg.get(xv.as_tensor()).unwrap()) < 1e-4);
        let want = x.max_pool2d(2)?;
        let got = max_pool_2x2_nhwc(&nhwc)?.permute((0, 3, 1, 2))?;
        assert_eq!(got.dims(), &[2, 6, 2, 2]);
        assert_eq!(max_abs_diff(&got, &want), 0.0);
        Ok(())
    }
}
