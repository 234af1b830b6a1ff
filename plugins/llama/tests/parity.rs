//! Parity with transformers (fixtures from tests/fixtures/make_fixtures.py), on the CPU:
//! tiny random-weight Llama GGUF files with every tensor type the engine reads, and the real
//! SmolLM2-135M-Instruct Q4_1 GGUF (the built-in default model, fetched by
//! `inference-pio models fetch`; CI fetches it before the tests).

use inference_pio_core::types::{ChatMessage, DType, DeviceRequest, LoadOptions, PluginSettings};
use inference_pio_engine::generate::Engine;
use inference_pio_engine::plugin::load_engine;
use inference_pio_engine::testing::{all_logits, greedy, ids, load_cpu, rel_l2};
use llama::FAMILY;
use serde_json::Value;

mod common;
use common::smollm2_path;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(path: &Path) -> Engine {
    load_cpu(&FAMILY, path, DType::F32)
}

fn reference(name: &str) -> Value {
    inference_pio_engine::testing::reference(&fixtures(), name)
}

#[test]
fn tiny_gguf_models_match_transformers() {
    for name in ["llama-tiny-tied", "llama-tiny-untied"] {
        let model = fixtures().join(format!("{name}.gguf"));
        let reference = reference(name);
        inference_pio_engine::testing::check_model(&FAMILY, &model, &reference, name, false);
        let engine = load(&model);
        for case in reference["tokenizer"].as_array().expect("tokenizer") {
            let text = case["text"].as_str().expect("text");
            assert_eq!(engine.tokenizer.encode(text, true).expect("encode"), ids(&case["ids"]), "{name}: {text:?}");
        }
    }
}

#[test]
fn tiny_gguf_chat_template_comes_from_the_file() {
    let engine = load(&fixtures().join("llama-tiny-tied.gguf"));
    let template = engine.template.as_ref().expect("template");
    let text = template.render(&[ChatMessage::new("user", "hi")], None, true).expect("render");
    assert_eq!(text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

fn smollm2() -> Engine {
    load(&smollm2_path())
}

#[test]
fn smollm2_tokenizer_and_chat_template_match_transformers() {
    let engine = smollm2();
    let reference = reference("smollm2");
    for case in reference["tokenizer"].as_array().expect("tokenizer") {
        let text = case["text"].as_str().expect("text");
        let got = engine.tokenizer.encode(text, true).expect("encode");
        assert_eq!(got, ids(&case["ids"]), "{text:?}");
        assert_eq!(engine.tokenizer.decode(&got, false).expect("decode"), text, "round trip of {text:?}");
    }
    let template = engine.template.as_ref().expect("template");
    for case in reference["chat_template"].as_array().expect("renders") {
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).expect("messages");
        assert_eq!(template.render(&messages, None, true).expect("render"), case["text"].as_str().expect("text"));
    }
    assert_eq!(engine.eos_token_ids, vec![reference["eos_token_id"].as_u64().expect("eos") as u32]);
}

#[test]
fn smollm2_logits_and_greedy_tokens_match_transformers() {
    let engine = smollm2();
    for prompt in reference("smollm2")["prompts"].as_array().expect("prompts") {
        let input = ids(&prompt["ids"]);
        let bytes = std::fs::read(fixtures().join(prompt["last_logits_file"].as_str().expect("file"))).expect("row");
        let want: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let got = all_logits(&engine, &input);
        let err = rel_l2(got.last().expect("row"), &want);
        assert!(err <= 1e-4, "{:?}: relative L2 {err}", prompt["text"]);
        // The reference generated 24 tokens for the chat prompt (it stops at EOS), 16 otherwise.
        let n = if prompt["kind"] == "chat" { 24 } else { 16 };
        assert_eq!(greedy(&engine, &input, n), ids(&prompt["greedy"]), "{:?}", prompt["text"]);
    }
}

#[test]
fn malformed_gguf_files_are_named_errors() {
    let dir = std::env::temp_dir().join(format!("pio-llama-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let good = std::fs::read(fixtures().join("llama-tiny-tied.gguf")).expect("fixture");
    let options = LoadOptions { device: DeviceRequest::Cpu, dtype: Some(DType::F32), random_weights: None };
    let settings = PluginSettings::default();
    let try_load = |bytes: &[u8]| {
        let path = dir.join("model.gguf");
        std::fs::write(&path, bytes).expect("write");
        load_engine(&FAMILY, &path, &options, &settings).err().expect("must fail").to_string()
    };
    let e = try_load(&good[..good.len() / 2]);
    assert!(e.contains("not a valid GGUF file") && e.contains("past the end"), "{e}");
    let mut count = good.clone();
    count[8..16].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let e = try_load(&count);
    assert!(e.contains("tensor count"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_plain_llama_safetensors_directory_matches_transformers() {
    // GQA, untied head, llama3 RoPE scaling: the plugin serves HF directories as well as GGUF.
    inference_pio_engine::testing::check_fixture(&FAMILY, &fixtures(), "llama-tiny-hf", false);
}
