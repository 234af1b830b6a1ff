//! The host library with plugins loaded into the test process: a panicking plugin poisons
//! itself and only itself; the host and other plugins keep working.

use inference_pio_core::ErrorKind;
use inference_pio_core::types::{InferRequest, LoadOptions, PluginSettings, PromptInput};
use inference_pio_host::plugin::LoadedPlugin;
use std::path::{Path, PathBuf};

fn lib(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_inference-pio")).parent().expect("dir").to_path_buf();
    let path = dir.join(format!("lib{name}{}", std::env::consts::DLL_SUFFIX));
    assert!(path.is_file(), "{} is missing: run `cargo build --workspace` before the tests", path.display());
    path
}

#[test]
fn a_panic_marks_only_that_plugin_unusable() {
    let panicking = LoadedPlugin::open(&lib("pio_test_plugin_panicking")).expect("open");
    let qwen = LoadedPlugin::open(&lib("qwen3_4b_instruct_2507")).expect("open");
    panicking.initialize(&PluginSettings::default()).expect("init");
    let info = panicking.load_model(Path::new("/tmp/anything"), &LoadOptions::default()).expect("load");
    let request = |stop: &str| InferRequest { input: PromptInput::TokenIds(vec![1, 2]), sampling: Default::default(), stop: vec![stop.to_string()], cache_salt: String::new(), logprobs: None, constraint: None, images: Vec::new() };

    // A call that does not panic works and streams.
    let mut streamed = Vec::new();
    let ok = panicking.infer(info.handle, &request("no-panic"), &mut |id, text, _| {
        streamed.push((id, text.to_string()));
        true
    });
    assert_eq!(ok.expect("infer").token_ids, vec![1, 2]);
    assert_eq!(streamed, vec![(1, "partial ".to_string())]);

    let err = panicking.infer(info.handle, &request("x"), &mut |_, _, _| true).expect_err("panics");
    assert_eq!(err.kind, ErrorKind::Poisoned);
    assert!(err.message.contains("test plugin panics in infer"), "{err}");
    assert!(!panicking.is_usable());
    let err = panicking.metadata().expect_err("refused after the panic");
    assert!(err.message.contains("unusable"), "{err}");

    // The other plugin is untouched.
    assert!(qwen.is_usable());
    assert_eq!(qwen.metadata().expect("metadata").id, "qwen3-4b-instruct-2507");
}

#[test]
fn wrong_abi_and_non_plugins_are_refused_with_reasons() {
    let err = LoadedPlugin::open(&lib("pio_test_plugin_wrong_abi")).err().expect("wrong abi");
    assert!(err.contains("ABI major version 2") && err.contains("speaks 1"), "{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = dir.path().join("libfake.so");
    std::fs::write(&fake, b"\x7fELF garbage").expect("write");
    let err = LoadedPlugin::open(&fake).err().expect("garbage");
    assert!(err.contains("cannot be loaded as a shared library"), "{err}");
}

#[test]
fn update_config_applies_live_settings_and_refuses_the_rest() {
    use inference_pio_core::config::SecurityLevel;
    use inference_pio_core::types::{ConfigUpdate, DType, DeviceRequest, SamplingOverrides, SamplingParams};
    let qwen = LoadedPlugin::open(&lib("qwen3_4b_instruct_2507")).expect("open");
    let mut settings = PluginSettings::default();
    settings.limits.memory_gb = Some(4.0);
    qwen.initialize(&settings).expect("init");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tiny-b");
    let info = qwen
        .load_model(&model, &LoadOptions { device: DeviceRequest::Cpu, dtype: Some(DType::F32), random_weights: None })
        .expect("load");
    let request = InferRequest {
        input: PromptInput::TokenIds(vec![5, 6, 7]),
        sampling: SamplingParams { greedy: true, ..Default::default() },
        stop: vec![],
        cache_salt: String::new(), logprobs: None, constraint: None, images: Vec::new(),
    };

    let mut optimization = inference_pio_core::config::Profile::Accuracy.settings();
    optimization.dtype = Some(DType::Bf16);
    let mut limits = settings.limits.clone();
    limits.memory_gb = Some(64.0);
    let update = ConfigUpdate {
        sampling_defaults: Some(SamplingOverrides { max_new_tokens: Some(3), ..Default::default() }),
        limits: Some(limits),
        optimization: Some(optimization),
        security: Some(SecurityLevel::High),
    };
    let outcome = qwen.update_config(&update).expect("update");
    assert_eq!(outcome.applied, vec!["sampling_defaults".to_string()]);
    assert!(outcome.refused["limits"].contains("only tighten"), "{outcome:?}");
    assert!(outcome.refused["optimization.dtype"].contains("reload"), "{outcome:?}");
    assert!(outcome.refused["security"].contains("fixed"), "{outcome:?}");
    // The new default is in force for the next request.
    let response = qwen.infer(info.handle, &request, &mut |_, _, _| true).expect("infer");
    assert_eq!(response.token_ids.len(), 3);

    // Tightening is applied; below the loaded model's size it is refused.
    let tighter = |gb: f64| ConfigUpdate {
        limits: Some(inference_pio_core::config::ResourceLimits { memory_gb: Some(gb), ..Default::default() }),
        ..Default::default()
    };
    assert_eq!(qwen.update_config(&tighter(2.0)).expect("update").applied, vec!["limits".to_string()]);
    let outcome = qwen.update_config(&tighter(0.00001)).expect("update");
    assert!(outcome.refused["limits"].contains("already uses more"), "{outcome:?}");

    qwen.cleanup(info.handle).expect("cleanup");
    let err = qwen.infer(info.handle, &request, &mut |_, _, _| true).expect_err("cleaned up");
    assert_eq!(err.kind, ErrorKind::UnknownModel);
}
