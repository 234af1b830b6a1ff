//! A plugin's declaration (`export_plugin!(id = ...)`, the `.inference_pio` section) is read
//! from the file without loading it: a pinned sha256 that does not match refuses the file
//! before any of its code runs, and a probe must answer the id the file declares.

use inference_pio_host::digest::sha256_file;
use inference_pio_host::discovery::{Discovery, ProbeOutcome, declared_id};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_inference-pio");

fn built(name: &str) -> PathBuf {
    let path = Path::new(BIN).parent().expect("dir").join(format!("lib{name}{}", std::env::consts::DLL_SUFFIX));
    assert!(path.is_file(), "{} is missing: run `cargo build --workspace` before the tests", path.display());
    path
}

/// A fresh directory holding a copy of `file` (optionally patched), for one discovery run.
fn dir_with(file: &Path, tag: &str, patch: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pio-declaration-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut bytes = std::fs::read(file).expect("read plugin");
    patch(&mut bytes);
    std::fs::write(dir.join(file.file_name().expect("name")), bytes).expect("write copy");
    dir
}

fn discover(dir: &Path, pins: &[(&str, String)]) -> ProbeOutcome {
    let pins: BTreeMap<String, String> = pins.iter().map(|(id, h)| (id.to_string(), h.clone())).collect();
    let discovery = Discovery::run(vec![dir.to_path_buf()], Path::new(BIN), Duration::from_secs(30), &pins);
    assert_eq!(discovery.records.len(), 1, "{:?}", discovery.records);
    discovery.records[0].outcome.clone()
}

#[test]
fn plugins_declare_their_id_in_the_file() {
    assert_eq!(declared_id(&built("pio_test_plugin_hostile")).expect("readable"), Some("test-hostile".into()));
    assert_eq!(declared_id(&built("llama")).expect("readable"), Some("llama".into()));
    // Declaring is optional; such files are probed as before.
    assert_eq!(declared_id(&built("pio_test_plugin_panicking")).expect("readable"), None);
}

#[test]
fn a_pinned_hash_that_differs_refuses_the_file_before_its_code_runs() {
    let hostile = built("pio_test_plugin_hostile");
    let dir = dir_with(&hostile, "pinned", |_| {});
    let wrong = "0".repeat(64);
    match discover(&dir, &[("test-hostile", wrong)]) {
        ProbeOutcome::Rejected(reason) => {
            assert!(reason.contains("sha256 mismatch") && reason.contains("before any of its code ran"), "{reason}")
        }
        other => panic!("accepted despite the pin: {other:?}"),
    }
    // The right pin: probed and accepted.
    let right = sha256_file(&hostile).expect("hash");
    assert!(matches!(discover(&dir, &[("test-hostile", right)]), ProbeOutcome::Accepted(m) if m.id == "test-hostile"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_file_must_answer_the_id_it_declares() {
    // The declaration says `test-hostilX`; the library's metadata still answers `test-hostile`.
    let dir = dir_with(&built("pio_test_plugin_hostile"), "mismatch", |bytes| {
        let magic = inference_pio_core::export::NOTE_MAGIC;
        let at = bytes.windows(magic.len()).position(|w| w == magic).expect("declaration in the file");
        let id_end = at + 20 + "test-hostile".len();
        bytes[id_end - 1] = b'X';
    });
    match discover(&dir, &[]) {
        ProbeOutcome::Rejected(reason) => assert!(reason.contains("declares plugin id `test-hostilX`") && reason.contains("`test-hostile`"), "{reason}"),
        other => panic!("accepted: {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The probe cache (`plugin-probes.json`): an unchanged file's answer is reused, a touched
/// file is probed again, another executable's answers are not used, and a pinned id is
/// checked at every run whatever the cache says.
#[test]
fn probe_answers_are_kept_for_unchanged_files_only() {
    let hostile = built("pio_test_plugin_hostile");
    let dir = dir_with(&hostile, "cache", |_| {});
    let file = dir.join(hostile.file_name().expect("name"));
    let cache = dir.join("cache").join("plugin-probes.json");
    let run = |pins: &BTreeMap<String, String>| {
        let d = Discovery::run_cached(vec![dir.clone()], Path::new(BIN), Duration::from_secs(30), pins, Some(&cache));
        assert_eq!(d.records.len(), 1, "{:?}", d.records);
        d.records[0].outcome.clone()
    };
    let none = BTreeMap::new();
    assert!(matches!(run(&none), ProbeOutcome::Accepted(m) if m.id == "test-hostile"));
    // Mark the kept answer, so that a run which uses it says so.
    let mark = |text: &str| {
        let mut kept: serde_json::Value = serde_json::from_slice(&std::fs::read(&cache).expect("cache written")).expect("json");
        let entry = &mut kept["entries"][file.to_str().expect("utf-8 path")];
        assert!(entry.is_array(), "no entry for {}: {kept}", file.display());
        entry[1] = serde_json::json!({ "rejected": text });
        std::fs::write(&cache, serde_json::to_vec(&kept).expect("json")).expect("write cache");
    };
    mark("kept answer");
    assert!(matches!(run(&none), ProbeOutcome::Rejected(r) if r == "kept answer"));
    // A pinned id: hashed and probed, not taken from the cache.
    let right: BTreeMap<String, String> = [("test-hostile".to_string(), sha256_file(&hostile).expect("hash"))].into();
    assert!(matches!(run(&right), ProbeOutcome::Accepted(_)));
    // Another executable's answers are not used.
    mark("kept answer");
    let mut kept: serde_json::Value = serde_json::from_slice(&std::fs::read(&cache).expect("cache")).expect("json");
    kept["host"]["len"] = serde_json::json!(1);
    std::fs::write(&cache, serde_json::to_vec(&kept).expect("json")).expect("write cache");
    assert!(matches!(run(&none), ProbeOutcome::Accepted(_)));
    // The same bytes written again (new times): probed again.
    mark("kept answer");
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&file, std::fs::read(&hostile).expect("read")).expect("rewrite");
    assert!(matches!(run(&none), ProbeOutcome::Accepted(_)));
    let _ = std::fs::remove_dir_all(&dir);
}
