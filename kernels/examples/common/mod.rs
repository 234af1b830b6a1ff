//! Shared by the CUDA examples (`decode_ops`, `kernel_check`): timing as CUDA-graph replays
//! and reading results back as f32.

use burn::tensor::{DType, Device, Tensor, capture};
use std::time::Instant;

/// Products summed into one captured graph.
const ITERS: usize = 10;
/// Timed replays of the graph (after one warm-up replay).
const REPLAYS: usize = 5;

/// Seconds per call of `op`, from CUDA-graph replays of `ITERS` calls whose outputs are summed
/// into the graph's result, so none is elided and host queuing is out of the figure.
pub fn time_graph(device: &Device, op: &dyn Fn() -> Tensor<2>) -> Result<f64, String> {
    let mut graph = capture(device, || {
        let mut acc = op();
        for _ in 1..ITERS {
            acc = acc.add(op());
        }
        acc
    });
    if !graph.is_hardware() {
        return Err("no hardware graph".into());
    }
    // SAFETY: the closure only reads tensors owned by the caller's frame, which outlives the
    // graph; replays and the reads below run on this thread's stream.
    let _ = values(unsafe { graph.replay() }.clone())?;
    let t = Instant::now();
    for _ in 0..REPLAYS {
        // SAFETY: as above.
        let _ = unsafe { graph.replay() };
    }
    // SAFETY: as above.
    let _ = values(unsafe { graph.replay() }.clone())?;
    Ok(t.elapsed().as_secs_f64() / ((REPLAYS + 1) * ITERS) as f64)
}

/// `t` on the host as f32 values.
pub fn values<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, String> {
    let data = t.cast(DType::F32).try_into_data().map_err(|e| format!("{e:?}"))?;
    data.convert::<f32>().try_to_vec::<f32>().map_err(|e| format!("{e:?}"))
}
