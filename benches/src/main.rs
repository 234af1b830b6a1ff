//! `pio-bench`: runs `inference-pio run --json` as a user would, in one or more processes, and
//! records time to first token (the first run of a process, and warm runs after it), prefill and
//! decode throughput at a batch size, the peak GPU memory of the host process (sampled through
//! NVML while it runs) and its peak resident memory, as JSON with device, date, commit and
//! command.
//!
//! Every process runs the request `--runs` times (`inference-pio run --repeat`): the first run
//! of the first process builds and tunes kernels (cold), the first run of a later process reuses
//! the on-disk kernel cache (warm cache), and later runs in a process are warm. The `median_*`
//! figures are over the warm runs (every run when `--runs 1`).

use anyhow::{Context, bail};
use clap::Parser;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Benchmark inference-pio through its CLI")]
struct Args {
    /// The inference-pio binary.
    #[arg(long, default_value = "target/release/inference-pio")]
    host: PathBuf,
    #[arg(long)]
    model: PathBuf,
    /// A host configuration file (`inference-pio --config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Ignore the checkpoint: deterministic random weights from `config.json` (`--random-weights`).
    #[arg(long)]
    random_weights: bool,
    /// Prompt length in tokens (ids 1000.. are used).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Rows decoded together (`inference-pio run --batch`), each with the same prompt.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Processes started one after another.
    #[arg(long = "processes", alias = "repeats", default_value_t = 3)]
    processes: usize,
    /// Runs of the request in each process (the first is cold, the rest warm).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Seconds each process may take.
    #[arg(long, default_value_t = 1800)]
    timeout_s: u64,
    /// Where to write the JSON result.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Free-form label of the machine (e.g. "2-core x86-64 CI VM").
    #[arg(long, default_value = "unknown")]
    machine: String,
    /// The commit the binaries were built from, when the benchmark runs outside that checkout
    /// (a copy on another machine); default: `git rev-parse --short HEAD` here.
    #[arg(long)]
    commit: Option<String>,
}

fn peak_rss_of_children_kib() -> i64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_CHILDREN with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_maxrss
}

/// The largest GPU memory NVML reported for `pid` while `done` was unset (`None` without NVML).
fn watch_gpu_memory(pid: u32, done: Arc<AtomicBool>) -> std::thread::JoinHandle<Option<u64>> {
    std::thread::spawn(move || {
        let nvml = nvml_wrapper::Nvml::init().ok()?;
        let mut peak = 0;
        while !done.load(Ordering::SeqCst) {
            peak = peak.max(inference_pio_host::worker::gpu_bytes(&nvml, pid));
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(peak)
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn command_output(args: &[&str]) -> String {
    Command::new(args[0]).args(&args[1..]).output().ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()).map(|s| s.trim().to_string()).unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.batch == 0 || args.runs == 0 || args.processes == 0 {
        bail!("--batch, --runs and --processes must be at least 1");
    }
    let ids: Vec<String> = (0..args.prompt_tokens).map(|i| (1000 + (i * 7919) % 20000).to_string()).collect();
    let ids = ids.join(",");
    let mut processes = Vec::new();
    for _ in 0..args.processes {
        let mut command = Command::new(&args.host);
        if let Some(config) = &args.config {
            command.arg("--config").arg(config);
        }
        command.args(["run", "--model"]).arg(&args.model);
        if args.random_weights {
            command.arg("--random-weights");
        }
        command
            .args(["--prompt-ids", &ids, "--greedy", "--json", "--device", &args.device, "--dtype", &args.dtype])
            .args(["--max-new-tokens", &args.new_tokens.to_string(), "--batch", &args.batch.to_string()])
            .args(["--repeat", &args.runs.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = command.spawn().with_context(|| format!("cannot run {}", args.host.display()))?;
        let done = Arc::new(AtomicBool::new(false));
        let watcher = watch_gpu_memory(child.id(), done.clone());
        let (mut stdout, mut stderr) = (child.stdout.take().context("stdout")?, child.stderr.take().context("stderr")?);
        let err_reader = std::thread::spawn(move || {
            let mut text = String::new();
            stderr.read_to_string(&mut text).map(|_| text)
        });
        let mut text = String::new();
        let deadline = started + Duration::from_secs(args.timeout_s);
        let out_reader = std::thread::spawn(move || stdout.read_to_string(&mut text).map(|_| text));
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                child.kill().ok();
                child.wait().ok();
                bail!("inference-pio took longer than {} s", args.timeout_s);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        done.store(true, Ordering::SeqCst);
        let peak_gpu = watcher.join().ok().flatten();
        let stdout = out_reader.join().map_err(|_| anyhow::anyhow!("stdout reader panicked"))??;
        let stderr = err_reader.join().map_err(|_| anyhow::anyhow!("stderr reader panicked"))??;
        if !status.success() {
            bail!("inference-pio failed ({status}): {stderr}");
        }
        let result: serde_json::Value = serde_json::from_str(&stdout).context("inference-pio printed no JSON")?;
        let runs = match result.get("runs") {
            Some(runs) => runs.clone(),
            None => serde_json::json!([result["timings"]]),
        };
        processes.push(serde_json::json!({
            "wall_s": started.elapsed().as_secs_f64(),
            "load_seconds": result["model"]["load_seconds"],
            "kv_cache_blocks": result["model"]["kv_cache_blocks"],
            "kv_block_tokens": result["model"]["kv_block_tokens"],
            "kv_cache_bytes": result["model"]["kv_cache_bytes"],
            "kv_cache_dtype": result["model"]["kv_cache_dtype"],
            "peak_gpu_mib": peak_gpu.map(|b| b as f64 / 1048576.0),
            "runs": runs,
            "generated_first_row": result["token_ids"].as_array().map_or(0, Vec::len),
        }));
    }
    // Warm runs: every run after a process's first (all runs when each process runs once).
    let warm: Vec<&serde_json::Value> = processes
        .iter()
        .flat_map(|p| p["runs"].as_array().into_iter().flatten().skip(usize::from(args.runs > 1)))
        .collect();
    let warm_median = |key: &str| median(warm.iter().filter_map(|r| r[key].as_f64()).collect());
    let first_run = |p: usize, key: &str| processes.get(p).and_then(|p| p["runs"][0][key].as_f64());
    let peak_gpu_mib = processes.iter().filter_map(|p| p["peak_gpu_mib"].as_f64()).fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let report = serde_json::json!({
        "benchmark": "run-cli",
        "machine": args.machine,
        "device": args.device,
        "dtype": args.dtype,
        "date": command_output(&["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "commit": args.commit.clone().unwrap_or_else(|| command_output(&["git", "rev-parse", "--short", "HEAD"])),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "model": args.model,
        "random_weights": args.random_weights,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "runs_per_process": args.runs,
        "median_prefill_tokens_per_s": warm_median("prefill_tokens_per_s"),
        "median_decode_tokens_per_s": warm_median("decode_tokens_per_s"),
        "median_steady_decode_tokens_per_s": warm_median("steady_decode_tokens_per_s"),
        "median_time_to_first_token_s": warm_median("time_to_first_token_s"),
        "cold_time_to_first_token_s": first_run(0, "time_to_first_token_s"),
        "second_process_time_to_first_token_s": first_run(1, "time_to_first_token_s"),
        "peak_gpu_mib": peak_gpu_mib,
        "peak_rss_mib": peak_rss_of_children_kib() as f64 / 1024.0,
        "processes": processes,
    });
    let text = serde_json::to_string_pretty(&report)?;
    match &args.out {
        Some(path) => std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}
