//! The Qwen3-VL vision tower (transformers `modeling_qwen3_vl.py`: `Qwen3VLVisionModel`,
//! `Qwen3VLVisionPatchEmbed`, `Qwen3VLVisionRotaryEmbedding`, `Qwen3VLVisionBlock`,
//! `Qwen3VLVisionPatchMerger`; `vision_utils.get_vision_interpolation_indices_and_weights`)
//! with DeepStack (Meng et al. 2024, arXiv:2406.04334): image patches in, per image the merged
//! embeddings that replace its `<|image_pad|>` tokens and the DeepStack features added to the
//! text decoder's hidden states after its first layers.
//!
//! - Patch embedding: the Conv3d over `(channels, temporal_patch, patch, patch)` with stride
//!   equal to its kernel is a linear map of each flattened patch (with bias).
//! - The learned `(side x side)` position table is resampled bilinearly, **align_corners**, to
//!   the image's patch grid (weights in f32), in the 2x2 merge-block order the patches come in.
//! - Every block: pre-norm LayerNorm (with bias), full non-causal attention within the image
//!   with 2D rotary embedding (height angles on the first quarter of the head, width on the
//!   second, both halves repeated; `rotate_half` in f32), and an MLP `fc1 -> GELU(tanh) -> fc2`.
//! - The merger: LayerNorm per patch, 2x2 patches concatenated, `fc1 -> exact (erf) GELU ->
//!   fc2` into the text width. DeepStack mergers (after blocks `deepstack_visual_indexes`)
//!   normalise *after* the concatenation (`use_postshuffle_norm`).
//!
//! A model crate reuses it by naming its weights' prefix; the text side's hook is
//! [`crate::decoder::StepVision`].

use crate::decoder::Linear;
use crate::error::EngineError;
use crate::rope::cos_sin_of_angles;
use crate::weights::Checkpoint;
use burn::tensor::{DType as BurnDType, Device, Int, Tensor, TensorData};
use inference_pio_core::types::DType;
use inference_pio_kernels::attention::gqa_attention;
use inference_pio_kernels::norm::layer_norm;
use inference_pio_kernels::reference::{gelu_erf, gelu_tanh};
use inference_pio_kernels::rotary::rotary_f32;
use serde_json::Value;

/// LayerNorm epsilon of every vision norm (hard-coded in transformers).
const NORM_EPS: f64 = 1e-6;

/// `vision_config` of a Qwen3-VL `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    /// The text decoder's width, which the mergers project into.
    pub out_hidden_size: usize,
    pub num_position_embeddings: usize,
    pub deepstack_visual_indexes: Vec<usize>,
    /// The blocks' MLP activation: `gelu_pytorch_tanh` (Qwen3-VL) or `gelu` (exact).
    pub hidden_act: String,
    /// The 2D rotary embedding's base (10,000 unless `rope_parameters` says otherwise).
    pub rope_theta: f64,
}

impl VisionConfig {
    /// Reads `vision_config`, with transformers' `Qwen3VLVisionConfig` defaults for absent
    /// keys; an error names a bad one.
    pub fn from_value(v: &Value) -> Result<Self, EngineError> {
        let uint = |key: &str, default: usize| -> Result<usize, EngineError> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| EngineError::Config(format!("vision_config.{key} must be a positive integer, not {x}"))),
            }
        };
        let deepstack = match v.get("deepstack_visual_indexes") {
            None | Some(Value::Null) => vec![8, 16, 24],
            Some(Value::Array(items)) => items
                .iter()
                .map(|x| x.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| EngineError::Config("vision_config.deepstack_visual_indexes must be a list of layer indexes".into()))?,
            Some(x) => return Err(EngineError::Config(format!("vision_config.deepstack_visual_indexes must be a list, not {x}"))),
        };
        let rope_theta = v
            .get("rope_parameters")
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0);
        let c = Self {
            depth: uint("depth", 27)?,
            hidden_size: uint("hidden_size", 1152)?,
            intermediate_size: uint("intermediate_size", 4304)?,
            num_heads: uint("num_heads", 16)?,
            in_channels: uint("in_channels", 3)?,
            patch_size: uint("patch_size", 16)?,
            temporal_patch_size: uint("temporal_patch_size", 2)?,
            spatial_merge_size: uint("spatial_merge_size", 2)?,
            out_hidden_size: uint("out_hidden_size", 3584)?,
            num_position_embeddings: uint("num_position_embeddings", 2304)?,
            deepstack_visual_indexes: deepstack,
            hidden_act: v.get("hidden_act").and_then(Value::as_str).unwrap_or("gelu_pytorch_tanh").to_string(),
            rope_theta,
        };
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), EngineError> {
        let bad = |why: String| Err(EngineError::Config(format!("vision_config: {why}")));
        if !self.hidden_size.is_multiple_of(self.num_heads) || !self.head_dim().is_multiple_of(4) {
            return bad(format!("hidden_size {} over {} heads must give a head size divisible by 4", self.hidden_size, self.num_heads));
        }
        if self.side() * self.side() != self.num_position_embeddings {
            return bad(format!("num_position_embeddings {} is not a square", self.num_position_embeddings));
        }
        if let Some(&i) = self.deepstack_visual_indexes.iter().find(|&&i| i >= self.depth) {
            return bad(format!("deepstack index {i} is past the last of {} blocks", self.depth));
        }
        if !matches!(self.hidden_act.as_str(), "gelu_pytorch_tanh" | "gelu") {
            return bad(format!("hidden_act `{}` is not supported (gelu_pytorch_tanh, gelu)", self.hidden_act));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Values per flattened patch (the Conv3d's kernel volume).
    pub fn patch_values(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Side of the learned position table.
    fn side(&self) -> usize {
        (self.num_position_embeddings as f64).sqrt().round() as usize
    }

    fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }
}

/// A vision-language model's vision side, as its model crate describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionSpec {
    pub config: VisionConfig,
    /// Where the tower's weights live (`model.visual`).
    pub prefix: String,
    /// The token each image's merged patches stand in for (`<|image_pad|>`), and the ones
    /// around an image (`<|vision_start|>`, `<|vision_end|>`).
    pub image_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
}

impl VisionSpec {
    /// A Qwen-style vision-language config's vision side: `vision_config` and the image token
    /// ids beside it (`image_token_id`, `vision_start_token_id`, `vision_end_token_id`),
    /// weights under `prefix`.
    pub fn from_config(c: &crate::hf_config::DecoderConfig, prefix: &str) -> Result<Self, EngineError> {
        let vision = c.raw.get("vision_config").filter(|v| v.is_object()).ok_or_else(|| EngineError::Config("`vision_config` is missing".into()))?;
        let id = |key: &str| -> Result<u32, EngineError> {
            let id = c.need_usize(key)?;
            u32::try_from(id).ok().filter(|&id| (id as usize) < c.vocab_size).ok_or_else(|| EngineError::Config(format!("`{key}` {id} is outside the vocabulary of {}", c.vocab_size)))
        };
        Ok(Self {
            config: VisionConfig::from_value(vision)?,
            prefix: prefix.to_string(),
            image_token_id: id("image_token_id")?,
            vision_start_token_id: id("vision_start_token_id")?,
            vision_end_token_id: id("vision_end_token_id")?,
        })
    }
}

/// An image's patch grid: `t` temporal patches (1 for a still image), `h` x `w` patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PatchGrid {
    pub t: usize,
    pub h: usize,
    pub w: usize,
}

impl PatchGrid {
    pub fn patches(&self) -> usize {
        self.t * self.h * self.w
    }
}

/// One image's features for the text decoder: `embeds [tokens, text_hidden]` (the merger's,
/// one row per `<|image_pad|>` token) and one `[tokens, text_hidden]` per DeepStack layer.
#[derive(Clone)]
pub struct ImageFeatures {
    pub embeds: Tensor<2>,
    pub deepstack: Vec<Tensor<2>>,
}

impl ImageFeatures {
    pub fn tokens(&self) -> usize {
        self.embeds.dims()[0]
    }

    /// The merger's rows, then each DeepStack set's, as one `[(1 + sets) * tokens,
    /// text_hidden]` tensor.
    pub fn stacked(self) -> Tensor<2> {
        Tensor::cat(std::iter::once(self.embeds).chain(self.deepstack).collect(), 0)
    }

    /// The merger's values, then each DeepStack set's, in f32 (for tests and checks).
    pub fn values(&self) -> Vec<Vec<f32>> {
        std::iter::once(&self.embeds)
            .chain(&self.deepstack)
            .map(|t| t.clone().cast(BurnDType::F32).into_data().convert::<f32>().try_to_vec::<f32>().unwrap_or_default())
            .collect()
    }

    /// [`Self::stacked`] undone: `sets` DeepStack sets after the merger's rows.
    pub fn from_stacked(t: Tensor<2>, sets: usize) -> Self {
        let tokens = t.dims()[0] / (1 + sets);
        let part = |i: usize| t.clone().narrow(0, i * tokens, tokens);
        Self { embeds: part(0), deepstack: (1..=sets).map(part).collect() }
    }
}

/// An image grid's inputs to the vision tower besides the patches
/// ([`VisionTower::grid_inputs`]).
pub struct GridInputs {
    /// The resampled position embeddings, `[patches, hidden]` in the tower's dtype.
    pos: Tensor<2>,
    /// The 2D rotary `cos`/`sin`, `[1, 1, patches, head_dim]` f32.
    cos: Tensor<4>,
    sin: Tensor<4>,
}

struct Norm {
    weight: Tensor<1>,
    bias: Tensor<1>,
}

impl Norm {
    fn load(ckpt: &Checkpoint, prefix: &str, width: usize, device: &Device, dtype: DType) -> Result<Self, EngineError> {
        Ok(Self { weight: ckpt.load(&format!("{prefix}.weight"), [width], device, dtype)?, bias: ckpt.load(&format!("{prefix}.bias"), [width], device, dtype)? })
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        layer_norm(x, &self.weight, &self.bias, NORM_EPS)
    }
}

struct Block {
    norm1: Norm,
    qkv: Linear,
    proj: Linear,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
}

struct Merger {
    /// Normalises after the 2x2 concatenation (DeepStack's) instead of per patch.
    postshuffle: bool,
    norm: Norm,
    fc1: Linear,
    fc2: Linear,
}

impl Merger {
    fn forward(&self, x: Tensor<2>, unit: usize) -> Tensor<2> {
        let [n, width] = x.dims();
        let merged = [n / unit, width * unit];
        let x = if self.postshuffle { self.norm.forward(x.reshape(merged)) } else { self.norm.forward(x).reshape(merged) };
        self.fc2.forward(gelu_erf(self.fc1.forward(x)))
    }
}

/// A loaded vision tower.
pub struct VisionTower {
    pub config: VisionConfig,
    dtype: DType,
    device: Device,
    /// The Conv3d as a linear map of flattened patches.
    patch: Linear,
    /// `[side * side, hidden]`.
    pos_embed: Tensor<2>,
    blocks: Vec<Block>,
    merger: Merger,
    deepstack: Vec<Merger>,
    inv_freq: Vec<f32>,
}

/// Names and shapes of the tower's tensors under `prefix` (`model.visual`).
pub fn vision_tensors(c: &VisionConfig, prefix: &str) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let merged = h * c.merge_unit();
    let mut out = vec![
        (format!("{prefix}.patch_embed.proj.weight"), vec![h, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size]),
        (format!("{prefix}.patch_embed.proj.bias"), vec![h]),
        (format!("{prefix}.pos_embed.weight"), vec![c.num_position_embeddings, h]),
    ];
    let linear = |out: &mut Vec<(String, Vec<usize>)>, name: String, o: usize, inp: usize| {
        out.push((format!("{name}.weight"), vec![o, inp]));
        out.push((format!("{name}.bias"), vec![o]));
    };
    for b in 0..c.depth {
        let p = format!("{prefix}.blocks.{b}");
        for norm in ["norm1", "norm2"] {
            out.push((format!("{p}.{norm}.weight"), vec![h]));
            out.push((format!("{p}.{norm}.bias"), vec![h]));
        }
        linear(&mut out, format!("{p}.attn.qkv"), 3 * h, h);
        linear(&mut out, format!("{p}.attn.proj"), h, h);
        linear(&mut out, format!("{p}.mlp.linear_fc1"), i, h);
        linear(&mut out, format!("{p}.mlp.linear_fc2"), h, i);
    }
    let merger = |out: &mut Vec<(String, Vec<usize>)>, p: String, norm: usize| {
        out.push((format!("{p}.norm.weight"), vec![norm]));
        out.push((format!("{p}.norm.bias"), vec![norm]));
        linear(out, format!("{p}.linear_fc1"), merged, merged);
        linear(out, format!("{p}.linear_fc2"), c.out_hidden_size, merged);
    };
    merger(&mut out, format!("{prefix}.merger"), h);
    for j in 0..c.deepstack_visual_indexes.len() {
        merger(&mut out, format!("{prefix}.deepstack_merger_list.{j}"), merged);
    }
    out
}

/// `[n, 4]` gather indices into the `side x side` position table and their bilinear weights
/// (align_corners) for the patches of `grid` in 2x2 merge-block order, as
/// `get_vision_interpolation_indices_and_weights(mode="bilinear", align_corners=True)`
/// computes them in f32; frames repeat the same rows.
pub fn position_taps(grid: PatchGrid, side: usize, merge: usize) -> (Vec<i64>, Vec<f32>) {
    let axis = |index: usize, size: usize| -> [(usize, f32); 2] {
        let src = index as f32 * (side - 1) as f32 / (size.max(2) - 1) as f32;
        let floor = src.floor();
        let at = |offset: f32| -> (usize, f32) {
            let tap = ((floor + offset) as usize).min(side - 1);
            (tap, (1.0 - (src - floor - offset).abs()).max(0.0))
        };
        [at(0.0), at(1.0)]
    };
    let mut indices = Vec::with_capacity(grid.patches() * 4);
    let mut weights = Vec::with_capacity(grid.patches() * 4);
    for _ in 0..grid.t {
        for (row, col) in merge_block_order(grid.h, grid.w, merge) {
            let (hs, ws) = (axis(row, grid.h), axis(col, grid.w));
            for (ht, hw) in hs {
                for (wt, ww) in ws {
                    indices.push((ht * side + wt) as i64);
                    weights.push(hw * ww);
                }
            }
        }
    }
    (indices, weights)
}

/// `(row, col)` of each patch of an `h x w` grid in the order the processor emits them: 2x2
/// (`merge x merge`) blocks row by row, each block's patches row by row.
pub fn merge_block_order(h: usize, w: usize, merge: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..h / merge).flat_map(move |br| {
        (0..w / merge).flat_map(move |bc| (0..merge).flat_map(move |ir| (0..merge).map(move |ic| (br * merge + ir, bc * merge + ic))))
    })
}

impl VisionTower {
    /// Checks every tensor under `prefix`, then loads them.
    pub fn load(config: VisionConfig, ckpt: &Checkpoint, prefix: &str, device: &Device, dtype: DType) -> Result<Self, EngineError> {
        for (name, shape) in vision_tensors(&config, prefix) {
            ckpt.check(&name, &shape)?;
        }
        let c = &config;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let merged = h * c.merge_unit();
        let linear = |name: &str, o: usize, inp: usize| Linear::load(ckpt, name, o, inp, true, device, dtype);
        let patch_weight: Tensor<5> = ckpt.load(
            &format!("{prefix}.patch_embed.proj.weight"),
            [h, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size],
            device,
            dtype,
        )?;
        let patch = Linear::from_parts(
            patch_weight.reshape([h, c.patch_values()]),
            Some(ckpt.load(&format!("{prefix}.patch_embed.proj.bias"), [h], device, dtype)?),
            device,
        );
        let mut blocks = Vec::with_capacity(c.depth);
        for b in 0..c.depth {
            let p = format!("{prefix}.blocks.{b}");
            blocks.push(Block {
                norm1: Norm::load(ckpt, &format!("{p}.norm1"), h, device, dtype)?,
                qkv: linear(&format!("{p}.attn.qkv"), 3 * h, h)?,
                proj: linear(&format!("{p}.attn.proj"), h, h)?,
                norm2: Norm::load(ckpt, &format!("{p}.norm2"), h, device, dtype)?,
                fc1: linear(&format!("{p}.mlp.linear_fc1"), i, h)?,
                fc2: linear(&format!("{p}.mlp.linear_fc2"), h, i)?,
            });
        }
        let merger = |p: String, postshuffle: bool| -> Result<Merger, EngineError> {
            Ok(Merger {
                postshuffle,
                norm: Norm::load(ckpt, &format!("{p}.norm"), if postshuffle { merged } else { h }, device, dtype)?,
                fc1: linear(&format!("{p}.linear_fc1"), merged, merged)?,
                fc2: linear(&format!("{p}.linear_fc2"), c.out_hidden_size, merged)?,
            })
        };
        let main = merger(format!("{prefix}.merger"), false)?;
        let deepstack = (0..c.deepstack_visual_indexes.len())
            .map(|j| merger(format!("{prefix}.deepstack_merger_list.{j}"), true))
            .collect::<Result<Vec<_>, _>>()?;
        // `Qwen3VLVisionRotaryEmbedding`: frequencies over half the head (`head_dim / 2`
        // channels, one angle per pair), shared by the height and the width halves.
        let spatial = c.head_dim() / 2;
        let inv_freq = (0..spatial / 2).map(|j| (1.0 / c.rope_theta.powf((2 * j) as f64 / spatial as f64)) as f32).collect();
        Ok(Self {
            pos_embed: ckpt.load(&format!("{prefix}.pos_embed.weight"), [c.num_position_embeddings, h], device, dtype)?,
            config,
            dtype,
            device: device.clone(),
            patch,
            blocks,
            merger: main,
            deepstack,
            inv_freq,
        })
    }

    /// One image's features from its flattened patches (`pixels`: `patches x patch_values`
    /// f32, in merge-block order, as the image processor makes them).
    pub fn encode(&self, pixels: &[f32], grid: PatchGrid) -> Result<ImageFeatures, EngineError> {
        let x = self.patches(pixels, grid)?;
        Ok(self.encode_patches(x, &self.grid_inputs(grid)))
    }

    /// An image's flattened patches checked against its grid and placed on the device in the
    /// tower's dtype: `[patches, patch_values]`.
    pub fn patches(&self, pixels: &[f32], grid: PatchGrid) -> Result<Tensor<2>, EngineError> {
        let c = &self.config;
        let n = grid.patches();
        let merge = c.spatial_merge_size;
        if n == 0 || !grid.h.is_multiple_of(merge) || !grid.w.is_multiple_of(merge) {
            return Err(EngineError::InvalidRequest(format!("an image grid of {}x{}x{} patches is not whole {merge}x{merge} blocks", grid.t, grid.h, grid.w)));
        }
        if pixels.len() != n * c.patch_values() {
            return Err(EngineError::InvalidRequest(format!(
                "an image of {n} patches needs {} values, got {}",
                n * c.patch_values(),
                pixels.len()
            )));
        }
        let dtype = crate::weights::burn_dtype(self.dtype);
        Ok(Tensor::<2>::from_data(TensorData::new(pixels.to_vec(), [n, c.patch_values()]), (&self.device, BurnDType::F32)).cast(dtype))
    }

    /// What an image's encoding takes besides its patches, fixed by its grid: the position
    /// table resampled to the grid (weighted in f32, then in the tower's dtype) and the 2D
    /// rotary angles.
    pub fn grid_inputs(&self, grid: PatchGrid) -> GridInputs {
        let c = &self.config;
        let n = grid.patches();
        let device = &self.device;
        let (taps, weights) = position_taps(grid, c.side(), c.spatial_merge_size);
        let taps = Tensor::<1, Int>::from_data(TensorData::new(taps, [n * 4]), device);
        let weights = Tensor::<3>::from_data(TensorData::new(weights, [n, 4, 1]), (device, BurnDType::F32));
        let pos = self.pos_embed.clone().select(0, taps).cast(BurnDType::F32).reshape([n, 4, c.hidden_size]).mul(weights).sum_dim(1);
        let (cos, sin) = self.rotary(grid);
        GridInputs { pos: pos.reshape([n, c.hidden_size]).cast(crate::weights::burn_dtype(self.dtype)), cos, sin }
    }

    /// The features of an image from its patches ([`Self::patches`]) and its grid's inputs
    /// ([`Self::grid_inputs`]): device operations only, so a recording can replay them.
    pub fn encode_patches(&self, x: Tensor<2>, grid: &GridInputs) -> ImageFeatures {
        let c = &self.config;
        let mut x = self.patch.forward(x).add(grid.pos.clone());
        let mut deepstack = Vec::with_capacity(self.deepstack.len());
        for (b, block) in self.blocks.iter().enumerate() {
            x = self.block(block, x, &grid.cos, &grid.sin);
            if let Some(j) = c.deepstack_visual_indexes.iter().position(|&i| i == b) {
                deepstack.push((j, self.deepstack[j].forward(x.clone(), c.merge_unit())));
            }
        }
        deepstack.sort_by_key(|(j, _)| *j);
        ImageFeatures { embeds: self.merger.forward(x, c.merge_unit()), deepstack: deepstack.into_iter().map(|(_, f)| f).collect() }
    }

    /// The DeepStack feature sets an image's features carry besides the merger's.
    pub fn deepstack_layers(&self) -> usize {
        self.deepstack.len()
    }

    /// The 2D rotary `cos`/`sin` `[1, 1, n, head_dim]` (f32) of the grid's patches: angles of
    /// the patch's row over the first quarter of the head, of its column over the second, the
    /// half repeated.
    fn rotary(&self, grid: PatchGrid) -> (Tensor<4>, Tensor<4>) {
        let merge = self.config.spatial_merge_size;
        let angles = (0..grid.t).flat_map(|_| merge_block_order(grid.h, grid.w, merge)).map(|(row, col)| {
            self.inv_freq.iter().map(|f| row as f32 * f).chain(self.inv_freq.iter().map(|f| col as f32 * f)).collect()
        });
        cos_sin_of_angles(angles, [1, 1, grid.patches(), self.config.head_dim()], &self.device, BurnDType::F32)
    }

    fn block(&self, block: &Block, x: Tensor<2>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<2> {
        let c = &self.config;
        let [n, h] = x.dims();
        let (heads, d) = (c.num_heads, c.head_dim());
        let qkv = block.qkv.forward(block.norm1.forward(x.clone())).reshape([1, n, 3 * heads, d]);
        // Queries and keys rotated together (in f32, rounded back) into `[1, 2 * heads, n, d]`;
        // `[1, heads, n, d]` views each, the values a view of the projection.
        let qk = rotary_f32(qkv.clone().narrow(2, 0, 2 * heads), cos, sin);
        let (q, k) = (qk.clone().narrow(1, 0, heads), qk.narrow(1, heads, heads));
        let v = qkv.narrow(2, 2 * heads, heads).swap_dims(1, 2);
        let attn = gqa_attention(q, &k, &v, None, (d as f64).powf(-0.5));
        let attn = attn.reshape([heads, n, d]).swap_dims(0, 1).reshape([n, h]);
        let x = x.add(block.proj.forward(attn));
        let hidden = block.fc1.forward(block.norm2.forward(x.clone()));
        let hidden = if c.hidden_act == "gelu" { gelu_erf(hidden) } else { gelu_tanh(hidden) };
        x.add(block.fc2.forward(hidden))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacked_features_come_apart_as_they_were() {
        let d = Device::flex();
        let part = |v: f32| Tensor::<2>::from_data(TensorData::new((0..12).map(|i| v + i as f32).collect::<Vec<f32>>(), [3, 4]), &d);
        let features = ImageFeatures { embeds: part(0.0), deepstack: vec![part(100.0), part(200.0)] };
        let want = features.values();
        let stacked = features.stacked();
        assert_eq!(stacked.dims(), [9, 4]);
        let back = ImageFeatures::from_stacked(stacked, 2);
        assert_eq!(back.values(), want);
        assert_eq!(back.tokens(), 3);
    }

    #[test]
    fn merge_blocks_come_row_by_row_with_their_patches_row_by_row() {
        let order: Vec<_> = merge_block_order(2, 4, 2).collect();
        assert_eq!(order, vec![(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]);
    }

    #[test]
    fn position_taps_are_align_corners_bilinear() {
        // A 3x3 table onto a 2x4 grid (merge 1, raster order): the corners land on the
        // table's corners; column 1 of 4 sits at 2/3 of the way from table column 0 to 1.
        let (idx, w) = position_taps(PatchGrid { t: 1, h: 2, w: 4 }, 3, 1);
        assert_eq!(&idx[..4], &[0, 1, 3, 4]);
        assert_eq!(&w[..4], &[1.0, 0.0, 0.0, 0.0]);
        let p1 = &w[4..8];
        assert!((p1[0] - 1.0 / 3.0).abs() < 1e-6 && (p1[1] - 2.0 / 3.0).abs() < 1e-6 && p1[2] == 0.0, "{p1:?}");
        // The last patch: row 1 of 2 -> table row 2, column 3 of 4 -> table column 2.
        let last = &idx[idx.len() - 4..];
        let lw = &w[w.len() - 4..];
        let full: Vec<_> = last.iter().zip(lw).filter(|(_, w)| **w > 0.0).collect();
        assert_eq!(full, vec![(&8, &1.0)]);
        for patch in w.chunks(4) {
            assert!((patch.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn the_real_2b_vision_config_reads_and_bad_ones_are_named() {
        let config: Value = serde_json::from_str(include_str!("../testdata/qwen3-vl-2b-config.json")).expect("json");
        let c = VisionConfig::from_value(&config["vision_config"]).expect("vision config");
        assert_eq!((c.depth, c.hidden_size, c.num_heads, c.out_hidden_size), (24, 1024, 16, 2048));
        assert_eq!(c.deepstack_visual_indexes, vec![5, 11, 17]);
        assert_eq!((c.patch_values(), c.side(), c.rope_theta), (1536, 48, 10_000.0));
        let mut bad = config["vision_config"].clone();
        bad["num_position_embeddings"] = 2300.into();
        assert!(VisionConfig::from_value(&bad).expect_err("not square").to_string().contains("not a square"));
        bad["num_position_embeddings"] = 2304.into();
        bad["deepstack_visual_indexes"] = serde_json::json!([5, 30]);
        assert!(VisionConfig::from_value(&bad).expect_err("past the end").to_string().contains("deepstack index 30"));
    }
}
