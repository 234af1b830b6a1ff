//! Inference-PIO compute kernels on burn tensors.
//!
//! Each operation exists here once, as a function on burn tensors that works on every
//! backend (the CPU/flex reference path). Fused CubeCL versions for CUDA are added beside
//! their reference and tested against it on the device; the functions exported at the top
//! pick the kernel on CubeCL devices and the reference elsewhere.

pub mod activation;
pub mod argmax;
pub mod attention;
mod cpu_attention;
mod cpu_rows;
pub mod flash;
pub mod cublas;
pub mod kv_pages;
pub mod kv_write;
mod launch;
pub mod linear;
pub mod matvec;
pub mod memory;
pub mod nccl;
pub mod norm;
pub mod paged;
pub mod quant;
pub mod quant_e4m3;
pub mod readback;
pub mod reference;
pub mod rotary;
pub mod router;
pub mod softmax;

pub use activation::swiglu_halves;
pub use kv_pages::{KvCodes, KvPages, KvStorage};
pub use cpu_rows::swiglu_row;
pub use kv_write::{write_kv_pair, write_kv_slots, zeroed_kv_buffer};
pub use linear::{batched_linear, batched_matmul, concat_outputs, linear, split_parts, split_stacked, split_weight, with_cpu_split};
pub use norm::{add_rms_norm, rms_norm};
pub use reference::{apply_rotary, rotate_half, swiglu};
pub use rotary::{qk_norm_rotary, rotary};

/// `Σ a · b` in sixteen independent lanes, which the compiler vectorises (a single running
/// sum chains every add on the last: as the attention scores' dot product it was 7 % of a CPU
/// decode). Inlined, so callers compiled for AVX2 get it compiled for AVX2 too.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..16 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}
