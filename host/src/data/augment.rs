//! Training-time augmentation (`training.augment`): which transforms are on and how strong,
//! and the per-image, per-epoch draw that [`super::batch::build_sample`] applies to pixels,
//! boxes and masks together.
//!
//! `augment: true` is lorahost's default policy: horizontal flip and zoom-out (Meta's random
//! resize + pad), p = 0.5 each. A mapping chooses each transform:
//!
//! ```yaml
//! augment:
//!   hflip: 0.5       # probability of a horizontal flip (true = 0.5)
//!   vflip: 0.5       # probability of a vertical flip (true = 0.5)
//!   zoom_out: 0.5    # probability of shrinking the content to U[0.5, 1) of the side, padded
//!   brightness: 0.1  # a shift drawn from U[-0.1, 0.1] on the [-1, 1] pixel scale (true = 0.1)
//!   contrast: 0.1    # a factor drawn from U[0.9, 1.1] around mid-grey (true = 0.1)
//! ```
//!
//! A transform not named in the mapping is off. SAM3-LoRA-Crack's `augment: true` was
//! `{hflip: 0.5, vflip: 0.5, brightness: 0.1, contrast: 0.1}`.
//!
//! Every draw comes from a stream keyed by (seed, transform, epoch, image id): a run is
//! reproducible, and an image is augmented differently in each epoch.

use super::SplitMix64;

/// Which augmentations training applies, and how strongly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augmentation {
    /// Probability of a horizontal flip.
    pub hflip: f64,
    /// Probability of a vertical flip (right for cracks, defects, cells, aerial images; wrong
    /// for scenes with an up and a down).
    pub vflip: f64,
    /// Probability of a zoom-out: the content scaled by U[0.5, 1) into the top-left corner of
    /// the square input, the rest padded.
    pub zoom_out: f64,
    /// Largest brightness shift on the normalized [-1, 1] pixel scale (0.1 ≈ 13 grey levels).
    pub brightness: f64,
    /// Largest contrast change: the factor is drawn from U[1 - contrast, 1 + contrast].
    pub contrast: f64,
}

/// What one image gets in one epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// Flip horizontally.
    pub hflip: bool,
    /// Flip vertically.
    pub vflip: bool,
    /// Content scale in (0, 1] (1 = no zoom-out).
    pub scale: f64,
    /// Contrast factor around mid-grey (1 = unchanged).
    pub contrast: f32,
    /// Brightness shift on the [-1, 1] scale (0 = unchanged).
    pub brightness: f32,
}

impl Draw {
    /// No augmentation.
    pub const NONE: Draw = Draw { hflip: false, vflip: false, scale: 1.0, contrast: 1.0, brightness: 0.0 };
}

/// The transforms of a mapping, in the order they are written out.
pub const KEYS: [&str; 5] = ["hflip", "vflip", "zoom_out", "brightness", "contrast"];

/// Stream tags (kept from the first versions, so `augment: true` runs draw as they did).
const HFLIP: u64 = 0xF11B;
const ZOOM: u64 = 0x200E;
const VFLIP: u64 = 0xF11F;
const PHOTOMETRIC: u64 = 0xC011;

impl Augmentation {
    /// None (`augment: false`).
    pub const NONE: Augmentation =
        Augmentation { hflip: 0.0, vflip: 0.0, zoom_out: 0.0, brightness: 0.0, contrast: 0.0 };
    /// lorahost's default policy (`augment: true`): horizontal flip and zoom-out, p = 0.5 each.
    pub const DEFAULT: Augmentation =
        Augmentation { hflip: 0.5, vflip: 0.0, zoom_out: 0.5, brightness: 0.0, contrast: 0.0 };
    /// SAM3-LoRA-Crack's `augment: true`: h/v flips (p = 0.5 each), brightness ±0.1 and
    /// contrast ×[0.9, 1.1] on the normalized image.
    pub const SAM3_LORA_CRACK: Augmentation =
        Augmentation { hflip: 0.5, vflip: 0.5, zoom_out: 0.0, brightness: 0.1, contrast: 0.1 };

    /// Whether any transform is on.
    pub fn is_on(&self) -> bool {
        self.values().iter().any(|v| *v > 0.0)
    }

    /// The values in [`KEYS`] order.
    pub fn values(&self) -> [f64; 5] {
        [self.hflip, self.vflip, self.zoom_out, self.brightness, self.contrast]
    }

    /// Set the value called `key` (one of [`KEYS`]); `false` when there is no such key.
    pub fn set(&mut self, key: &str, value: f64) -> bool {
        match key {
            "hflip" => self.hflip = value,
            "vflip" => self.vflip = value,
            "zoom_out" => self.zoom_out = value,
            "brightness" => self.brightness = value,
            "contrast" => self.contrast = value,
            _ => return false,
        }
        true
    }

    /// The range `key` takes, for messages and checks: probabilities in [0, 1], brightness in
    /// [0, 1], contrast in [0, 1).
    pub fn accepts(key: &str, value: f64) -> bool {
        match key {
            "contrast" => (0.0..1.0).contains(&value),
            _ => (0.0..=1.0).contains(&value),
        }
    }

    /// What a value in `key` means and takes, for messages.
    pub fn expected(key: &str) -> &'static str {
        match key {
            "brightness" => "a shift in [0, 1] on the [-1, 1] pixel scale (true = 0.1)",
            "contrast" => "a contrast change in [0, 1) (true = 0.1: factors 0.9..1.1)",
            _ => "a probability in [0, 1] (true = 0.5)",
        }
    }

    /// The first value outside its range, as a message naming the key and the fix.
    pub fn check(&self) -> Result<(), String> {
        for (k, v) in KEYS.iter().zip(self.values()) {
            if !Self::accepts(k, v) {
                return Err(format!("training.augment.{k} is {v}: expected {}", Self::expected(k)));
            }
        }
        Ok(())
    }

    /// The draw for image `image_id` in `epoch` of a run seeded `seed`.
    pub fn draw(&self, seed: u64, epoch: u32, image_id: u64) -> Draw {
        let stream = |tag: u64| SplitMix64::from_parts(&[seed, tag, epoch as u64, image_id]);
        let coin = |tag: u64, p: f64| p > 0.0 && stream(tag).next_f64() < p;
        let mut zoom = stream(ZOOM);
        let scale = if self.zoom_out > 0.0 && zoom.next_f64() < self.zoom_out {
            0.5 + 0.5 * zoom.next_f64()
        } else {
            1.0
        };
        let mut photo = stream(PHOTOMETRIC);
        let mut symmetric = |amount: f64| amount * (2.0 * photo.next_f64() - 1.0);
        let brightness = symmetric(self.brightness) as f32;
        let contrast = 1.0 + symmetric(self.contrast) as f32;
        Draw { hflip: coin(HFLIP, self.hflip), vflip: coin(VFLIP, self.vflip), scale, contrast, brightness }
    }

    /// Every transform that is on, at a setting a person can see (flips, zoom-out to 0.75,
    /// the largest brightness and contrast): the augmented variant `doctor --gt-overlays`
    /// draws.
    pub fn showcase(&self) -> Draw {
        Draw {
            hflip: self.hflip > 0.0,
            vflip: self.vflip > 0.0,
            scale: if self.zoom_out > 0.0 { 0.75 } else { 1.0 },
            contrast: 1.0 + self.contrast as f32,
            brightness: self.brightness as f32,
        }
    }

    /// In words, for logs and `doctor`.
    pub fn describe(&self) -> String {
        if !self.is_on() {
            return "no augmentation".into();
        }
        let mut parts = Vec::new();
        if self.hflip > 0.0 {
            parts.push(format!("horizontal flip (p = {})", self.hflip));
        }
        if self.vflip > 0.0 {
            parts.push(format!("vertical flip (p = {})", self.vflip));
        }
        if self.zoom_out > 0.0 {
            parts.push(format!("zoom-out to U[0.5, 1) (p = {})", self.zoom_out));
        }
        if self.brightness > 0.0 {
            parts.push(format!("brightness ±{}", self.brightness));
        }
        if self.contrast > 0.0 {
            parts.push(format!("contrast ×[{}, {}]", 1.0 - self.contrast, 1.0 + self.contrast));
        }
        parts.join(", ")
    }
}

impl Default for Augmentation {
    fn default() -> Self {
        Self::NONE
    }
}

impl serde::Serialize for Augmentation {
    /// `false` for none, `true` for [`Augmentation::DEFAULT`], otherwise the mapping of every
    /// key (so a run's record reads back the same).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        if !self.is_on() {
            return s.serialize_bool(false);
        }
        if *self == Self::DEFAULT {
            return s.serialize_bool(true);
        }
        let mut m = s.serialize_map(Some(KEYS.len()))?;
        for (k, v) in KEYS.iter().zip(self.values()) {
            m.serialize_entry(k, &v)?;
        }
        m.end()
    }
}

impl<'de> serde::Deserialize<'de> for Augmentation {
    /// `true`, `false`, or a mapping of [`KEYS`] to numbers (keys left out are off).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Map(std::collections::BTreeMap<String, f64>),
        }
        let bad = |what: String| serde::de::Error::custom(what);
        match Raw::deserialize(d).map_err(|_| {
            bad("expected true, false or a mapping of hflip, vflip, zoom_out, brightness, contrast".into())
        })? {
            Raw::Bool(true) => Ok(Self::DEFAULT),
            Raw::Bool(false) => Ok(Self::NONE),
            Raw::Map(m) => {
                let mut a = Self::NONE;
                for (k, v) in m {
                    if !a.set(&k, v) {
                        return Err(bad(format!("`{k}` is not an augmentation (use {})", KEYS.join(", "))));
                    }
                }
                a.check().map_err(bad)?;
                Ok(a)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_booleans_and_mappings_and_writes_them_back() {
        let read = |s: &str| serde_yaml::from_str::<Augmentation>(s);
        assert_eq!(read("true").unwrap(), Augmentation::DEFAULT);
        assert_eq!(read("false").unwrap(), Augmentation::NONE);
        let crack = read("{hflip: 0.5, vflip: 0.5, brightness: 0.1, contrast: 0.1}").unwrap();
        assert_eq!(crack, Augmentation::SAM3_LORA_CRACK);
        assert!(read("{rotate: 0.5}").unwrap_err().to_string().contains("`rotate` is not"));
        assert!(read("{hflip: 1.5}").unwrap_err().to_string().contains("hflip is 1.5"));
        assert!(read("{contrast: 1.0}").is_err(), "a factor of 0 would blank the image");
        for a in [Augmentation::NONE, Augmentation::DEFAULT, Augmentation::SAM3_LORA_CRACK] {
            let text = serde_yaml::to_string(&a).unwrap();
            assert_eq!(read(&text).unwrap(), a, "{text}");
        }
        assert_eq!(serde_yaml::to_string(&Augmentation::DEFAULT).unwrap().trim(), "true");
    }

    #[test]
    fn draws_follow_the_probabilities_and_ranges() {
        let n = 4000u64;
        let draws: Vec<Draw> = (0..n).map(|i| Augmentation::SAM3_LORA_CRACK.draw(7, 1, i)).collect();
        let share = |f: &dyn Fn(&Draw) -> bool| draws.iter().filter(|d| f(d)).count() as f64 / n as f64;
        assert!((share(&|d| d.hflip) - 0.5).abs() < 0.04);
        assert!((share(&|d| d.vflip) - 0.5).abs() < 0.04);
        // The two flips are independent.
        assert!((share(&|d| d.hflip && d.vflip) - 0.25).abs() < 0.04);
        assert!(draws.iter().all(|d| d.scale == 1.0));
        assert!(draws.iter().all(|d| d.brightness.abs() <= 0.1 && (d.contrast - 1.0).abs() <= 0.1));
        assert!(share(&|d| d.brightness > 0.05) > 0.2 && share(&|d| d.brightness < -0.05) > 0.2);
        assert!(share(&|d| d.contrast > 1.05) > 0.2 && share(&|d| d.contrast < 0.95) > 0.2);
        // Zoom-out: half of the images, content in [0.5, 1).
        let zoomed: Vec<f64> = (0..n).map(|i| Augmentation::DEFAULT.draw(7, 1, i).scale).collect();
        let share_zoomed = zoomed.iter().filter(|s| **s < 1.0).count() as f64 / n as f64;
        assert!((share_zoomed - 0.5).abs() < 0.04 && zoomed.iter().all(|s| *s >= 0.5 && *s <= 1.0));
        // Off is off; the same (seed, epoch, image) draws the same; another epoch differs.
        assert!((0..n).all(|i| Augmentation::NONE.draw(7, 1, i) == Draw::NONE));
        let a = Augmentation::SAM3_LORA_CRACK;
        assert_eq!(a.draw(7, 1, 3), a.draw(7, 1, 3));
        assert!((0..50).any(|i| a.draw(7, 1, i) != a.draw(7, 2, i)));
    }

    #[test]
    fn describes_and_shows_what_is_on() {
        assert_eq!(Augmentation::NONE.describe(), "no augmentation");
        let d = Augmentation::SAM3_LORA_CRACK.describe();
        assert!(d.contains("vertical flip") && d.contains("brightness ±0.1") && !d.contains("zoom"), "{d}");
        let s = Augmentation::DEFAULT.showcase();
        assert!(s.hflip && !s.vflip && s.scale == 0.75 && s.contrast == 1.0 && s.brightness == 0.0);
    }
}
