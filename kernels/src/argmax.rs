//! The index of each row's largest value: greedy decoding's token pick, done where the
//! logits are so that only the ids come back (PyTorch's `torch.argmax(logits, dim=-1)`, as
//! transformers' greedy search calls it; the first of equal values, as
//! `torch.argmax` documents).
//!
//! burn's argmax on CubeCL devices scans a row with one unit, which cost a batch-1 decode step
//! more than reading the row back. Our kernel takes one cube of 256 units per row: each unit
//! scans every 256th value, then planes (warps) reduce (value, index) pairs with `plane_max` /
//! `plane_min`, and the planes through shared memory. The reference elsewhere is burn's
//! `argmax`. Checked against it on the device by `kernels/examples/kernel_check.rs`
//! (group `elementwise`).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Int, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use crate::launch::{PLANE, is_cubecl, last_axis_contiguous};

/// Planes per row: one cube of 256 units per row.
const PLANES_PER_ROW: usize = 8;

/// The row argmax as a backend operation (CubeCL runtimes only). The indices come back as f32
/// `[rows]`, exact below 2^24 (vocabularies are far smaller): an extension's output takes its
/// input's kind.
#[backend_extension(Cube, Fusion)]
pub trait ArgmaxOps: Backend {
    /// `logits [rows, cols]` (any float dtype): `[rows]` f32 indices.
    #[fusion(dtype = burn::tensor::DType::F32, shape = burn::tensor::Shape::new([logits[0]]))]
    fn row_argmax(logits: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl ArgmaxOps for CubeBackend {
    fn row_argmax(logits: FloatTensor<Self>) -> FloatTensor<Self> {
        launch(logits)
    }
}

/// The kernel, apart from burn's names (`Tensor` is CubeCL's here).
mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;

    #[cube(launch_unchecked)]
    pub fn argmax_kernel<E: Float>(logits: &Tensor<E>, out: &mut Tensor<f32>, #[comptime] planes: usize, #[define(E)] _dtype: ElemType) {
        let row = CUBE_POS_X as usize;
        let cols = logits.shape(1);
        let start = row * logits.stride(0);
        let step = CUBE_DIM as usize;
        // A unit's values rise in index: `>` keeps the first of equals.
        let mut best = f32::new(-3.4e38);
        let mut at = u32::cast_from(cols);
        let mut i = UNIT_POS as usize;
        while i < cols {
            let value = f32::cast_from(logits[start + i]);
            if value > best {
                best = value;
                at = u32::cast_from(i);
            }
            i += step;
        }
        // Over the plane: the largest value, then the smallest index holding it (`cols`: none).
        let top = plane_max(best);
        let mut mine = u32::cast_from(cols);
        if best == top {
            mine = at;
        }
        let first = plane_min(mine);
        let mut values = Shared::<[f32]>::new_slice(planes);
        let mut indices = Shared::<[u32]>::new_slice(planes);
        if UNIT_POS_X == 0 {
            values[UNIT_POS_Y as usize] = top;
            indices[UNIT_POS_Y as usize] = first;
        }
        sync_cube();
        if UNIT_POS == 0 {
            let mut value = values[0];
            let mut index = indices[0];
            for p in 1..planes {
                if values[p] > value || (values[p] == value && indices[p] < index) {
                    value = values[p];
                    index = indices[p];
                }
            }
            // Nothing above the floor (every value -inf or NaN): index 0.
            if index >= u32::cast_from(cols) {
                index = 0;
            }
            out[row] = f32::cast_from(index);
        }
    }
}

fn launch(logits: CubeTensor) -> CubeTensor {
    let logits = last_axis_contiguous(logits);
    let rows = logits.meta.shape()[0];
    let dtype = logits.dtype;
    let client = logits.client.clone();
    let out = empty_device_contiguous_dtype(client.clone(), logits.device.clone(), [rows].into(), DType::F32);
    // SAFETY: one cube per row `row < rows`; a row starts at `row * stride(0)` and its `cols`
    // values are contiguous (the last axis made contiguous above); `out` has `rows` entries.
    unsafe {
        device::argmax_kernel::launch_unchecked(
            &client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_2d(PLANE as u32, PLANES_PER_ROW as u32),
            logits.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            PLANES_PER_ROW,
            dtype_to_storage_type(dtype),
        )
    };
    out
}

/// The kernel's indices as ids `[rows]` (CubeCL devices only).
pub fn fused_row_argmax(logits: Tensor<2>) -> Tensor<1, Int> {
    Tensor::<1>::from_dispatch(Dispatch::row_argmax(logits.into_dispatch())).int()
}

/// The index of each row's largest value, `logits [rows, cols] -> [rows]`: the kernel on
/// CubeCL devices, burn's `argmax` elsewhere.
pub fn row_argmax(logits: Tensor<2>) -> Tensor<1, Int> {
    if is_cubecl(&logits.device()) && matches!(logits.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        fused_row_argmax(logits)
    } else {
        let rows = logits.dims()[0];
        logits.argmax(1).reshape([rows])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn the_reference_takes_the_first_of_equal_values() {
        let values = vec![0.5f32, 2.0, -1.0, 2.0, 1.0, 0.0, 3.0, 3.0];
        let logits = Tensor::<2>::from_data(TensorData::new(values, [2, 4]), &Device::flex());
        let ids = row_argmax(logits).into_data().convert::<i64>().try_to_vec::<i64>().expect("ids");
        assert_eq!(ids, vec![1, 2]);
    }
}
