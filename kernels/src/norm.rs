//! RMS normalisation (`Qwen3RMSNorm` / `LlamaRMSNorm` in transformers; Zhang & Sennrich 2019,
//! arXiv:1910.07467) and the decoder's residual add before it, each as one CubeCL kernel:
//! - `rms_norm(x, weight)`: one cube (eight planes) per row sums the squares in f32, then writes
//!   `weight * dtype(x / sqrt(mean + eps))`; the rows may be a strided view (the query and key
//!   heads inside a fused q|k|v projection) and the weight one row per group of rows (the
//!   per-head QK-norm weights);
//! - `add_rms_norm(residual, y, weight)`: the sum `residual + y` (rounded to the dtype, as
//!   transformers adds in bf16) written out as the new residual stream, and its normalisation,
//!   from one read of each input;
//! - `layer_norm(x, weight, bias)` (`nn.LayerNorm`; Ba et al. 2016, arXiv:1607.06450, as the
//!   Qwen3-VL vision tower and its mergers use it): one cube per row takes the mean, then the
//!   variance of the centred values, both in f32, and writes `dtype((x - mean) * inv * weight +
//!   bias)`, rounded once, as [`crate::reference::layer_norm`] computes in f32.
//!
//! burn's operations take about eight kernels for a normalisation (cast, square, mean, add,
//! square root, reciprocal, two products, cast back) and one more for the add. The rounding
//! points are those of [`crate::reference::rms_norm`], the reference on every backend, which
//! the kernels are checked against on the device (`kernels/examples/kernel_check.rs`).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use crate::launch::{PLANE, is_cubecl, last_axis_contiguous, row_vector_width, vector_width};

/// Planes (warps) per row: one cube of 256 units per row. A decode step normalises one row of
/// 2,560 values, which one plane took about 10 µs to read twice (ten dependent 16-byte loads
/// per lane and pass); eight planes share it.
const PLANES_PER_ROW: u32 = 8;
/// The most planes a row's cube may have (the cube reductions' shared buffers hold this many).
const MAX_PLANES: usize = 32;

/// [`PLANES_PER_ROW`], unless `INFERENCE_PIO_NORM_PLANES` (1 to 32, a power of two) says
/// otherwise. On an H100, Qwen3-4B batch 1 decoded at 243.2-243.3 tok/s with 8, 243.6-244.0
/// with 16 and 242.1 with 32: inside run spread
/// (`benches/results/gpu-h100-2026-12-07l-small-kernel-shapes.md`).
fn planes_per_row() -> u32 {
    static PLANES: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PLANES.get_or_init(|| {
        crate::launch::env_number("INFERENCE_PIO_NORM_PLANES", |p| (1..=MAX_PLANES).contains(&p) && p.is_power_of_two(), "a power of two from 1 to 32")
            .map_or(PLANES_PER_ROW, |p| p as u32)
    })
}

/// The normalisations as backend operations (CubeCL runtimes only).
#[backend_extension(Cube, Fusion)]
pub trait NormOps: Backend {
    /// `x [.., n]` normalised over its last axis; row `r` (all axes but the last flattened)
    /// is scaled by row `r % groups` of `weight [groups, n]`.
    #[fusion(dtype = x, shape = x)]
    fn fused_rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;

    /// `(residual + y, rms_norm(residual + y))` for `residual, y [.., n]`, `weight [1, n]`.
    #[fusion(meta = |residual, _y, _weight, _eps| (residual.clone(), residual.clone()))]
    fn fused_add_rms_norm(
        residual: FloatTensor<Self>,
        y: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `x [.., n]` layer-normalised over its last axis, then scaled by `weight [1, n]` and
    /// shifted by `bias [1, n]`.
    #[fusion(dtype = x, shape = x)]
    fn fused_layer_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;
}

impl NormOps for CubeBackend {
    fn fused_rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        launch(x, None, weight, eps).1
    }

    fn fused_add_rms_norm(
        residual: FloatTensor<Self>,
        y: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (sum, normed) = launch(residual, Some(y), weight, eps);
        (sum.expect("the add variant writes the sum"), normed)
    }

    fn fused_layer_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        launch_layer_norm(x, weight, bias, eps)
    }
}

/// The kernels, apart from burn's names (`Tensor` is CubeCL's here).
pub(crate) mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::num_traits::Zero;
    use burn_cubecl::cubecl::prelude::*;
    use crate::launch::device::{cube_reduce, row_start};

    /// One vector normalised and scaled as transformers rounds: `dtype(weight * dtype(value *
    /// inv))`, the normalised value rounded to the dtype before the weight.
    #[cube]
    pub fn normalised<E: Float, N: Size>(value: Vector<f32, N>, inv: f32, weight: Vector<E, N>) -> Vector<E, N> {
        let normed = Vector::<E, N>::cast_from(value * Vector::new(inv));
        Vector::cast_from(Vector::<f32, N>::cast_from(normed) * Vector::<f32, N>::cast_from(weight))
    }

    /// The second pass over a row whose mean square is known: [`normalised`] vector by
    /// vector.
    #[cube]
    fn scale_row<E: Float, N: Size>(
        src: &Tensor<Vector<E, N>>,
        src_start: usize,
        weight: &Tensor<Vector<E, N>>,
        w_start: usize,
        out: &mut Tensor<Vector<E, N>>,
        out_start: usize,
        vectors: usize,
        inv: f32,
    ) {
        let mut v = UNIT_POS as usize;
        while v < vectors {
            out[out_start + v] = normalised(Vector::cast_from(src[src_start + v]), inv, weight[w_start + v]);
            v += CUBE_DIM as usize;
        }
    }

    /// `1 / sqrt(mean + eps)` from one unit's partial sum of squares, summed over its plane
    /// and then over the cube's planes (every unit of the cube gets the result).
    #[cube]
    fn inverse_rms(partial: f32, n: usize, eps: f32) -> f32 {
        let total = cube_reduce(partial, crate::norm::MAX_PLANES, false);
        f32::new(1.0) / (total / f32::cast_from(n) + eps).sqrt()
    }

    #[cube(launch_unchecked)]
    pub fn rms_norm_kernel<E: Float, N: Size>(
        x: &Tensor<Vector<E, N>>,
        weight: &Tensor<Vector<E, N>>,
        out: &mut Tensor<Vector<E, N>>,
        rows: usize,
        eps: f32,
        #[define(E)] _dtype: ElemType,
    ) {
        // The whole cube leaves together (one cube per row).
        let row = CUBE_POS_X as usize;
        if row >= rows {
            terminate!();
        }
        let n = x.shape(x.rank() - 1);
        let vectors = n / x.vector_size();
        let start = row_start(x, row);
        let mut acc = Vector::<f32, N>::zero();
        let mut v = UNIT_POS as usize;
        while v < vectors {
            let value = Vector::<f32, N>::cast_from(x[start + v]);
            acc += value * value;
            v += CUBE_DIM as usize;
        }
        let inv = inverse_rms(Vector::vector_sum(acc), n, eps);
        let w_start = (row % weight.shape(0)) * weight.stride(0) / weight.vector_size();
        scale_row(x, start, weight, w_start, out, row * vectors, vectors, inv);
    }

    #[cube(launch_unchecked)]
    pub fn add_rms_norm_kernel<E: Float, N: Size>(
        residual: &Tensor<Vector<E, N>>,
        y: &Tensor<Vector<E, N>>,
        weight: &Tensor<Vector<E, N>>,
        sum: &mut Tensor<Vector<E, N>>,
        out: &mut Tensor<Vector<E, N>>,
        rows: usize,
        eps: f32,
        #[define(E)] _dtype: ElemType,
    ) {
        let row = CUBE_POS_X as usize;
        if row >= rows {
            terminate!();
        }
        let n = residual.shape(residual.rank() - 1);
        let vectors = n / residual.vector_size();
        let (r_start, y_start) = (row_start(residual, row), row_start(y, row));
        let s_start = row * vectors;
        let mut acc = Vector::<f32, N>::zero();
        let mut v = UNIT_POS as usize;
        while v < vectors {
            // Rounded to the dtype first: the residual stream is stored in it.
            let total = Vector::<E, N>::cast_from(
                Vector::<f32, N>::cast_from(residual[r_start + v]) + Vector::<f32, N>::cast_from(y[y_start + v]),
            );
            sum[s_start + v] = total;
            let value = Vector::<f32, N>::cast_from(total);
            acc += value * value;
            v += CUBE_DIM as usize;
        }
        let inv = inverse_rms(Vector::vector_sum(acc), n, eps);
        // The sum again from the inputs (still in cache), rounded as it was stored.
        let mut v = UNIT_POS as usize;
        while v < vectors {
            let total = Vector::<E, N>::cast_from(
                Vector::<f32, N>::cast_from(residual[r_start + v]) + Vector::<f32, N>::cast_from(y[y_start + v]),
            );
            out[s_start + v] = normalised(Vector::cast_from(total), inv, weight[v]);
            v += CUBE_DIM as usize;
        }
    }

    #[cube(launch_unchecked)]
    pub fn layer_norm_kernel<E: Float, N: Size>(
        x: &Tensor<Vector<E, N>>,
        weight: &Tensor<Vector<E, N>>,
        bias: &Tensor<Vector<E, N>>,
        out: &mut Tensor<Vector<E, N>>,
        rows: usize,
        eps: f32,
        #[define(E)] _dtype: ElemType,
    ) {
        // The whole cube leaves together (one cube per row).
        let row = CUBE_POS_X as usize;
        if row >= rows {
            terminate!();
        }
        let n = x.shape(x.rank() - 1);
        let vectors = n / x.vector_size();
        let start = row_start(x, row);
        let mut total = Vector::<f32, N>::zero();
        let mut v = UNIT_POS as usize;
        while v < vectors {
            total += Vector::<f32, N>::cast_from(x[start + v]);
            v += CUBE_DIM as usize;
        }
        let mean = cube_reduce(Vector::vector_sum(total), crate::norm::MAX_PLANES, false) / f32::cast_from(n);
        // The variance from the centred values (a second read of the row, in cache), as
        // the reference takes it, not from the mean square.
        let mut squares = Vector::<f32, N>::zero();
        let mut u = UNIT_POS as usize;
        while u < vectors {
            let centred = Vector::<f32, N>::cast_from(x[start + u]) - Vector::new(mean);
            squares += centred * centred;
            u += CUBE_DIM as usize;
        }
        let variance = cube_reduce(Vector::vector_sum(squares), crate::norm::MAX_PLANES, false) / f32::cast_from(n);
        let inv = f32::new(1.0) / (variance + eps).sqrt();
        let out_start = row * vectors;
        let mut w = UNIT_POS as usize;
        while w < vectors {
            let centred = Vector::<f32, N>::cast_from(x[start + w]) - Vector::new(mean);
            let scaled = centred * Vector::new(inv) * Vector::<f32, N>::cast_from(weight[w]);
            out[out_start + w] = Vector::cast_from(scaled + Vector::<f32, N>::cast_from(bias[w]));
            w += CUBE_DIM as usize;
        }
    }
}

fn launch_layer_norm(x: CubeTensor, weight: CubeTensor, bias: CubeTensor, eps: f64) -> CubeTensor {
    let shape = x.meta.shape().clone();
    let n = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / n.max(1);
    let dtype = x.dtype;
    assert!(weight.dtype == dtype && bias.dtype == dtype, "layer_norm: the weight's or bias's dtype differs from the input's");
    assert!(weight.meta.shape()[1] == n && bias.meta.shape()[1] == n, "layer_norm: the weight's or bias's width differs from the input's");
    let x = last_axis_contiguous(x);
    let (weight, bias) = (into_contiguous(weight), into_contiguous(bias));
    let vector = row_vector_width(vector_width(n, dtype), &[&x]);
    let out = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), shape, dtype);
    let client = out.client.clone();
    // SAFETY: a row `row < rows` (checked) starts at its strided offset and spans `n`
    // contiguous elements of `x` and of the contiguous `out`; the weight and bias are
    // contiguous `[1, n]` rows (asserted widths).
    unsafe {
        device::layer_norm_kernel::launch_unchecked(
            &client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_2d(PLANE as u32, planes_per_row()),
            vector,
            x.into_tensor_arg(),
            weight.into_tensor_arg(),
            bias.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rows,
            eps as f32,
            dtype_to_storage_type(dtype),
        )
    };
    out
}

fn launch(x: CubeTensor, y: Option<CubeTensor>, weight: CubeTensor, eps: f64) -> (Option<CubeTensor>, CubeTensor) {
    let shape = x.meta.shape().clone();
    let rank = shape.num_dims();
    let n = shape[rank - 1];
    let rows = shape.num_elements() / n.max(1);
    let dtype = x.dtype;
    assert_eq!(weight.dtype, dtype, "rms_norm: the weight's dtype differs from the input's");
    assert_eq!(weight.meta.shape()[1], n, "rms_norm: the weight's width differs from the input's");
    // The kernels index rows through strides but need each row's elements contiguous.
    let x = last_axis_contiguous(x);
    let y = y.map(last_axis_contiguous);
    let weight = into_contiguous(weight);
    let widest = vector_width(n, dtype);
    let vector = match &y {
        Some(y) => row_vector_width(widest, &[&x, y]),
        None => row_vector_width(widest, &[&x]),
    };
    let client = x.client.clone();
    let alloc = || empty_device_contiguous_dtype(client.clone(), x.device.clone(), shape.clone(), dtype);
    let out = alloc();
    let cube_dim = CubeDim::new_2d(PLANE as u32, planes_per_row());
    let cube_count = CubeCount::Static(rows as u32, 1, 1);
    let storage = dtype_to_storage_type(dtype);
    match y {
        None => {
            // SAFETY: a row `row < rows` (checked) starts at its strided offset and spans `n`
            // contiguous elements of `x` and of the contiguous `out`; the weight row is
            // `row % groups < groups`, `n` wide (asserted).
            unsafe {
                device::rms_norm_kernel::launch_unchecked(
                    &client,
                    cube_count,
                    cube_dim,
                    vector,
                    x.into_tensor_arg(),
                    weight.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    rows,
                    eps as f32,
                    storage,
                )
            };
            (None, out)
        }
        Some(y) => {
            assert_eq!(y.meta.shape(), &shape, "add_rms_norm: the addend's shape differs from the residual's");
            let sum = alloc();
            // SAFETY: as above, for `residual`, `y` (the same shape, asserted), `sum` and `out`
            // (contiguous, that shape), and the weight's first row.
            unsafe {
                device::add_rms_norm_kernel::launch_unchecked(
                    &client,
                    cube_count,
                    cube_dim,
                    vector,
                    x.into_tensor_arg(),
                    y.into_tensor_arg(),
                    weight.into_tensor_arg(),
                    sum.clone().into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    rows,
                    eps as f32,
                    storage,
                )
            };
            (Some(sum), out)
        }
    }
}

/// `weight` as the kernels' `[groups, n]`: a `[n]` weight is one group.
fn weight_rows<const W: usize>(weight: &Tensor<W>) -> Tensor<2> {
    let dims = weight.dims();
    let n = dims[W - 1];
    weight.clone().reshape([dims.iter().product::<usize>() / n.max(1), n])
}

/// [`crate::reference::rms_norm`] by the kernel (CubeCL devices only). `weight` is `[n]`, or
/// `[groups, n]` with its groups repeating over the rows, innermost first (one weight per
/// head of `x [.., heads, n]`).
pub fn fused_rms_norm<const D: usize, const W: usize>(x: Tensor<D>, weight: &Tensor<W>, eps: f64) -> Tensor<D> {
    let w = weight_rows(weight);
    Tensor::from_dispatch(Dispatch::fused_rms_norm(x.into_dispatch(), w.into_dispatch(), eps))
}

/// `(residual + y, rms_norm(residual + y))` by the kernel (CubeCL devices only).
pub fn fused_add_rms_norm<const D: usize>(residual: Tensor<D>, y: Tensor<D>, weight: &Tensor<1>, eps: f64) -> (Tensor<D>, Tensor<D>) {
    let w = weight_rows(weight);
    let (sum, normed) = Dispatch::fused_add_rms_norm(residual.into_dispatch(), y.into_dispatch(), w.into_dispatch(), eps);
    (Tensor::from_dispatch(sum), Tensor::from_dispatch(normed))
}

/// [`crate::reference::layer_norm`] by the kernel (CubeCL devices only); `weight` and `bias`
/// `[n]` in `x`'s dtype.
pub fn fused_layer_norm<const D: usize>(x: Tensor<D>, weight: &Tensor<1>, bias: &Tensor<1>, eps: f64) -> Tensor<D> {
    let (w, b) = (weight_rows(weight), weight_rows(bias));
    Tensor::from_dispatch(Dispatch::fused_layer_norm(x.into_dispatch(), w.into_dispatch(), b.into_dispatch(), eps))
}

/// Layer normalisation over the last axis with a weight and a bias (see
/// [`crate::reference::layer_norm`]): the kernel on CubeCL devices where the weight and bias
/// have `x`'s dtype, the reference elsewhere.
pub fn layer_norm<const D: usize>(x: Tensor<D>, weight: &Tensor<1>, bias: &Tensor<1>, eps: f64) -> Tensor<D> {
    let n = x.dims()[D - 1];
    if is_cubecl(&x.device()) && weight.dtype() == x.dtype() && bias.dtype() == x.dtype() && weight.dims()[0] == n && bias.dims()[0] == n {
        return fused_layer_norm(x, weight, bias, eps);
    }
    crate::reference::layer_norm(x, weight, bias, eps)
}

/// RMS normalisation over the last axis (see [`crate::reference::rms_norm`]): the kernel on
/// CubeCL devices, one loop over each row for f32 on the CPU with a `[n]` weight
/// (`crate::cpu_rows`), the reference elsewhere.
pub fn rms_norm<const D: usize, const W: usize>(x: Tensor<D>, weight: &Tensor<W>, eps: f64) -> Tensor<D> {
    if is_cubecl(&x.device()) && weight.dims()[W - 1] == x.dims()[D - 1] {
        return fused_rms_norm(x, weight, eps);
    }
    if W == 1
        && let Some(out) = crate::cpu_rows::rms_norm(&x, &weight.clone().reshape([weight.dims()[W - 1]]), eps)
    {
        return out;
    }
    crate::reference::rms_norm(x, weight, eps)
}

/// The residual add and the normalisation after it: `(residual + y, rms_norm(residual + y))`,
/// by one kernel on CubeCL devices, one loop over each row for f32 on the CPU.
pub fn add_rms_norm<const D: usize>(residual: Tensor<D>, y: Tensor<D>, weight: &Tensor<1>, eps: f64) -> (Tensor<D>, Tensor<D>) {
    if is_cubecl(&residual.device()) {
        return fused_add_rms_norm(residual, y, weight, eps);
    }
    if let Some(out) = crate::cpu_rows::add_rms_norm(&residual, &y, weight, eps) {
        return out;
    }
    add_rms_norm_reference(residual, y, weight, eps)
}

/// What [`add_rms_norm`] computes, with burn operations (every backend).
pub fn add_rms_norm_reference<const D: usize>(residual: Tensor<D>, y: Tensor<D>, weight: &Tensor<1>, eps: f64) -> (Tensor<D>, Tensor<D>) {
    let sum = residual.add(y);
    let normed = crate::reference::rms_norm(sum.clone(), weight, eps);
    (sum, normed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Device, Distribution};

    fn values<const D: usize>(x: Tensor<D>) -> Vec<f32> {
        x.cast(DType::F32).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data")
    }

    #[test]
    fn on_the_cpu_the_add_then_norm_is_the_reference_pair() {
        let d = Device::flex();
        assert!(!is_cubecl(&d));
        let r: Tensor<3> = Tensor::random([2, 3, 8], Distribution::Uniform(-1.0, 1.0), &d);
        let y: Tensor<3> = Tensor::random([2, 3, 8], Distribution::Uniform(-1.0, 1.0), &d);
        let w: Tensor<1> = Tensor::random([8], Distribution::Uniform(0.5, 1.5), &d);
        let (sum, normed) = add_rms_norm(r.clone(), y.clone(), &w, 1e-6);
        assert_eq!(values(sum.clone()), values(r.add(y)));
        let want = values(crate::reference::rms_norm(sum, &w, 1e-6));
        for (a, b) in values(normed).iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        // A per-group weight flattens to the kernels' [groups, n].
        let heads: Tensor<2> = Tensor::random([3, 8], Distribution::Uniform(0.5, 1.5), &d);
        assert_eq!(weight_rows(&heads).dims(), [3, 8]);
        assert_eq!(weight_rows(&w).dims(), [1, 8]);
    }
}
