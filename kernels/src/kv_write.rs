//! Writing a step's keys and values into the paged KV pool (vLLM's `reshape_and_cache`,
//! `csrc/cache_kernels.cu`): `pool[slots[i], h, :] = values[i, h, :]` for every token `i` of
//! the step, in place, as one CubeCL kernel with one unit per vector of the values.
//!
//! burn's `select_assign` (the reference on every backend) launches one unit per element of a
//! pool row (`kv_heads x head_dim`, 1,024 units for Qwen3-4B) and each unit loops over all the
//! step's tokens: on an H200 it wrote an 8,192-token prefill step's keys at about 15 GB/s (82 ms
//! of a 153 ms step, 2026-12-03 profile). Here every unit moves one vector, so the write runs
//! at copy bandwidth. The pool is written in place when burn holds it uniquely (the engine
//! takes each layer's pool out of the cache for the step, so it always does); otherwise it is
//! copied first, as `select_assign` does. Checked on the device against `select_assign`
//! (`kernels/examples/kernel_check.rs`).
//!
//! Into an 8-bit cache (`kv_cache_dtype = "int8"` or `"fp8"`) a second kernel quantizes as it
//! writes: a plane per (token, key head) finds the head's largest magnitude, writes its scale
//! and each value's code (`crate::kv_pages` has the formats and the host reference), one launch
//! where burn's operations took about nine.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Device, Int, IndexingUpdateOp, Tensor, TensorData};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use crate::kv_pages::KvCodes;
use crate::launch::{is_cubecl, last_axis_contiguous, row_vector_width, vector_width};

/// Units per cube.
const UNITS_PER_CUBE: u32 = 256;

/// The pool write as a backend operation (CubeCL runtimes only).
#[backend_extension(Cube, Fusion)]
pub trait KvWriteOps: Backend {
    /// `pool [slots, heads, head_dim]` with row `slots[i]` replaced by `values[i]` for each `i`
    /// of `values [tokens, heads, head_dim]`.
    #[fusion(dtype = pool, shape = pool)]
    fn write_kv_slots(pool: FloatTensor<Self>, slots: IntTensor<Self>, values: FloatTensor<Self>) -> FloatTensor<Self>;

    /// [`write_kv_slots`](KvWriteOps::write_kv_slots) of a layer's keys and values, in one
    /// launch: `(k_pool, v_pool)` with row `slots[i]` replaced by `k[i]` and `v[i]` (`k`, `v`
    /// of one shape and dtype; the pools too).
    #[fusion(meta = |k_pool, v_pool, _slots, _k, _v| (k_pool.clone(), v_pool.clone()))]
    fn write_kv_pair(k_pool: FloatTensor<Self>, v_pool: FloatTensor<Self>, slots: IntTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `values [tokens, heads, head_dim]` quantized per (token, head) and written into coded
    /// pages: `codes [slots, heads, head_dim]` (i8: integers, or with `fp8` E4M3 bytes) and `scales
    /// [slots, heads, 1]` (f32) at row `slots[i]`, as
    /// [`crate::kv_pages::quantize_heads_on_host`] computes them, in one launch.
    #[fusion(meta = |codes, scales, _slots, _values, _fp8| (codes.clone(), scales.clone()))]
    fn write_kv_codes(codes: IntTensor<Self>, scales: FloatTensor<Self>, slots: IntTensor<Self>, values: FloatTensor<Self>, fp8: bool) -> (IntTensor<Self>, FloatTensor<Self>);
}

impl KvWriteOps for CubeBackend {
    fn write_kv_slots(pool: FloatTensor<Self>, slots: IntTensor<Self>, values: FloatTensor<Self>) -> FloatTensor<Self> {
        launch(pool, slots, values)
    }

    fn write_kv_pair(k_pool: FloatTensor<Self>, v_pool: FloatTensor<Self>, slots: IntTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        launch_pair(k_pool, v_pool, slots, k, v)
    }

    fn write_kv_codes(codes: IntTensor<Self>, scales: FloatTensor<Self>, slots: IntTensor<Self>, values: FloatTensor<Self>, fp8: bool) -> (IntTensor<Self>, FloatTensor<Self>) {
        launch_codes(codes, scales, slots, values, fp8)
    }
}

/// The kernel, apart from burn's names (`Tensor` is CubeCL's here).
mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;

    /// Unit `ABSOLUTE_POS` copies vector `c` of head `h` of token `i` into the pool row the
    /// token's slot names; a slot outside the pool is skipped.
    #[cube(launch_unchecked)]
    pub fn write_kv_slots_kernel<E: Float, I: Int, N: Size>(
        pool: &mut Tensor<Vector<E, N>>,
        slots: &[I],
        values: &Tensor<Vector<E, N>>,
        #[define(E, I)] _dtypes: [ElemType; 2],
    ) {
        let vector = values.vector_size();
        let per_head = values.shape(2) / vector;
        let per_token = values.shape(1) * per_head;
        let index = ABSOLUTE_POS;
        if index >= values.shape(0) * per_token {
            terminate!();
        }
        let (token, rest) = (index / per_token, index % per_token);
        let (h, c) = (rest / per_head, rest % per_head);
        let slot = usize::cast_from(slots[token]);
        if slot < pool.shape(0) {
            // Strides count elements, indices count vectors.
            let from = (token * values.stride(0) + h * values.stride(1)) / vector + c;
            let to = (slot * pool.stride(0) + h * pool.stride(1)) / vector + c;
            pool[to] = values[from];
        }
    }

    /// [`write_kv_slots_kernel`] for keys (units below `tokens * heads * head_dim / vector`)
    /// and values (the units after them) in one launch.
    #[cube(launch_unchecked)]
    pub fn write_kv_pair_kernel<E: Float, I: Int, N: Size>(
        k_pool: &mut Tensor<Vector<E, N>>,
        v_pool: &mut Tensor<Vector<E, N>>,
        slots: &[I],
        k: &Tensor<Vector<E, N>>,
        v: &Tensor<Vector<E, N>>,
        #[define(E, I)] _dtypes: [ElemType; 2],
    ) {
        let vector = k.vector_size();
        let per_head = k.shape(2) / vector;
        let per_token = k.shape(1) * per_head;
        let half = k.shape(0) * per_token;
        let at = ABSOLUTE_POS;
        if at >= 2 * half {
            terminate!();
        }
        let values_of_v = at >= half;
        let index = if values_of_v { at - half } else { at };
        let (token, rest) = (index / per_token, index % per_token);
        let (h, c) = (rest / per_head, rest % per_head);
        let slot = usize::cast_from(slots[token]);
        // Strides count elements, indices count vectors.
        if values_of_v {
            if slot < v_pool.shape(0) {
                let from = (token * v.stride(0) + h * v.stride(1)) / vector + c;
                let to = (slot * v_pool.stride(0) + h * v_pool.stride(1)) / vector + c;
                v_pool[to] = v[from];
            }
        } else if slot < k_pool.shape(0) {
            let from = (token * k.stride(0) + h * k.stride(1)) / vector + c;
            let to = (slot * k_pool.stride(0) + h * k_pool.stride(1)) / vector + c;
            k_pool[to] = k[from];
        }
    }

    /// Plane `UNIT_POS_Y` of cube `CUBE_POS` quantizes (token, head) `CUBE_POS * planes +
    /// UNIT_POS_Y` of `values` (its lanes over the head's values: the largest magnitude by a
    /// plane maximum, then each value times `largest / max` to its code) into the codes' and
    /// scales' row of the token's slot; a slot outside the pool is skipped. Codes (see
    /// `crate::kv_pages::KvCodes`): `round(y)` in ±127 (half to even: `rint`), or with `fp8`
    /// the E4M3 byte nearest `y` (`crate::kv_pages::e4m3_from_f32`'s arithmetic).
    #[cube(launch_unchecked)]
    pub fn write_kv_codes_kernel<E: Float, C: Int, I: Int>(
        codes: &mut Tensor<C>,
        scales: &mut Tensor<f32>,
        slots: &[I],
        values: &Tensor<E>,
        #[comptime] planes: usize,
        #[comptime] fp8: bool,
        #[define(E, C, I)] _dtypes: [ElemType; 3],
    ) {
        let lane = UNIT_POS_X as usize;
        let heads = values.shape(1);
        let d = values.shape(2);
        let pair = CUBE_POS * planes + UNIT_POS_Y as usize;
        if pair >= values.shape(0) * heads {
            terminate!();
        }
        let largest = comptime!(if fp8 { 448.0f32 } else { 127.0f32 });
        let (token, h) = (pair / heads, pair % heads);
        let from = token * values.stride(0) + h * values.stride(1);
        let step = values.stride(2);
        let mut top = f32::new(0.0);
        let mut i = lane;
        while i < d {
            top = max(top, f32::abs(f32::cast_from(values[from + i * step])));
            i += 32;
        }
        top = plane_max(top);
        let inv = f32::new(largest) / max(top, f32::new(1.175_494_4e-38));
        let slot = usize::cast_from(slots[token]);
        if slot < codes.shape(0) {
            let to = slot * codes.stride(0) + h * codes.stride(1);
            let mut j = lane;
            while j < d {
                let y = clamp(f32::cast_from(values[from + j * step]) * inv, f32::new(-largest), f32::new(largest));
                if comptime!(fp8) {
                    let a = f32::abs(y);
                    let mut code = u32::cast_from(f32::round(a * f32::new(512.0)));
                    if a >= f32::new(0.015_625) {
                        // The mantissa rounded to 3 bits, half to even; the exponent rebiased
                        // from 127 to 7: `(bits >> 20) - (120 << 3)`.
                        let bits = u32::reinterpret(a);
                        let rounded = (bits + 0x7_FFFFu32 + ((bits >> 20) & 1u32)) & 0xFFF0_0000u32;
                        code = (rounded >> 20) - 960u32;
                    }
                    if y < f32::new(0.0) {
                        code |= 0x80u32;
                    }
                    codes[to + j] = C::cast_from(code);
                } else {
                    codes[to + j] = C::cast_from(f32::round(y));
                }
                j += 32;
            }
            if lane == 0 {
                let at = slot * scales.stride(0) + h * scales.stride(1);
                scales[at] = top / f32::new(largest);
            }
        }
    }
}

/// `pool` itself when burn holds it uniquely (the write lands in place), else a contiguous
/// copy (as `select_assign` copies).
pub(crate) fn writable(pool: CubeTensor) -> CubeTensor {
    if pool.can_mut() && pool.is_nonoverlapping() { pool } else { into_contiguous(pool.copy()) }
}

fn launch(pool: CubeTensor, slots: CubeTensor, values: CubeTensor) -> CubeTensor {
    let pool = writable(pool);
    let pool = last_axis_contiguous(pool);
    let values = last_axis_contiguous(values);
    let slots = into_contiguous(slots);
    let shape = values.meta.shape().clone();
    assert_eq!(shape.num_dims(), 3, "write_kv_slots: values must be [tokens, heads, head_dim]");
    assert_eq!(pool.meta.shape()[1..], shape[1..], "write_kv_slots: pool rows and values differ in shape");
    assert_eq!(slots.meta.shape()[0], shape[0], "write_kv_slots: one slot per token");
    let dtype = values.dtype;
    assert_eq!(pool.dtype, dtype, "write_kv_slots: pool and values differ in dtype");
    let vector = row_vector_width(vector_width(shape[2], dtype), &[&pool, &values]);
    let units = shape.num_elements() / vector;
    if units == 0 {
        return pool;
    }
    let client = pool.client.clone();
    let int_dtype = slots.dtype;
    // SAFETY: unit `index < tokens * heads * head_dim / vector` (checked) reads token `index /
    // per_token`'s slot (one slot per token, asserted above) and vector `c < head_dim / vector`
    // of head `h < heads` of that token and of pool row `slot`, skipped unless `slot < slots`;
    // every row start is a whole vector (`row_vector_width`) and the last axes are contiguous.
    unsafe {
        device::write_kv_slots_kernel::launch_unchecked(
            &client,
            CubeCount::Static((units as u32).div_ceil(UNITS_PER_CUBE), 1, 1),
            CubeDim::new_1d(UNITS_PER_CUBE),
            vector,
            pool.clone().into_tensor_arg(),
            slots.into_buffer_arg(),
            values.into_tensor_arg(),
            [dtype_to_storage_type(dtype), dtype_to_storage_type(int_dtype)],
        )
    };
    pool
}

fn launch_pair(k_pool: CubeTensor, v_pool: CubeTensor, slots: CubeTensor, k: CubeTensor, v: CubeTensor) -> (CubeTensor, CubeTensor) {
    let (k_pool, v_pool) = (last_axis_contiguous(writable(k_pool)), last_axis_contiguous(writable(v_pool)));
    let (k, v) = (last_axis_contiguous(k), last_axis_contiguous(v));
    let slots = into_contiguous(slots);
    let shape = k.meta.shape().clone();
    assert_eq!(shape.num_dims(), 3, "write_kv_pair: keys must be [tokens, heads, head_dim]");
    assert_eq!(v.meta.shape(), &shape, "write_kv_pair: keys and values differ in shape");
    assert_eq!(k_pool.meta.shape(), v_pool.meta.shape(), "write_kv_pair: the pools differ in shape");
    assert_eq!(k_pool.meta.shape()[1..], shape[1..], "write_kv_pair: pool rows and values differ in shape");
    assert_eq!(slots.meta.shape()[0], shape[0], "write_kv_pair: one slot per token");
    let dtype = k.dtype;
    assert!([k_pool.dtype, v_pool.dtype, v.dtype].iter().all(|&d| d == dtype), "write_kv_pair: pools, keys and values differ in dtype");
    let vector = row_vector_width(vector_width(shape[2], dtype), &[&k_pool, &v_pool, &k, &v]);
    let units = 2 * shape.num_elements() / vector;
    if units == 0 {
        return (k_pool, v_pool);
    }
    let client = k_pool.client.clone();
    let int_dtype = slots.dtype;
    // SAFETY: as `launch`'s, for keys (unit `at < tokens * heads * head_dim / vector`) and
    // values (`at - that`, below it again: checked), each into its own pool of the same shape
    // (asserted); every row start of the four tensors is a whole vector (`row_vector_width`).
    unsafe {
        device::write_kv_pair_kernel::launch_unchecked(
            &client,
            CubeCount::Static((units as u32).div_ceil(UNITS_PER_CUBE), 1, 1),
            CubeDim::new_1d(UNITS_PER_CUBE),
            vector,
            k_pool.clone().into_tensor_arg(),
            v_pool.clone().into_tensor_arg(),
            slots.into_buffer_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            [dtype_to_storage_type(dtype), dtype_to_storage_type(int_dtype)],
        )
    };
    (k_pool, v_pool)
}

/// Keys and values written into their pools by one kernel on CubeCL devices (see
/// [`KvWriteOps::write_kv_pair`]), by [`write_kv_slots`] twice elsewhere.
pub fn write_kv_pair(k_pool: Tensor<3>, v_pool: Tensor<3>, slots: Tensor<1, Int>, k: Tensor<3>, v: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
    if is_cubecl(&k_pool.device()) {
        let (k_pool, v_pool) = Dispatch::write_kv_pair(k_pool.into_dispatch(), v_pool.into_dispatch(), slots.into_dispatch(), k.into_dispatch(), v.into_dispatch());
        (Tensor::from_dispatch(k_pool), Tensor::from_dispatch(v_pool))
    } else {
        (write_kv_slots(k_pool, slots.clone(), k), write_kv_slots(v_pool, slots, v))
    }
}

/// Planes (one per (token, head)) per cube of the coded write.
const CODE_PLANES: usize = 8;

fn launch_codes(codes: CubeTensor, scales: CubeTensor, slots: CubeTensor, values: CubeTensor, fp8: bool) -> (CubeTensor, CubeTensor) {
    let codes = last_axis_contiguous(writable(codes));
    let scales = writable(scales);
    let slots = into_contiguous(slots);
    let shape = values.meta.shape().clone();
    assert_eq!(shape.num_dims(), 3, "write_kv_codes: values must be [tokens, heads, head_dim]");
    assert_eq!(codes.meta.shape()[1..], shape[1..], "write_kv_codes: pool rows and values differ in shape");
    assert_eq!((scales.meta.shape()[0], scales.meta.shape()[1]), (codes.meta.shape()[0], shape[1]), "write_kv_codes: one scale per slot and head");
    assert_eq!(slots.meta.shape()[0], shape[0], "write_kv_codes: one slot per token");
    assert_eq!(scales.dtype, DType::F32, "write_kv_codes: f32 scales");
    assert_eq!(codes.dtype, DType::I8, "write_kv_codes: i8 codes (int8, or fp8 bytes)");
    let pairs = shape[0] * shape[1];
    if pairs == 0 {
        return (codes, scales);
    }
    let client = codes.client.clone();
    let dtypes = [dtype_to_storage_type(values.dtype), dtype_to_storage_type(codes.dtype), dtype_to_storage_type(slots.dtype)];
    // SAFETY: plane `pair < tokens * heads` (checked) reads token `pair / heads`'s slot (one
    // per token, asserted) and head `pair % heads < heads` of `values` through its strides,
    // `head_dim` values; it writes that head's `head_dim` codes and one scale of pool row
    // `slot`, skipped unless `slot < slots` (codes and scales have as many rows, asserted).
    unsafe {
        device::write_kv_codes_kernel::launch_unchecked(
            &client,
            CubeCount::Static((pairs.div_ceil(CODE_PLANES)) as u32, 1, 1),
            CubeDim::new_2d(32, CODE_PLANES as u32),
            codes.clone().into_tensor_arg(),
            scales.clone().into_tensor_arg(),
            slots.into_buffer_arg(),
            values.into_tensor_arg(),
            CODE_PLANES,
            fp8,
            dtypes,
        )
    };
    (codes, scales)
}

/// Quantizes `values` into `format`'s pages by the kernel (CubeCL devices only): see
/// [`KvWriteOps::write_kv_codes`].
pub fn fused_write_kv_codes(format: KvCodes, codes: Tensor<3, Int>, scales: Tensor<3>, slots: Tensor<1, Int>, values: Tensor<3>) -> (Tensor<3, Int>, Tensor<3>) {
    let fp8 = format == KvCodes::Fp8;
    let (codes, scales) = Dispatch::write_kv_codes(codes.into_dispatch(), scales.into_dispatch(), slots.into_dispatch(), values.into_dispatch(), fp8);
    (Tensor::from_dispatch(codes), Tensor::from_dispatch(scales))
}

/// [`write_kv_slots`] by the kernel (CubeCL devices only).
pub fn fused_write_kv_slots(pool: Tensor<3>, slots: Tensor<1, Int>, values: Tensor<3>) -> Tensor<3> {
    Tensor::from_dispatch(Dispatch::write_kv_slots(pool.into_dispatch(), slots.into_dispatch(), values.into_dispatch()))
}

/// `pool [slots, heads, head_dim]` with row `slots[i]` replaced by `values[i]` (`values [tokens,
/// heads, head_dim]`): the kernel on CubeCL devices, `select_assign` elsewhere, over rows of
/// `heads * head_dim` (burn-flex copies two-dimensional rows whole, in place where the pool is
/// its storage's only owner; in three dimensions it computed each element's index by division:
/// 3.5 % of a small Qwen3-MoE model's prefill on the CPU).
pub fn write_kv_slots(pool: Tensor<3>, slots: Tensor<1, Int>, values: Tensor<3>) -> Tensor<3> {
    if is_cubecl(&pool.device()) {
        fused_write_kv_slots(pool, slots, values)
    } else {
        let [rows, heads, d] = pool.dims();
        let tokens = values.dims()[0];
        // 16-bit pages of an f32 attention: the values rounded to the pages' dtype (to
        // nearest, ties to even).
        let values = if values.dtype() == pool.dtype() { values } else { values.cast(pool.dtype()) };
        pool.reshape([rows, heads * d]).select_assign(0, slots, values.reshape([tokens, heads * d]), IndexingUpdateOp::Assign).reshape([rows, heads, d])
    }
}

/// Anonymous memory from the kernel (`mmap`), zero-filled and resident only once written,
/// handed to burn as a tensor's storage; unmapped when the tensor is dropped.
struct ZeroPages(memmap2::MmapMut);

impl burn_std::AllocationController for ZeroPages {
    fn alloc_align(&self) -> usize {
        // Mappings start on a page.
        4096
    }

    fn property(&self) -> burn_std::AllocationProperty {
        burn_std::AllocationProperty::Other
    }

    unsafe fn memory_mut(&mut self, _policy: burn_std::AccessPolicy) -> Result<&mut [std::mem::MaybeUninit<u8>], burn_std::AccessError> {
        let bytes: &mut [u8] = &mut self.0;
        // SAFETY: `MaybeUninit<u8>` has `u8`'s layout, and every byte of the mapping is
        // initialized (zero pages, then what was written); the caller may only write
        // initialized bytes (the trait's contract), so the mapping stays initialized.
        Ok(unsafe { &mut *(bytes as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) })
    }

    fn memory(&self, _policy: burn_std::AccessPolicy) -> Result<&[std::mem::MaybeUninit<u8>], burn_std::AccessError> {
        let bytes: &[u8] = &self.0;
        // SAFETY: as in `memory_mut`: same layout, and a shared view of initialized bytes.
        Ok(unsafe { &*(bytes as *const [u8] as *const [std::mem::MaybeUninit<u8>]) })
    }
}

/// A zeroed KV pool buffer of `shape` and `dtype` on `device`. On the CPU it lives in
/// anonymous memory whose pages become resident only when a block is written, so an idle
/// pool costs address space, not memory (burn-flex's `zeros` writes every byte: the default
/// 0.5 GB pool was 0.44 GB of the built-in model's resident memory), and it is returned to the
/// system when the pool is dropped. On GPUs, and if the mapping fails, `zeros`.
pub fn zeroed_kv_buffer(shape: [usize; 3], dtype: DType, device: &Device) -> Tensor<3> {
    match zero_pages(shape, dtype, device) {
        Some(data) => Tensor::from_data(data, (device, dtype)),
        None => Tensor::zeros(shape, (device, dtype)),
    }
}

/// [`zeroed_kv_buffer`] of an integer dtype (a coded cache's codes).
pub fn zeroed_kv_int_buffer(shape: [usize; 3], dtype: DType, device: &Device) -> Tensor<3, Int> {
    match zero_pages(shape, dtype, device) {
        Some(data) => Tensor::from_data(data, (device, dtype)),
        None => Tensor::zeros(shape, (device, dtype)),
    }
}

/// Zeroed tensor data in anonymous memory on the CPU; `None` on GPUs or if the mapping fails.
fn zero_pages(shape: [usize; 3], dtype: DType, device: &Device) -> Option<TensorData> {
    if is_cubecl(device) {
        return None;
    }
    let len = shape.iter().product::<usize>() * dtype.size();
    let map = memmap2::MmapMut::map_anon(len.max(1)).ok()?;
    // SAFETY: the mapping holds `len.max(1)` initialized (zero) bytes, at least `len`.
    let bytes = unsafe { burn_std::Bytes::from_controller(Box::new(ZeroPages(map)), len) };
    Some(TensorData::from_bytes(bytes, shape, dtype))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn tokens_land_in_their_slots_and_nothing_else_moves() {
        let device = Device::flex();
        let pool = zeroed_kv_buffer([6, 2, 4], DType::F32, &device);
        assert_eq!((pool.dims(), pool.dtype()), ([6, 2, 4], DType::F32));
        assert!(pool.clone().into_data().convert::<f32>().try_to_vec::<f32>().expect("f32").iter().all(|&v| v == 0.0));
        let half = zeroed_kv_buffer([2, 1, 4], DType::BF16, &device);
        assert_eq!(half.dtype(), DType::BF16);
        assert!(half.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32").iter().all(|&v| v == 0.0));
        let values = Tensor::<3>::from_data(TensorData::new((1..=24).map(|x| x as f32).collect::<Vec<_>>(), [3, 2, 4]), &device);
        let slots = Tensor::<1, Int>::from_data(TensorData::new(vec![4i64, 0, 2], [3]), &device);
        let out: Vec<f32> = write_kv_slots(pool, slots, values).into_data().try_to_vec::<f32>().expect("f32");
        let row = |r: usize| out[r * 8..(r + 1) * 8].to_vec();
        assert_eq!(row(4), (1..=8).map(|x| x as f32).collect::<Vec<_>>());
        assert_eq!(row(0), (9..=16).map(|x| x as f32).collect::<Vec<_>>());
        assert_eq!(row(2), (17..=24).map(|x| x as f32).collect::<Vec<_>>());
        for r in [1, 3, 5] {
            assert_eq!(row(r), vec![0.0; 8]);
        }
    }

    #[test]
    fn keys_and_values_land_in_their_own_pools() {
        let device = Device::flex();
        let (kp, vp) = (zeroed_kv_buffer([4, 1, 2], DType::F32, &device), zeroed_kv_buffer([4, 1, 2], DType::F32, &device));
        let k = Tensor::<3>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 1, 2]), &device);
        let v = k.clone().neg();
        let slots = Tensor::<1, Int>::from_data(TensorData::new(vec![3i64, 1], [2]), &device);
        let (kp, vp) = write_kv_pair(kp, vp, slots, k, v);
        let got = |t: Tensor<3>| t.into_data().try_to_vec::<f32>().expect("f32");
        assert_eq!(got(kp), [0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 1.0, 2.0]);
        assert_eq!(got(vp), [0.0, 0.0, -3.0, -4.0, 0.0, 0.0, -1.0, -2.0]);
    }
}
