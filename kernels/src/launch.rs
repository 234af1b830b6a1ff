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

/// Device-side helpers the kernels share.
pub(crate) mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;

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
    fn vectors_span_sixteen_bytes_where_the_row_allows() {
        assert_eq!(vector_width(2560, DType::BF16), 8);
        assert_eq!(vector_width(2560, DType::F32), 4);
        assert_eq!(vector_width(12, DType::BF16), 4);
        assert_eq!(vector_width(7, DType::F32), 1);
    }
}
