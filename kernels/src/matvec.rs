//! Decode-time products with few rows as our own CubeCL kernel: `y[s] = x[s] · W[e(s)]ᵀ`,
//! where `W` is a linear weight in the split `[parts, out, in / parts]` layout of
//! [`crate::linear`] (or a stack of them, one per expert, `[experts, parts, out, in /
//! parts]`, with `e(s)` the expert routed to row `s`). One plane (warp) computes one output
//! channel of one row: its lanes stride over `in` in 16-byte vectors, four loads in
//! flight per lane (eight measured slower: Qwen3-4B batch 1 at 146 against 199 tok/s on an H100,
//! 2026-12-06; again 214 against 254 on 2026-12-07), accumulate in f32 and sum across the
//! plane. The weight is read once, in place:
//! no gathered copy of the chosen experts, no partial products to sum, no casts (what
//! `batched_linear` queues as four kernels, `benches/results/gpu-h200-2026-12-01-graphs.md`). The form is the classic
//! "one warp per row" GEMV (e.g. llama.cpp's `mul_mat_vec`, vLLM's fused-MoE decode path).
//!
//! Three things keep a plane's short row from waiting on memory more often than it must
//! (`benches/results/gpu-h100-2026-12-07m-matvec-early-loads.md`, H100, Qwen3-4B batch 1):
//! - the first round of weight loads is issued before the kernel waits for the kernels before it
//!   (programmatic dependent launch: the weights are no kernel's output), so it overlaps their
//!   tail: 244.3-245.1 -> 254.2-254.4 tok/s (`INFERENCE_PIO_MATVEC_EARLY=0` turns it off; not for
//!   routed experts, whose weights follow the router's choice);
//! - the last vectors of a lane (fewer than four) are one round of masked loads instead of one
//!   load after another;
//! - with the weight unsplit (cuBLAS present, one part) a vector's index is its offset, with no
//!   division by the part's width.
//!
//! The last two together with the first: 242.5-243.1 -> 254.2-254.4 tok/s at batch 1, 389.9 ->
//! 430.5 at batch 2, Qwen3-VL-2B after an image 484.2 -> 497.4.
//!
//! A SwiGLU MLP's `[gate | up]` product can end in the gate itself ([`split_matvec_swiglu`]):
//! half of a cube's planes take gate channels, the other half the matching up channels, and
//! `silu(gate) * up` is formed through shared memory, with the rounding of the gate's own kernel
//! (the same bits). On an H100 in bf16 the product with the gate took 40.8 µs for Qwen3-4B's
//! 2560 -> 2 x 9728 against 42.2 µs for the product and the gate's kernel (one row; 52.9 against
//! 53.9 µs for two), end to end within the spread of batch-1 decode
//! (`benches/results/gpu-h100-2026-12-07j-fusions.md`, which also records two other last-kernel
//! fusions measured slower and not kept).
//!
//! The reference version on every backend is [`crate::linear::batched_linear`] over the
//! selected weights ([`matvec_reference`]); the kernel runs on CubeCL devices only and is
//! checked against it on the device (`kernels/examples/kernel_check.rs`).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Device, Int, Shape, Tensor};
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use crate::activation::halves_shape;
use crate::launch::{PLANE, is_cubecl, vector_width};

/// Output channels per cube (one plane each), unless `INFERENCE_PIO_MATVEC_PLANES` (1 to 32, a
/// power of two) says otherwise. Four, not eight: Qwen3-4B's o and down products have 2,560
/// channels, 320 cubes of eight over an H100's 132 multiprocessors (two or three each, so a
/// third of them idle for the last third of the product) or 640 of four. On an H100 four gave
/// batch-1 decode 242.8-243.2 tok/s against 240.2-240.8 with eight (batch 2 391.4 against
/// 382.1, Qwen3-VL-2B after an image 486.0 against 481.9; sixteen 235.8;
/// `benches/results/gpu-h100-2026-12-07k-matvec-planes.md`).
const ROWS_PER_CUBE: u32 = 4;
/// [`ROWS_PER_CUBE`] for the routed experts' products ([`gathered_split_matvec`]): eight, as
/// before, since four measured slower there with several tokens in the same call (30B gate_up
/// of 2 tokens x 8 experts 36.2 against 34.9 µs, of 5 tokens 76.8 against 75.4; one token equal).
const EXPERT_ROWS_PER_CUBE: u32 = 8;
/// The most cubes a grid's second dimension takes (CUDA's limit).
const MAX_GRID_Y: usize = 65_535;

/// [`ROWS_PER_CUBE`] ([`EXPERT_ROWS_PER_CUBE`] for `experts`) or the switch's value, raised (a
/// power of two, at most 32) until `channels` fit the grid's second dimension.
fn planes_per_cube(channels: usize, experts: bool) -> u32 {
    static PLANES: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    let set = *PLANES.get_or_init(|| {
        crate::launch::env_number("INFERENCE_PIO_MATVEC_PLANES", |p| (1..=32).contains(&p) && p.is_power_of_two(), "a power of two from 1 to 32").map(|p| p as u32)
    });
    let chosen = set.unwrap_or(if experts { EXPERT_ROWS_PER_CUBE } else { ROWS_PER_CUBE });
    let needed = channels.div_ceil(MAX_GRID_Y).min(32).next_power_of_two() as u32;
    chosen.max(needed).min(32)
}
/// Up to this many rows of a dense product run through the kernel; more go to the batched
/// split-K matmul, which reuses each weight block across rows: on the H200, 2560 -> 9728 in
/// bf16 took 19.0 µs by the kernel (four loads in flight per lane; 26 µs with one) and 40.7 µs
/// split-K for one row, 27.7 µs against 42.1 µs for two, but 85.1 µs against 44.8 µs for
/// eight (`benches/results/gpu-h200-2026-12-02-final/kernel_check.txt`).
pub const DENSE_MAX_ROWS: usize = 2;
/// Up to this many (token, expert) rows of a mixture-of-experts product run through the
/// kernel: each row reads its own expert, so rows share no weights and the kernel wins at any
/// count it is used for (5 tokens x 8 experts: 63.9 µs against 599.4 µs gathered).
pub const GATHERED_MAX_ROWS: usize = 64;

/// Output shape of a product with a split weight `[.., parts, out, in / parts]`: `[rows,
/// out]`, `rows` the first dimension of `rows` (the input, or the experts chosen per row).
pub fn matvec_shape(rows: &Shape, w: &Shape) -> Shape {
    let rank = w.num_dims();
    Shape::new([rows[0], w[rank - 2]])
}

/// The products as backend operations (CubeCL runtimes only).
#[backend_extension(Cube, Fusion)]
pub trait MatvecOps: Backend {
    /// `x [rows, in] · wᵀ -> [rows, out]`, `w [parts, out, in / parts]`.
    #[fusion(dtype = x, shape = matvec_shape(x, w))]
    fn split_matvec(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `silu(gate) * up` of [`Self::split_matvec`]'s `[gate | up]` output, in the same kernel:
    /// `x [rows, in]`, `w [parts, 2 * inner, in / parts]` -> `[rows, inner]`.
    #[fusion(dtype = x, shape = halves_shape(&matvec_shape(x, w)))]
    fn split_matvec_swiglu(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;

    /// Row `s` of the output, `[slots, out]`, is row `s / (slots / rows)` of `x [rows, in]`
    /// times expert `experts[s]` of `w [experts, parts, out, in / parts]` (`experts [slots]`).
    #[fusion(dtype = x, shape = matvec_shape(experts, w))]
    fn gathered_split_matvec(x: FloatTensor<Self>, w: FloatTensor<Self>, experts: IntTensor<Self>) -> FloatTensor<Self>;
}

impl MatvecOps for CubeBackend {
    fn split_matvec(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        launch(x, w, None, false)
    }

    fn split_matvec_swiglu(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        launch(x, w, None, true)
    }

    fn gathered_split_matvec(x: FloatTensor<Self>, w: FloatTensor<Self>, experts: IntTensor<Self>) -> FloatTensor<Self> {
        // The kernel reads the indices as a plain buffer, so in their memory order.
        launch(x, w, Some(into_contiguous(experts)), false)
    }
}

/// The kernel, apart from burn's names (`Tensor`, `Int` are CubeCL's here).
mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::num_traits::Zero;
    use burn_cubecl::cubecl::prelude::*;

    /// One product term: `x`'s vector `u` of the row times the weight's vector `u` of the
    /// channel, `u` counting over the whole `parts * block` row (part `u / block`).
    /// `split`: the weight has more than one part (no cuBLAS); with one, `u` is the offset
    /// itself and no division by the block is computed.
    #[cube]
    fn term<E: Float, N: Size>(
        x: &Tensor<Vector<E, N>>,
        w: &Tensor<Vector<E, N>>,
        x_base: usize,
        w_base: usize,
        part_stride: usize,
        block: usize,
        u: usize,
        #[comptime] split: bool,
    ) -> Vector<f32, N> {
        Vector::cast_from(x[x_base + u]) * Vector::cast_from(w[weight_at(w_base, part_stride, block, u, split)])
    }

    /// [`term`] for a `u` that may be past the row (`u < total` or not): the load is of the
    /// row's last vector then, issued like the others, and the term is zero.
    #[cube]
    fn masked_term<E: Float, N: Size>(
        x: &Tensor<Vector<E, N>>,
        w: &Tensor<Vector<E, N>>,
        x_base: usize,
        w_base: usize,
        part_stride: usize,
        block: usize,
        u: usize,
        total: usize,
        #[comptime] split: bool,
    ) -> Vector<f32, N> {
        masked_loaded(x, x_base, w[weight_at(w_base, part_stride, block, min(u, total - 1), split)], u, total)
    }

    /// Index of the weight's vector `u` of the channel starting at `w_base` (see [`term`]).
    #[cube]
    fn weight_at(w_base: usize, part_stride: usize, block: usize, u: usize, #[comptime] split: bool) -> usize {
        let mut at = w_base + u;
        if split {
            at = w_base + (u / block) * part_stride + u % block;
        }
        at
    }

    /// `x`'s vector `u` of the row times a weight vector already loaded (the one [`weight_at`]
    /// `min(u, total - 1)`), zero where `u` is past the row.
    #[cube]
    fn masked_loaded<E: Float, N: Size>(x: &Tensor<Vector<E, N>>, x_base: usize, w: Vector<E, N>, u: usize, total: usize) -> Vector<f32, N> {
        let t = Vector::cast_from(x[x_base + min(u, total - 1)]) * Vector::cast_from(w);
        select(u < total, t, Vector::<f32, N>::zero())
    }

    #[cube(launch_unchecked)]
    pub fn split_matvec_kernel<E: Float, I: Int, N: Size>(
        x: &Tensor<Vector<E, N>>,
        w: &Tensor<Vector<E, N>>,
        experts: ComptimeOption<&[I]>,
        out: &mut Tensor<E>,
        parts: usize,
        x_share: usize,
        #[comptime] swiglu: bool,
        #[comptime] planes: usize,
        #[comptime] split: bool,
        #[comptime] early: bool,
        #[define(E, I)] _dtypes: [ElemType; 2],
    ) {
        // Rows vary fastest across cubes, so the rows of one weight block run side by side
        // and read it through L2 once.
        let row = CUBE_POS_X as usize;
        let mut channel = (CUBE_POS_Y * CUBE_DIM_Y + UNIT_POS_Y) as usize;
        let inner = out.shape(1);
        let mut channels = inner;
        // `swiglu`: the weight holds `[gate | up]`, `2 * out` channels; the cube's first half
        // of planes takes gate channels, the second half the matching up channels.
        let half_planes = CUBE_DIM_Y / 2;
        let out_channel = (CUBE_POS_Y * half_planes + UNIT_POS_Y % half_planes) as usize;
        if swiglu {
            channels = 2 * inner;
            // Planes past the last channel compute the last one again (every plane reaches
            // the cube barrier below) and write nothing.
            channel = min(out_channel, inner - 1) + (UNIT_POS_Y / half_planes) as usize * inner;
        } else if channel >= channels {
            // The whole plane leaves together (the channel depends on the plane only).
            terminate!();
        }
        let expert: ComptimeOption<usize> = experts.as_ref().map(|e| usize::cast_from(e[row]));
        let stack = expert.unwrap_or(0usize);
        // Shapes count elements, indices count vectors.
        let block = w.shape(w.rank() - 1) / w.vector_size();
        let total = parts * block;
        let x_base = row / x_share * total;
        let part_stride = channels * block;
        let w_base = (stack * parts * channels + channel) * block;
        let step = PLANE_DIM as usize;
        // Four independent loads per lane in flight: a plane's one row of the weight is only
        // `total / 32` vectors per lane, too few to hide memory latency one at a time. The
        // rounds where every load is in the row, then the rest (fewer than four a lane) as one
        // more round of masked loads, issued together: one memory latency for the tail, not one
        // for each of its vectors.
        let mut acc0 = Vector::<f32, N>::zero();
        let mut acc1 = Vector::<f32, N>::zero();
        let mut acc2 = Vector::<f32, N>::zero();
        let mut acc3 = Vector::<f32, N>::zero();
        let mut u = UNIT_POS_X as usize;
        if early {
            // The first round's weights, which no kernel before this one writes, are loaded
            // before the kernel waits for those kernels (it is launched as their programmatic
            // dependent, `kernels/cubecl-cuda-stream/src/dependent_launch.rs`): their latency
            // overlaps the kernel before's tail instead of following it. Loads past the row
            // read its last vector and count zero.
            let last = total - 1;
            let w0 = w[weight_at(w_base, part_stride, block, min(u, last), split)];
            let w1 = w[weight_at(w_base, part_stride, block, min(u + step, last), split)];
            let w2 = w[weight_at(w_base, part_stride, block, min(u + 2 * step, last), split)];
            let w3 = w[weight_at(w_base, part_stride, block, min(u + 3 * step, last), split)];
            gpu_asm!("griddepcontrol.wait;");
            gpu_asm!("griddepcontrol.launch_dependents;");
            acc0 += masked_loaded(x, x_base, w0, u, total);
            acc1 += masked_loaded(x, x_base, w1, u + step, total);
            acc2 += masked_loaded(x, x_base, w2, u + 2 * step, total);
            acc3 += masked_loaded(x, x_base, w3, u + 3 * step, total);
            u += 4 * step;
        }
        while u + 3 * step < total {
            acc0 += term(x, w, x_base, w_base, part_stride, block, u, split);
            acc1 += term(x, w, x_base, w_base, part_stride, block, u + step, split);
            acc2 += term(x, w, x_base, w_base, part_stride, block, u + 2 * step, split);
            acc3 += term(x, w, x_base, w_base, part_stride, block, u + 3 * step, split);
            u += 4 * step;
        }
        if u < total {
            acc0 += term(x, w, x_base, w_base, part_stride, block, u, split);
            acc1 += masked_term(x, w, x_base, w_base, part_stride, block, u + step, total, split);
            acc2 += masked_term(x, w, x_base, w_base, part_stride, block, u + 2 * step, total, split);
        }
        let total_sum = plane_sum(Vector::vector_sum((acc0 + acc1) + (acc2 + acc3)));
        if swiglu {
            // `dtype(dtype(silu(gate)) * up)` from the products rounded to the dtype, as
            // `activation::swiglu_halves_kernel` computes it from a stored `[gate | up]`.
            let mut sums = Shared::<[f32]>::new_slice(planes);
            if UNIT_POS_X == 0 {
                sums[UNIT_POS_Y as usize] = f32::cast_from(E::cast_from(total_sum));
            }
            sync_cube();
            if UNIT_POS_X == 0 && UNIT_POS_Y < half_planes && out_channel < inner {
                let gate = sums[UNIT_POS_Y as usize];
                let up = sums[(UNIT_POS_Y + half_planes) as usize];
                let silu = E::cast_from(gate / (f32::new(1.0) + (f32::new(0.0) - gate).exp()));
                out[row * inner + out_channel] = E::cast_from(f32::cast_from(silu) * up);
            }
        } else if UNIT_POS_X == 0 {
            out[row * channels + channel] = E::cast_from(total_sum);
        }
    }
}

fn launch(x: CubeTensor, w: CubeTensor, experts: Option<CubeTensor>, swiglu: bool) -> CubeTensor {
    let x = into_contiguous(x);
    // Early loads read the weight before waiting for the kernel before this one, so not where
    // that kernel is the weight's own copy into a contiguous layout (a weight as loaded is
    // contiguous; a view of one might not be).
    let w_in_place = !w.meta.is_tiled() && w.is_contiguous();
    let w = into_contiguous(w);
    let wshape = w.meta.shape().clone();
    let rank = wshape.num_dims();
    let (parts, channels, block) = (wshape[rank - 3], wshape[rank - 2], wshape[rank - 1]);
    let x_rows = x.meta.shape()[0];
    let rows = experts.as_ref().map_or(x_rows, |e| e.meta.shape()[0]);
    assert!(x_rows > 0 && rows.is_multiple_of(x_rows), "matvec: {rows} output rows for {x_rows} input rows");
    let x_share = rows / x_rows;
    let dtype = x.dtype;
    assert!(!swiglu || channels.is_multiple_of(2), "matvec: an odd width {channels} has no [gate | up] halves");
    let out_channels = if swiglu { channels / 2 } else { channels };
    // Contiguous: the kernel writes rows `out_channels` apart (CubeCL may pitch the rows of a
    // tensor it allocates, which a first one-row test cannot see).
    let out = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new([rows, out_channels]), dtype);
    let vector = vector_width(block, dtype);
    // With `swiglu` a cube's planes take half as many output channels, each twice: two planes
    // at least, and as `channels` is twice the outputs, half the planes still keep the grid
    // within its limit.
    let planes = planes_per_cube(channels, experts.is_some());
    let planes = if swiglu { planes.max(2) } else { planes };
    let cube_dim = CubeDim::new_2d(PLANE as u32, planes);
    let per_cube = if swiglu { planes / 2 } else { planes };
    let cube_count = CubeCount::Static(rows as u32, (out_channels as u32).div_ceil(per_cube), 1);
    let int_dtype = experts.as_ref().map_or(DType::I32, |e| e.dtype);
    let gathered = experts.is_some();
    let client = out.client.clone();
    // SAFETY: every index the kernel reads is in bounds: `row < rows` (the grid's y),
    // `channel < channels` (checked; with `swiglu` clamped below `channels / 2` in each half,
    // and written only below it), `v < block`, `part < parts`, and an expert index comes from
    // the router, which picks among the `experts` stacked in `w`.
    unsafe {
        device::split_matvec_kernel::launch_unchecked(
            &client,
            cube_count,
            cube_dim,
            vector,
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            experts.map(|e| e.into_buffer_arg()).into(),
            out.clone().into_tensor_arg(),
            parts,
            x_share,
            swiglu,
            planes as usize,
            parts > 1,
            // A routed expert's weights are known only once the router before has written
            // its choice, so those products wait first.
            crate::launch::early_loads() && !gathered && w_in_place,
            [dtype_to_storage_type(dtype), dtype_to_storage_type(int_dtype)],
        )
    };
    out
}

/// Whether [`split_matvec`] runs for a dense product of `rows` rows on `device`: CubeCL
/// devices, up to [`DENSE_MAX_ROWS`] rows.
pub fn dense_kernel_applies(rows: usize, device: &Device) -> bool {
    rows <= DENSE_MAX_ROWS && is_cubecl(device)
}

/// Whether [`gathered_split_matvec`] runs for `rows` (token, expert) rows on `device`: CubeCL
/// devices, up to [`GATHERED_MAX_ROWS`] rows.
pub fn gathered_kernel_applies(rows: usize, device: &Device) -> bool {
    rows <= GATHERED_MAX_ROWS && is_cubecl(device)
}

/// `x [rows, in] · wᵀ -> [rows, out]` for `w [parts, out, in / parts]` by the kernel.
pub fn split_matvec(x: Tensor<2>, w: &Tensor<3>) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::split_matvec(x.into_dispatch(), w.clone().into_dispatch()))
}

/// `silu(gate) * up` of `x [rows, in] · wᵀ` for `w [parts, 2 * inner, in / parts]` holding
/// `[gate | up]`, by the kernel: `[rows, inner]`, the bits of
/// [`crate::activation::swiglu_halves`] over [`split_matvec`]'s output, with one launch and no
/// `[gate | up]` written out.
pub fn split_matvec_swiglu(x: Tensor<2>, w: &Tensor<3>) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::split_matvec_swiglu(x.into_dispatch(), w.clone().into_dispatch()))
}

/// Whether a SwiGLU MLP's `[gate | up]` product of `rows` rows on `device` takes the gate in
/// the product's kernel ([`split_matvec_swiglu`]): where [`dense_kernel_applies`], unless
/// `INFERENCE_PIO_SWIGLU_IN_MATVEC=0`.
pub fn swiglu_kernel_applies(rows: usize, device: &Device) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    dense_kernel_applies(rows, device) && *ON.get_or_init(|| !crate::launch::switched_off("INFERENCE_PIO_SWIGLU_IN_MATVEC"))
}

/// Row `s` of `x [rows, in]`, repeated `slots / rows` times, times expert `experts[s]` of
/// `w [experts, parts, out, in / parts]` by the kernel: `[slots, out]`.
pub fn gathered_split_matvec(x: Tensor<2>, w: &Tensor<4>, experts: Tensor<1, Int>) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::gathered_split_matvec(x.into_dispatch(), w.clone().into_dispatch(), experts.into_dispatch()))
}

/// What [`gathered_split_matvec`] computes, with burn operations (every backend): the rows
/// repeated, the chosen experts' weights gathered, then [`crate::batched_linear`] one row per
/// entry.
pub fn matvec_reference(x: Tensor<2>, w: &Tensor<4>, experts: Tensor<1, Int>) -> Tensor<2> {
    let [rows, inp] = x.dims();
    let [slots] = experts.dims();
    let [_, _, out, _] = w.dims();
    let x = x.reshape([rows, 1, inp]).repeat_dim(1, slots / rows).reshape([slots, 1, inp]);
    let chosen = w.clone().select(0, experts);
    crate::batched_linear(x, chosen).reshape([slots, out])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    fn values(x: Tensor<2>) -> Vec<f32> {
        x.cast(DType::F32).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data")
    }

    #[test]
    fn the_reference_multiplies_each_row_by_its_expert() {
        let d = Device::flex();
        let (experts, out, inp) = (4, 6, 8);
        let w: Tensor<3> = Tensor::random([experts, out, inp], Distribution::Uniform(-1.0, 1.0), &d);
        let x: Tensor<2> = Tensor::random([2, inp], Distribution::Uniform(-1.0, 1.0), &d);
        // Two tokens, two experts each: rows (token 0, expert 3), (0, 1), (1, 0), (1, 3).
        let chosen = [3i64, 1, 0, 3];
        let ids = Tensor::<1, Int>::from_data(TensorData::new(chosen.to_vec(), [4]), &d);
        let xs = values(x.clone());
        let ws = values(w.clone().reshape([experts * out, inp]));
        let want: Vec<f32> = (0..4)
            .flat_map(|s| {
                let (token, e) = (s / 2, chosen[s] as usize);
                let (xs, ws) = (&xs, &ws);
                (0..out).map(move |o| (0..inp).map(|i| xs[token * inp + i] * ws[(e * out + o) * inp + i]).sum::<f32>())
            })
            .collect();
        for parts in [1, 2] {
            let got = values(matvec_reference(x.clone(), &crate::split_stacked(w.clone(), parts), ids.clone()));
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "parts {parts}: {g} vs {w}");
            }
        }
        assert_eq!(matvec_shape(&Shape::new([4]), &Shape::new([experts, 2, out, inp / 2])), Shape::new([4, out]));
    }

    #[test]
    fn the_grid_fits_every_product_width() {
        // Without the switch (CI): four planes, raised where the channels would pass the
        // 65,535 cubes of the grid's second dimension.
        if std::env::var_os("INFERENCE_PIO_MATVEC_PLANES").is_some() {
            return;
        }
        assert_eq!(planes_per_cube(2560, false), ROWS_PER_CUBE);
        assert_eq!(planes_per_cube(2560, true), EXPERT_ROWS_PER_CUBE);
        assert_eq!(planes_per_cube(151_936, false), 4);
        assert_eq!(planes_per_cube(4 * MAX_GRID_Y, false), 4);
        // A 262,144-token head (4 x 65,536) takes cubes of 8.
        assert_eq!(planes_per_cube(262_144, false), 8);
        assert_eq!(planes_per_cube(usize::MAX / 2, false), 32);
        for channels in [1, 2560, 151_936, 262_141, 262_144 * 2, 1_000_000, 2_000_000] {
            let planes = planes_per_cube(channels, false) as usize;
            assert!(channels.div_ceil(planes) <= MAX_GRID_Y, "{channels} channels in cubes of {planes}");
            // The SwiGLU form: half the planes a cube take outputs of `channels / 2`.
            let half = planes.max(2) / 2;
            assert!((channels / 2).div_ceil(half) <= MAX_GRID_Y, "{channels} channels, SwiGLU, cubes of {half}");
        }
    }

    #[test]
    fn the_kernel_is_for_cubecl_devices_and_few_rows() {
        assert!(!dense_kernel_applies(1, &Device::flex()));
        assert!(!gathered_kernel_applies(8, &Device::flex()));
        // Constructing a device handle does not touch the driver.
        let gpu = Device::cuda(0usize);
        assert!(dense_kernel_applies(DENSE_MAX_ROWS, &gpu) && !dense_kernel_applies(DENSE_MAX_ROWS + 1, &gpu));
        assert!(gathered_kernel_applies(GATHERED_MAX_ROWS, &gpu) && !gathered_kernel_applies(GATHERED_MAX_ROWS + 1, &gpu));
    }
}
