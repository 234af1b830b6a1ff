//! Long-lived device buffers outside CubeCL's memory pools (CubeCL 0.11
//! `Client::memory_dedicated_allocation`, `MemoryAllocationMode::Dedicated`).
//!
//! CubeCL's default ("adaptive") pools carve every allocation from pages sized after the largest
//! allocation served so far. A model's KV pool is the largest of all (one buffer per layer for
//! keys and one for values, 1.77 GB each for Qwen3-4B on an H200), so inside the pools every
//! later activation page was that size, and a step that outgrew its pages asked the driver for
//! another 1.77 GB where a few MB would have done: `inference-pio bench` on the H200 ran out of
//! memory with 13 GB left beside the cache. Weights and the KV pool made inside
//! [`outside_pools`] get their own device allocations instead, which neither shape the pools'
//! pages nor stay reserved after the model is dropped (the next model, e.g. another variant of
//! the benchmark's optimization suite, finds the memory free again).

use burn::backend::DispatchDevice;
use burn::tensor::Device;
use burn_cubecl::CubeDevice;
use cubecl_cuda::CudaRuntime;
use cubecl_runtime::runtime::Runtime;

/// Runs `make` with every device allocation it makes on `device` given its own device
/// allocation outside CubeCL's pools, waiting for the device before it returns (so that
/// buffers whose creation was queued, e.g. by the fusion backend, are allocated inside the
/// window). On other devices (the CPU) it just runs `make`.
pub fn outside_pools<R: Send>(device: &Device, make: impl FnOnce() -> R + Send) -> R {
    let DispatchDevice::Cube(CubeDevice::Cuda(cuda)) = device.as_dispatch() else {
        return make();
    };
    let client = CudaRuntime::client(cuda);
    client.memory_dedicated_allocation((), |()| {
        let made = make();
        // An error here resurfaces at the model's first step, which reports it.
        let _ = device.sync();
        made
    })
}

/// Hands the device memory CubeCL holds but no tensor uses back to the driver: freed
/// buffers made in [`outside_pools`] (returned only at the allocator's next cleanup) and the
/// pools' free pages. After a model is dropped its KV pool and activation pages stayed
/// reserved, so the driver's free memory, from which the next load sizes its KV cache, missed
/// them: on an H100 the benchmark's second load of Qwen3-4B found 0.28 GB free after its
/// weights and refused to load. The device is synced first (as [`outside_pools`] does), so
/// that frees still queued by the fusion backend, such as those of a step loop's tensors
/// dropped as its thread ended, are done before CubeCL releases; CubeCL refuses the release
/// (and this skips it) while a stream records a CUDA graph. On other devices it does nothing.
pub fn release_free_memory(device: &Device) {
    let DispatchDevice::Cube(CubeDevice::Cuda(cuda)) = device.as_dispatch() else {
        return;
    };
    let _ = device.sync();
    let _ = CudaRuntime::client(cuda).memory_cleanup();
}

/// The driver's free bytes on a CUDA `device`; `None` on other devices (the CPU).
pub fn device_free(device: &Device) -> Option<u64> {
    let DispatchDevice::Cube(CubeDevice::Cuda(cuda)) = device.as_dispatch() else {
        return None;
    };
    crate::cublas::device_memory(cuda.index).map(|(free, _)| free)
}

/// Bytes CubeCL's memory on `device` holds in live allocations and reserves from the driver
/// (every stream, every pool, the dedicated allocations included), for the log: what a
/// recorded CUDA graph keeps shows as bytes in use that no tensor of the next step frees.
/// `None` on other devices (the CPU).
pub fn pool_usage(device: &Device) -> Option<(u64, u64)> {
    let DispatchDevice::Cube(CubeDevice::Cuda(cuda)) = device.as_dispatch() else {
        return None;
    };
    let usage = CudaRuntime::client(cuda).memory_report(cubecl_runtime::memory_management::MemoryScope::Device).usage();
    Some((usage.bytes_in_use, usage.bytes_reserved))
}

/// [`pool_usage`] in words for the log (`X GB in use, Y GB reserved on the device`).
pub fn pool_usage_text(device: &Device) -> Option<String> {
    pool_usage(device).map(|(in_use, reserved)| format!("{:.3} GB in use, {:.3} GB reserved on the device", in_use as f64 / 1e9, reserved as f64 / 1e9))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Tensor;

    #[test]
    fn on_the_cpu_the_closure_just_runs() {
        let device = Device::flex();
        let t: Tensor<1> = outside_pools(&device, || Tensor::ones([4], &device));
        release_free_memory(&device);
        assert_eq!(pool_usage(&device), None);
        assert_eq!(pool_usage_text(&device), None);
        assert_eq!(device_free(&device), None);
        assert_eq!(t.into_data().try_to_vec::<f32>().expect("f32"), vec![1.0; 4]);
    }
}
