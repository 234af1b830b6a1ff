//! Choosing the next token from logits, in transformers' order
//! (`RepetitionPenaltyLogitsProcessor`, then `TemperatureLogitsWarper`, `TopKLogitsWarper`,
//! `TopPLogitsWarper`, `MinPLogitsWarper`, then a draw from the softmax), with a seeded RNG.
//! OpenAI's presence and frequency penalties (which transformers lacks) follow the repetition
//! penalty as in vLLM's `apply_penalties`: over the generated tokens only.

use rand::{Rng, SeedableRng, rngs::StdRng};

/// Resolved sampling settings of one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    pub greedy: bool,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    /// Subtracted once from each generated token's logit.
    pub presence_penalty: f32,
    /// Subtracted per occurrence of a generated token.
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl SamplingConfig {
    pub fn greedy() -> Self {
        Self { greedy: true, temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, presence_penalty: 0.0, frequency_penalty: 0.0, seed: 0 }
    }
}

pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

/// Index of the largest value (the first of equals).
pub(crate) fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self { config, rng }
    }

    /// Whether [`Self::sample`] is the plain argmax of the logits.
    pub fn is_plain_greedy(&self) -> bool {
        let c = &self.config;
        (c.greedy || c.temperature == 0.0) && c.repetition_penalty == 1.0 && c.presence_penalty == 0.0 && c.frequency_penalty == 0.0
    }

    /// Picks a token; `history` is the prompt and everything generated (the repetition
    /// penalty's), of which the last `generated` are this request's output (the presence and
    /// frequency penalties').
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32], generated: usize) -> u32 {
        let c = &self.config;
        if c.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l < 0.0 { *l * c.repetition_penalty } else { *l / c.repetition_penalty };
                }
            }
        }
        if c.presence_penalty != 0.0 || c.frequency_penalty != 0.0 {
            let mut output = history[history.len().saturating_sub(generated)..].to_vec();
            output.sort_unstable();
            for run in output.chunk_by(|a, b| a == b) {
                if let Some(l) = logits.get_mut(run[0] as usize) {
                    *l -= c.presence_penalty + c.frequency_penalty * run.len() as f32;
                }
            }
        }
        if c.greedy || c.temperature == 0.0 {
            return argmax(logits);
        }
        if c.temperature != 1.0 {
            logits.iter_mut().for_each(|l| *l /= c.temperature);
        }
        // Candidates sorted by logit, descending.
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        if c.top_k > 0 && (c.top_k as usize) < order.len() {
            order.truncate(c.top_k as usize);
        }
        let max = logits[order[0] as usize];
        let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i as usize] - max) as f64).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if c.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= c.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            order.truncate(keep);
            probs.truncate(keep);
        }
        if c.min_p > 0.0 {
            let threshold = probs[0] * c.min_p as f64;
            let keep = probs.iter().take_while(|&&p| p >= threshold).count().max(1);
            order.truncate(keep);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut draw = self.rng.random::<f64>() * total;
        for (i, p) in probs.iter().enumerate() {
            if draw < *p {
                return order[i];
            }
            draw -= p;
        }
        order[order.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SamplingConfig {
        SamplingConfig { greedy: false, temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, presence_penalty: 0.0, frequency_penalty: 0.0, seed: 7 }
    }

    #[test]
    fn greedy_takes_the_argmax_after_the_penalty() {
        let mut s = Sampler::new(SamplingConfig::greedy());
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[], 0), 1);
        let mut s = Sampler::new(SamplingConfig { repetition_penalty: 2.0, ..SamplingConfig::greedy() });
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[1], 0), 2);
        let mut logits = [-1.0, 0.5];
        Sampler::new(SamplingConfig { repetition_penalty: 2.0, ..SamplingConfig::greedy() }).sample(&mut logits, &[0], 0);
        assert_eq!(logits[0], -2.0);
    }

    #[test]
    fn presence_and_frequency_penalties_count_only_the_generated_tokens() {
        // History: prompt [2, 2, 1], then generated [1, 1, 3]. Token 2 is only in the prompt.
        let history = [2, 2, 1, 1, 1, 3];
        let mut logits = [0.0f32, 1.0, 1.0, 1.0];
        let mut s = Sampler::new(SamplingConfig { presence_penalty: 0.5, frequency_penalty: 0.25, ..SamplingConfig::greedy() });
        assert!(!s.is_plain_greedy());
        // 1: generated twice (1 - 0.5 - 0.5); 3: once (1 - 0.5 - 0.25); 2: untouched.
        assert_eq!(s.sample(&mut logits, &history, 3), 2);
        assert_eq!(logits, [0.0, 0.0, 1.0, 0.25]);
        // Negative penalties encourage repeats.
        let mut s = Sampler::new(SamplingConfig { presence_penalty: -1.0, ..SamplingConfig::greedy() });
        assert_eq!(s.sample(&mut [0.0, 1.0, 1.5, 1.0], &history, 3), 1);
    }

    #[test]
    fn top_k_top_p_and_min_p_restrict_the_draw() {
        let logits = [5.0f32, 4.0, 0.0, -1.0];
        for seed in 0..50 {
            let mut s = Sampler::new(SamplingConfig { top_k: 2, seed, ..config() });
            assert!(s.sample(&mut logits.clone(), &[], 0) < 2);
            let mut s = Sampler::new(SamplingConfig { top_p: 0.5, seed, ..config() });
            assert_eq!(s.sample(&mut logits.clone(), &[], 0), 0);
            let mut s = Sampler::new(SamplingConfig { min_p: 0.5, seed, ..config() });
            assert!(s.sample(&mut logits.clone(), &[], 0) < 2);
        }
    }

    #[test]
    fn seeded_sampling_repeats_and_covers() {
        let logits = [1.0f32, 1.0, 1.0, 1.0];
        let draw = |seed| {
            let mut s = Sampler::new(SamplingConfig { seed, ..config() });
            (0..32).map(|_| s.sample(&mut logits.clone(), &[], 0)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        let mut seen = draw(3);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 4);
    }
}
