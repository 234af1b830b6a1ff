//! Images inside a prompt, as the serving core sees them: where each image's tokens sit
//! (transformers `Qwen3VLModel.get_placeholder_mask`: one `<|image_pad|>` per merged patch),
//! the prompt's multimodal rotary positions and the decode offset after it
//! (`get_rope_index`, `rope_deltas`; [`crate::rope::mrope_positions`]), and each image's
//! content hash, which keys the prefix-cache blocks its tokens fall in (vLLM v1's
//! `mm_hashes` as extra block keys), so the same image in a later turn takes its blocks back
//! instead of being encoded again, and another image never does.

use crate::error::EngineError;
use crate::rope::{PromptStretch, mrope_positions};
use crate::vision::PatchGrid;
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::sync::Arc;

/// One image of a prompt: its flattened patches (as the image processor makes them), its
/// patch grid, the prompt tokens it fills and its content hash.
#[derive(Clone, Debug)]
pub struct PromptImage {
    /// Index of its first `<|image_pad|>` token in the prompt.
    pub start: usize,
    /// Its tokens (merged patches).
    pub tokens: usize,
    pub grid: PatchGrid,
    pub pixels: Arc<Vec<f32>>,
    pub hash: u128,
}

impl PromptImage {
    pub fn range(&self) -> Range<usize> {
        self.start..self.start + self.tokens
    }
}

/// The images of one prompt and its multimodal rotary positions.
#[derive(Clone, Debug)]
pub struct PromptMedia {
    pub images: Vec<PromptImage>,
    /// `[temporal, height, width]` of each prompt token.
    positions: Vec<[usize; 3]>,
    /// Tokens after the prompt sit at `index + delta` on all three rows.
    delta: i64,
}

/// The content hash of an image's patches (SHA-256 of the grid and the values, 128 bits).
pub fn image_hash(pixels: &[f32], grid: PatchGrid) -> u128 {
    let mut h = Sha256::new();
    h.update(b"image");
    for d in [grid.t, grid.h, grid.w] {
        h.update((d as u64).to_le_bytes());
    }
    for v in pixels {
        h.update(v.to_le_bytes());
    }
    let digest = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    u128::from_le_bytes(out)
}

impl PromptMedia {
    /// Places `images` (patches and grid, in prompt order) on the runs of `image_token` in
    /// `prompt`: each image takes the next `t * h * w / merge²` of them, which must all be
    /// image tokens; every image token must be taken. An error says what does not match.
    pub fn new(prompt: &[u32], image_token: u32, merge: usize, images: Vec<(Vec<f32>, PatchGrid)>) -> Result<Self, EngineError> {
        let count = images.len();
        let mut placed = Vec::with_capacity(count);
        let mut stretches = Vec::new();
        let mut images = images.into_iter();
        let (mut i, mut text_from) = (0, 0);
        while i < prompt.len() {
            if prompt[i] != image_token {
                i += 1;
                continue;
            }
            let Some((pixels, grid)) = images.next() else {
                let pads = prompt.iter().filter(|&&t| t == image_token).count();
                return Err(EngineError::InvalidRequest(format!("the prompt has {pads} image tokens but only {count} image(s) fill {}", placed_tokens(&placed))));
            };
            if grid.h % merge != 0 || grid.w % merge != 0 {
                return Err(EngineError::InvalidRequest(format!("an image grid of {}x{} patches is not whole {merge}x{merge} blocks", grid.h, grid.w)));
            }
            let tokens = grid.patches() / (merge * merge);
            let run = prompt[i..].iter().take_while(|&&t| t == image_token).count();
            if run < tokens {
                return Err(EngineError::InvalidRequest(format!(
                    "image {} needs {tokens} image tokens at prompt index {i} but the run there has {run}",
                    placed.len() + 1
                )));
            }
            stretches.push(PromptStretch::Text(i - text_from));
            stretches.push(PromptStretch::Image { t: grid.t, h: grid.h / merge, w: grid.w / merge });
            let hash = image_hash(&pixels, grid);
            placed.push(PromptImage { start: i, tokens, grid, pixels: Arc::new(pixels), hash });
            i += tokens;
            text_from = i;
        }
        if images.next().is_some() {
            return Err(EngineError::InvalidRequest(format!("{count} images for a prompt whose image tokens take {}", placed.len())));
        }
        stretches.push(PromptStretch::Text(prompt.len() - text_from));
        let (positions, delta) = mrope_positions(&stretches);
        Ok(Self { images: placed, positions, delta })
    }

    /// The rotary position of sequence index `i`: the prompt's own, or past the prompt
    /// `i + delta` on all three rows.
    pub fn rope_position(&self, i: usize) -> [usize; 3] {
        match self.positions.get(i) {
            Some(&p) => p,
            None => [(i as i64 + self.delta).max(0) as usize; 3],
        }
    }

    /// Whether every token from sequence index `i` on is text (the step may treat it as a
    /// plain decode row at position `rope_position(i)[0]`).
    pub fn text_from(&self, i: usize) -> bool {
        let [t, h, w] = self.rope_position(i);
        self.images.iter().all(|im| im.range().end <= i) && t == h && t == w
    }

    /// The extra prefix-cache key bytes of block `b` (`block_tokens` tokens): the hash and
    /// offset of each image whose tokens fall in it.
    pub fn block_keys(&self, b: usize, block_tokens: usize) -> Vec<u8> {
        let block = b * block_tokens..(b + 1) * block_tokens;
        let mut keys = Vec::new();
        for im in self.images.iter().filter(|im| im.start < block.end && im.range().end > block.start) {
            keys.extend(im.hash.to_le_bytes());
            keys.extend((im.start as i64 - block.start as i64).to_le_bytes());
        }
        keys
    }
}

fn placed_tokens(images: &[PromptImage]) -> String {
    format!("{} of them", images.iter().map(|i| i.tokens).sum::<usize>())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAD: u32 = 9;

    fn image(h: usize, w: usize, value: f32) -> (Vec<f32>, PatchGrid) {
        (vec![value; h * w * 6], PatchGrid { t: 1, h, w })
    }

    #[test]
    fn images_take_their_runs_and_positions_follow_get_rope_index() {
        // 2 text, a 4x6-patch image (2x3 merged: 6 tokens), 1 text, a 2x2 image (1 token), 2 text.
        let prompt = [1, 2, PAD, PAD, PAD, PAD, PAD, PAD, 3, PAD, 4, 5];
        let m = PromptMedia::new(&prompt, PAD, 2, vec![image(4, 6, 0.5), image(2, 2, 0.25)]).expect("media");
        assert_eq!(m.images.iter().map(|i| (i.start, i.tokens)).collect::<Vec<_>>(), vec![(2, 6), (9, 1)]);
        assert_eq!(m.rope_position(1), [1, 1, 1]);
        assert_eq!(m.rope_position(2), [2, 2, 2]);
        assert_eq!(m.rope_position(7), [2, 3, 4]);
        // After the image: 2 + max(2, 3) = 5.
        assert_eq!(m.rope_position(8), [5, 5, 5]);
        assert_eq!(m.rope_position(9), [6, 6, 6]);
        assert_eq!(m.rope_position(11), [8, 8, 8]);
        // 12 tokens span positions 0..=8: the next token (index 12) is at 9.
        assert_eq!(m.rope_position(12), [9, 9, 9]);
        assert!(m.text_from(10) && !m.text_from(9) && !m.text_from(4));
    }

    #[test]
    fn block_keys_name_the_images_in_each_block() {
        let prompt = [1, 2, PAD, PAD, PAD, PAD, PAD, PAD, 3, 4];
        let a = PromptMedia::new(&prompt, PAD, 2, vec![image(4, 6, 0.5)]).expect("media");
        let b = PromptMedia::new(&prompt, PAD, 2, vec![image(4, 6, 0.75)]).expect("media");
        // Blocks of 4: block 0 holds tokens 0..4 (image from 2), block 1 4..8, block 2 none.
        assert!(!a.block_keys(0, 4).is_empty() && !a.block_keys(1, 4).is_empty() && a.block_keys(2, 4).is_empty());
        assert_ne!(a.block_keys(0, 4), b.block_keys(0, 4));
        assert_ne!(a.block_keys(0, 4), a.block_keys(1, 4));
        let again = PromptMedia::new(&prompt, PAD, 2, vec![image(4, 6, 0.5)]).expect("media");
        assert_eq!(a.block_keys(1, 4), again.block_keys(1, 4));
    }

    #[test]
    fn mismatched_images_and_tokens_are_named() {
        let prompt = [1, PAD, PAD, 2];
        let err = |images| PromptMedia::new(&prompt, PAD, 2, images).expect_err("mismatch").to_string();
        assert!(err(vec![]).contains("2 image tokens but only 0 image(s)"));
        assert!(err(vec![image(4, 4, 0.0)]).contains("needs 4 image tokens at prompt index 1 but the run there has 2"));
        assert!(err(vec![image(2, 4, 0.0), image(2, 2, 0.0)]).contains("2 images for a prompt whose image tokens take 1"));
        assert!(err(vec![image(3, 4, 0.0)]).contains("not whole 2x2 blocks"));
    }
}
