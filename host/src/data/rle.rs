//! COCO mask codecs: checked decoding of uncompressed RLE counts, the compressed RLE string form
//! (pycocotools `rleFrString` / `rleToString`), and polygon rasterization.
//!
//! Compressed RLE: each run count (column-major runs, background first) is written as a
//! little-endian sequence of 5-bit groups, each as one character `48 + group`, where bit 0x20
//! marks "more groups follow" and bit 0x10 of the last group is the sign. From the fourth count
//! on (index > 2) the value written is the difference to the count two places earlier, which is
//! why negative values occur.
//!
//! Polygons are filled with the even-odd rule sampled at pixel centers: pixel (x, y) is inside
//! when the point (x + 0.5, y + 0.5) is inside the polygon. Several polygons of one annotation
//! are unioned (as pycocotools `merge` does). pycocotools rasterizes differently at the boundary
//! (it traces the outline on a 5× upsampled grid), so boundary pixels can differ by one pixel;
//! interiors agree.

/// Decode a compressed COCO RLE string into run counts. Errors say what is wrong with it.
pub fn decode_compressed_counts(s: &str) -> Result<Vec<u64>, String> {
    let bytes = s.as_bytes();
    let mut counts: Vec<i64> = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        let mut x: i64 = 0;
        let mut k = 0u32;
        loop {
            let Some(&b) = bytes.get(p) else {
                return Err(format!("compressed RLE string ends inside a count (at byte {p})"));
            };
            let c = b as i64 - 48;
            if !(0..64).contains(&c) {
                return Err(format!("compressed RLE has invalid character {:?} at byte {p}", b as char));
            }
            if k >= 13 {
                return Err(format!("compressed RLE count too long at byte {p}"));
            }
            x |= (c & 0x1f) << (5 * k);
            p += 1;
            k += 1;
            if c & 0x20 == 0 {
                if c & 0x10 != 0 && 5 * k < 64 {
                    x |= -1i64 << (5 * k);
                }
                break;
            }
        }
        if counts.len() > 2 {
            x = x
                .checked_add(counts[counts.len() - 2])
                .ok_or_else(|| "compressed RLE count overflows".to_string())?;
        }
        if x < 0 {
            return Err(format!("compressed RLE decodes to a negative run ({x}) at count {}", counts.len()));
        }
        counts.push(x);
    }
    Ok(counts.into_iter().map(|c| c as u64).collect())
}

/// Encode run counts as a compressed COCO RLE string (the inverse of
/// [`decode_compressed_counts`]; byte-identical to pycocotools).
pub fn encode_compressed_counts(counts: &[u64]) -> String {
    let mut out = String::new();
    for i in 0..counts.len() {
        let mut x = counts[i] as i64;
        if i > 2 {
            x -= counts[i - 2] as i64;
        }
        loop {
            let mut c = x & 0x1f;
            x >>= 5;
            let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                c |= 0x20;
            }
            out.push((c + 48) as u8 as char);
            if !more {
                break;
            }
        }
    }
    out
}

/// Decode run counts (column-major, background first) of an `h`×`w` mask into a row-major mask.
/// The counts must sum to exactly `h * w`.
pub fn decode_counts(counts: &[u64], h: usize, w: usize) -> Result<Vec<bool>, String> {
    let Some(n) = h.checked_mul(w) else {
        return Err(format!("RLE size {h}x{w} is too large"));
    };
    let total = counts.iter().try_fold(0u64, |a, &c| a.checked_add(c));
    if total != Some(n as u64) {
        return Err(format!(
            "RLE counts sum to {} but size is {h}x{w} = {} pixels",
            total.map_or("overflow".to_string(), |t| t.to_string()),
            h * w
        ));
    }
    let mut out = vec![false; h * w];
    let mut i = 0usize;
    for (n, &c) in counts.iter().enumerate() {
        let fg = n % 2 == 1;
        for j in i..i + c as usize {
            if fg {
                let (x, y) = (j / h, j % h);
                out[y * w + x] = true;
            }
        }
        i += c as usize;
    }
    Ok(out)
}

/// [`decode_counts`] of an `h`×`w` mask, only the pixels of `win` (row-major, `win.w` wide);
/// the counts are checked as there.
pub fn decode_counts_in(counts: &[u64], h: usize, w: usize, win: Window) -> Result<Vec<bool>, String> {
    let total = counts.iter().try_fold(0u64, |a, &c| a.checked_add(c));
    if h.checked_mul(w).is_none() || total != Some((h * w) as u64) {
        return decode_counts(counts, h, w).map(|_| Vec::new());
    }
    let mut out = vec![false; win.w * win.h];
    let (xs, ys) = (win.x0..win.x0 + win.w, win.y0..win.y0 + win.h);
    let mut i = 0usize;
    for (n, &c) in counts.iter().enumerate() {
        if n % 2 == 1 {
            // Column-major runs: only the columns of the window, each run's rows clipped to it.
            for j in i..i + c as usize {
                let (x, y) = (j / h, j % h);
                if xs.contains(&x) && ys.contains(&y) {
                    out[(y - win.y0) * win.w + x - win.x0] = true;
                }
            }
        }
        i += c as usize;
    }
    Ok(out)
}

/// Fill COCO polygons (each a flat `[x0, y0, x1, y1, ...]` list in pixels) into a row-major
/// `h`×`w` mask; see the module docs for the rule. Coordinates must be finite; a polygon of
/// fewer than 3 points adds nothing, and a trailing odd coordinate is ignored (as pycocotools).
pub fn rasterize_polygons(polygons: &[Vec<f64>], h: usize, w: usize) -> Result<Vec<bool>, String> {
    rasterize_polygons_in(polygons, h, w, Window { x0: 0, y0: 0, w, h })
}

/// A rectangle of an image, `[x0, x0 + w) × [y0, y0 + h)` in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Left column.
    pub x0: usize,
    /// Top row.
    pub y0: usize,
    /// Width.
    pub w: usize,
    /// Height.
    pub h: usize,
}

/// [`rasterize_polygons`] of an `h`×`w` image, only the pixels of `win` (row-major, `win.w`
/// wide): the same pixels the whole mask has there, computed in the image's own coordinates.
pub fn rasterize_polygons_in(
    polygons: &[Vec<f64>],
    h: usize,
    w: usize,
    win: Window,
) -> Result<Vec<bool>, String> {
    if polygons.is_empty() {
        return Err("segmentation is an empty polygon list".into());
    }
    let (ys, xe) = (win.y0..(win.y0 + win.h).min(h), (win.x0 + win.w).min(w));
    let mut mask = vec![false; win.h * win.w];
    let mut xs: Vec<f64> = Vec::new();
    for (pi, poly) in polygons.iter().enumerate() {
        if poly.iter().any(|v| !v.is_finite()) {
            return Err(format!("polygon {pi} has a non-finite coordinate"));
        }
        // As pycocotools: a trailing odd coordinate is ignored, and a fragment of fewer than 3
        // points (exporters leave them behind) encloses nothing.
        let n = poly.len() / 2;
        if n < 3 {
            continue;
        }
        for y in ys.clone() {
            let yc = y as f64 + 0.5;
            xs.clear();
            for e in 0..n {
                let (x0, y0) = (poly[2 * e], poly[2 * e + 1]);
                let (x1, y1) = (poly[2 * ((e + 1) % n)], poly[2 * ((e + 1) % n) + 1]);
                if (y0 > yc) != (y1 > yc) {
                    xs.push(x0 + (yc - y0) * (x1 - x0) / (y1 - y0));
                }
            }
            xs.sort_by(f64::total_cmp);
            for pair in xs.chunks_exact(2) {
                // Pixels whose center x + 0.5 lies in [a, b).
                let start = (pair[0] - 0.5).ceil().max(0.0);
                let end = (pair[1] - 0.5).ceil().min(w as f64);
                let (start, end) = ((start as usize).max(win.x0), (end.max(0.0) as usize).min(xe));
                for x in start..end {
                    mask[(y - win.y0) * win.w + x - win.x0] = true;
                }
            }
        }
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sam3::postprocess::rle_encode;

    /// A window of a mask, decoded or rasterized on its own, is the whole mask's pixels there
    /// (polygons with edges through pixel centres and past the image, RLE runs across columns).
    #[test]
    fn windows_are_the_whole_masks_pixels() {
        let (h, w) = (23, 31);
        let polys =
            vec![vec![2.5, 1.5, 20.25, 3.0, 29.0, 17.5, 7.5, 21.5], vec![-4.0, 10.0, 6.0, 8.5, 3.3, 30.0]];
        let whole = rasterize_polygons(&polys, h, w).unwrap();
        let counts = rle_encode(&whole, h, w).counts;
        for win in [
            Window { x0: 0, y0: 0, w, h },
            Window { x0: 3, y0: 2, w: 10, h: 7 },
            Window { x0: 20, y0: 15, w: 11, h: 8 },
            Window { x0: 0, y0: 9, w: 5, h: 14 },
        ] {
            let want: Vec<bool> = (win.y0..win.y0 + win.h)
                .flat_map(|y| (win.x0..win.x0 + win.w).map(move |x| (x, y)))
                .map(|(x, y)| whole[y * w + x])
                .collect();
            assert_eq!(rasterize_polygons_in(&polys, h, w, win).unwrap(), want, "{win:?}");
            assert_eq!(decode_counts_in(&counts, h, w, win).unwrap(), want, "{win:?}");
        }
        assert!(decode_counts_in(&[1, 2], 2, 2, Window { x0: 0, y0: 0, w: 1, h: 1 }).is_err());
    }

    #[test]
    fn compressed_roundtrip_and_checks() {
        let counts = vec![3u64, 1, 40, 2, 0, 7, 100, 1];
        let s = encode_compressed_counts(&counts);
        assert_eq!(decode_compressed_counts(&s).unwrap(), counts);
        assert!(decode_compressed_counts("\u{7f}").is_err());
        // A lone continuation group is truncated.
        assert!(decode_compressed_counts("P").is_err());
        assert!(decode_counts(&[1, 2], 2, 2).is_err());
    }

    /// Ground truth from pycocotools 2.0.11: `mask.encode` of a 6x5 mask with pixels (0,0),
    /// rows 1..4 × cols 1..3 and (5,4) set gives `b'0162M0:N'`.
    #[test]
    fn compressed_matches_pycocotools() {
        let counts = decode_compressed_counts("0162M0:N").unwrap();
        let mask = decode_counts(&counts, 6, 5).unwrap();
        let mut want = vec![false; 30];
        want[0] = true;
        for y in 1..4 {
            for x in 1..3 {
                want[y * 5 + x] = true;
            }
        }
        want[5 * 5 + 4] = true;
        assert_eq!(mask, want);
        assert_eq!(encode_compressed_counts(&counts), "0162M0:N");
        // A 40x30 mask with a hole, also from pycocotools: long runs and negative deltas.
        let s = "c2P180000WOJ`06@J`06@J`06@J`06@J`06@J`06@J`06@J`06@J`06@J`06@J`06@J`06@J`06@J`06@J`06900000000U6";
        let m = decode_counts(&decode_compressed_counts(s).unwrap(), 40, 30).unwrap();
        let want = |y: usize, x: usize| {
            (3..35).contains(&y) && (2..25).contains(&x) && !((10..12).contains(&y) && (5..20).contains(&x))
        };
        for y in 0..40 {
            for x in 0..30 {
                assert_eq!(m[y * 30 + x], want(y, x), "({y},{x})");
            }
        }
        assert_eq!(encode_compressed_counts(&decode_compressed_counts(s).unwrap()), s);
    }

    #[test]
    fn polygon_square_fills_interior() {
        let m = rasterize_polygons(&[vec![1.0, 1.0, 3.0, 1.0, 3.0, 3.0, 1.0, 3.0]], 4, 4).unwrap();
        let on: Vec<usize> = (0..16).filter(|&i| m[i]).collect();
        assert_eq!(on, vec![5, 6, 9, 10]);
        // A 2-point fragment adds nothing, beside a real polygon or alone; an odd trailing
        // coordinate is ignored.
        assert_eq!(
            rasterize_polygons(
                &[vec![1.0, 1.0, 3.0, 1.0, 3.0, 3.0, 1.0, 3.0], vec![0.0, 0.0, 1.0, 1.0]],
                4,
                4
            )
            .unwrap(),
            m
        );
        assert!(!rasterize_polygons(&[vec![0.0, 0.0, 1.0, 1.0]], 4, 4).unwrap().contains(&true));
        assert_eq!(
            rasterize_polygons(&[vec![1.0, 1.0, 3.0, 1.0, 3.0, 3.0, 1.0, 3.0, 7.0]], 4, 4).unwrap(),
            m
        );
        assert!(rasterize_polygons(&[vec![1.0, f64::NAN, 3.0, 1.0, 3.0, 3.0]], 4, 4).is_err());
        assert!(rasterize_polygons(&[], 4, 4).is_err());
    }

    /// pycocotools 2.0.11 (`frPyObjects` → `merge` → `decode`) fills this quadrilateral as
    /// `want`; the center-sampled even-odd fill may differ only on boundary pixels.
    #[test]
    fn polygon_close_to_pycocotools() {
        let want = [
            "000000000",
            "011100000",
            "011111110",
            "011111100",
            "011111100",
            "111111000",
            "001111000",
            "000000000",
            "000000000",
        ];
        let poly = vec![1.2, 0.7, 7.6, 2.3, 5.1, 7.8, 0.4, 5.5];
        let m = rasterize_polygons(&[poly], 9, 9).unwrap();
        let mut diff = 0;
        for (y, row) in want.iter().enumerate() {
            for (x, c) in row.chars().enumerate() {
                if m[y * 9 + x] != (c == '1') {
                    diff += 1;
                }
            }
        }
        let area = m.iter().filter(|b| **b).count();
        assert!(diff <= 2, "{diff} pixels differ (area {area})");
    }

    #[test]
    fn uncompressed_matches_postprocess_encoder() {
        let mask: Vec<bool> = (0..35).map(|i| (i * 7 + i / 5) % 3 == 0).collect();
        let rle = rle_encode(&mask, 5, 7);
        assert_eq!(decode_counts(&rle.counts, 5, 7).unwrap(), mask);
        let s = encode_compressed_counts(&rle.counts);
        assert_eq!(decode_compressed_counts(&s).unwrap(), rle.counts);
    }
}
