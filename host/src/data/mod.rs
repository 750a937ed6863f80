//! Training data: the Roboflow COCO layout SAM3_LoRA users have (`<data_dir>/{train,valid,test}/
//! _annotations.coco.json` + images), a preflight that names every bad file/annotation, a dataset
//! fingerprint, per-image prompt queries with seeded hard negatives, sample/batch building, and a
//! deterministic synthetic dataset for demos and tests.
//!
//! - [`rle`]: COCO RLE (uncompressed and compressed string) and polygon rasterization.
//! - [`coco`]: loading, preflight, fingerprint, queries.
//! - [`augment`]: the augmentation policy (`training.augment`) and its seeded draws.
//! - [`batch`]: resize/normalize/augment into model inputs and targets, stacking into tensors.
//! - [`overlay`]: pictures of the targets as training builds them (`doctor --gt-overlays`).
//! - [`synthetic`]: the bundled synthetic crack dataset.
//! - [`masks`]: importing image + mask pairs as COCO RLE (`lorahost import`).
//! - [`tiling`]: cutting large images into overlapping tiles with their masks (`lorahost tile`).

pub mod augment;
pub mod batch;
pub mod coco;
pub mod labels;
pub mod masks;
pub mod overlay;
pub mod rle;
pub mod synthetic;
pub mod tiling;

use std::path::PathBuf;

/// Bounds `[x, y, w, h]` (pixels) of the set pixels of a row-major mask `w` wide, if any.
pub(crate) fn mask_bounds(mask: &[bool], w: usize) -> Option<[f64; 4]> {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for (i, _) in mask.iter().enumerate().filter(|(_, v)| **v) {
        let (x, y) = (i % w, i / w);
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
    }
    (x0 != usize::MAX).then(|| [x0 as f64, y0 as f64, (x1 + 1 - x0) as f64, (y1 + 1 - y0) as f64])
}

/// Why data could not be loaded, built or written. Each variant names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A split's annotation file is missing.
    #[error(
        "no {path}: data_dir must be the folder that holds train/ (and valid/) from a Roboflow \
         \"COCO Segmentation\" export, each with _annotations.coco.json{hint}"
    )]
    MissingSplit {
        /// The annotation file that was expected.
        path: PathBuf,
        /// What the folder given looks like instead, if that says more.
        hint: String,
    },
    /// A file could not be read or written.
    #[error("cannot access {path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An annotation file is not COCO JSON.
    #[error("cannot parse {path}: {reason} (expected COCO JSON with images, annotations, categories)")]
    Json {
        /// The file.
        path: PathBuf,
        /// Why, with the JSON path.
        reason: String,
    },
    /// An annotation's mask cannot be decoded.
    #[error(
        "{path}: annotation {ann_id} has an undecodable segmentation: {reason} (fix or drop the \
         annotation; run the preflight to list all)"
    )]
    Mask {
        /// The annotation file.
        path: PathBuf,
        /// The annotation id.
        ann_id: u64,
        /// Why.
        reason: String,
    },
    /// An image could not be read.
    #[error(transparent)]
    Image(#[from] crate::imageio::ImageError),
    /// A bad argument (synthetic spec, sample options, index).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which argument.
        what: &'static str,
        /// Why and what is allowed.
        reason: String,
    },
    /// Tensor construction failed.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// SplitMix64: a tiny, stable PRNG so seeded choices never change with a dependency upgrade.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator from several values (seed, image id, epoch, ...), mixed.
    pub fn from_parts(parts: &[u64]) -> Self {
        let mut r = Self(0x5eed);
        for &p in parts {
            r.0 ^= p;
            r.next_u64();
        }
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n); 0 when n is 0.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

#[cfg(test)]
mod tests;
