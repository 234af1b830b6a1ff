//! Helpers the host's end-to-end tests share.

use serde_json::{Value, json};
use std::path::Path;

/// The tiny Qwen3-MoE fixture with Qwen3's whole vocabulary (its 512-row embedding and head
/// grown to 151,936 rows of small pseudo-random bf16 values) and a 4,096-token context, so
/// that chat prompts and the tool-call tags (ids past 151,000) fit it.
pub fn full_vocabulary_moe(dir: &Path) {
    const VOCAB: usize = 151_936;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/qwen3-coder-30b/tests/fixtures/qwen3moe-tiny-a");
    let mut config: Value = serde_json::from_slice(&std::fs::read(fixture.join("config.json")).expect("config")).expect("json");
    config["vocab_size"] = json!(VOCAB);
    config["max_position_embeddings"] = json!(4096);
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config");
    for file in ["generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(file), dir.join(file)).expect(file);
    }
    let bytes = std::fs::read(fixture.join("model.safetensors")).expect("weights");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + header_len]).expect("header");
    let data = &bytes[8 + header_len..];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut out_header = serde_json::Map::new();
    let mut out_data = Vec::new();
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offsets: Vec<usize> = info["data_offsets"].as_array().expect("offsets").iter().map(|o| o.as_u64().expect("offset") as usize).collect();
        let mut tensor = data[offsets[0]..offsets[1]].to_vec();
        let mut shape: Vec<u64> = info["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim")).collect();
        if name.ends_with("embed_tokens.weight") || name == "lm_head.weight" {
            let row = tensor.len() / shape[0] as usize;
            while tensor.len() < VOCAB * row {
                // xorshift, scaled to about +-0.03, as bf16 (the high half of an f32).
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let v = ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.06;
                tensor.extend_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
            }
            shape[0] = VOCAB as u64;
        }
        let start = out_data.len();
        out_data.extend_from_slice(&tensor);
        out_header.insert(name.clone(), json!({"dtype": info["dtype"], "shape": shape, "data_offsets": [start, out_data.len()]}));
    }
    let header = Value::Object(out_header).to_string().into_bytes();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    file.extend_from_slice(&out_data);
    std::fs::write(dir.join("model.safetensors"), file).expect("write weights");
}
