//! Images end to end through the real binary and the real `qwen3-vl-2b` plugin, on the tiny
//! Qwen3-VL fixture (`plugins/qwen3-vl-2b/tests/fixtures`): `run --image` and chat's `/image`
//! give transformers' greedy tokens for the fixture's one-image prompt, a model without a
//! vision tower refuses images by name, and bad image files are named.

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_inference-pio");

fn vl_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/qwen3-vl-2b/tests/fixtures")
}

fn inference_pio(args: &[&str], dir: &Path, stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("INFERENCE_PIO_PLUGIN_DIR")
        .env_remove("INFERENCE_PIO_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn inference-pio");
    child.stdin.take().expect("stdin").write_all(stdin).expect("write stdin");
    child.wait_with_output().expect("inference-pio")
}

fn one_image_case() -> Value {
    let text = std::fs::read_to_string(vl_fixtures().join("vl-tiny-a.reference.json")).expect("reference");
    let reference: Value = serde_json::from_str(&text).expect("json");
    reference["cases"].as_array().expect("cases").iter().find(|c| c["case"] == "one-image").expect("one-image").clone()
}

const GREEDY: [&str; 7] = ["--greedy", "--ignore-eos", "--max-new-tokens", "16", "--device", "cpu", "--dtype"];

#[test]
fn run_with_an_image_file_gives_transformers_tokens_and_chat_the_same_answer() {
    let cwd = tempfile::tempdir().expect("cwd");
    let model = vl_fixtures().join("vl-tiny-a");
    let image = vl_fixtures().join("image-40x56.png");
    let (model, image) = (model.to_str().expect("utf8"), image.to_str().expect("utf8"));
    let mut args = vec!["run", "--model", model, "--image", image, "--prompt", "What is this?", "--json"];
    args.extend(GREEDY);
    args.push("f32");
    let out = inference_pio(&args, cwd.path(), b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let result: Value = serde_json::from_slice(&out.stdout).expect("json");
    let case = one_image_case();
    // The chat template's prompt with the image's pad expanded, as transformers' processor.
    assert_eq!(result["prompt_token_ids"], case["ids"]);
    assert_eq!(result["token_ids"], case["greedy"]);

    // chat: `/image FILE` goes with the next message; the answer is the same text.
    let mut args = vec!["chat", "--model", model];
    args.extend(GREEDY);
    args.push("f32");
    let input = format!("/image {image}\nWhat is this?\n/exit\n");
    let out = inference_pio(&args, cwd.path(), input.as_bytes());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("attached to your next message"), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{}\n", result["text"].as_str().expect("text")));
}

#[test]
fn images_are_refused_by_name_where_they_cannot_go() {
    let cwd = tempfile::tempdir().expect("cwd");
    let image = vl_fixtures().join("image-40x56.png");
    let image = image.to_str().expect("utf8");
    // A text-only model.
    let dense = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tiny-b");
    let out = inference_pio(&["run", "--model", dense.to_str().expect("utf8"), "--image", image, "--prompt", "hi", "--device", "cpu"], cwd.path(), b"");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("this model does not take images"), "{err}");
    // Not an image, and a missing file.
    let model = vl_fixtures().join("vl-tiny-a");
    let model = model.to_str().expect("utf8");
    let not_image = cwd.path().join("notes.txt");
    std::fs::write(&not_image, "hello").expect("write");
    let out = inference_pio(&["run", "--model", model, "--image", not_image.to_str().expect("utf8"), "--prompt", "hi", "--device", "cpu"], cwd.path(), b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("image 0: unsupported image: the data is not a PNG, JPEG or WebP image"), "{err}");
    let out = inference_pio(&["run", "--model", model, "--image", "/no/such/image.png", "--prompt", "hi", "--device", "cpu"], cwd.path(), b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot read image /no/such/image.png"), "{err}");
    // --image needs --prompt (a chat turn to place it in), not raw text.
    let out = inference_pio(&["run", "--model", model, "--image", image, "--prompt", "hi", "--raw"], cwd.path(), b"");
    assert_eq!(out.status.code(), Some(2), "clap usage error");
}

/// A copy of a fixture directory with its symlinks resolved (the worker's jail binds the
/// model directory alone, so links out of it would dangle there), readable by `nobody`.
fn resolved_copy(from: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(from).expect("fixture dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
        }
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

#[test]
fn images_reach_a_plugin_jailed_at_maximum_security() {
    // The host reads the file; the sandboxed worker decodes it (untrusted bytes meet only the
    // jailed plugin) and answers with transformers' tokens.
    let cwd = tempfile::tempdir().expect("cwd");
    let model = resolved_copy(&vl_fixtures().join("vl-tiny-a"));
    let library = Path::new(BIN).parent().expect("dir").join(format!("libqwen3_vl_2b{}", std::env::consts::DLL_SUFFIX));
    let sha = inference_pio_host::digest::sha256_file(&library).expect("hash");
    std::fs::write(
        cwd.path().join("inference-pio.toml"),
        format!("[plugins.qwen3-vl-2b]\nsecurity = \"maximum\"\nallow_degraded = true\nsha256 = \"{sha}\"\n"),
    )
    .expect("config");
    let image = vl_fixtures().join("image-40x56.png");
    let mut args = vec!["run", "--model", model.path().to_str().expect("utf8"), "--image", image.to_str().expect("utf8"), "--prompt", "What is this?", "--json"];
    args.extend(GREEDY);
    args.push("f32");
    let out = inference_pio(&args, cwd.path(), b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let result: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(result["token_ids"], one_image_case()["greedy"]);
}
