//! Collectives across the GPUs of one process through NVIDIA NCCL (NCCL User Guide:
//! `ncclCommInitAll`, `ncclAllReduce`, `ncclAllGather`), for tensor parallelism: one
//! communicator per GPU, all made together by the process, each then used by the one thread
//! that drives its GPU. NCCL is loaded at run time like the rest of CUDA (cudarc's dynamic
//! loading, which opens `libnccl.so`; NVIDIA's packages install it beside `libnccl.so.2`).
//!
//! Each collective is queued on the CUDA stream CubeCL queues the output buffer's work on
//! (exposed by our patched cubecl-cuda, as for [`crate::cublas`]), so it runs in order with
//! CubeCL's kernels without host synchronisation.
//!
//! Communicators live in a process-wide table and are named by their index in it, so that a
//! collective can be a backend operation of its own (the fusion backend orders it with the
//! kernels around it) that takes that index as a plain value.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl_cuda::CudaRuntime;
use cudarc::driver::sys as driver;
use cudarc::nccl::sys as nccl;
use std::ffi::c_void;
use std::sync::Mutex;

/// Whether NCCL can be loaded (the library is on the loader's path).
pub fn available() -> bool {
    // SAFETY: only tries to open the library by its candidate names.
    unsafe { nccl::is_culib_present() }
}

/// CUDA devices on this machine (`cuDeviceGetCount`); `None` without a driver.
pub fn device_count() -> Option<usize> {
    // cudarc panics when the driver library cannot be loaded; that is an answer here.
    std::panic::catch_unwind(|| {
        cudarc::driver::result::init().ok()?;
        cudarc::driver::result::device::get_count().ok().and_then(|n| usize::try_from(n).ok())
    })
    .ok()
    .flatten()
}

/// The process's communicators, as addresses (a `ncclComm_t` is a pointer NCCL owns); a slot
/// is `None` once its communicator is destroyed.
static COMMS: Mutex<Vec<Option<usize>>> = Mutex::new(Vec::new());

/// One communicator per GPU of a group, made together ([`Self::init_all`]); destroyed when
/// dropped.
pub struct Comms {
    /// Indices into the process's table, in rank order.
    slots: Vec<usize>,
}

impl Comms {
    /// A communicator for each CUDA device in `ordinals` (rank `r` on `ordinals[r]`).
    pub fn init_all(ordinals: &[usize]) -> Result<Self, String> {
        if let (Some(count), Some(&last)) = (device_count(), ordinals.iter().max())
            && last >= count
        {
            return Err(format!("{} ranks need CUDA devices {ordinals:?}, and this machine has {count} (cuda:0 to cuda:{})", ordinals.len(), count.saturating_sub(1)));
        }
        if !available() {
            return Err("NCCL is not on the library path (libnccl.so; NVIDIA's nccl package or PyTorch's nvidia-nccl wheel has it)".into());
        }
        let devices: Vec<i32> = ordinals.iter().map(|&o| i32::try_from(o).map_err(|_| format!("CUDA device {o}"))).collect::<Result<_, _>>()?;
        let n = i32::try_from(devices.len()).map_err(|_| "too many ranks".to_string())?;
        let mut comms: Vec<nccl::ncclComm_t> = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: `comms` has room for one communicator per device in `devices`, which NCCL
        // reads `n` entries of; both outlive the call.
        unsafe { cudarc::nccl::result::comm_init_all(comms.as_mut_ptr(), n, devices.as_ptr()) }.map_err(|e| format!("ncclCommInitAll over CUDA devices {ordinals:?}: {e:?}"))?;
        let mut table = COMMS.lock().map_err(|_| "the NCCL table lock is poisoned".to_string())?;
        let slots = comms
            .into_iter()
            .map(|c| {
                table.push(Some(c as usize));
                table.len() - 1
            })
            .collect();
        Ok(Self { slots })
    }

    pub fn ranks(&self) -> usize {
        self.slots.len()
    }

    /// Rank `rank`'s communicator, as the collectives below take it.
    pub fn slot(&self, rank: usize) -> usize {
        self.slots[rank]
    }
}

impl Drop for Comms {
    fn drop(&mut self) {
        let Ok(mut table) = COMMS.lock() else { return };
        for &s in &self.slots {
            if let Some(comm) = table.get_mut(s).and_then(Option::take) {
                // SAFETY: the communicator came from `ncclCommInitAll` and is destroyed once
                // (its slot is emptied first); no collective is queued on it any more, since
                // the ranks that used it have stopped before their group is dropped.
                let _ = unsafe { cudarc::nccl::result::comm_destroy(comm as nccl::ncclComm_t) };
            }
        }
    }
}

/// Output shape of [`all_gather_rows`] over `ranks` ranks: `[ranks * rows, cols]`.
pub fn gathered_shape(x: &Shape, ranks: usize) -> Shape {
    Shape::new([ranks * x[0], x[1]])
}

/// The collectives as backend operations (CubeCL's CUDA runtime only).
#[backend_extension(Cube, Fusion)]
pub trait NcclOps: Backend {
    /// The sum of every rank's `x`, through communicator `slot`.
    #[fusion(dtype = x, shape = x)]
    fn nccl_all_reduce_sum(x: FloatTensor<Self>, slot: usize) -> FloatTensor<Self>;

    /// Every rank's `x [rows, cols]` stacked by rank, `[ranks * rows, cols]`.
    #[fusion(dtype = x, shape = gathered_shape(x, *ranks))]
    fn nccl_all_gather_rows(x: FloatTensor<Self>, slot: usize, ranks: usize) -> FloatTensor<Self>;
}

impl NcclOps for CubeBackend {
    fn nccl_all_reduce_sum(x: FloatTensor<Self>, slot: usize) -> FloatTensor<Self> {
        let shape = x.meta.shape().clone();
        collective(x, shape, slot, Op::AllReduce).unwrap_or_else(|e| panic!("NCCL all-reduce: {e}"))
    }

    fn nccl_all_gather_rows(x: FloatTensor<Self>, slot: usize, ranks: usize) -> FloatTensor<Self> {
        let shape = gathered_shape(x.meta.shape(), ranks);
        collective(x, shape, slot, Op::AllGather).unwrap_or_else(|e| panic!("NCCL all-gather: {e}"))
    }
}

/// `x` summed over the ranks of `comms`, on rank `rank`'s GPU.
pub fn all_reduce_sum(comms: &Comms, rank: usize, x: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::nccl_all_reduce_sum(x.into_dispatch(), comms.slot(rank)))
}

/// Every rank's `x [rows, cols]` stacked in rank order, `[ranks * rows, cols]`.
pub fn all_gather_rows(comms: &Comms, rank: usize, x: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::nccl_all_gather_rows(x.into_dispatch(), comms.slot(rank), comms.ranks()))
}

enum Op {
    AllReduce,
    AllGather,
}

fn data_type(dtype: DType) -> Option<nccl::ncclDataType_t> {
    match dtype {
        DType::BF16 => Some(nccl::ncclDataType_t::ncclBfloat16),
        DType::F16 => Some(nccl::ncclDataType_t::ncclFloat16),
        DType::F32 => Some(nccl::ncclDataType_t::ncclFloat32),
        _ => None,
    }
}

fn collective(x: CubeTensor, out_shape: Shape, slot: usize, op: Op) -> Result<CubeTensor, String> {
    let dtype = x.dtype;
    let ty = data_type(dtype).ok_or_else(|| format!("collectives take bf16, f16 or f32, not {dtype:?}"))?;
    let comm = COMMS
        .lock()
        .map_err(|_| "the NCCL table lock is poisoned".to_string())?
        .get(slot)
        .copied()
        .flatten()
        .ok_or_else(|| format!("communicator {slot} is gone"))?;
    let x = into_contiguous(x);
    let count = x.meta.shape().num_elements();
    let out = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), out_shape, dtype);
    if count == 0 {
        return Ok(out);
    }
    let server = |t: &CubeTensor| t.client.get_resource::<<CudaRuntime as cubecl_runtime::runtime::Runtime>::Server>(t.handle.clone());
    let out_res = server(&out).map_err(|e| format!("output buffer: {e:?}"))?;
    let x_res = server(&x).map_err(|e| format!("input buffer: {e:?}"))?;
    let (stream, out_ptr, x_ptr) = (out_res.resource().stream, out_res.resource().ptr, x_res.resource().ptr);
    // SAFETY: `comm` is a live communicator of this process (its slot is filled until its
    // group is dropped, after its rank's thread stopped), used by this rank's thread alone.
    // Both pointers are CubeCL buffers held alive (and in place) by the `ManagedResource`
    // guards until after the call is queued: the input of `count` elements, the output of
    // `count` (all-reduce) or `ranks * count` (all-gather, its shape), and later work on them is
    // queued on the same stream, so it runs after the collective.
    let queued = unsafe {
        let mut context: driver::CUcontext = std::ptr::null_mut();
        let _ = driver::cuStreamGetCtx(stream, &mut context);
        if !context.is_null() {
            let _ = driver::cuCtxSetCurrent(context);
        }
        match op {
            Op::AllReduce => cudarc::nccl::result::all_reduce(
                x_ptr as *const c_void,
                out_ptr as *mut c_void,
                count,
                ty,
                nccl::ncclRedOp_t::ncclSum,
                comm as nccl::ncclComm_t,
                stream as nccl::cudaStream_t,
            ),
            Op::AllGather => cudarc::nccl::result::all_gather(x_ptr as *const c_void, out_ptr as *mut c_void, count, ty, comm as nccl::ncclComm_t, stream as nccl::cudaStream_t),
        }
    };
    drop((x_res, out_res));
    queued.map(|_| out).map_err(|e| format!("{e:?}"))
}
