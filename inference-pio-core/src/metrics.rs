//! Measures of how far one model's outputs are from another's: the per-position KL
//! divergence of next-token distributions and top-1 agreement, as llama.cpp's
//! `llama-perplexity --kl-divergence` reports them. Used by the quantization tests and by
//! `inference-pio bench` (accuracy and optimization-impact suites).

/// How far next-token distributions move from a reference's, position by position (as
/// llama.cpp's `llama-perplexity --kl-divergence` reports them): the mean and largest
/// `KL(reference || got)` in nats, and the share of positions whose most likely token agrees.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Divergence {
    pub mean_kl: f64,
    pub max_kl: f64,
    pub top1_agreement: f64,
    pub positions: usize,
}

/// [`Divergence`] of `got` from `reference`, logits `[positions][vocab]`, over the positions
/// both have.
pub fn divergence(reference: &[Vec<f32>], got: &[Vec<f32>]) -> Divergence {
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let log_sum = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
        row.iter().map(|&v| v as f64 - log_sum).collect()
    };
    let argmax = |row: &[f32]| row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
    let (mut sum, mut max, mut agree) = (0.0, 0f64, 0usize);
    for (r, g) in reference.iter().zip(got) {
        let (lr, lg) = (log_softmax(r), log_softmax(g));
        let kl: f64 = lr.iter().zip(&lg).map(|(a, b)| a.exp() * (a - b)).sum();
        sum += kl;
        max = max.max(kl);
        agree += usize::from(argmax(r) == argmax(g));
    }
    let positions = reference.len().min(got.len());
    let n = positions.max(1);
    Divergence { mean_kl: sum / n as f64, max_kl: max, top1_agreement: agree as f64 / n as f64, positions }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_logits_do_not_diverge_and_a_flipped_pick_is_counted() {
        let a = vec![vec![2.0, 1.0, 0.0], vec![0.0, 3.0, 1.0]];
        let same = divergence(&a, &a);
        assert_eq!((same.mean_kl, same.top1_agreement, same.positions), (0.0, 1.0, 2));
        // The second position's pick moves to token 2: half the positions agree, and its KL
        // is that of softmax(0,3,1) from softmax(0,1,3).
        let b = vec![vec![2.0, 1.0, 0.0], vec![0.0, 1.0, 3.0]];
        let d = divergence(&a, &b);
        assert_eq!(d.top1_agreement, 0.5);
        let p: Vec<f64> = [0.0f64, 3.0, 1.0].iter().map(|x| x.exp()).collect();
        let q: Vec<f64> = [0.0f64, 1.0, 3.0].iter().map(|x| x.exp()).collect();
        let (sp, sq) = (p.iter().sum::<f64>(), q.iter().sum::<f64>());
        let kl: f64 = p.iter().zip(&q).map(|(a, b)| a / sp * ((a / sp) / (b / sq)).ln()).sum();
        assert!((d.max_kl - kl).abs() < 1e-12 && (d.mean_kl - kl / 2.0).abs() < 1e-12, "{d:?} vs {kl}");
    }
}
