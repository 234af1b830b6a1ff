//! Antialiased bicubic resampling of 8-bit images, bit-exact with Pillow's `Image.resize(size,
//! BICUBIC)` (`libImaging/Resample.c`: `precompute_coeffs`, `normalize_coeffs_8bpc`,
//! `ImagingResampleHorizontal_8bpc` / `Vertical_8bpc`), which is also what torch's uint8 CPU
//! path of `interpolate(..., mode="bicubic", antialias=True)` computes (its comments say it
//! matches Pillow-SIMD) and so what transformers' Qwen2-VL image processors produce.
//!
//! The filter (Keys cubic, a = -0.5, support 2) is stretched by the scale when shrinking
//! (antialiasing); weights are normalised, rounded to 22-bit fixed point, and each pass
//! (horizontal first, then vertical) rounds and clamps to 8 bits.

/// Fixed-point fraction bits of the weights (`PRECISION_BITS` = 32 - 8 - 2).
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output index: the first input index it reads, and its fixed-point weights.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    (0..out_size)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            // C's (int) truncates toward zero; both bounds are clamped as Pillow clamps them.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = (((center + support + 0.5) as i64).min(in_size as i64)) as usize;
            // Pillow multiplies by the reciprocal (`ss`), which rounds differently from dividing.
            let ss = 1.0 / filter_scale;
            let raw: Vec<f64> = (lo..hi).map(|x| bicubic((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = raw.iter().sum();
            let fixed = raw
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    let scaled = w * (1u64 << PRECISION_BITS) as f64;
                    (if w < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i32
                })
                .collect();
            (lo, fixed)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes interleaved 8-bit pixels (`channels` per pixel, rows of `width`) to `new_width` x
/// `new_height`.
pub fn resize_bicubic(pixels: &[u8], width: usize, height: usize, channels: usize, new_width: usize, new_height: usize) -> Vec<u8> {
    debug_assert_eq!(pixels.len(), width * height * channels);
    let half = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass (skipped when the width stays, as Pillow skips it).
    let wide = if new_width == width {
        pixels.to_vec()
    } else {
        let coeffs = coefficients(width, new_width);
        let mut out = vec![0u8; new_width * height * channels];
        for y in 0..height {
            let row = &pixels[y * width * channels..(y + 1) * width * channels];
            for (x, (lo, k)) in coeffs.iter().enumerate() {
                for c in 0..channels {
                    let acc = k.iter().enumerate().fold(half, |acc, (j, &w)| acc + row[(lo + j) * channels + c] as i64 * w as i64);
                    out[(y * new_width + x) * channels + c] = clip8(acc);
                }
            }
        }
        out
    };
    if new_height == height {
        return wide;
    }
    let coeffs = coefficients(height, new_height);
    let mut out = vec![0u8; new_width * new_height * channels];
    for (y, (lo, k)) in coeffs.iter().enumerate() {
        for x in 0..new_width * channels {
            let acc = k.iter().enumerate().fold(half, |acc, (j, &w)| acc + wide[(lo + j) * new_width * channels + x] as i64 * w as i64);
            out[y * new_width * channels + x] = clip8(acc);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_a_same_size_resize_is_the_identity() {
        for (from, to) in [(37, 32), (32, 96), (100, 7), (5, 5)] {
            for (_, k) in coefficients(from, to) {
                let sum: i64 = k.iter().map(|&w| w as i64).sum();
                assert!((sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{from}->{to}: {sum}");
            }
        }
        let pixels: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 37 % 256) as u8).collect();
        assert_eq!(resize_bicubic(&pixels, 5, 4, 3, 5, 4), pixels);
        // A flat image stays flat at any size.
        let flat = vec![77u8; 9 * 7 * 3];
        assert!(resize_bicubic(&flat, 9, 7, 3, 32, 3).iter().all(|&v| v == 77));
    }
}
