//! Programmatic dependent launch for CubeCL's kernels (CUDA programming guide, "Programmatic
//! Dependent Launch and Synchronization"; sm_90 and later).
//!
//! Each transpiled kernel's body starts by waiting for the grid launched before it
//! (`griddepcontrol.wait`: that grid has completed and its writes are visible), then lets
//! the grid after it be scheduled (`griddepcontrol.launch_dependents`). Launched with
//! `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`, a kernel's launch and block
//! scheduling then overlap the tail of the kernel before it, in a stream and in a CUDA graph
//! recorded from one, while nothing it reads or writes is touched before the wait. A kernel may
//! place the wait itself instead, after loads of what no kernel writes (the matrix-vector
//! kernels' first weights, `inference-pio-kernels`' `launch::early_loads`): it gets no second
//! one, and below sm_90 both instructions are taken out ([`without_dependent_launch`]).
//! On by default; `INFERENCE_PIO_PDL=0` compiles and launches every kernel as before (read
//! once, at the first kernel). Measured on an H100 (2026-12-07,
//! `benches/results/gpu-h100-2026-12-07i-dependent-launch.md`): Qwen3-4B batch-1 decode 227.7
//! -> 233.4 tok/s, batch 8 1,653 -> 1,678, Qwen3-VL-2B after an image 452 -> 466; the tiny
//! fixtures' logits unchanged to the bit.

use std::sync::OnceLock;

/// The PTX instruction the injected wait compiles to.
pub const WAIT_PTX: &[u8] = b"griddepcontrol.wait";

const PROLOGUE: &str = "\nasm volatile(\"griddepcontrol.wait;\" ::: \"memory\");\nasm volatile(\"griddepcontrol.launch_dependents;\" ::: \"memory\");\n";

/// `source` with the wait and the release as its kernel's first statements, or `None`
/// where it holds no `__global__` entry point, or waits already: a kernel may place the wait
/// itself (`gpu_asm!("griddepcontrol.wait;")`) after work that reads nothing the kernels before
/// it write, such as loading its first weights.
pub fn wait_then_release(source: &str) -> Option<String> {
    if source.contains("griddepcontrol.wait") {
        return None;
    }
    let entry = source.find("extern \"C\" __global__")?;
    let open = entry + source[entry..].find('{')?;
    let mut out = String::with_capacity(source.len() + PROLOGUE.len());
    out.push_str(&source[..=open]);
    out.push_str(PROLOGUE);
    out.push_str(&source[open + 1..]);
    Some(out)
}

/// Whether kernels get the wait and are launched as dependents (on sm_90 and later): on
/// unless `INFERENCE_PIO_PDL=0`.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("INFERENCE_PIO_PDL").map_or(true, |v| v != "0"))
}

/// `source` without the dependent-launch instructions a kernel placed itself, for devices
/// before sm_90, which have none (every launch there waits for the one before it anyway).
pub fn without_dependent_launch(source: &str) -> String {
    source.replace("griddepcontrol.wait;", "").replace("griddepcontrol.launch_dependents;", "")
}
