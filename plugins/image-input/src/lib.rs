//! # inference-pio-image-input
//!
//! Images into vision-language models, as transformers' `Qwen2VLImageProcessor` /
//! `Qwen2VLImageProcessorFast` prepare them for Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the size
//! chosen by `smart_resize` (multiples of patch x merge, within the pixel budget), Pillow-exact
//! antialiased bicubic resampling of the 8-bit pixels ([`resample`]), rescale and normalise,
//! and the patches flattened in the order of the vision tower's Conv3d patch embedding, with
//! the image's `grid_thw`; and image files (PNG, JPEG, WebP) into those RGB8 pixels, within
//! limits ([`decode`]).

use rayon::prelude::*;

pub mod decode;
pub mod resample;

pub use decode::{DecodeLimits, Rgb8, decode_image};

/// What went wrong with an image, named.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImageError {
    #[error("the image is {width}x{height} pixels; {reason}")]
    Size { width: usize, height: usize, reason: String },
    #[error("{got} bytes of RGB8 pixels for a {width}x{height} image (want {want})")]
    Pixels { width: usize, height: usize, got: usize, want: usize },
    #[error("preprocessor_config.json: {0}")]
    Config(String),
    #[error("image too large: {0}")]
    TooLarge(String),
    #[error("unsupported image: {0}")]
    Format(String),
    #[error("corrupt image: {0}")]
    Corrupt(String),
}

/// The processor's settings (`preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    /// Side of a square patch in pixels (`patch_size`).
    pub patch_size: usize,
    /// Frames per patch (`temporal_patch_size`): a still image is repeated to fill them.
    pub temporal_patch_size: usize,
    /// Patches merged per side into one token (`merge_size`).
    pub merge_size: usize,
    /// Fewest and most pixels after resizing (`size.shortest_edge` / `size.longest_edge`,
    /// which are pixel counts, or `min_pixels` / `max_pixels`).
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ImageProcessor {
    /// Qwen3-VL-2B-Instruct's `preprocessor_config.json`.
    pub fn qwen3_vl() -> Self {
        Self { patch_size: 16, temporal_patch_size: 2, merge_size: 2, min_pixels: 65_536, max_pixels: 16_777_216, mean: [0.5; 3], std: [0.5; 3] }
    }

    /// The settings of a `preprocessor_config.json` (absent keys: Qwen3-VL's); `size`'s
    /// `shortest_edge` / `longest_edge` are pixel counts, as transformers reads them for this
    /// processor (`min_pixels` / `max_pixels` where those are given).
    pub fn from_config(config: &serde_json::Value) -> Result<Self, ImageError> {
        let d = Self::qwen3_vl();
        let count = |keys: &[(&str, Option<&str>)], default: usize| -> Result<usize, ImageError> {
            for (key, inner) in keys {
                let v = match inner {
                    Some(i) => config.get(key).and_then(|s| s.get(i)),
                    None => config.get(key),
                };
                if let Some(v) = v.filter(|v| !v.is_null()) {
                    return v.as_u64().filter(|&n| n > 0).map(|n| n as usize).ok_or_else(|| ImageError::Config(format!("`{key}` must be a positive integer, got {v}")));
                }
            }
            Ok(default)
        };
        let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3], ImageError> {
            match config.get(key).filter(|v| !v.is_null()) {
                None => Ok(default),
                Some(v) => v
                    .as_array()
                    .and_then(|a| a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect::<Option<Vec<_>>>())
                    .and_then(|v| <[f32; 3]>::try_from(v).ok())
                    .ok_or_else(|| ImageError::Config(format!("`{key}` must be three numbers, got {v}"))),
            }
        };
        let p = Self {
            patch_size: count(&[("patch_size", None)], d.patch_size)?,
            temporal_patch_size: count(&[("temporal_patch_size", None)], d.temporal_patch_size)?,
            merge_size: count(&[("merge_size", None)], d.merge_size)?,
            min_pixels: count(&[("min_pixels", None), ("size", Some("shortest_edge"))], d.min_pixels)?,
            max_pixels: count(&[("max_pixels", None), ("size", Some("longest_edge"))], d.max_pixels)?,
            mean: triple("image_mean", d.mean)?,
            std: triple("image_std", d.std)?,
        };
        if p.min_pixels > p.max_pixels {
            return Err(ImageError::Config(format!("min_pixels {} is over max_pixels {}", p.min_pixels, p.max_pixels)));
        }
        if p.std.contains(&0.0) {
            return Err(ImageError::Config("image_std has a zero".into()));
        }
        Ok(p)
    }

    /// The side every resized dimension is a multiple of.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// transformers' `smart_resize`: the (height, width) nearest the image's, multiples of
    /// [`Self::factor`], with the pixel count within the budget and the aspect ratio kept.
    pub fn smart_resize(&self, height: usize, width: usize) -> Result<(usize, usize), ImageError> {
        let factor = self.factor() as f64;
        let (h, w) = (height as f64, width as f64);
        let size_error = |reason: String| ImageError::Size { width, height, reason };
        if height == 0 || width == 0 {
            return Err(size_error("it has no pixels".into()));
        }
        if h.max(w) / h.min(w) > 200.0 {
            return Err(size_error(format!("the aspect ratio {:.1} is past 200", h.max(w) / h.min(w))));
        }
        // Python's round() rounds halves to even.
        let round = |x: f64| x.round_ties_even();
        let mut h_bar = (round(h / factor) * factor).max(factor);
        let mut w_bar = (round(w / factor) * factor).max(factor);
        if h_bar * w_bar > self.max_pixels as f64 {
            let beta = (h * w / self.max_pixels as f64).sqrt();
            h_bar = ((h / beta / factor).floor() * factor).max(factor);
            w_bar = ((w / beta / factor).floor() * factor).max(factor);
        } else if h_bar * w_bar < self.min_pixels as f64 {
            let beta = (self.min_pixels as f64 / (h * w)).sqrt();
            h_bar = (h * beta / factor).ceil() * factor;
            w_bar = (w * beta / factor).ceil() * factor;
        }
        Ok((h_bar as usize, w_bar as usize))
    }

    /// Prepares one image (`rgb`: `height` rows of `width` RGB8 pixels): the patches, one row
    /// of `3 * temporal_patch_size * patch_size^2` values per patch, and `[t, h, w]` in patches.
    pub fn preprocess(&self, rgb: &[u8], width: usize, height: usize) -> Result<Patches, ImageError> {
        let want = width * height * 3;
        if rgb.len() != want {
            return Err(ImageError::Pixels { width, height, got: rgb.len(), want });
        }
        let (new_h, new_w) = self.smart_resize(height, width)?;
        let resized = resample::resize_bicubic(rgb, width, height, 3, new_w, new_h);
        // Rescale by 1/255, then normalise, in f32 as the processors do: once per pixel, into
        // one plane per channel, so that a patch's rows are contiguous runs to copy.
        let planes: Vec<Vec<f32>> = (0..3)
            .map(|c| resized.iter().skip(c).step_by(3).map(|&v| (v as f32 * (1.0 / 255.0) - self.mean[c]) / self.std[c]).collect())
            .collect();
        let (p, m, tp) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (grid_h, grid_w) = (new_h / p, new_w / p);
        let width_per_patch = 3 * tp * p * p;
        // Patches in merge-block order (block row, block column, row within, column within);
        // each patch's values in (channel, frame, row, column) order: the Conv3d's. Rows of
        // merge blocks are filled in parallel (a 1344x1344 image's 21 M values took 30-36 ms
        // on one core of the 2-core VM, before its request reaches the scheduler).
        let mut values = vec![0f32; grid_h * grid_w * width_per_patch];
        let block_row = grid_w * m * width_per_patch;
        if block_row > 0 {
            values.par_chunks_mut(block_row).enumerate().for_each(|(bh, out)| {
                let mut out = out.chunks_exact_mut(p);
                for bw in 0..grid_w / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            let (py, px) = ((bh * m + mh) * p, (bw * m + mw) * p);
                            for plane in &planes {
                                for _frame in 0..tp {
                                    for y in 0..p {
                                        let start = (py + y) * new_w + px;
                                        if let Some(run) = out.next() {
                                            run.copy_from_slice(&plane[start..start + p]);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            });
        }
        Ok(Patches { values, grid_thw: [1, grid_h, grid_w], patch_width: width_per_patch })
    }
}

/// One image as the vision tower takes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Patches {
    /// `grid_thw` product rows of `patch_width` values.
    pub values: Vec<f32>,
    /// Frames, rows and columns of patches (before merging).
    pub grid_thw: [usize; 3],
    pub patch_width: usize,
}

impl Patches {
    /// Tokens the image takes in the prompt (`<|image_pad|>` repeated): patches / merge^2.
    pub fn tokens(&self, merge_size: usize) -> usize {
        self.grid_thw.iter().product::<usize>() / (merge_size * merge_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_real_preprocessor_config_reads_and_bad_ones_are_named() {
        let real = serde_json::json!({"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
            "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"});
        assert_eq!(ImageProcessor::from_config(&real), Ok(ImageProcessor::qwen3_vl()));
        let tiny = serde_json::json!({"min_pixels": 1024, "max_pixels": 4096, "patch_size": 8});
        let p = ImageProcessor::from_config(&tiny).expect("tiny");
        assert_eq!((p.patch_size, p.min_pixels, p.max_pixels, p.factor()), (8, 1024, 4096, 16));
        let bad = |v: serde_json::Value| ImageProcessor::from_config(&v).expect_err("bad").to_string();
        assert!(bad(serde_json::json!({"patch_size": 0})).contains("`patch_size` must be a positive integer"));
        assert!(bad(serde_json::json!({"image_std": [0.5, 0.5]})).contains("`image_std` must be three numbers"));
        assert!(bad(serde_json::json!({"min_pixels": 10, "max_pixels": 5})).contains("over max_pixels"));
    }

    #[test]
    fn smart_resize_keeps_multiples_of_32_within_the_budget() {
        let p = ImageProcessor::qwen3_vl();
        assert_eq!(p.smart_resize(448, 448), Ok((448, 448)));
        // 300x500 rounds to 288x512 (ties to even: 500/32 = 15.6 -> 16).
        assert_eq!(p.smart_resize(300, 500), Ok((288, 512)));
        // Too few pixels: scaled up to at least 65,536.
        let (h, w) = p.smart_resize(20, 30).expect("small");
        assert!(h * w >= 65_536 && h % 32 == 0 && w % 32 == 0, "{h}x{w}");
        // Too many: scaled down below the budget.
        let small = ImageProcessor { max_pixels: 100_000, ..p.clone() };
        let (h, w) = small.smart_resize(1000, 2000).expect("large");
        assert!(h * w <= 100_000 && h % 32 == 0 && w % 32 == 0, "{h}x{w}");
        assert!(p.smart_resize(10, 3000).expect_err("ratio").to_string().contains("aspect ratio"));
        assert!(p.smart_resize(0, 10).is_err());
    }

    #[test]
    fn patches_come_in_merge_block_order_with_each_frame_repeated() {
        let p = ImageProcessor { patch_size: 2, temporal_patch_size: 2, merge_size: 2, min_pixels: 1, max_pixels: 1 << 20, mean: [0.5; 3], std: [0.5; 3] };
        // 8x8 pixels, each pixel's red channel its x, green its y, blue 0.
        let mut rgb = Vec::new();
        for y in 0..8u8 {
            for x in 0..8u8 {
                rgb.extend([x, y, 0]);
            }
        }
        let out = p.preprocess(&rgb, 8, 8).expect("preprocess");
        assert_eq!(out.grid_thw, [1, 4, 4]);
        assert_eq!(out.patch_width, 3 * 2 * 2 * 2);
        assert_eq!(out.tokens(2), 4);
        let norm = |v: u8| (v as f32 / 255.0 - 0.5) / 0.5;
        let patch = |i: usize| &out.values[i * 24..(i + 1) * 24];
        // Patch 1 is the second of the first merge block: pixels x 2..4, y 0..2.
        assert_eq!(&patch(1)[..4], &[norm(2), norm(3), norm(2), norm(3)], "red of frame 0");
        assert_eq!(&patch(1)[4..8], &patch(1)[..4], "frame 1 repeats frame 0");
        assert_eq!(&patch(1)[8..12], &[norm(0), norm(0), norm(1), norm(1)], "green");
        // Patch 4 starts the second merge block: x 4..6, y 0..2.
        assert_eq!(patch(4)[0], norm(4));
        // Patch 2 is the first block's second row: x 0..2, y 2..4.
        assert_eq!(patch(2)[8], norm(2));
        assert!(p.preprocess(&rgb[1..], 8, 8).is_err());
    }
}
