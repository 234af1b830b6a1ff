//! `inference-pio plugins check` end to end: every plugin of the workspace passes the
//! conformance suite on its tiny fixture, in process and through the sandboxed worker; a
//! plugin that panics fails it, check by check, and the host reports instead of crashing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_inference-pio");

/// A copy of a fixture directory with its symlinks resolved (the worker's jail binds the
/// model directory alone, so links out of it would dangle there).
fn fixture(relative: &str) -> tempfile::TempDir {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative);
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&from).expect("fixture dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
        }
    }
    // A root host's worker runs as `nobody`: the copy must be readable by it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn check(plugin: &str, model: &Path) -> (bool, String) {
    check_in(plugin, model, model)
}

/// Runs `plugins check` from `cwd` (no `inference-pio.toml` there).
fn check_in(plugin: &str, model: &Path, cwd: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["plugins", "check", plugin, "--model"])
        .arg(model)
        .env_remove("INFERENCE_PIO_CONFIG")
        .env_remove("INFERENCE_PIO_PLUGIN_DIR")
        .current_dir(cwd)
        .output()
        .expect("run plugins check");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn passes(id: &str, fixture_dir: &str) {
    let model = fixture(fixture_dir);
    let (ok, out) = check(id, model.path());
    assert!(ok, "{id} failed its conformance checks:\n{out}");
    for level in ["low", "high"] {
        assert!(out.contains(&format!("at security level {level}")), "{out}");
    }
    assert!(!out.contains("FAIL"), "{out}");
    assert!(out.contains("26 checks: 26 passed, 0 failed"), "{out}");
}

#[test]
fn qwen3_4b_passes_the_conformance_suite() {
    passes("qwen3-4b-instruct-2507", "plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tiny-a");
}

#[test]
fn qwen3_coder_passes_the_conformance_suite() {
    // The MoE fixture's 512-token vocabulary cannot take text through Qwen3's tokenizer: the
    // check runs on the same model grown to the whole vocabulary.
    let model = tempfile::tempdir().expect("model dir");
    common::full_vocabulary_moe(model.path());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(model.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (ok, out) = check("qwen3-coder-30b", model.path());
    assert!(ok && out.contains("26 checks: 26 passed, 0 failed"), "{out}");
}

#[test]
fn qwen3_vl_passes_the_conformance_suite() {
    passes("qwen3-vl-2b", "plugins/qwen3-vl-2b/tests/fixtures/vl-tiny-a");
}

#[test]
fn glm_passes_the_conformance_suite() {
    passes("glm-4-7", "plugins/glm-4-7/tests/fixtures/glm4moe-tiny-a");
}

#[test]
fn llama_passes_the_conformance_suite_on_the_built_in_default_model() {
    // The built-in SmolLM2 GGUF (`.ci/run` fetches it before the tests); its tiny fixture's
    // vocabulary is smaller than its tokenizer's.
    let cwd = tempfile::tempdir().expect("cwd");
    let (ok, out) = check_in("llama", Path::new("smollm2-135m-instruct"), cwd.path());
    assert!(ok && out.contains("passed, 0 failed"), "{out}");
}

#[test]
fn a_plugin_that_panics_fails_its_checks_and_the_host_reports_them() {
    let library: PathBuf = Path::new(BIN).parent().expect("dir").join(format!("libpio_test_plugin_panicking{}", std::env::consts::DLL_SUFFIX));
    assert!(library.is_file(), "{} is missing: run `cargo build --workspace` before the tests", library.display());
    let model = tempfile::tempdir().expect("model dir");
    std::fs::write(model.path().join("config.json"), r#"{"architectures": ["PioTesttestpanickingForCausalLM"]}"#).expect("config");
    let (ok, out) = check(library.to_str().expect("utf8"), model.path());
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL generate_text") && out.contains("panicked"), "{out}");
    assert!(out.contains("failed") && out.contains("conformance checks"), "{out}");
}
