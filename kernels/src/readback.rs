//! Reading a small int tensor back to the host without waiting at the call: the device-to-host
//! copy is queued now, behind the work already queued on the tensor's stream, and waited for
//! later, so the host can queue more work (the next decode step) in between (CUDA
//! `cuMemcpyDtoHAsync` then an event, the pattern of vLLM v1's async scheduling, which copies
//! the sampled ids to the host while the next step runs).
//!
//! burn's own `into_data` reads lazily: the copy is queued when its future is first polled,
//! that is behind whatever was queued meanwhile, so it would wait for the next step too. Here
//! the fused tensor is resolved (its pending operations launched) and CubeCL's
//! `read_one_tensor_async` queues the copy and records the fence at once. Elsewhere (the CPU)
//! the values are read at the call.

use burn::backend::{BackendTensor, DispatchTensorKind};
use burn::tensor::{Int, Tensor, TensorData};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::server::CopyDescriptor;
use burn_cubecl::tensor::CubeTensor;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

type Read = Pin<Box<dyn Future<Output = Result<TensorData, String>> + Send>>;

/// A read under way; [`PendingRead::wait`] gives its values.
pub struct PendingRead {
    read: Read,
}

/// Starts reading `ids` (any int dtype). The tensor itself is not changed; keep a clone to use
/// it on the device afterwards.
pub fn start_read(ids: Tensor<1, Int>) -> PendingRead {
    let device = ids.device();
    if !crate::launch::is_cubecl(&device) {
        let data = ids.into_data();
        return PendingRead { read: Box::pin(std::future::ready(Ok(data))) };
    }
    let shape = ids.shape();
    let dispatch = ids.into_dispatch();
    let cube: CubeTensor = match dispatch.kind {
        DispatchTensorKind::Cube(BackendTensor::Int(fused)) => {
            let client = fused.client.clone();
            client.resolve_tensor_int::<CubeBackend>(fused)
        }
        other => {
            let kind = format!("{other:?}");
            return PendingRead { read: Box::pin(std::future::ready(Err(format!("not a CubeCL int tensor: {}", &kind[..kind.len().min(80)])))) };
        }
    };
    let cube = burn_cubecl::kernel::into_contiguous(cube);
    let (dtype, elem_size) = (cube.dtype, cube.elem_size());
    let descriptor = CopyDescriptor::new(cube.handle.clone().binding(), cube.meta.shape().clone(), cube.meta.strides().clone(), elem_size);
    let client = cube.client.clone();
    // The future borrows the client, so both live in this block; its first poll, below, queues
    // the copy and its fence and stops at the yield; `wait` finishes it.
    let mut read: Read = Box::pin(async move {
        let bytes = client.read_one_tensor_async(descriptor);
        YieldOnce(false).await;
        let bytes = bytes.await.map_err(|e| format!("{e:?}"))?;
        Ok(TensorData::from_bytes(bytes, shape, dtype))
    });
    let mut context = Context::from_waker(Waker::noop());
    if let Poll::Ready(done) = read.as_mut().poll(&mut context) {
        read = Box::pin(std::future::ready(done));
    }
    PendingRead { read }
}

/// Pending once, then ready.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            Poll::Pending
        }
    }
}

impl PendingRead {
    /// Waits for the copy; the values as `i64`.
    pub fn wait(self) -> Result<Vec<i64>, String> {
        let data = burn_cubecl::cubecl::future::block_on(self.read)?;
        data.convert::<i64>().try_to_vec::<i64>().map_err(|e| format!("{e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn a_cpu_read_gives_the_values() {
        let ids = Tensor::<1, Int>::from_data(TensorData::new(vec![3i64, 1, 4], [3]), &Device::flex());
        let kept = ids.clone();
        assert_eq!(start_read(ids).wait().expect("read"), vec![3, 1, 4]);
        assert_eq!(kept.into_data().convert::<i64>().try_to_vec::<i64>().expect("kept"), vec![3, 1, 4]);
    }
}
