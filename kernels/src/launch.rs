//! What the launches of our CubeCL kernels share.

use burn::tensor::DType;

/// Lanes of an NVIDIA plane (warp). Kernels that stride by it read the runtime `PLANE_DIM`.
pub(crate) const PLANE: usize = 32;

/// Elements per vector for rows of `len` elements of `dtype`: the widest of 8, 4, 2 and 1
/// that divides `len` and spans at most 16 bytes.
pub(crate) fn vector_width(len: usize, dtype: DType) -> usize {
    let most = (16 / dtype.size()).max(1);
    [8usize, 4, 2, 1].into_iter().find(|&v| v <= most && len.is_multiple_of(v)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_span_sixteen_bytes_where_the_row_allows() {
        assert_eq!(vector_width(2560, DType::BF16), 8);
        assert_eq!(vector_width(2560, DType::F32), 4);
        assert_eq!(vector_width(12, DType::BF16), 4);
        assert_eq!(vector_width(7, DType::F32), 1);
    }
}
