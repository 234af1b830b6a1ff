//! What the launches of our CubeCL kernels share.

use burn::tensor::{DType, Device};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

/// Lanes of an NVIDIA plane (warp). Kernels that stride by it read the runtime `PLANE_DIM`.
pub(crate) const PLANE: usize = 32;

/// Elements per vector for rows of `len` elements of `dtype`: the widest of 8, 4, 2 and 1
/// that divides `len` and spans at most 16 bytes.
pub(crate) fn vector_width(len: usize, dtype: DType) -> usize {
    let most = (16 / dtype.size()).max(1);
    [8usize, 4, 2, 1].into_iter().find(|&v| v <= most && len.is_multiple_of(v)).unwrap_or(1)
}

/// Whether our CubeCL kernels can run on `device`: every device but the CPU (burn-flex), where
/// the reference versions run.
pub(crate) fn is_cubecl(device: &Device) -> bool {
    *device != Device::flex()
}

/// The number in environment variable `name`, where set and `valid`; a value that is set but
/// not a valid number is named on stderr (`expected` says what is) and ignored.
pub(crate) fn env_number(name: &str, valid: impl Fn(usize) -> bool, expected: &str) -> Option<usize> {
    let raw = std::env::var(name).ok()?;
    let parsed = valid_number(&raw, valid);
    if parsed.is_none() {
        eprintln!("inference-pio: ignoring {name}={raw:?}: expected {expected}");
    }
    parsed
}

/// Whether the one- and few-row product kernels (dense weights, int4/int8 codes) load their
/// first weights before they wait for the kernels before them (a programmatic dependent launch
/// on sm_90 and later; the patched cubecl-cuda strips the wait on older devices, where every
/// launch waits for the one before it anyway): on unless `INFERENCE_PIO_MATVEC_EARLY=0`. On an
/// H100 it took Qwen3-4B batch-1 decode from 244.3-245.1 to 254.2-254.4 tok/s, int8 codes from
/// 301.1-302.5 to 304.3-305.6, int4 from 344.5-346.6 to 349.0-349.1; the E4M3 kernel was
/// measured with it and kept without (254.7 against 256.0-256.1)
/// (`benches/results/gpu-h100-2026-12-07m-matvec-early-loads.md`).
pub(crate) fn early_loads() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !switched_off("INFERENCE_PIO_MATVEC_EARLY"))
}

/// Whether environment variable `name` is `0`: the switches of measured defaults that are on
/// unless turned off.
pub(crate) fn switched_off(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "0")
}

/// `raw` as a number where it is one and `valid`.
fn valid_number(raw: &str, valid: impl Fn(usize) -> bool) -> Option<usize> {
    raw.trim().parse::<usize>().ok().filter(|&n| valid(n))
}

/// `t` itself when its last axis is contiguous (the kernels read any other strides), else a
/// contiguous copy.
pub(crate) fn last_axis_contiguous(t: CubeTensor) -> CubeTensor {
    let rank = t.meta.num_dims();
    if t.meta.strides()[rank - 1] == 1 { t } else { into_contiguous(t) }
}

/// The widest vector up to `widest` elements at which every row (all axes but the last) of
/// each of `tensors` starts on a whole vector, halving from `widest`.
pub(crate) fn row_vector_width(widest: usize, tensors: &[&CubeTensor]) -> usize {
    let aligned = |t: &CubeTensor, vector: usize| {
        let strides = t.meta.strides();
        strides[..strides.len() - 1].iter().all(|s| s % vector == 0)
    };
    let mut vector = widest;
    while vector > 1 && !tensors.iter().all(|t| aligned(t, vector)) {
        vector /= 2;
    }
    vector
}

/// Device-side helpers the kernels share.
pub(crate) mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;

    /// `value` combined over the cube of `planes` planes (`max`: the maximum, else the sum):
    /// over each plane, then over the planes through shared memory. Every unit of the cube
    /// gets the result; the shared buffer is free again when it returns.
    #[cube]
    pub fn cube_reduce(value: f32, #[comptime] planes: usize, #[comptime] max: bool) -> f32 {
        let mut parts = Shared::<[f32]>::new_slice(planes);
        let plane = if max { plane_max(value) } else { plane_sum(value) };
        if UNIT_POS_X == 0 {
            parts[UNIT_POS_Y as usize] = plane;
        }
        sync_cube();
        let mut total = parts[0];
        for p in 1..CUBE_DIM_Y as usize {
            if max {
                total = f32::max(total, parts[p]);
            } else {
                total += parts[p];
            }
        }
        // Every unit has read the parts before any reuses the buffer.
        sync_cube();
        total
    }

    /// Vector index of the first element of row `row` of `t`, the rows being every axis but
    /// the last (which is contiguous), laid out by `t`'s strides: a view need not be copied.
    #[cube]
    pub fn row_start<E: Float, N: Size>(t: &Tensor<Vector<E, N>>, row: usize) -> usize {
        let rank = t.rank();
        let mut rest = row;
        let mut offset = 0usize;
        for i in 1..rank {
            let d = rank - 1 - i;
            let dim = t.shape(d);
            offset += (rest % dim) * t.stride(d);
            rest /= dim;
        }
        // Strides count elements, indices count vectors.
        offset / t.vector_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_takes_only_valid_numbers() {
        let power = |p: usize| (1..=32).contains(&p) && p.is_power_of_two();
        assert_eq!(valid_number("4", power), Some(4));
        assert_eq!(valid_number(" 16 ", power), Some(16));
        assert_eq!(valid_number("6", power), None);
        assert_eq!(valid_number("64", power), None);
        assert_eq!(valid_number("0", power), None);
        assert_eq!(valid_number("four", power), None);
        assert_eq!(valid_number("-2", power), None);
    }

    #[test]
    fn vectors_span_sixteen_bytes_where_the_row_allows() {
        assert_eq!(vector_width(2560, DType::BF16), 8);
        assert_eq!(vector_width(2560, DType::F32), 4);
        assert_eq!(vector_width(12, DType::BF16), 4);
        assert_eq!(vector_width(7, DType::F32), 1);
    }
}

#[cfg(test)]
mod dependent_launch_tests {
    use cubecl_cuda::dependent_launch::{wait_then_release, without_dependent_launch};

    // The waits the patched cubecl-cuda puts in every CubeCL kernel before launching it as a
    // programmatic dependent (kernels/cubecl-cuda-stream/PATCH.md): the wait must come
    // before anything the kernel reads or writes, in the entry point, not in a helper.
    #[test]
    fn the_wait_is_the_entry_points_first_statement() {
        let src = "__device__ float f(float x) { return x; }\nextern \"C\" __global__ void __launch_bounds__(32) k(float* a) {\nint i = 0;\n}\n";
        let out = wait_then_release(src).expect("an entry point");
        let (head, body) = out.split_once("k(float* a) {").expect("the signature kept");
        assert_eq!(head, "__device__ float f(float x) { return x; }\nextern \"C\" __global__ void __launch_bounds__(32) ");
        let body = body.trim_start();
        assert!(body.starts_with("asm volatile(\"griddepcontrol.wait;\" ::: \"memory\");"), "{body}");
        let release = body.find("griddepcontrol.launch_dependents").expect("the release");
        assert!(release < body.find("int i = 0;").expect("the body kept"));
        assert!(wait_then_release("__device__ void g() {}").is_none());
        // A kernel that placed its own wait keeps it where it is (the matrix-vector kernel's
        // early weight loads), and devices before sm_90 get neither instruction.
        let own = "extern \"C\" __global__ void k(float* a) {\nfloat w = a[1];\nasm volatile(\"griddepcontrol.wait;\" :  :  : \"memory\");\n}\n";
        assert!(wait_then_release(own).is_none());
        assert!(!without_dependent_launch(own).contains("griddepcontrol"));
    }
}
