//! Row-wise loops on the CPU for the f32 operations between a decoder's products: RMSNorm
//! (transformers `LlamaRMSNorm` / `Qwen3RMSNorm`), the residual add before it, SwiGLU
//! (`silu(gate) * up`, `LlamaMLP`) and the rotary embedding (`apply_rotary_pos_emb`). Through burn's operations each is five to seven launches
//! with an allocation each, about 900 a token of the default model and a tenth of a
//! one-thread decode; here each is one pass over each row.
//!
//! A row is the last axis. The inputs may be views (a product's output transposed back from
//! `[n, rows]`, whose rows are strided; a narrowed slice): rows are read through the tensor's
//! strides (gathered first where their elements are not adjacent), so one row gives the same
//! result, bit for bit, whether it comes alone or in a batch, contiguous or not (a batched
//! request must match the same request alone where sampling depends on it). Other dtypes and
//! backends return `None` and the caller takes burn's operations.

use burn::backend::{BackendTensor, DispatchTensorKind};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

/// Elements from which a loop splits its rows over rayon's threads (a prefill's rows; a
/// decode step's few stay on the calling thread). Each row is computed the same way either way.
const PARALLEL_FROM: usize = 1 << 16;

/// `f(row index, output row, scratch)` for each `n`-wide row of `out`, over rayon's threads
/// where `out` is large.
fn each_row(out: &mut [f32], n: usize, f: impl Fn(usize, &mut [f32], &mut Vec<f32>) + Sync) {
    let n = n.max(1);
    if out.len() >= PARALLEL_FROM {
        out.par_chunks_mut(n).enumerate().for_each_init(Vec::new, |buf, (r, o)| f(r, o, buf));
    } else {
        let mut buf = Vec::new();
        for (r, o) in out.chunks_exact_mut(n).enumerate() {
            f(r, o, &mut buf);
        }
    }
}

/// A tensor's rows in its CPU storage: each row's first element, the row length and the step
/// between a row's elements.
struct Rows<'a> {
    data: &'a [f32],
    starts: Vec<usize>,
    n: usize,
    step: usize,
}

impl Rows<'_> {
    /// Row `r`: the storage itself where its elements are adjacent, else gathered into `buf`
    /// (the same values either way, so the arithmetic after does not depend on the layout).
    fn row<'b>(&'b self, r: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
        let s = self.starts[r];
        if self.step == 1 {
            &self.data[s..s + self.n]
        } else {
            buf.clear();
            buf.extend((0..self.n).map(|j| self.data[s + j * self.step]));
            buf
        }
    }
}

/// `f` of a tensor's rows on the CPU; `None` (without calling `f`) unless `t` is f32 on the
/// CPU with no negative stride.
fn with_rows<const D: usize, R>(t: &Tensor<D>, f: impl FnOnce(&Rows<'_>) -> R) -> Option<R> {
    let DispatchTensorKind::Flex(BackendTensor::Float(tensor)) = t.clone().into_dispatch().kind else {
        return None;
    };
    if tensor.dtype() != DType::F32 {
        return None;
    }
    let layout = tensor.layout();
    let dims = layout.shape().to_vec();
    let strides = layout.strides().to_vec();
    let n = *dims.last()?;
    if dims.len() != D || strides.iter().any(|&s| s < 0) {
        return None;
    }
    let step = if n > 1 { strides[D - 1] as usize } else { 1 };
    let rows: usize = dims[..D - 1].iter().product();
    let mut starts = Vec::with_capacity(rows);
    let mut index = vec![0usize; D - 1];
    for _ in 0..rows {
        starts.push(layout.start_offset() + index.iter().zip(&strides).map(|(&i, &s)| i * s as usize).sum::<usize>());
        // The next multi-index over the leading axes, last fastest.
        for axis in (0..D - 1).rev() {
            index[axis] += 1;
            if index[axis] < dims[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    let storage = tensor.storage::<f32>();
    if starts.iter().any(|&s| s + n.saturating_sub(1) * step >= storage.len().max(1) && n > 0) {
        return None;
    }
    Some(f(&Rows { data: storage, starts, n, step }))
}

/// A weight `[n]` as an f32 vector from the CPU, else `None`.
fn weight_of(w: &Tensor<1>) -> Option<Vec<f32>> {
    with_rows(w, |rows| rows.row(0, &mut Vec::new()).to_vec())
}

fn tensor_of<const D: usize>(values: Vec<f32>, dims: [usize; D], like: &Tensor<D>) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, dims), (&like.device(), DType::F32))
}

/// The softmax of `row` in place, in f32: `exp(x - max)`, then each divided by their sum (summed
/// in order). Inlined, so a caller compiled for wider vectors gets it compiled so too.
#[inline(always)]
pub(crate) fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        total += *v;
    }
    for v in row.iter_mut() {
        *v /= total;
    }
}

/// `out = x / sqrt(mean(x²) + eps) * w`, in the reference's order: the mean of the squares,
/// its reciprocal square root, then `x` times it, then times the weight.
fn norm_row(x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let sum: f32 = acc.iter().sum::<f32>() + tail;
    let inv = 1.0 / ((sum / x.len() as f32) + eps as f32).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
        *o = (v * inv) * w;
    }
}

/// RMS normalisation of each row of `x` by the weight `[n]` (see
/// [`crate::reference::rms_norm`]); `None` off the CPU's f32 path.
pub fn rms_norm<const D: usize>(x: &Tensor<D>, weight: &Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    let w = weight_of(weight)?;
    let out = with_rows(x, |rows| {
        let n = rows.n;
        (w.len() == n).then(|| {
            let mut out = vec![0f32; rows.starts.len() * n];
            each_row(&mut out, n, |r, o, buf| norm_row(rows.row(r, buf), &w, eps, o));
            out
        })
    })??;
    Some(tensor_of(out, x.dims(), x))
}

/// `(residual + y, rms_norm(residual + y))` row by row; `None` off the CPU's f32 path or for
/// shapes that differ.
pub fn add_rms_norm<const D: usize>(residual: &Tensor<D>, y: &Tensor<D>, weight: &Tensor<1>, eps: f64) -> Option<(Tensor<D>, Tensor<D>)> {
    if residual.dims() != y.dims() {
        return None;
    }
    let w = weight_of(weight)?;
    let (sum, normed) = with_rows(residual, |a| {
        with_rows(y, |b| {
            let n = a.n;
            (w.len() == n).then(|| {
                let mut sum = vec![0f32; a.starts.len() * n];
                each_row(&mut sum, n, |r, s, buf| {
                    s.copy_from_slice(a.row(r, buf));
                    for (s, v) in s.iter_mut().zip(b.row(r, buf)) {
                        *s += v;
                    }
                });
                let mut normed = vec![0f32; sum.len()];
                each_row(&mut normed, n, |r, o, _| norm_row(&sum[r * n..(r + 1) * n], &w, eps, o));
                (sum, normed)
            })
        })
    })???;
    Some((tensor_of(sum, residual.dims(), residual), tensor_of(normed, residual.dims(), residual)))
}

/// `out = silu(gate) * up` of one row, in [`swiglu_halves`]'s arithmetic (for callers that hold
/// rows on the host).
pub fn swiglu_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `silu(gate) * up` of `[.., gate | up]` rows (see [`crate::reference::swiglu_halves`]);
/// `None` off the CPU's f32 path.
pub fn swiglu_halves<const D: usize>(gate_up: &Tensor<D>) -> Option<Tensor<D>> {
    let out = with_rows(gate_up, |rows| {
        let (n, inner) = (rows.n, rows.n / 2);
        (n == 2 * inner).then(|| {
            let mut out = vec![0f32; rows.starts.len() * inner];
            each_row(&mut out, inner, |r, o, buf| {
                let (gate, up) = rows.row(r, buf).split_at(inner);
                swiglu_row(gate, up, o);
            });
            out
        })
    })??;
    let inner = gate_up.dims()[D - 1] / 2;
    let mut dims = gate_up.dims();
    dims[D - 1] = inner;
    Some(tensor_of(out, dims, gate_up))
}

/// Half the rotated width of `cos`/`sin [batch, 1, tokens, rotary_dim]` for rows of
/// `head_dim` (the angles' shapes checked), else `None`.
fn rotary_half(cos: &Tensor<4>, sin: &Tensor<4>, batch: usize, tokens: usize, head_dim: usize) -> Option<usize> {
    let [cb, one, ct, rotary_dim] = cos.dims();
    ((cb, one, ct) == (batch, 1, tokens) && sin.dims() == cos.dims() && rotary_dim <= head_dim && rotary_dim.is_multiple_of(2)).then_some(rotary_dim / 2)
}

/// Rotates the first `2 * half` channels of the row `o` in place by its angles' `c`/`s`, in the
/// reference's order of operations (`x·cos + rotate_half(x)·sin`); the rest stay.
fn rotate_row(o: &mut [f32], c: &[f32], s: &[f32], half: usize) {
    for i in 0..half {
        let (x1, x2) = (o[i], o[i + half]);
        o[i] = x1 * c[i] + -x2 * s[i];
        o[i + half] = x2 * c[i + half] + x1 * s[i + half];
    }
}

/// Rotary position embedding of `x [batch, heads, tokens, head_dim]` by `cos`/`sin [batch, 1,
/// tokens, rotary_dim]` (see [`crate::reference::apply_rotary`]: `x·cos + rotate_half(x)·sin`
/// on the first `rotary_dim` channels, the rest passed through), each row in the reference's
/// order of operations; `None` off the CPU's f32 path.
pub fn rotary(x: &Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Option<Tensor<4>> {
    let [batch, heads, tokens, head_dim] = x.dims();
    let half = rotary_half(cos, sin, batch, tokens, head_dim)?;
    let out = with_rows(x, |xs| {
        with_rows(cos, |cs| {
            with_rows(sin, |ss| {
                let mut out = vec![0f32; xs.starts.len() * head_dim];
                each_row(&mut out, head_dim, |r, o, buf| {
                    // Row r is (b, h, t); its angles are row (b, t) of cos and sin.
                    let (b, t) = (r / (heads * tokens), r % tokens);
                    o.copy_from_slice(xs.row(r, buf));
                    // Empty unless cos and sin are views with strided rows.
                    let (mut cbuf, mut sbuf) = (Vec::new(), Vec::new());
                    rotate_row(o, cs.row(b * tokens + t, &mut cbuf), ss.row(b * tokens + t, &mut sbuf), half);
                });
                out
            })
        })
    })???;
    Some(tensor_of(out, [batch, heads, tokens, head_dim], x))
}

/// QK-norm and rotary embedding together (see [`crate::rotary::qk_norm_rotary_reference`]):
/// each row of `qk [batch, tokens, heads, head_dim]` (a view is fine) normalised by its head's
/// weight row of `weight [heads, head_dim]` as [`rms_norm`] does, then rotated as [`rotary`]
/// does, one pass a row instead of the reference's dozen operations: `[batch, heads, tokens,
/// head_dim]`; `None` off the CPU's f32 path.
pub fn qk_norm_rotary(qk: &Tensor<4>, weight: &Tensor<2>, cos: &Tensor<4>, sin: &Tensor<4>, eps: f64) -> Option<Tensor<4>> {
    let [batch, tokens, heads, head_dim] = qk.dims();
    if weight.dims() != [heads, head_dim] {
        return None;
    }
    let half = rotary_half(cos, sin, batch, tokens, head_dim)?;
    let out = with_rows(qk, |xs| {
        with_rows(weight, |ws| {
            with_rows(cos, |cs| {
                with_rows(sin, |ss| {
                    let mut out = vec![0f32; xs.starts.len() * head_dim];
                    // Output row r is (b, h, t); its input row is (b, t, h), its weight row h,
                    // its angles row (b, t) of cos and sin.
                    each_row(&mut out, head_dim, |r, o, buf| {
                        let (b, h, t) = (r / (heads * tokens), r / tokens % heads, r % tokens);
                        // Empty unless the weight, cos or sin are views with strided rows.
                        let (mut wbuf, mut cbuf, mut sbuf) = (Vec::new(), Vec::new(), Vec::new());
                        // Normalised into `o`, then rotated there (the channels past
                        // `rotary_dim` stay as normalised).
                        norm_row(xs.row((b * tokens + t) * heads + h, buf), ws.row(h, &mut wbuf), eps, o);
                        rotate_row(o, cs.row(b * tokens + t, &mut cbuf), ss.row(b * tokens + t, &mut sbuf), half);
                    });
                    out
                })
            })
        })
    })????;
    Some(tensor_of(out, [batch, heads, tokens, head_dim], qk))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    fn values<const D: usize>(x: Tensor<D>) -> Vec<f32> {
        x.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data")
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{what}: element {i}: {x} vs {y}");
        }
    }

    /// Contiguous rows, a transposed product output (rows strided), a narrowed view (rows
    /// offset) and a single row: each against burn's operations, and a row alone equals the
    /// same row in a batch, bit for bit.
    #[test]
    fn the_loops_are_the_reference_on_views_and_a_row_is_the_same_alone() {
        let d = Device::flex();
        let n = 37;
        let w: Tensor<1> = Tensor::random([n], Distribution::Uniform(0.5, 1.5), &d);
        let base: Tensor<2> = Tensor::random([n, 5], Distribution::Uniform(-2.0, 2.0), &d);
        let wide: Tensor<2> = Tensor::random([5, 2 * n + 6], Distribution::Uniform(-2.0, 2.0), &d);
        let views: [(&str, Tensor<2>); 4] = [
            ("contiguous", Tensor::from_data(base.clone().transpose().into_data(), &d)),
            ("transposed", base.clone().transpose()),
            ("narrowed", wide.clone().narrow(1, 3, n)),
            ("one row", wide.clone().narrow(0, 2, 1).narrow(1, 1, n)),
        ];
        for (what, x) in views {
            let want = values(crate::reference::rms_norm(x.clone(), &w, 1e-6));
            close(&values(rms_norm(&x, &w, 1e-6).unwrap_or_else(|| panic!("{what}: f32 on the CPU"))), &want, what);
            let y: Tensor<2> = Tensor::random(x.dims(), Distribution::Uniform(-2.0, 2.0), &d);
            let (s, o) = add_rms_norm(&x, &y, &w, 1e-6).expect("f32 on the CPU");
            close(&values(s), &values(x.clone().add(y.clone())), what);
            close(&values(o), &values(crate::reference::rms_norm(x.clone().add(y), &w, 1e-6)), what);
        }
        // A row alone is the same row in the batch, bit for bit.
        for (what, x) in [("transposed", base.clone().transpose()), ("narrowed", wide.clone().narrow(1, 3, n))] {
            let all = values(rms_norm(&x, &w, 1e-6).expect("views"));
            let alone = values(rms_norm(&x.clone().narrow(0, 3, 1), &w, 1e-6).expect("one row"));
            assert_eq!(&all[3 * n..4 * n], &alone[..], "{what}: row 3 alone and in the batch");
        }
        // SwiGLU of the halves, on a strided view (a product's transposed output).
        let gate_up: Tensor<2> = Tensor::random([2 * n, 4], Distribution::Uniform(-3.0, 3.0), &d);
        let gate_up = gate_up.transpose();
        let want = values(crate::reference::swiglu_halves(gate_up.clone()));
        let got = values(swiglu_halves(&gate_up).expect("f32 on the CPU"));
        close(&got, &want, "swiglu");
        let alone = values(swiglu_halves(&gate_up.clone().narrow(0, 1, 1)).expect("one row"));
        assert_eq!(&got[n..2 * n], &alone[..], "swiglu: row 1 alone and in the batch");
        // Enough rows for rayon's threads (past `PARALLEL_FROM`): the same rows as alone.
        let rows = PARALLEL_FROM / n + 7;
        let big: Tensor<2> = Tensor::random([2 * n, rows], Distribution::Uniform(-2.0, 2.0), &d);
        let big = big.transpose();
        let y: Tensor<2> = Tensor::random([rows, 2 * n], Distribution::Uniform(-2.0, 2.0), &d);
        let half = |t: &Tensor<2>| t.clone().narrow(1, 0, n);
        let (s, o) = add_rms_norm(&half(&big), &half(&y), &w, 1e-6).expect("f32 on the CPU");
        close(&values(s), &values(half(&big).add(half(&y))), "parallel sum");
        let (o, want) = (values(o), values(crate::reference::rms_norm(half(&big).add(half(&y)), &w, 1e-6)));
        close(&o, &want, "parallel add + norm");
        let (_, alone) = add_rms_norm(&half(&big).narrow(0, rows - 2, 1), &half(&y).narrow(0, rows - 2, 1), &w, 1e-6).expect("one row");
        assert_eq!(&o[(rows - 2) * n..(rows - 1) * n], &values(alone)[..], "a row alone and among many");
        let act = values(swiglu_halves(&big).expect("f32 on the CPU"));
        close(&act, &values(crate::reference::swiglu_halves(big.clone())), "parallel swiglu");
        let normed = values(rms_norm(&half(&big), &w, 1e-6).expect("f32 on the CPU"));
        close(&normed, &values(crate::reference::rms_norm(half(&big), &w, 1e-6)), "parallel norm");
        // Rotary: full and partial, on a view with heads before tokens (as the decoder passes
        // it), exactly the reference's values.
        for rotary_dim in [8usize, 4] {
            let qk: Tensor<4> = Tensor::random([1, 5, 3, 8], Distribution::Uniform(-2.0, 2.0), &d);
            let x = qk.swap_dims(1, 2);
            let cos: Tensor<4> = Tensor::random([1, 1, 5, rotary_dim], Distribution::Uniform(-1.0, 1.0), &d);
            let sin: Tensor<4> = Tensor::random([1, 1, 5, rotary_dim], Distribution::Uniform(-1.0, 1.0), &d);
            let want = values(crate::reference::apply_rotary(x.clone(), &cos, &sin));
            assert_eq!(values(rotary(&x, &cos, &sin).expect("f32 on the CPU")), want, "rotary over {rotary_dim} of 8 channels");
        }
        // QK-norm + rotary of a q|k view of a wider projection (as the decoder passes it),
        // full and partial rotation: the reference's values, and one token alone is the same.
        for rotary_dim in [8usize, 4] {
            let qkv: Tensor<4> = Tensor::random([1, 5, 4, 8], Distribution::Uniform(-2.0, 2.0), &d);
            let qk = qkv.narrow(2, 0, 3);
            let weight: Tensor<2> = Tensor::random([3, 8], Distribution::Uniform(0.5, 1.5), &d);
            let cos: Tensor<4> = Tensor::random([1, 1, 5, rotary_dim], Distribution::Uniform(-1.0, 1.0), &d);
            let sin: Tensor<4> = Tensor::random([1, 1, 5, rotary_dim], Distribution::Uniform(-1.0, 1.0), &d);
            let got = values(qk_norm_rotary(&qk, &weight, &cos, &sin, 1e-6).expect("f32 on the CPU"));
            close(&got, &values(crate::rotary::qk_norm_rotary_reference(qk.clone(), &weight, &cos, &sin, 1e-6)), "qk-norm + rotary");
            let one = |t: &Tensor<4>| t.clone().narrow(2, 3, 1);
            let alone = values(qk_norm_rotary(&qk.clone().narrow(1, 3, 1), &weight, &one(&cos), &one(&sin), 1e-6).expect("one token"));
            for h in 0..3 {
                assert_eq!(&got[(h * 5 + 3) * 8..(h * 5 + 4) * 8], &alone[h * 8..(h + 1) * 8], "qk-norm + rotary: token 3 of head {h} alone");
            }
        }
        // Other dtypes are not taken.
        assert!(rms_norm(&base.clone().cast(DType::BF16), &w, 1e-6).is_none());
    }
}
