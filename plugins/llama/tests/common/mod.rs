//! What the Llama plugin's integration tests share.

use std::path::PathBuf;

/// The default model where `inference-pio models fetch smollm2-135m-instruct` puts it
/// (`INFERENCE_PIO_SMOLLM2_GGUF` overrides); a test without it fails saying how to fetch it.
pub fn smollm2_path() -> PathBuf {
    let path = match std::env::var_os("INFERENCE_PIO_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .expect("HOME or XDG_CACHE_HOME")
            .join("inference-pio/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    assert!(
        path.is_file(),
        "{} is missing: run `./target/debug/inference-pio models fetch smollm2-135m-instruct` first (the README's test command does)",
        path.display()
    );
    path
}

/// The committed evaluation texts (`inference-pio-host/src/eval-texts.json`, which
/// `inference-pio bench` scores too), tokenized by `engine`: what the divergence tests
/// (`quantization.rs`, `kv_cache.rs`) teacher-force.
#[allow(dead_code)] // not every test file that shares this module measures divergence
pub fn eval_texts(engine: &inference_pio_engine::generate::Engine) -> Vec<Vec<u32>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../inference-pio-host/src/eval-texts.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("eval-texts.json")).expect("json");
    json["texts"]
        .as_array()
        .expect("texts")
        .iter()
        .map(|t| engine.tokenizer.encode(t.as_str().expect("text"), false).expect("tokenizes"))
        .collect()
}

/// Every position's logits of `texts`, each text in one pass (the prompt path).
#[allow(dead_code)] // as `eval_texts`
pub fn prompt_logits(engine: &inference_pio_engine::generate::Engine, texts: &[Vec<u32>]) -> Vec<Vec<f32>> {
    texts.iter().flat_map(|ids| inference_pio_engine::testing::all_logits(engine, ids)).collect()
}

/// The same positions one token per step, as decode computes them (one row at a time through
/// the products that read the codes in place, over blocks of 16 tokens).
#[allow(dead_code)] // as `eval_texts`
pub fn decode_logits(engine: &inference_pio_engine::generate::Engine, texts: &[Vec<u32>]) -> Vec<Vec<f32>> {
    texts.iter().flat_map(|ids| inference_pio_engine::testing::incremental_logits(engine, ids, 1, 16)).collect()
}
