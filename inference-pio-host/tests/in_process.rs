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
    let request = |stop: &str| InferRequest { input: PromptInput::TokenIds(vec![1, 2]), sampling: Default::default(), stop: vec![stop.to_string()] };

    // A call that does not panic works and streams.
    let mut streamed = Vec::new();
    let ok = panicking.infer(info.handle, &request("no-panic"), &mut |id, text| {
        streamed.push((id, text.to_string()));
        true
    });
    assert_eq!(ok.expect("infer").token_ids, vec![1, 2]);
    assert_eq!(streamed, vec![(1, "partial ".to_string())]);

    let err = panicking.infer(info.handle, &request("x"), &mut |_, _| true).expect_err("panics");
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
