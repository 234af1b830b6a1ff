//! Matrix products through NVIDIA cuBLAS (`cublasGemmStridedBatchedEx`, cuBLAS Library
//! User Guide) on the CubeCL tensors' own device buffers: `c[b] = a[b] · b[b]`, each operand
//! row- or column-major (a transposed view is read in place).
//!
//! Why: without autotuning CubeCL's matmul multiplies 2,048 rows by 2560 -> 19456 at about
//! 40 TFLOP/s on an H200, against cuBLAS's ~750 (`benches/results/gpu-h200-2026-12-02.md`),
//! which left prefill far behind transformers. cuBLAS is loaded at run time like the rest of
//! CUDA (cudarc's dynamic loading); without it ([`available`] false) every product stays on
//! CubeCL's matmul.
//!
//! The call is queued on the CUDA stream CubeCL queues the output buffer's work on (exposed
//! by our patched cubecl-cuda, `kernels/cubecl-cuda-stream/PATCH.md`), so it runs in order with
//! CubeCL's kernels without host synchronisation and is recorded like them when a decode
//! step is captured as a CUDA graph. Each CUDA context gets one cuBLAS handle with a fixed
//! workspace of its own (cuBLAS must not allocate while a graph is being recorded).
//!
//! The reference on every backend is burn's `matmul`; the kernel check on the device
//! (`kernels/examples/kernel_check.rs`, group `cublas`) compares the two.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Device, Shape, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::kernel::matmul::{MatmulStrategy, matmul as cubecl_matmul};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeDevice};
use cubecl_cuda::CudaRuntime;
use cudarc::cublas::sys as cublas;
use cudarc::driver::sys as driver;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

/// Bytes of cuBLAS workspace per CUDA context (NVIDIA recommends 32 MiB on Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// Set to `0` to keep every product on CubeCL's matmul (for side-by-side measurements).
pub const DISABLE_ENV: &str = "INFERENCE_PIO_CUBLAS";

/// Whether products on `device` can go through cuBLAS: a CUDA device, the cuBLAS library
/// loadable, and not switched off by `INFERENCE_PIO_CUBLAS=0`.
pub fn available(device: &Device) -> bool {
    static LOADABLE: OnceLock<bool> = OnceLock::new();
    if !crate::launch::is_cubecl(device) {
        return false;
    }
    *LOADABLE.get_or_init(|| {
        if crate::launch::switched_off(DISABLE_ENV) {
            return false;
        }
        // SAFETY: only tries to open the library by its candidate names.
        unsafe { cublas::is_culib_present() }
    })
}

/// Whether `dtype` is one cuBLAS multiplies here (bf16, f16, f32).
pub fn supports(dtype: DType) -> bool {
    data_type(dtype).is_some()
}

fn data_type(dtype: DType) -> Option<cublas::cudaDataType> {
    match dtype {
        DType::BF16 => Some(cublas::cudaDataType::CUDA_R_16BF),
        DType::F16 => Some(cublas::cudaDataType::CUDA_R_16F),
        DType::F32 => Some(cublas::cudaDataType::CUDA_R_32F),
        _ => None,
    }
}

/// Output shape of `a [.., m, k] · b [.., k, n]`: `[.., m, n]`.
pub fn product_shape(a: &Shape, b: &Shape) -> Shape {
    let (ra, rb) = (a.num_dims(), b.num_dims());
    let mut dims: Vec<usize> = (0..ra).map(|i| a[i]).collect();
    dims[ra - 1] = b[rb - 1];
    Shape::from(dims)
}

/// The product as a backend operation (CubeCL runtimes only).
#[backend_extension(Cube, Fusion)]
pub trait CublasOps: Backend {
    /// `a [.., m, k] · b [.., k, n] -> [.., m, n]` (the same leading dimensions), contiguous,
    /// in `a`'s dtype.
    #[fusion(dtype = a, shape = product_shape(a, b))]
    fn cublas_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl CublasOps for CubeBackend {
    fn cublas_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let dtype = a.dtype;
        match launch(a.clone(), b.clone()) {
            Ok(c) => c,
            Err(why) => {
                static WARNED: OnceLock<()> = OnceLock::new();
                WARNED.get_or_init(|| eprintln!("inference-pio-kernels: cuBLAS product failed ({why}); CubeCL's matmul runs instead"));
                match cubecl_matmul(a, b, None, MatmulStrategy::default(), dtype) {
                    Ok(c) => c,
                    Err(err) => panic!("matmul: cuBLAS failed ({why}) and CubeCL's matmul could not be set up: {err:?}"),
                }
            }
        }
    }
}

/// `a [.., m, k] · b [.., k, n]` by cuBLAS (`a`, `b` of one float dtype, the same leading
/// dimensions, at least rank 3). Leading dimensions whose strides chain (a view such as keys
/// narrowed from a larger cache) are read in place as one batch.
pub fn matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(Dispatch::cublas_matmul(a.into_dispatch(), b.into_dispatch()))
}

/// How cuBLAS reads one `[batch, rows, cols]` operand: its batch stride, and whether it lies
/// row-major (`transposed` for cuBLAS's column-major view) with leading dimension `ld`.
struct Operand {
    tensor: CubeTensor,
    row_major: bool,
    ld: usize,
    batch_stride: usize,
}

impl Operand {
    /// Reads `t` in place when its leading dimensions chain and one of its matrix axes is
    /// contiguous, else from a copy.
    fn new(t: CubeTensor) -> Self {
        match Self::layout(&t) {
            Some((row_major, ld, batch_stride)) => Self { tensor: t, row_major, ld, batch_stride },
            None => {
                let t = into_contiguous(t);
                let [_, rows, cols] = dims3(&t);
                Self { tensor: t, row_major: true, ld: cols.max(1), batch_stride: rows * cols }
            }
        }
    }

    fn layout(t: &CubeTensor) -> Option<(bool, usize, usize)> {
        let (dims, strides) = (t.meta.shape(), t.meta.strides());
        let n = dims.num_dims();
        let (lead, lead_strides): (Vec<usize>, Vec<usize>) = (0..n - 2).map(|i| (dims[i], strides[i])).unzip();
        let (batch, batch_stride) = flatten_batch(&lead, &lead_strides)?;
        matrix_layout([batch, dims[n - 2], dims[n - 1]], [batch_stride, strides[n - 2], strides[n - 1]])
    }
}

/// The leading dimensions as one batch `(count, stride)` when their strides chain (each one
/// the next one's extent apart; size-1 dimensions ignored), else `None`.
fn flatten_batch(dims: &[usize], strides: &[usize]) -> Option<(usize, usize)> {
    let kept: Vec<(usize, usize)> = dims.iter().zip(strides).filter(|(d, _)| **d != 1).map(|(d, s)| (*d, *s)).collect();
    let Some(&(_, innermost)) = kept.last() else { return Some((1, 0)) };
    if kept.windows(2).all(|w| w[0].1 == w[1].0 * w[1].1) {
        Some((kept.iter().map(|(d, _)| d).product(), innermost))
    } else {
        None
    }
}

/// How cuBLAS can read a `[batch, rows, cols]` operand with these strides in place: `(row
/// major, leading dimension, batch stride)`, or `None` when neither matrix axis is
/// contiguous.
fn matrix_layout([batch, rows, cols]: [usize; 3], [s0, s1, s2]: [usize; 3]) -> Option<(bool, usize, usize)> {
    let batch_stride = if batch == 1 { rows * cols } else { s0 };
    // A size-1 axis may carry any stride; its leading dimension is then the other size.
    if s2 == 1 || cols == 1 {
        let ld = if rows == 1 { cols } else { s1 };
        if ld >= cols.max(1) {
            return Some((true, ld, batch_stride));
        }
    }
    if s1 == 1 || rows == 1 {
        let ld = if cols == 1 { rows } else { s2 };
        if ld >= rows.max(1) {
            return Some((false, ld, batch_stride));
        }
    }
    None
}

/// `[batch, rows, cols]` of `t`, its leading dimensions counted as one batch.
fn dims3(t: &CubeTensor) -> [usize; 3] {
    let s = t.meta.shape();
    let n = s.num_dims();
    [(0..n - 2).map(|i| s[i]).product(), s[n - 2], s[n - 1]]
}

/// One cuBLAS handle per CUDA context, with its own workspace, and the stream it was last
/// pointed at (`cublasSetStream` resets the workspace, so it is set again only on a change).
struct Context {
    device: CubeDevice,
    context: driver::CUcontext,
    handle: cublas::cublasHandle_t,
    workspace: driver::CUdeviceptr,
    stream: driver::CUstream,
}

// SAFETY: the handle, context and workspace are only used while `CONTEXTS`' lock is held, so
// by one thread at a time, which is what cuBLAS requires of a handle.
unsafe impl Send for Context {}

static CONTEXTS: Mutex<Vec<Context>> = Mutex::new(Vec::new());

fn check_cuda(call: &str, r: driver::CUresult) -> Result<(), String> {
    if r == driver::CUresult::CUDA_SUCCESS { Ok(()) } else { Err(format!("{call}: {r:?}")) }
}

fn check_blas(call: &str, r: cublas::cublasStatus_t) -> Result<(), String> {
    if r == cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS { Ok(()) } else { Err(format!("{call}: {r:?}")) }
}

fn int(v: usize, what: &str) -> Result<i32, String> {
    i32::try_from(v).map_err(|_| format!("{what} {v} exceeds cuBLAS's 32-bit sizes"))
}

fn launch(a: CubeTensor, b: CubeTensor) -> Result<CubeTensor, String> {
    let dtype = a.dtype;
    let ty = data_type(dtype).ok_or_else(|| format!("cuBLAS products take bf16, f16 or f32, not {dtype:?}"))?;
    if b.dtype != dtype {
        return Err(format!("operands of {dtype:?} and {:?}", b.dtype));
    }
    let [batch, m, k] = dims3(&a);
    let [b_batch, k2, n] = dims3(&b);
    if b_batch != batch || k2 != k {
        return Err(format!("shapes [{batch}, {m}, {k}] and [{b_batch}, {k2}, {n}] do not multiply"));
    }
    if a.meta.shape().num_dims() != b.meta.shape().num_dims() || a.meta.shape().num_dims() < 3 {
        return Err("operands of different ranks, or below rank 3".into());
    }
    let out_shape = product_shape(a.meta.shape(), b.meta.shape());
    let out = empty_device_contiguous_dtype(a.client.clone(), a.device.clone(), out_shape, dtype);
    if batch * m * n == 0 {
        return Ok(out);
    }
    if k == 0 {
        return Err("an empty inner dimension".into());
    }
    let (a, b) = (Operand::new(a), Operand::new(b));
    let server = |t: &CubeTensor| t.client.get_resource::<<CudaRuntime as cubecl_runtime::runtime::Runtime>::Server>(t.handle.clone());
    let out_res = server(&out).map_err(|e| format!("output buffer: {e:?}"))?;
    let a_res = server(&a.tensor).map_err(|e| format!("left operand: {e:?}"))?;
    let b_res = server(&b.tensor).map_err(|e| format!("right operand: {e:?}"))?;
    let (stream, c_ptr) = (out_res.resource().stream, out_res.resource().ptr);
    let (a_ptr, b_ptr) = (a_res.resource().ptr, b_res.resource().ptr);

    // Row-major `c [m, n] = a · b` is column-major `cᵀ [n, m] = bᵀ · aᵀ`: cuBLAS's first
    // operand is `b`, its second `a`. A row-major operand is, column-major, already the
    // transpose cuBLAS wants (no op); a column-major one is read transposed.
    let op = |row_major: bool| if row_major { cublas::cublasOperation_t::CUBLAS_OP_N } else { cublas::cublasOperation_t::CUBLAS_OP_T };
    let (alpha, beta) = (1.0f32, 0.0f32);

    let mut contexts = CONTEXTS.lock().map_err(|_| "the cuBLAS state lock is poisoned".to_string())?;
    let index = match contexts.iter().position(|c| c.device == out.device) {
        Some(i) => i,
        None => {
            contexts.push(new_context(out.device.clone())?);
            contexts.len() - 1
        }
    };
    let ctx = &mut contexts[index];
    // SAFETY: `ctx.context` is the primary context the buffers were allocated in; the
    // handle belongs to it, and the lock
    // gives this thread the handle alone. The three pointers are CubeCL buffers held alive
    // (and in place) by the `ManagedResource` guards until after the call is queued, with at
    // least the extents the strides describe, and later work on them is queued on the same
    // stream, so it runs after this product. The scalars are f32 host values, as
    // `CUBLAS_COMPUTE_32F` requires.
    unsafe {
        check_cuda("cuCtxSetCurrent", driver::cuCtxSetCurrent(ctx.context))?;
        if ctx.stream != stream {
            check_blas("cublasSetStream", cublas::cublasSetStream_v2(ctx.handle, stream as cublas::cudaStream_t))?;
            check_blas("cublasSetWorkspace", cublas::cublasSetWorkspace_v2(ctx.handle, ctx.workspace as *mut c_void, WORKSPACE_BYTES))?;
            ctx.stream = stream;
        }
        check_blas(
            "cublasGemmStridedBatchedEx",
            cublas::cublasGemmStridedBatchedEx(
                ctx.handle,
                op(b.row_major),
                op(a.row_major),
                int(n, "n")?,
                int(m, "m")?,
                int(k, "k")?,
                &alpha as *const f32 as *const c_void,
                b_ptr as *const c_void,
                ty,
                int(b.ld, "leading dimension")?,
                b.batch_stride as i64,
                a_ptr as *const c_void,
                ty,
                int(a.ld, "leading dimension")?,
                a.batch_stride as i64,
                &beta as *const f32 as *const c_void,
                c_ptr as *mut c_void,
                ty,
                int(n, "n")?,
                (m * n) as i64,
                int(batch, "batch")?,
                cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            ),
        )?;
    }
    drop((a_res, b_res, out_res));
    Ok(out)
}

/// A handle and workspace in `device`'s primary context, the one CubeCL works in
/// (cubecl-cuda retains it for each device it opens).
fn new_context(device: CubeDevice) -> Result<Context, String> {
    let CubeDevice::Cuda(cuda) = &device else {
        return Err(format!("cuBLAS runs on CUDA devices, not {device:?}"));
    };
    let ordinal = int(cuda.index, "device index")?;
    let mut dev: driver::CUdevice = 0;
    let mut context: driver::CUcontext = std::ptr::null_mut();
    let mut handle: cublas::cublasHandle_t = std::ptr::null_mut();
    let mut workspace: driver::CUdeviceptr = 0;
    // SAFETY: the out-pointers are valid locals. Retaining the primary context takes one
    // more reference to the context CubeCL already holds (it is never released: the handle
    // and workspace live as long as the process), and the workspace is allocated in it.
    unsafe {
        check_cuda("cuDeviceGet", driver::cuDeviceGet(&mut dev, ordinal))?;
        check_cuda("cuDevicePrimaryCtxRetain", driver::cuDevicePrimaryCtxRetain(&mut context, dev))?;
        check_cuda("cuCtxSetCurrent", driver::cuCtxSetCurrent(context))?;
        check_cuda("cuMemAlloc", driver::cuMemAlloc_v2(&mut workspace, WORKSPACE_BYTES))?;
        check_blas("cublasCreate", cublas::cublasCreate_v2(&mut handle))?;
    }
    Ok(Context { device, context, handle, workspace, stream: std::ptr::null_mut() })
}

/// Free and total bytes of CUDA device `ordinal` (`cuMemGetInfo` through cudarc's run-time
/// loaded driver); `None` without a driver or device.
pub fn device_memory(ordinal: usize) -> Option<(u64, u64)> {
    // cudarc panics when the driver library cannot be loaded; that is an answer here, not a
    // failure.
    std::panic::catch_unwind(|| {
        let ctx = cudarc::driver::CudaContext::new(ordinal).ok()?;
        ctx.mem_get_info().ok().map(|(free, total)| (free as u64, total as u64))
    })
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_are_read_in_place_when_a_matrix_axis_is_contiguous() {
        // Row-major `[2, 3, 4]`.
        assert_eq!(matrix_layout([2, 3, 4], [12, 4, 1]), Some((true, 4, 12)));
        // A pitched row-major matrix: rows 8 apart.
        assert_eq!(matrix_layout([1, 3, 4], [24, 8, 1]), Some((true, 8, 12)));
        // The transposed view of an `[out 5, in 4]` weight: `[1, 4, 5]`, strides `[20, 1, 4]`.
        assert_eq!(matrix_layout([1, 4, 5], [20, 1, 4]), Some((false, 4, 20)));
        // Keys `[8 heads, 512 of 4096 slots, 128]` transposed: `[8, 128, 512]`.
        assert_eq!(matrix_layout([8, 128, 512], [4096 * 128, 1, 128]), Some((false, 128, 4096 * 128)));
        // One row: its stride does not matter.
        assert_eq!(matrix_layout([1, 1, 6], [6, 999, 1]), Some((true, 6, 6)));
        // Neither axis contiguous: copied first.
        assert_eq!(matrix_layout([1, 3, 4], [24, 8, 2]), None);
    }

    #[test]
    fn leading_dimensions_are_one_batch_when_their_strides_chain() {
        // Keys `[1, 8 heads, 512 of 4096 slots, 128]`: heads 4096 * 128 apart.
        assert_eq!(flatten_batch(&[1, 8], &[8 * 4096 * 128, 4096 * 128]), Some((8, 4096 * 128)));
        // Two batch entries of 8 heads, contiguous.
        assert_eq!(flatten_batch(&[2, 8], &[8 * 640, 640]), Some((16, 640)));
        // Heads of one entry not adjacent to the next entry's: copied first.
        assert_eq!(flatten_batch(&[2, 8], &[9 * 640, 640]), None);
        assert_eq!(flatten_batch(&[], &[]), Some((1, 0)));
    }

    #[test]
    fn the_cpu_never_takes_the_cublas_path() {
        assert!(!available(&Device::flex()));
        assert!(supports(DType::BF16) && supports(DType::F32) && !supports(DType::F64));
        assert_eq!(product_shape(&Shape::new([2, 3, 4]), &Shape::new([2, 4, 5])), Shape::new([2, 3, 5]));
        assert_eq!(product_shape(&Shape::new([1, 8, 3, 4]), &Shape::new([1, 8, 4, 5])), Shape::new([1, 8, 3, 5]));
    }
}

