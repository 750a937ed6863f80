//! Reading images the way users have them: JPEG/PNG, EXIF orientation applied, resized to the
//! model's square input (aspect ratio not preserved, as SAM3 does), normalized to [-1, 1].

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use std::path::{Path, PathBuf};

/// Why an image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Missing or unreadable file.
    #[error("cannot read image {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Not a decodable image.
    #[error("cannot decode image {path}: {reason} (supported: JPEG, PNG)")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A header that declares more pixels than lorahost decodes ([`MAX_IMAGE_SIDE`],
    /// [`MAX_IMAGE_PIXELS`]): a huge photo, or a corrupt or hostile header ("decompression
    /// bomb") that would make the decoder allocate tens of GiB.
    #[error(
        "cannot decode image {path}: it declares {width}x{height} pixels, over lorahost's limit of {} megapixels \
         (e.g. 20000x20000) and {} px a side: downscale it (if it is not that large, its header is corrupt: \
         export it again)",
        MAX_IMAGE_PIXELS / 1_000_000,
        MAX_IMAGE_SIDE
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The width its header declares.
        width: u32,
        /// The height its header declares.
        height: u32,
    },
}

/// The longest side, in pixels, of an image lorahost decodes (JPEG's own maximum).
pub const MAX_IMAGE_SIDE: u32 = 65_535;

/// The most pixels an image lorahost decodes may have: 20000x20000. Decoding one takes about
/// 1.2 GB as 8-bit RGB (more while converting); a header declaring more is refused before any
/// pixel buffer is allocated.
pub const MAX_IMAGE_PIXELS: u64 = 400_000_000;

/// The most bytes the decoders may allocate for their own buffers (the pixel buffer itself is
/// bounded by [`MAX_IMAGE_PIXELS`]: at most 3.2 GB, 16-bit RGBA).
const MAX_DECODE_BYTES: u64 = 4 << 30;

/// Whether an image of `width`x`height` pixels is one lorahost decodes.
fn within_limits(width: u32, height: u32) -> bool {
    width <= MAX_IMAGE_SIDE && height <= MAX_IMAGE_SIDE && width as u64 * height as u64 <= MAX_IMAGE_PIXELS
}

/// How an image's EXIF orientation was used by [`load_rgb_for_annotations`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrientationUse {
    /// No EXIF orientation (or the identity).
    None,
    /// Applied: the pixels are as a person sees them. `swaps` when it exchanges width and height.
    Applied {
        /// The EXIF orientation value (2..=8).
        exif: u8,
        /// Whether it exchanges width and height (a 90° rotation).
        swaps: bool,
    },
    /// Not applied: the JSON width/height are the stored frame's, so the annotations were drawn
    /// on the stored pixels (as pycocotools-based tools, which ignore EXIF, see them).
    Ignored {
        /// The EXIF orientation value (5..=8).
        exif: u8,
    },
}

/// Whether a JPEG's main image has no end-of-image marker: the file was cut off (a partial
/// download or copy). The decoder pads the missing part with grey without an error. The marker
/// segments are walked to the first start-of-scan, so an EXIF thumbnail's own end marker does
/// not count.
fn jpeg_truncated(bytes: &[u8]) -> bool {
    if bytes.len() < 4 || bytes[0] != 0xFF || bytes[1] != 0xD8 {
        return false;
    }
    let mut i = 2;
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return false; // not a marker: leave it to the decoder
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        if marker == 0xD9 {
            return false;
        }
        if marker == 0xDA {
            // Entropy-coded data follows; the end marker must come after it.
            return !bytes[i + 2..].windows(2).any(|w| w == [0xFF, 0xD9]);
        }
        if (0xD0..=0xD7).contains(&marker) || marker == 0x01 {
            i += 2;
            continue;
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        i += 2 + len;
    }
    true
}

/// Decode a file: the raw pixels and the EXIF orientation, without applying it.
fn decode_raw(path: &Path) -> Result<(DynamicImage, image::metadata::Orientation), ImageError> {
    let decode = |reason: String| ImageError::Decode { path: path.into(), reason: reason.replace('\n', " ") };
    let bytes = std::fs::read(path).map_err(|e| ImageError::Read {
        path: path.into(),
        reason: if path.is_dir() { "it is a directory, not an image file".into() } else { e.to_string() },
    })?;
    if bytes.is_empty() {
        return Err(decode("the file is empty (0 bytes): copy or export it again".into()));
    }
    let mut reader = ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Read { path: path.into(), reason: e.to_string() })?;
    // The decoders' own buffers are bounded; the pixel buffer is checked below, from the
    // header, before it is allocated (`DynamicImage::from_decoder` does not check limits).
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    if reader.format() == Some(image::ImageFormat::Jpeg) && jpeg_truncated(&bytes) {
        return Err(decode(format!(
            "the JPEG is truncated ({} bytes, no end-of-image marker): the lower part would decode as grey; copy or export it again",
            bytes.len()
        )));
    }
    let mut decoder = reader.into_decoder().map_err(|e| decode(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    if !within_limits(width, height) {
        return Err(ImageError::TooLarge { path: path.into(), width, height });
    }
    let orientation = decoder.orientation().map_err(|e| decode(e.to_string()))?;
    let img = DynamicImage::from_decoder(decoder).map_err(|e| decode(e.to_string()))?;
    Ok((img, orientation))
}

/// Decode an image file and apply its EXIF orientation, so pixels are as a person sees them.
pub fn load_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    let (mut img, orientation) = decode_raw(path)?;
    img.apply_orientation(orientation);
    Ok(img.to_rgb8())
}

/// An image file's sizes as stored and as displayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frames {
    /// (width, height) of the stored pixels.
    pub stored: (u32, u32),
    /// (width, height) with the EXIF orientation applied.
    pub displayed: (u32, u32),
    /// The EXIF orientation value (1: none).
    pub exif: u8,
}

/// Decode an image file (checking it whole) for its [`Frames`].
pub fn frames(path: &Path) -> Result<Frames, ImageError> {
    let (img, orientation) = decode_raw(path)?;
    let exif = orientation.to_exif();
    let stored = (img.width(), img.height());
    let displayed = if exif >= 5 { (stored.1, stored.0) } else { stored };
    Ok(Frames { stored, displayed, exif })
}

/// Decode an image file as stored, its EXIF orientation not applied.
pub fn load_rgb_stored(path: &Path) -> Result<RgbImage, ImageError> {
    Ok(decode_stored(path)?.to_rgb8())
}

/// Decode an image file as stored, in its own colour type and bit depth (a mask image), with
/// the same checks as every other read (empty or truncated files, declared sizes too large).
pub fn decode_stored(path: &Path) -> Result<DynamicImage, ImageError> {
    Ok(decode_raw(path)?.0)
}

/// Decode an image to pair with its COCO annotations. The EXIF orientation is applied (the
/// frame Roboflow and most annotation tools draw in), except when it exchanges width and height
/// and the JSON `width`/`height` are those of the stored, un-rotated pixels: then the
/// annotations were drawn on the stored pixels, and rotating the image would misalign them.
pub fn load_rgb_for_annotations(
    path: &Path,
    json_size: Option<(u32, u32)>,
) -> Result<(RgbImage, OrientationUse), ImageError> {
    let (mut img, orientation) = decode_raw(path)?;
    let exif = orientation.to_exif();
    if exif == 1 {
        return Ok((img.to_rgb8(), OrientationUse::None));
    }
    let stored = (img.width(), img.height());
    let swaps = exif >= 5;
    if swaps && stored.0 != stored.1 && json_size == Some(stored) {
        return Ok((img.to_rgb8(), OrientationUse::Ignored { exif }));
    }
    img.apply_orientation(orientation);
    Ok((img.to_rgb8(), OrientationUse::Applied { exif, swaps }))
}

/// Resize to `size`×`size` (bilinear with antialiasing when shrinking) and normalize each
/// channel as x/255·2 − 1 (mean 0.5, std 0.5): a (1, 3, size, size) f32 tensor.
pub fn to_pixel_values(img: &RgbImage, size: usize, device: &Device) -> candle_core::Result<Tensor> {
    let resized =
        image::imageops::resize(img, size as u32, size as u32, image::imageops::FilterType::Triangle);
    let hw = size * size;
    let mut data = vec![0f32; 3 * hw];
    for (i, p) in resized.pixels().enumerate() {
        for c in 0..3 {
            data[c * hw + i] = p[c] as f32 / 255.0 * 2.0 - 1.0;
        }
    }
    Tensor::from_vec(data, (1, 3, size, size), device)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn normalizes_to_minus_one_one() {
        let img =
            RgbImage::from_fn(
                4,
                4,
                |x, _| if x < 2 { image::Rgb([0, 0, 0]) } else { image::Rgb([255, 255, 255]) },
            );
        let t = to_pixel_values(&img, 4, &Device::Cpu).unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v[0], -1.0);
        assert_eq!(v[3], 1.0);
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("broken.jpg");
        std::fs::write(&p, b"not an image").unwrap();
        let e = load_rgb(&p).unwrap_err().to_string();
        assert!(e.contains("broken.jpg"), "{e}");
        let e = load_rgb(&dir.path().join("none.png")).unwrap_err().to_string();
        assert!(e.contains("none.png") && e.contains("cannot read"), "{e}");
    }

    /// A PNG of `width`x`height` pixels (8-bit RGB) by hand: the header, then `idat` as its only
    /// image data chunk (whatever it decodes to).
    pub(crate) fn png_with_header(width: u32, height: u32, idat: &[u8]) -> Vec<u8> {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &b in bytes {
                crc ^= b as u32;
                for _ in 0..8 {
                    crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
                }
            }
            !crc
        }
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8; 4], data: &[u8]| {
            out.extend((data.len() as u32).to_be_bytes());
            let start = out.len();
            out.extend(kind);
            out.extend(data);
            let crc = crc32(&out[start..]);
            out.extend(crc.to_be_bytes());
        };
        let mut ihdr = Vec::new();
        ihdr.extend(width.to_be_bytes());
        ihdr.extend(height.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, adaptive filters, not interlaced
        chunk(b"IHDR", &ihdr);
        chunk(b"IDAT", idat);
        chunk(b"IEND", &[]);
        out
    }

    /// A "decompression bomb": a header claiming 100000x100000 pixels (30 GB of RGB) over a
    /// few bytes of data. Refused from the header, named, before any pixel buffer exists (it
    /// used to abort the process with "memory allocation failed").
    #[test]
    fn huge_declared_size_is_refused_from_the_header() {
        let dir = tempfile::tempdir().unwrap();
        // An empty zlib stream: a valid, tiny IDAT.
        let empty_zlib = [0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01];
        let p = dir.path().join("bomb.png");
        std::fs::write(&p, png_with_header(100_000, 100_000, &empty_zlib)).unwrap();
        for e in [load_rgb(&p).unwrap_err(), load_rgb_for_annotations(&p, Some((100, 100))).unwrap_err()] {
            assert!(matches!(e, ImageError::TooLarge { width: 100_000, height: 100_000, .. }), "{e:?}");
            let msg = e.to_string();
            assert!(
                msg.contains("bomb.png") && msg.contains("100000x100000") && msg.contains("downscale"),
                "{msg}"
            );
        }
        // One side too long, within the pixel count.
        let p = dir.path().join("strip.png");
        std::fs::write(&p, png_with_header(70_000, 2, &empty_zlib)).unwrap();
        assert!(matches!(load_rgb(&p), Err(ImageError::TooLarge { width: 70_000, height: 2, .. })));
        // A small image with the same broken data is a plain decode error.
        let p = dir.path().join("small.png");
        std::fs::write(&p, png_with_header(4, 4, &empty_zlib)).unwrap();
        assert!(matches!(load_rgb(&p), Err(ImageError::Decode { .. })));
        // Real large photos stay within the limits: 20000x20000, a 60000x6000 panorama.
        assert!(within_limits(20_000, 20_000) && within_limits(60_000, 6_000));
        assert!(!within_limits(20_001, 20_000) && !within_limits(65_536, 1));
    }

    #[test]
    fn a_directory_is_no_image_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("photo.jpg");
        std::fs::create_dir(&p).unwrap();
        let e = load_rgb(&p).unwrap_err();
        assert!(matches!(e, ImageError::Read { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("photo.jpg") && msg.contains("is a directory, not an image file"), "{msg}");
    }

    /// `img` as a JPEG whose EXIF orientation is `exif`.
    pub(crate) fn jpeg_with_orientation(img: &RgbImage, exif: u8) -> Vec<u8> {
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode_image(&DynamicImage::ImageRgb8(img.clone()))
            .unwrap();
        // APP1 "Exif\0\0" + little-endian TIFF header + one IFD entry: 0x0112 SHORT 1 = exif.
        let mut tiff = b"II*\0\x08\0\0\0".to_vec();
        tiff.extend([1, 0]); // one entry
        tiff.extend([0x12, 0x01, 3, 0, 1, 0, 0, 0, exif, 0, 0, 0]);
        tiff.extend([0, 0, 0, 0]); // no next IFD
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend(tiff);
        let len = (app1.len() + 2) as u16;
        let mut out = vec![0xFF, 0xD8, 0xFF, 0xE1, (len >> 8) as u8, len as u8];
        out.extend(app1);
        out.extend(&jpeg[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 4x2 JPEG whose EXIF says "rotate 90° clockwise" (orientation 6) loads as 2x4.
        let img = RgbImage::from_fn(4, 2, |x, _| image::Rgb([x as u8 * 60, 0, 0]));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rotated.jpg");
        std::fs::write(&p, jpeg_with_orientation(&img, 6)).unwrap();
        let loaded = load_rgb(&p).unwrap();
        assert_eq!(loaded.dimensions(), (2, 4));
        // Paired with annotations: the JSON size says which frame they were drawn in.
        let (img, used) = load_rgb_for_annotations(&p, Some((2, 4))).unwrap();
        assert_eq!((img.dimensions(), used), ((2, 4), OrientationUse::Applied { exif: 6, swaps: true }));
        let (img, used) = load_rgb_for_annotations(&p, Some((4, 2))).unwrap();
        assert_eq!((img.dimensions(), used), ((4, 2), OrientationUse::Ignored { exif: 6 }));
        assert_eq!(img.get_pixel(3, 0)[0], loaded.get_pixel(1, 3)[0], "the stored pixels, not rotated");
        let (img, used) = load_rgb_for_annotations(&p, None).unwrap();
        assert_eq!((img.dimensions(), used), ((2, 4), OrientationUse::Applied { exif: 6, swaps: true }));
    }
}
