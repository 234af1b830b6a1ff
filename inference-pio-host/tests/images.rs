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
