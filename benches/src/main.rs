//! `pio-bench`: runs `inference-pio run --json` as a user would, several times, and records
//! prefill and decode throughput, time to first token and the peak resident memory of the
//! host process (the plugin runs inside it) as JSON with device, date, commit and command.

use anyhow::{Context, bail};
use clap::Parser;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Benchmark inference-pio through its CLI")]
struct Args {
    /// The inference-pio binary.
    #[arg(long, default_value = "target/release/inference-pio")]
    host: PathBuf,
    #[arg(long)]
    model: PathBuf,
    /// Prompt length in tokens (ids 1000.. are used).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Where to write the JSON result.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Free-form label of the machine (e.g. "2-core x86-64 CI VM").
    #[arg(long, default_value = "unknown")]
    machine: String,
}

fn peak_rss_of_children_kib() -> i64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_CHILDREN with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_maxrss
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ids: Vec<String> = (0..args.prompt_tokens).map(|i| (1000 + (i * 7919) % 20000).to_string()).collect();
    let ids = ids.join(",");
    let mut runs = Vec::new();
    for _ in 0..args.repeats {
        let started = Instant::now();
        let out = Command::new(&args.host)
            .args(["run", "--model"])
            .arg(&args.model)
            .args(["--prompt-ids", &ids, "--greedy", "--json", "--device", &args.device, "--dtype", &args.dtype])
            .args(["--max-new-tokens", &args.new_tokens.to_string()])
            .output()
            .with_context(|| format!("cannot run {}", args.host.display()))?;
        if !out.status.success() {
            bail!("inference-pio failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let result: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        runs.push(serde_json::json!({
            "wall_s": started.elapsed().as_secs_f64(),
            "timings": result["timings"],
            "load_seconds": result["model"]["load_seconds"],
            "generated": result["token_ids"].as_array().map_or(0, Vec::len),
        }));
    }
    let median = |key: &str| {
        let mut v: Vec<f64> = runs.iter().filter_map(|r| r["timings"][key].as_f64()).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let commit = Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()).map(|s| s.trim().to_string()).unwrap_or_default();
    let date = Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output().ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()).map(|s| s.trim().to_string()).unwrap_or_default();
    let report = serde_json::json!({
        "benchmark": "run-cli",
        "machine": args.machine,
        "device": args.device,
        "dtype": args.dtype,
        "date": date,
        "commit": commit,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "model": args.model,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "median_prefill_tokens_per_s": median("prefill_tokens_per_s"),
        "median_decode_tokens_per_s": median("decode_tokens_per_s"),
        "median_time_to_first_token_s": median("time_to_first_token_s"),
        "peak_rss_mib": peak_rss_of_children_kib() as f64 / 1024.0,
        "runs": runs,
    });
    let text = serde_json::to_string_pretty(&report)?;
    match &args.out {
        Some(path) => std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}
