//! Bad model directories and requests get errors that name the problem, never a panic.

use inference_pio_core::types::{DType, DeviceRequest, InferRequest, LoadOptions, PluginSettings, PromptInput, SamplingParams};
use inference_pio_engine::plugin::load_engine;
use qwen3_4b_instruct_2507::FAMILY;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A writable copy of a fixture model directory (tokenizer files resolved).
fn copy_of(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture(name)).expect("fixture") {
        let path = entry.expect("entry").path();
        let target = dir.path().join(path.file_name().expect("name"));
        std::fs::copy(std::fs::canonicalize(&path).expect("resolve"), target).expect("copy");
    }
    dir
}

fn try_load(dir: &Path, settings: &PluginSettings) -> Result<inference_pio_engine::generate::Engine, String> {
    let options = LoadOptions { device: DeviceRequest::Cpu, dtype: Some(DType::F32), random_weights: None };
    load_engine(&FAMILY, dir, &options, settings).map(|(e, _)| e).map_err(|e| e.to_string())
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    edit(&mut config);
    std::fs::write(path, config.to_string()).expect("write");
}

#[test]
fn missing_and_truncated_weights() {
    let dir = copy_of("qwen3-tiny-b");
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("read");
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = try_load(dir.path(), &PluginSettings::default()).err().expect("truncated");
    assert!(err.contains("model.safetensors") && err.contains("not a valid safetensors"), "{err}");
    std::fs::remove_file(&weights).expect("remove");
    let err = try_load(dir.path(), &PluginSettings::default()).err().expect("missing");
    assert!(err.contains("no model.safetensors"), "{err}");
}

#[test]
fn shape_disagreeing_with_the_config_names_the_tensor() {
    let dir = copy_of("qwen3-tiny-b");
    edit_config(dir.path(), |c| c["intermediate_size"] = 128.into());
    let err = try_load(dir.path(), &PluginSettings::default()).err().expect("shape");
    assert!(err.contains("model.layers.0.mlp.gate_proj.weight") && err.contains("[96, 64]"), "{err}");
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = copy_of("qwen3-tiny-b");
    // Rewrite the checkpoint with one tensor stored as I32 (same byte size as F32 would not
    // fit bf16, so rebuild the header and data).
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    header["model.norm.weight"]["dtype"] = "I16".into();
    let mut text = header.to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).expect("write");
    let err = try_load(dir.path(), &PluginSettings::default()).err().expect("dtype");
    assert!(err.contains("model.norm.weight") && err.contains("I16"), "{err}");
}

#[test]
fn unknown_architecture_and_malformed_config() {
    let dir = copy_of("qwen3-tiny-b");
    edit_config(dir.path(), |c| c["architectures"] = serde_json::json!(["MambaForCausalLM"]));
    let err = try_load(dir.path(), &PluginSettings::default()).err().expect("arch");
    assert!(err.contains("MambaForCausalLM"), "{err}");
    std::fs::write(dir.path().join("config.json"), "{ not json").expect("write");
    let err = try_load(dir.path(), &PluginSettings::default()).err().expect("json");
    assert!(err.contains("config.json") && err.contains("not valid JSON"), "{err}");
}

#[test]
fn memory_limit_refuses_before_loading_with_the_numbers() {
    let mut settings = PluginSettings::default();
    settings.limits.memory_gb = Some(0.0001);
    let err = try_load(&fixture("qwen3-tiny-b"), &settings).err().expect("limit");
    assert!(err.contains("memory_gb") && err.contains("0.0001") && err.contains("GB"), "{err}");
}

#[test]
fn prompts_longer_than_the_context_and_bad_ids_are_refused() {
    let mut settings = PluginSettings::default();
    settings.optimization.max_context_tokens = Some(8);
    let engine = try_load(&fixture("qwen3-tiny-b"), &settings).expect("load");
    let run = |ids: Vec<u32>| {
        engine
            .generate(&PromptInput::TokenIds(ids), &SamplingParams { greedy: true, ..Default::default() }, &[], &Default::default(), &Default::default(), &mut |_, _| true)
            .err()
            .map(|e| e.to_string())
    };
    let err = run((3..20).collect()).expect("too long");
    assert!(err.contains("17 tokens") && err.contains("context of 8"), "{err}");
    let err = run(vec![5, 9999]).expect("bad id");
    assert!(err.contains("9999") && err.contains("vocabulary"), "{err}");
    // Generation stops at the context instead of overflowing it.
    let mut params = SamplingParams { greedy: true, ..Default::default() };
    params.values.max_new_tokens = Some(100);
    let response = engine
        .generate(&PromptInput::TokenIds(vec![5, 6, 7]), &params, &[], &Default::default(), &Default::default(), &mut |_, _| true)
        .expect("generate");
    assert!(response.token_ids.len() <= 5, "{:?}", response.token_ids);
    assert_eq!(response.finish_reason, inference_pio_core::types::FinishReason::ContextFull);
    // In a batch, the bad request is named by its position, and the others are not run.
    let request = |ids: Vec<u32>| InferRequest { input: PromptInput::TokenIds(ids), sampling: params.clone(), stop: vec![], cache_salt: String::new(), logprobs: None, constraint: None, images: Vec::new() };
    let err = engine
        .generate_batch(&[request(vec![5, 6]), request(vec![5, 9999])], &Default::default(), &Default::default())
        .expect_err("bad id in row 1")
        .to_string();
    assert!(err.contains("request 1 of the batch") && err.contains("9999"), "{err}");
    // Rows of different lengths each stop at the context.
    let batch = engine
        .generate_batch(&[request(vec![5, 6, 7]), request(vec![5])], &Default::default(), &Default::default())
        .expect("batch");
    assert_eq!(batch.responses.len(), 2);
    assert_eq!(batch.responses[0].token_ids, response.token_ids, "a padded batch row differs from the single run");
    assert!(batch.responses.iter().all(|r| r.finish_reason == inference_pio_core::types::FinishReason::ContextFull));
    assert_eq!(batch.timings.generated_tokens, batch.responses.iter().map(|r| r.token_ids.len() as u64).sum::<u64>());
}

#[test]
fn sharded_checkpoints_load_like_single_files() {
    use safetensors::SafeTensors;
    let single = fixture("qwen3-tiny-b");
    let bytes = std::fs::read(single.join("model.safetensors")).expect("read");
    let tensors = SafeTensors::deserialize(&bytes).expect("parse");
    let dir = copy_of("qwen3-tiny-b");
    std::fs::remove_file(dir.path().join("model.safetensors")).expect("remove");
    let mut names: Vec<String> = tensors.names().iter().map(|s| s.to_string()).collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
            part.iter().map(|n| (n.clone(), tensors.tensor(n).expect("tensor"))).collect();
        safetensors::serialize_to_file(views, None, &dir.path().join(file)).expect("write shard");
        for n in part {
            weight_map.insert(n.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).expect("index");
    let sharded = try_load(dir.path(), &PluginSettings::default()).expect("sharded load");
    let whole = try_load(&single, &PluginSettings::default()).expect("single load");
    let prompt = PromptInput::TokenIds(vec![5, 17, 200, 3, 99]);
    let a = sharded.score(&prompt, true).expect("score").logits.expect("logits");
    let b = whole.score(&prompt, true).expect("score").logits.expect("logits");
    assert_eq!(a, b);

    // An index that names a tensor its shard lacks is refused by name.
    weight_map_insert_missing(dir.path());
    let err = try_load(dir.path(), &PluginSettings::default()).err().expect("bad index");
    assert!(err.contains("`model.layers.99.mlp.up_proj.weight`"), "{err}");
}

fn weight_map_insert_missing(dir: &Path) {
    let path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    index["weight_map"]["model.layers.99.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(path, index.to_string()).expect("write");
}

#[test]
fn cuda_without_a_driver_is_a_clear_error() {
    if Path::new("/dev/nvidia0").exists() || Path::new("/proc/driver/nvidia/version").exists() {
        return; // a GPU machine: nothing to check here
    }
    let options = LoadOptions { device: DeviceRequest::Cuda(0), dtype: None, random_weights: None };
    let err = load_engine(&FAMILY, &fixture("qwen3-tiny-b"), &options, &PluginSettings::default()).err().expect("no driver");
    assert!(err.to_string().contains("no NVIDIA driver"), "{err}");
}
