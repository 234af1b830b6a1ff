//! Benchmark (not a test): what the worker boundary of security levels `high`/`maximum` costs
//! per streamed token and per request, against the same plugin in-process. Uses the hostile
//! test plugin's `stream:N` (tokens cost nothing to make, so the difference is the boundary).
//!
//! `cargo build -p inference-pio-host -p pio-test-plugin-hostile && cargo run -p inference-pio-host --example worker_overhead`

use inference_pio_core::config::{ResourceLimits, SecurityLevel};
use inference_pio_core::types::{InferRequest, LoadOptions, PluginSettings, PromptInput};
use inference_pio_host::handle::PluginHandle;
use inference_pio_host::plugin::LoadedPlugin;
use inference_pio_host::digest::sha256_file;
use inference_pio_host::worker::{WorkerConfig, WorkerPlugin};
use std::path::Path;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let dir = std::env::current_exe()?.parent().and_then(Path::parent).map(Path::to_path_buf).ok_or_else(|| anyhow::anyhow!("no target dir"))?;
    let exe = dir.join("inference-pio");
    let plugin = dir.join(format!("libpio_test_plugin_hostile{}", std::env::consts::DLL_SUFFIX));
    anyhow::ensure!(exe.is_file() && plugin.is_file(), "build first: cargo build -p inference-pio-host -p pio-test-plugin-hostile");
    let tokens: u32 = 20_000;
    let requests = 200;
    println!("| where | per token (µs) | per request round trip (µs) |\n|---|---|---|");
    let in_process = PluginHandle::InProcess(LoadedPlugin::open(&plugin).map_err(anyhow::Error::msg)?);
    measure("in-process (low)", &in_process, tokens, requests)?;
    for level in [SecurityLevel::High, SecurityLevel::Maximum] {
        let config = WorkerConfig {
            exe: exe.clone(),
            id: "test-hostile".into(),
            plugin: plugin.clone(),
            level,
            limits: ResourceLimits::default(),
            allow_degraded: true,
            sha256: Some(sha256_file(&plugin).map_err(anyhow::Error::msg)?),
            timeout: Duration::from_secs(60),
            model: None,
            worker_uid: None,
            worker_gid: None,
            cache_dir: None,
            user_namespace: true,
        };
        let worker = PluginHandle::Worker(Box::new(WorkerPlugin::start(config).map_err(anyhow::Error::msg)?));
        measure(&format!("worker ({})", level.as_str()), &worker, tokens, requests)?;
    }
    Ok(())
}

fn measure(name: &str, plugin: &PluginHandle, tokens: u32, requests: u32) -> anyhow::Result<()> {
    plugin.initialize(&PluginSettings::default())?;
    let model = plugin.load_model(Path::new("/tmp"), &LoadOptions::default())?.handle;
    let request = |text: String| InferRequest { input: PromptInput::Text(text), sampling: Default::default(), stop: vec![], cache_salt: String::new(), logprobs: None, constraint: None, images: Vec::new() };
    let stream = request(format!("stream:{tokens}"));
    let mut seen = 0u32;
    plugin.infer(model, &stream, &mut |_, _, _| true)?; // warm-up
    let start = Instant::now();
    plugin.infer(model, &stream, &mut |_, _, _| {
        seen += 1;
        true
    })?;
    let per_token = start.elapsed().as_secs_f64() / f64::from(tokens) * 1e6;
    anyhow::ensure!(seen == tokens, "{seen} tokens streamed, {tokens} expected");
    let echo = request("echo".into());
    let start = Instant::now();
    for _ in 0..requests {
        plugin.infer(model, &echo, &mut |_, _, _| true)?;
    }
    let per_request = start.elapsed().as_secs_f64() / f64::from(requests) * 1e6;
    println!("| {name} | {per_token:.3} | {per_request:.1} |");
    Ok(())
}
