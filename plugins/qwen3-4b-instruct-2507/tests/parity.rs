//! Parity with transformers (fixtures from tests/fixtures/make_fixtures.py) and the engine's
//! own invariants, on tiny random-weight Qwen3 checkpoints, on the CPU.

use inference_pio_core::types::{ChatMessage, DType, PromptInput, SamplingParams};
use inference_pio_engine::generate::{Engine, RowRequest};
use inference_pio_engine::testing::{all_logits, check_rows_equal_alone, greedy, ids, incremental_logits, load_cpu, rel_l2};
use qwen3_4b_instruct_2507::FAMILY;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(name: &str, dtype: DType) -> Engine {
    load_cpu(&FAMILY, &fixtures().join(name), dtype)
}

/// `name` on the CPU in f32 with these plugin settings.
fn load_with(name: &str, settings: impl FnOnce(&mut inference_pio_core::types::PluginSettings)) -> Engine {
    inference_pio_engine::testing::load_cpu_with(&FAMILY, &fixtures().join(name), DType::F32, settings)
}

fn chunking(tokens: u32) -> inference_pio_core::config::OptimizationSettings {
    inference_pio_core::config::OptimizationSettings { prefill_chunk_tokens: Some(tokens), ..Default::default() }
}

fn reference(name: &str) -> Value {
    inference_pio_engine::testing::reference(&fixtures(), name)
}

#[test]
fn f32_logits_and_greedy_tokens_match_transformers() {
    for name in ["qwen3-tiny-b", "qwen3-tiny-c"] {
        let engine = load(name, DType::F32);
        for prompt in reference(name)["prompts"].as_array().expect("prompts") {
            let input = ids(&prompt["ids"]);
            let got = all_logits(&engine, &input);
            let want = prompt["logits"].as_array().expect("logits");
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                let w: Vec<f32> = w.as_array().expect("row").iter().map(|x| x.as_f64().expect("f") as f32).collect();
                let err = rel_l2(g, &w);
                assert!(err <= 1e-4, "{name}, prompt of {} tokens: relative L2 {err}", input.len());
            }
            assert_eq!(greedy(&engine, &input, 16), ids(&prompt["greedy"]), "{name}, prompt of {} tokens", input.len());
        }
    }
}

#[test]
fn full_vocabulary_model_matches_transformers() {
    let engine = load("qwen3-tiny-a", DType::F32);
    for prompt in reference("qwen3-tiny-a")["prompts"].as_array().expect("prompts") {
        let input = ids(&prompt["ids"]);
        let bytes = std::fs::read(fixtures().join(prompt["last_logits_file"].as_str().expect("file"))).expect("row");
        let want: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let got = all_logits(&engine, &input);
        let err = rel_l2(got.last().expect("row"), &want);
        assert!(err <= 1e-4, "prompt of {} tokens: relative L2 {err}", input.len());
        assert_eq!(greedy(&engine, &input, 16), ids(&prompt["greedy"]));
    }
}

#[test]
fn bf16_logits_are_within_bf16_tolerance() {
    // Judged against transformers' own bf16 run (bf16 rounding alone moves its logits by up to
    // 3e-2 from its f32 run on these models), over all positions of each prompt.
    for name in ["qwen3-tiny-b", "qwen3-tiny-c"] {
        let engine = load(name, DType::Bf16);
        for prompt in reference(name)["prompts"].as_array().expect("prompts") {
            let input = ids(&prompt["ids"]);
            let got: Vec<f32> = all_logits(&engine, &input).concat();
            let want: Vec<f32> = prompt["logits_bf16"]
                .as_array()
                .expect("logits")
                .iter()
                .flat_map(|row| row.as_array().expect("row").iter().map(|x| x.as_f64().expect("f") as f32))
                .collect();
            let err = rel_l2(&got, &want);
            assert!(err <= 2e-2, "{name} bf16, prompt of {} tokens: relative L2 {err}", input.len());
        }
    }
}

#[test]
fn incremental_decode_equals_the_full_forward_pass() {
    let engine = load("qwen3-tiny-b", DType::F32);
    let prompt: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 500 + 3).collect();
    let full = all_logits(&engine, &prompt);
    // Prefill 7 tokens, then one at a time, over blocks of 4 tokens in scattered order.
    let rows = incremental_logits(&engine, &prompt, 7, 4);
    assert_eq!(rows.len(), full.len());
    for (i, (a, b)) in rows.iter().zip(&full).enumerate() {
        let err = rel_l2(a, b);
        assert!(err <= 1e-5, "position {i}: relative L2 {err}");
    }
}

#[test]
fn chunked_prefill_equals_one_pass() {
    let prompt: Vec<u32> = (0..30).map(|i| (i * 13 + 5) % 380 + 3).collect();
    let one_pass = greedy(&load("qwen3-tiny-c", DType::F32), &prompt, 12);
    let engine = load_with("qwen3-tiny-c", |s| s.optimization.prefill_chunk_tokens = Some(7));
    let mut timings = Default::default();
    let chunked = engine
        .generate_rows(vec![RowRequest::greedy(prompt.clone(), 12)], &chunking(7), &mut |_, _, _| true, &mut timings)
        .expect("generate");
    assert_eq!(chunked[0].new_ids, one_pass);
    // Scoring in chunks gives the one-pass logits.
    let full = all_logits(&load("qwen3-tiny-c", DType::F32), &prompt);
    for (i, (a, b)) in all_logits(&engine, &prompt).iter().zip(&full).enumerate() {
        assert!(rel_l2(a, b) <= 1e-5, "position {i}");
    }
}

#[test]
fn concurrent_rows_equal_one_by_one() {
    let engine = load("qwen3-tiny-b", DType::F32);
    let prompts: Vec<Vec<u32>> = vec![vec![5, 9, 200, 31], (0..19).map(|i| (i * 29 + 7) % 500 + 3).collect(), vec![77]];
    check_rows_equal_alone(&engine, &prompts, 10);
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    let engine = load("qwen3-tiny-a", DType::F32);
    let text = std::fs::read_to_string(fixtures().join("tokenizer.reference.json")).expect("fixture");
    let reference: Value = serde_json::from_str(&text).expect("json");
    for case in reference["tokenizer"].as_array().expect("cases") {
        let s = case["text"].as_str().expect("text");
        let encoded = engine.tokenizer.encode(s, true).expect("encode");
        assert_eq!(encoded, ids(&case["ids"]), "encode {s:?}");
        assert_eq!(engine.tokenizer.decode(&encoded, false).expect("decode"), case["decoded"].as_str().expect("decoded"));
    }
    let template = engine.template.as_ref().expect("template");
    for case in reference["chat_template"].as_array().expect("cases") {
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).expect("messages");
        let tools = case.get("tools");
        let agp = case["add_generation_prompt"].as_bool().expect("bool");
        let rendered = template.render(&messages, tools, agp).expect("render");
        assert_eq!(rendered, case["rendered"].as_str().expect("rendered"), "conversation {messages:?}");
    }
}

#[test]
fn streamed_text_equals_the_final_text() {
    let engine = load("qwen3-tiny-a", DType::F32);
    let mut streamed = String::new();
    let mut params = SamplingParams { greedy: true, ..Default::default() };
    params.values.max_new_tokens = Some(20);
    let input = PromptInput::Chat { messages: vec![ChatMessage::new("user", "Say something")], tools: None };
    let response = engine
        .generate(&input, &params, &[], &Default::default(), &Default::default(), &mut |_, t| {
            streamed.push_str(t);
            true
        })
        .expect("generate");
    assert_eq!(streamed, response.text);
    assert_eq!(response.token_ids.len(), 20);
    // Cancelling after three tokens stops generation.
    let mut seen = 0;
    let response = engine
        .generate(&input, &params, &[], &Default::default(), &Default::default(), &mut |_, _| {
            seen += 1;
            seen < 3
        })
        .expect("generate");
    assert_eq!(response.token_ids.len(), 3);
    assert_eq!(response.finish_reason, inference_pio_core::types::FinishReason::Cancelled);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let engine = load("qwen3-tiny-b", DType::F32);
    let run = |seed| {
        let mut params = SamplingParams { greedy: false, seed: Some(seed), ..Default::default() };
        params.values.temperature = Some(1.5);
        params.values.top_k = Some(50);
        params.values.max_new_tokens = Some(12);
        engine
            .generate(&PromptInput::TokenIds(vec![5, 6, 7]), &params, &[], &Default::default(), &Default::default(), &mut |_, _| true)
            .expect("generate")
            .token_ids
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn stop_strings_end_generation_and_are_not_streamed() {
    let engine = load("qwen3-tiny-a", DType::F32);
    let mut params = SamplingParams { greedy: true, ..Default::default() };
    params.values.max_new_tokens = Some(24);
    let input = PromptInput::TokenIds(vec![785, 6722, 315, 9625, 374]);
    let free = engine
        .generate(&input, &params, &[], &Default::default(), &Default::default(), &mut |_, _| true)
        .expect("generate");
    // Stop at a piece of the middle of the free-running text.
    let chars: Vec<char> = free.text.chars().collect();
    assert!(chars.len() > 8, "{:?}", free.text);
    let start = chars.len() / 2;
    let stop: String = chars[start..start + 3].iter().collect();
    let expected: String = free.text[..free.text.find(&stop).expect("stop occurs")].to_string();
    let mut streamed = String::new();
    let stopped = engine
        .generate(&input, &params, std::slice::from_ref(&stop), &Default::default(), &Default::default(), &mut |_, t| {
            streamed.push_str(t);
            true
        })
        .expect("generate");
    assert_eq!(stopped.finish_reason, inference_pio_core::types::FinishReason::Stop);
    assert_eq!(stopped.text, expected);
    assert_eq!(streamed, expected, "nothing of the stop string was streamed");
    assert!(stopped.token_ids.len() < free.token_ids.len());
}

#[test]
fn the_gpu_weight_layout_matches_transformers_too() {
    // Every linear (and the tied head) split into column blocks as on a GPU (split-K products).
    inference_pio_engine::testing::with_cpu_split(4, || {
        inference_pio_engine::testing::check_fixture(&FAMILY, &fixtures(), "qwen3-tiny-b", false);
    });
}


#[test]
fn sliding_window_attention_matches_transformers() {
    // Layers 1 and 2 attend to the last 5 tokens only (use_sliding_window, max_window_layers 1).
    inference_pio_engine::testing::check_fixture(&FAMILY, &fixtures(), "qwen3-tiny-sw", true);
    let engine = load("qwen3-tiny-sw", DType::F32);
    assert_eq!(engine.decoder.config.layer_windows, vec![None, Some(5), Some(5)]);
    // Decode steps and concurrent rows see the same window.
    let prompt: Vec<u32> = (0..23).map(|i| (i * 41 + 3) % 500 + 3).collect();
    let full = all_logits(&engine, &prompt);
    for (i, (a, b)) in incremental_logits(&engine, &prompt, 3, 4).iter().zip(&full).enumerate() {
        assert!(rel_l2(a, b) <= 1e-5, "position {i}");
    }
    check_rows_equal_alone(&engine, &[prompt, vec![7, 8, 9]], 12);
}

#[test]
fn tensor_parallel_ranks_on_the_cpu_equal_the_whole_model() {
    use inference_pio_engine::testing::check_tensor_parallel;
    let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 11) % 500 + 3).collect();
    // tiny-a: 4 heads over 2 KV heads, tied embeddings; at 4 ranks each KV head is replicated.
    for ranks in [2, 4] {
        check_tensor_parallel(&FAMILY, &fixtures().join("qwen3-tiny-a"), ranks, &prompt, 4);
    }
    // tiny-b: biases on q/k/v/o (o's added once, by rank 0), an untied head.
    check_tensor_parallel(&FAMILY, &fixtures().join("qwen3-tiny-b"), 2, &prompt, 4);
}

#[test]
fn decode_steps_past_the_first_rotary_table_equal_the_prompt_pass() {
    inference_pio_engine::testing::check_rope_tables_grow(&FAMILY, &fixtures().join("qwen3-tiny-a"));
}
