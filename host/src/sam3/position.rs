//! Sine position encodings (transformers' `Sam3SinePositionEmbedding`) for image maps and boxes.
//! Channel j of a value v is sin(v / t_j) for even j and cos(v / t_j) for odd j, with
//! t_j = temperature^(2·⌊j/2⌋ / num_feats), as in DETR.

use candle_core::{DType, Device, Result, Tensor, D};

/// `dim_t` of the encoding: temperature^(2⌊j/2⌋/n) for j in 0..n.
fn dim_t(num_feats: usize, temperature: f64) -> Vec<f64> {
    (0..num_feats).map(|j| temperature.powf(2.0 * (j / 2) as f64 / num_feats as f64)).collect()
}

/// Encode values already scaled (e.g. by 2π) into `num_feats` channels per value:
/// input (..., ) → output (..., num_feats), interleaved sin/cos.
pub fn encode_values(v: &Tensor, num_feats: usize, temperature: f64) -> Result<Tensor> {
    let key = format!("dim_t {num_feats} {temperature}");
    let dt = super::ops::cached_constant(key, v.device(), || {
        Tensor::new(dim_t(num_feats, temperature).iter().map(|x| *x as f32).collect::<Vec<_>>(), v.device())
    })?;
    let v = v.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let x = v.broadcast_div(&dt)?; // (..., n)
    let dims = x.dims().to_vec();
    let n = num_feats;
    let mut pair_dims = dims[..dims.len() - 1].to_vec();
    pair_dims.extend([n / 2, 2]);
    let pairs = x.reshape(pair_dims.clone())?;
    let even = pairs.narrow(D::Minus1, 0, 1)?.sin()?;
    let odd = pairs.narrow(D::Minus1, 1, 1)?.cos()?;
    Tensor::cat(&[even, odd], D::Minus1)?.reshape(dims)
}

/// The image-map encoding: (B, 2·num_feats, H, W), channels [pos_y, pos_x], positions 1..=H
/// and 1..=W normalized by (H + 1e-6)/(W + 1e-6) and scaled by 2π (transformers' SAM3 uses
/// `normalize=True`, 128 features per axis for a 256-wide model).
pub fn image_encoding(
    batch: usize,
    height: usize,
    width: usize,
    num_feats: usize,
    device: &Device,
) -> Result<Tensor> {
    let scale = 2.0 * std::f64::consts::PI;
    let eps = 1e-6;
    let dt = dim_t(num_feats, 10000.0);
    let mut data = vec![0f32; 2 * num_feats * height * width];
    let hw = height * width;
    for i in 0..height {
        // Computed in f32 as transformers does (positions and dim_t are f32 there).
        let y = ((i + 1) as f32 / (height as f32 + eps as f32)) * scale as f32;
        for j in 0..width {
            let x = ((j + 1) as f32 / (width as f32 + eps as f32)) * scale as f32;
            for (c, t) in dt.iter().enumerate() {
                let t = *t as f32;
                let (vy, vx) = (y / t, x / t);
                let (ey, ex) = if c % 2 == 0 { (vy.sin(), vx.sin()) } else { (vy.cos(), vx.cos()) };
                data[c * hw + i * width + j] = ey;
                data[(num_feats + c) * hw + i * width + j] = ex;
            }
        }
    }
    Tensor::from_vec(data, (1, 2 * num_feats, height, width), device)?.repeat((batch, 1, 1, 1))
}

/// Encode boxes (B, N, 4) given as (x, y, w, h) in [0,1] into (B, N, 4·num_feats) with channel
/// order [y, x, w, h] (the decoder's query position input), scale 2π.
pub fn box_encoding(boxes: &Tensor, num_feats: usize) -> Result<Tensor> {
    let scaled = (boxes.to_dtype(DType::F32)? * (2.0 * std::f64::consts::PI))?;
    let enc = encode_values(&scaled, num_feats, 10000.0)?; // (B, N, 4, n)
    let x = enc.narrow(2, 0, 1)?;
    let y = enc.narrow(2, 1, 1)?;
    let w = enc.narrow(2, 2, 1)?;
    let h = enc.narrow(2, 3, 1)?;
    let cat = Tensor::cat(&[y, x, w, h], 2)?;
    let (b, n, _, f) = cat.dims4()?;
    cat.reshape((b, n, 4 * f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaves_sin_and_cos() -> Result<()> {
        let v = Tensor::new(&[1.0f32], &Device::Cpu)?;
        let e = encode_values(&v, 4, 100.0)?.to_vec2::<f32>()?;
        // dim_t = [100^0, 100^0, 100^(2/4), 100^(2/4)] = [1, 1, 10, 10]
        let expect = [1f32.sin(), 1f32.cos(), (0.1f32).sin(), (0.1f32).cos()];
        for (g, x) in e[0].iter().zip(expect) {
            assert!((g - x).abs() < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn image_encoding_channels_are_y_then_x() -> Result<()> {
        let p = image_encoding(1, 2, 3, 4, &Device::Cpu)?;
        assert_eq!(p.dims(), &[1, 8, 2, 3]);
        let v = p.to_vec3::<f32>().err(); // 4-D; read one value through flatten
        assert!(v.is_some());
        let flat = p.flatten_all()?.to_vec1::<f32>()?;
        // channel 0 (sin y, dim_t 1) at (row 1, col 0): y = 2/(2+1e-6)*2π
        let y = 2.0f32 / (2.0 + 1e-6) * std::f32::consts::TAU;
        assert!((flat[3] - y.sin()).abs() < 1e-5);
        // channel 4 (sin x) at (row 0, col 2): x = 3/(3+1e-6)*2π
        let x = 3.0f32 / (3.0 + 1e-6) * std::f32::consts::TAU;
        assert!((flat[4 * 6 + 2] - x.sin()).abs() < 1e-5);
        Ok(())
    }
}
