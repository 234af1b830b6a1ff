//! Inference-PIO compute kernels on burn tensors.
//!
//! Each operation exists here once, as a function on burn tensors that works on every
//! backend (the CPU/flex reference path). Fused CubeCL versions for CUDA are added beside
//! their reference and tested against it on the device.

pub mod attention;
mod launch;
pub mod linear;
pub mod matvec;
pub mod reference;

pub use linear::{batched_linear, concat_outputs, linear, split_parts, split_stacked, split_weight, with_cpu_split};
pub use reference::{apply_rotary, rms_norm, rotate_half, swiglu, swiglu_halves};
