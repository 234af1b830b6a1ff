//! The SwiGLU gate (Shazeer 2020, arXiv:2002.05202; transformers' `Qwen3MLP`:
//! `act_fn(gate_proj(x)) * up_proj(x)` with SiLU) over one `[gate | up]` projection, as one
//! CubeCL kernel: each unit reads a vector of the gate and the matching vector of the up half
//! and writes `dtype(dtype(silu(gate)) * up)`, rounding where transformers rounds in bf16.
//! burn's operations take four kernels (two slices' reads, the SiLU, the product). The
//! reference on every backend is [`crate::reference::swiglu_halves`], which the kernel is
//! checked against on the device (`kernels/examples/kernel_check.rs`).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Shape, Tensor};
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use crate::launch::{is_cubecl, last_axis_contiguous, row_vector_width, vector_width};

/// Units per cube.
const UNITS_PER_CUBE: u32 = 256;

/// `[.., 2 * inner] -> [.., inner]`.
pub fn halves_shape(gate_up: &Shape) -> Shape {
    let mut shape = gate_up.clone();
    let rank = shape.num_dims();
    shape[rank - 1] /= 2;
    shape
}

/// The gate as a backend operation (CubeCL runtimes only).
#[backend_extension(Cube, Fusion)]
pub trait ActivationOps: Backend {
    /// `silu(gate) * up` for `gate_up [.., 2 * inner]` holding the gate, then the up half.
    #[fusion(dtype = gate_up, shape = halves_shape(gate_up))]
    fn fused_swiglu_halves(gate_up: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl ActivationOps for CubeBackend {
    fn fused_swiglu_halves(gate_up: FloatTensor<Self>) -> FloatTensor<Self> {
        launch(gate_up)
    }
}

/// The kernel, apart from burn's names (`Tensor` is CubeCL's here).
mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;
    use crate::launch::device::row_start;

    #[cube(launch_unchecked)]
    pub fn swiglu_halves_kernel<E: Float, N: Size>(
        gate_up: &Tensor<Vector<E, N>>,
        out: &mut Tensor<Vector<E, N>>,
        #[define(E)] _dtype: ElemType,
    ) {
        let index = ABSOLUTE_POS;
        if index >= out.len() {
            terminate!();
        }
        // Shapes count elements, indices count vectors.
        let inner = out.shape(out.rank() - 1) / out.vector_size();
        let (row, v) = (index / inner, index % inner);
        let start = row_start(gate_up, row);
        let gate = Vector::<f32, N>::cast_from(gate_up[start + v]);
        let up = Vector::<f32, N>::cast_from(gate_up[start + inner + v]);
        let one = Vector::<f32, N>::new(1.0);
        let silu = Vector::<E, N>::cast_from(gate / (one + Vector::exp(Vector::<f32, N>::new(0.0) - gate)));
        out[index] = Vector::cast_from(Vector::<f32, N>::cast_from(silu) * up);
    }
}

fn launch(gate_up: CubeTensor) -> CubeTensor {
    let shape = gate_up.meta.shape().clone();
    let rank = shape.num_dims();
    let width = shape[rank - 1];
    assert!(width.is_multiple_of(2), "swiglu_halves: an odd width {width} has no halves");
    let inner = width / 2;
    let gate_up = last_axis_contiguous(gate_up);
    let dtype = gate_up.dtype;
    let vector = row_vector_width(vector_width(inner, dtype), &[&gate_up]);
    let out_shape = halves_shape(&shape);
    let units = out_shape.num_elements() / vector;
    let out = empty_device_contiguous_dtype(gate_up.client.clone(), gate_up.device.clone(), out_shape, dtype);
    let client = out.client.clone();
    let cube_count = CubeCount::Static((units as u32).div_ceil(UNITS_PER_CUBE), 1, 1);
    // SAFETY: unit `index < out.len()` (checked) reads row `index / inner` of `gate_up`, whose
    // rows span `2 * inner` contiguous elements from their strided start, and writes the
    // contiguous `out`.
    unsafe {
        device::swiglu_halves_kernel::launch_unchecked(
            &client,
            cube_count,
            CubeDim::new_1d(UNITS_PER_CUBE),
            vector,
            gate_up.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            dtype_to_storage_type(dtype),
        )
    };
    out
}

/// [`crate::reference::swiglu_halves`] by the kernel (CubeCL devices only).
pub fn fused_swiglu_halves<const D: usize>(gate_up: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(Dispatch::fused_swiglu_halves(gate_up.into_dispatch()))
}

/// `silu(gate) * up` of one `[gate | up]` projection: the kernel on CubeCL devices, one loop
/// over each row for f32 on the CPU (`crate::cpu_rows`), the reference elsewhere.
pub fn swiglu_halves<const D: usize>(gate_up: Tensor<D>) -> Tensor<D> {
    if is_cubecl(&gate_up.device()) {
        return fused_swiglu_halves(gate_up);
    }
    if let Some(out) = crate::cpu_rows::swiglu_halves(&gate_up) {
        return out;
    }
    crate::reference::swiglu_halves(gate_up)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_is_half_as_wide() {
        assert_eq!(halves_shape(&Shape::new([3, 5, 8])), Shape::new([3, 5, 4]));
    }
}
