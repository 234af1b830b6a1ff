//! The plugin export glue every model crate uses: a [`ModelFamily`] describes the model, and
//! [`export_model!`](crate::export_model) turns it into an Inference-PIO plugin (metadata,
//! selection by `architectures`, device and dtype choice, the memory budget check, loading,
//! generation, scoring, live config updates).

use crate::decoder::{Decoder, DecoderSpec, KvPool, parameter_count, stored_weight_bytes, weight_bytes};
use crate::error::EngineError;
use crate::generate::{Engine, GenerationDefaults, Model};
use crate::hf_config::DecoderConfig;
use crate::chat_template::ChatTemplate;
use crate::tokenizer::TextTokenizer;
use crate::weights::{Checkpoint, GgufFile, burn_dtype};
use inference_pio_chat_output::OutputFormat;
use inference_pio_formats::gguf;
use inference_pio_image_input::ImageProcessor;
use burn::tensor::Device;
use inference_pio_core::abi::{ABI_MAJOR, ABI_MINOR, ErrorKind, PluginError};
use inference_pio_core::config::{KvCacheDtype, OptimizationSettings, QuantActivations};
use inference_pio_kernels::{KvCodes, KvStorage};
use inference_pio_kernels::quant::Activations;
use inference_pio_core::export::{Plugin, TokenCallback};
use inference_pio_core::types::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// Everything a dense model crate says about its model.
pub struct ModelFamily {
    /// Plugin id (`qwen3-4b-instruct-2507`).
    pub id: &'static str,
    pub version: &'static str,
    pub description: &'static str,
    /// HF `architectures` handled.
    pub architectures: &'static [&'static str],
    pub primary_model_name: &'static str,
    /// The primary model's real `config.json` (for its parameter count and size).
    pub primary_config_json: &'static str,
    /// Defaults for keys absent from `config.json` (a JSON object; `"{}"` for none): the
    /// family's transformers config-class defaults that differ from the engine's.
    pub config_defaults: &'static str,
    /// How the model's output carries reasoning and tool calls (`OutputFormat::Plain`: it
    /// does not; the text is the answer).
    pub output_format: OutputFormat,
    /// Model-specific layer choices, from the config (an error names a bad key).
    pub spec: fn(&DecoderConfig) -> Result<DecoderSpec, EngineError>,
}

const BURN_VERSION: &str = "0.22.1";

impl ModelFamily {
    /// Parses a `config.json` value with this family's defaults.
    pub fn config(&self, value: &serde_json::Value) -> Result<DecoderConfig, EngineError> {
        DecoderConfig::from_value(&DecoderConfig::with_defaults(value, self.config_defaults)?)
    }
}

/// A vision-language model's image processor: its directory's `preprocessor_config.json`
/// (Qwen3-VL's defaults where it has none), checked against the vision tower's patch shape.
fn image_processor(dir: &Path, vision: &crate::vision::VisionConfig) -> Result<ImageProcessor, EngineError> {
    let path = dir.join("preprocessor_config.json");
    let config = if path.is_file() { DecoderConfig::read_json(&path)? } else { serde_json::json!({}) };
    let p = ImageProcessor::from_config(&config).map_err(|e| EngineError::Config(format!("{}: {e}", path.display())))?;
    if (p.patch_size, p.temporal_patch_size, p.merge_size) != (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) {
        return Err(EngineError::Config(format!(
            "{}: patches of {}x{} over {} frames merged {}x{} do not match the vision tower's {}x{} over {} merged {}x{}",
            path.display(),
            p.patch_size,
            p.patch_size,
            p.temporal_patch_size,
            p.merge_size,
            p.merge_size,
            vision.patch_size,
            vision.patch_size,
            vision.temporal_patch_size,
            vision.spatial_merge_size,
            vision.spatial_merge_size
        )));
    }
    Ok(p)
}

/// Picks the device: `auto` is CUDA 0 when an NVIDIA driver is present, else the CPU. Asking
/// for CUDA on a machine without the driver is an error rather than a crash inside CUDA.
pub fn choose_device(request: DeviceRequest) -> Result<(Device, String), EngineError> {
    let cuda_present = Path::new("/proc/driver/nvidia/version").exists() || Path::new("/dev/nvidia0").exists();
    match request {
        DeviceRequest::Cpu => Ok((Device::flex(), "cpu".into())),
        DeviceRequest::Cuda(i) if cuda_present => Ok((Device::cuda(i as usize), format!("cuda:{i}"))),
        DeviceRequest::Cuda(i) => Err(EngineError::Unsupported(format!(
            "cuda:{i} requested but no NVIDIA driver is present on this machine (no /dev/nvidia0); use --device cpu or auto"
        ))),
        DeviceRequest::Auto if cuda_present => Ok((Device::cuda(0usize), "cuda:0".into())),
        DeviceRequest::Auto => Ok((Device::flex(), "cpu".into())),
    }
}

/// A model's tokenizer and chat template.
type TextParts = (TextTokenizer, Option<ChatTemplate>);

/// The tokenizer and template: ready, or being built on a thread of their own.
enum TextSource {
    Ready(Box<TextParts>),
    Building(std::thread::JoinHandle<Result<TextParts, EngineError>>),
}

/// About how many bytes of temporaries building a GGUF file's tokenizer holds per vocabulary
/// entry and per merge (the strings as read, the vocabulary's maps, the merges as pairs): a
/// 151,936-token Qwen3 vocabulary with its 151,387 merges added 26-32 MB to a load's peak when
/// built beside the weights (`benches/results/cpu-2026-12-07j-tokenizer-first.md`).
const TOKENIZER_BYTES_PER_ENTRY: u64 = 96;

/// Whether a GGUF file's tokenizer is built before its weights load instead of beside them:
/// where its build's temporaries ([`TOKENIZER_BYTES_PER_ENTRY`]) would pass a quarter of the
/// weights, which they meet at the load's peak. A small-vocabulary model (the built-in
/// SmolLM2's 49,152 tokens against 94 MB of weights: no difference in peak memory) keeps the
/// build on its own thread, which is about 35 ms of its start on two cores.
fn tokenizer_first(file: &gguf::Gguf) -> bool {
    let entries = |key: &str| match file.metadata.get(key) {
        Some(gguf::Value::Array(items)) => items.len() as u64,
        _ => 0,
    };
    let temporaries = (entries("tokenizer.ggml.tokens") + entries("tokenizer.ggml.merges")) * TOKENIZER_BYTES_PER_ENTRY;
    let weights: u64 = file.tensors.iter().map(|t| t.n_bytes).sum();
    temporaries > weights / 4
}

impl TextSource {
    fn get(self) -> Result<TextParts, EngineError> {
        match self {
            TextSource::Ready(parts) => Ok(*parts),
            TextSource::Building(thread) => thread.join().unwrap_or_else(|_| Err(EngineError::Tokenizer("building the tokenizer panicked".into()))),
        }
    }
}

/// The CUDA ordinal a device request names (0 for the CPU and `auto`).
fn gpu_ordinal_of(request: DeviceRequest) -> usize {
    match request {
        DeviceRequest::Cuda(i) => i as usize,
        _ => 0,
    }
}

/// Loads a model — a Hugging Face directory, or one GGUF file — with a family's spec. Checks
/// the memory budget before reading any weight data.
pub fn load_engine(
    family: &ModelFamily,
    dir: &Path,
    options: &LoadOptions,
    settings: &PluginSettings,
) -> Result<(Engine, ModelInfo), EngineError> {
    let started = Instant::now();
    settings.optimization.validate().map_err(|(k, r)| EngineError::Config(format!("{k}: {r}")))?;
    if let Some(allowed) = &settings.allowed_paths {
        check_file_access(dir, allowed)?;
    }
    let gguf = if gguf::is_gguf_file(dir) { Some(GgufFile::open(dir)?) } else { None };
    let raw = match &gguf {
        Some(g) => gguf::hf::config(&g.file).map_err(|e| EngineError::Config(format!("{}: {e}", dir.display())))?,
        None => DecoderConfig::read_json(&dir.join("config.json"))?,
    };
    let config = family.config(&raw).map_err(|e| e.context(&dir.display().to_string()))?;
    if !config.architectures.iter().any(|a| family.architectures.contains(&a.as_str())) {
        return Err(EngineError::Unsupported(format!(
            "architecture {:?} is not handled by plugin `{}` (handles {:?})",
            config.architectures, family.id, family.architectures
        )));
    }
    let spec = (family.spec)(&config)?;
    let image_processor = match &spec.vision {
        Some(v) => Some(image_processor(dir, &v.config)?),
        None => None,
    };
    let (device, device_name) = choose_device(options.device)?;
    let on_gpu = device_name.starts_with("cuda");
    if on_gpu {
        // Before the device's first use: CubeCL reads its configuration once.
        let cache = crate::kernel_cache::configure(settings.cache_dir.as_deref().map(Path::new));
        crate::progress::log(|| format!("kernel and autotune cache: {}", cache.map_or("none".into(), |p| p.display().to_string())));
    }
    let dtype = options
        .dtype
        .or(settings.optimization.dtype)
        .unwrap_or(if on_gpu { DType::Bf16 } else { DType::F32 });
    let quantization = settings.optimization.quantization;
    // Products of quantized weights: unless set, exact f32 activations on the CPU, 16-bit
    // blocks for others and in the CUDA kernel.
    let activations = match settings.optimization.quant_activations {
        None => None,
        Some(QuantActivations::Int8) if on_gpu => {
            return Err(EngineError::Config(format!(
                "quant_activations = \"int8\" is implemented for the CPU's products only; on {device_name} use \"int16\" (its default) or \"exact\""
            )));
        }
        Some(QuantActivations::Exact) => Some(Activations::F32),
        Some(QuantActivations::Int16) => Some(Activations::Blocks16),
        Some(QuantActivations::Int8) => Some(Activations::Blocks8),
    };
    let kv_storage = kv_storage(settings.optimization.kv_cache_dtype, dtype, on_gpu)?;
    let dense_bytes = weight_bytes(&config, &spec, dtype);
    let quantize_lm_head = settings.optimization.quantize_lm_head;
    let bytes = stored_weight_bytes(&config, &spec, dtype, quantization, quantize_lm_head);
    let (limit, which) = if on_gpu {
        (settings.limits.gpu_memory_gb, "gpu_memory_gb")
    } else {
        (settings.limits.memory_gb, "memory_gb")
    };
    if let Some(limit_gb) = limit
        && bytes as f64 > limit_gb * 1e9
    {
        return Err(EngineError::ResourceLimit(format!(
            "the weights need {:.3} GB in {dtype} on {device_name}, more than the {which} limit of {limit_gb} GB",
            bytes as f64 / 1e9
        )));
    }
    // Tensor parallelism: each rank's share, refused here (with the numbers) when the heads,
    // widths, experts or vocabulary do not divide.
    let tensor_parallel = match settings.optimization.tensor_parallel {
        None => None,
        Some(_) if gguf.is_some() => {
            return Err(EngineError::Unsupported("tensor_parallel takes a model directory (safetensors), not a GGUF file".into()));
        }
        Some(n) => Some(crate::tensor_parallel::plan(&config, &spec, n as usize)?),
    };
    let ranks = tensor_parallel.as_ref().map_or(1, Vec::len);
    // The CUDA device's memory (free, total) as the thread that asks sees it; `None` on the CPU.
    let gpu_ordinal = gpu_ordinal_of(options.device);
    let gpu_memory = move || if on_gpu { inference_pio_kernels::cublas::device_memory(gpu_ordinal) } else { None };
    // Weights larger than the whole card fail at once, by name, instead of part-way through
    // the load with an allocation error (the total, not the free memory: memory an earlier
    // model of this process left in the allocator's pools is reused, not lost).
    // A split model's device holds one rank's share.
    let shares = ranks as u64;
    if let Some((_, total)) = gpu_memory()
        && bytes / shares > total
    {
        return Err(EngineError::ResourceLimit(format!(
            "the weights need {:.3} GB in {dtype} on {device_name}{}, more than the device's {:.3} GB",
            (bytes / shares) as f64 / 1e9,
            if shares > 1 { format!(" (a rank's share of {shares})") } else { String::new() },
            total as f64 / 1e9
        )));
    }
    if gguf.is_some() && options.random_weights.is_some() {
        return Err(EngineError::InvalidRequest("--random-weights takes a model directory (config.json), not a GGUF file".into()));
    }
    let device_ordinal = move |rank: usize| gpu_ordinal + rank;
    let from_gguf = gguf.is_some();
    let (text, generation, mut ckpt) = match gguf {
        Some(mut g) => {
            // A GGUF file's tokenizer and chat template are rebuilt from its `tokenizer.*`
            // keys, moved to a metadata-only copy and built on a thread of their own while the
            // weights load (35 ms of the built-in model's start on two cores), or, where the
            // build's temporaries would weigh on the load's peak, before ([`tokenizer_first`]).
            let first = tokenizer_first(&g.file);
            let keys: Vec<String> = g.file.metadata.keys().filter(|k| k.starts_with("tokenizer.")).cloned().collect();
            let metadata = keys.iter().filter_map(|k| g.file.metadata.remove_entry(k)).collect();
            let f = &g.file;
            let meta = gguf::Gguf { version: f.version, metadata, tensors: Vec::new(), alignment: f.alignment, data_offset: f.data_offset };
            let build = move || -> Result<TextParts, EngineError> {
                // The template first: the tokenizer takes the vocabulary out of `meta`.
                let template = ChatTemplate::from_gguf(&meta)?;
                let tokenizer = TextTokenizer::from_gguf(meta)?;
                // The build's strings (the vocabulary and merges as read, their copies) are
                // freed now: their pages go back at once instead of adding to the load's peak
                // until it ends.
                crate::weights::return_free_heap_pages();
                Ok((tokenizer, template))
            };
            let text = if first {
                TextSource::Ready(Box::new(build()?))
            } else {
                TextSource::Building(
                    std::thread::Builder::new()
                        .name("inference-pio-tokenizer".into())
                        .spawn(build)
                        .map_err(|e| EngineError::Device(format!("cannot start the tokenizer's thread: {e}")))?,
                )
            };
            (text, GenerationDefaults::default(), Checkpoint::open_gguf(g, (config.num_attention_heads, config.num_key_value_heads))?)
        }
        None => (
            TextSource::Ready(Box::new((
                TextTokenizer::from_file(&dir.join("tokenizer.json"))?,
                if spec.vision.is_some() { ChatTemplate::for_processor(dir)? } else { ChatTemplate::from_model_dir(dir)? },
            ))),
            GenerationDefaults::from_model_dir(dir)?,
            match options.random_weights {
                Some(seed) => Checkpoint::random(seed),
                None => Checkpoint::open(dir)?,
            },
        ),
    };
    let packed_layout = if options.random_weights.is_none() && !from_gguf {
        inference_pio_formats::packed::layout(&raw).map_err(|e| EngineError::Config(format!("{}: {e}", dir.join("config.json").display())))?
    } else {
        None
    };
    // How every handle on the checkpoint reads it: this one, and each further rank's own.
    let configure = move |c: &mut Checkpoint| {
        c.set_packed_layout(packed_layout);
        c.set_quantization(quantization);
        c.set_quantize_lm_head(quantize_lm_head);
        c.set_activations(activations);
    };
    configure(&mut ckpt);
    // Ranks 1..N read the checkpoint through handles of their own (each reads only its slices).
    let reopen = {
        let (dir, random) = (dir.to_path_buf(), options.random_weights);
        move || -> Result<Checkpoint, EngineError> {
            let mut c = match random {
                Some(seed) => Checkpoint::random(seed),
                None => Checkpoint::open(&dir)?,
            };
            configure(&mut c);
            Ok(c)
        }
    };
    crate::progress::log(|| format!("loading {} weights ({:.2} GB in {dtype}) on {device_name}", if options.random_weights.is_some() { "random" } else { "checkpoint" }, bytes as f64 / 1e9));
    let optimization = settings.optimization.clone();
    let max_context_setting = settings.optimization.max_context_tokens;
    let output_format = family.output_format;
    // The weights and the KV pool are made on the model's step-loop thread, which does all
    // of its device work from then on.
    let build = move || -> Result<crate::serve::Built<Loaded>, EngineError> {
        // The weights (and the KV pool, `Decoder::new_kv_pool`) get device allocations of
        // their own, outside the pools the steps' activations use
        // (`inference_pio_kernels::memory`).
        let (decoder, ckpt, others) = match tensor_parallel {
            None => {
                let on = device.clone();
                let (decoder, ckpt) = inference_pio_kernels::memory::outside_pools(&device, move || (Decoder::load(config, spec, &ckpt, &on, dtype), ckpt));
                (decoder?, ckpt, None)
            }
            Some(shards) => {
                // Ranks 1..N load on threads of their own while this thread loads rank 0.
                let group = crate::tensor_parallel::group_for(on_gpu, &(0..shards.len()).map(device_ordinal).collect::<Vec<_>>())?;
                let rank_device = move |rank: usize| if on_gpu { Device::cuda(device_ordinal(rank)) } else { device.clone() };
                let load = std::sync::Arc::new(move |rank: usize, mut ckpt: Checkpoint| -> Result<(Decoder, Checkpoint), EngineError> {
                    let on = rank_device(rank);
                    let (config, spec, shard, group) = (config.clone(), spec.clone(), shards[rank].clone(), group.clone());
                    let at = on.clone();
                    inference_pio_kernels::memory::outside_pools(&on, move || Decoder::load_rank(config, spec, &mut ckpt, &at, dtype, &shard, group).map(|d| (d, ckpt)))
                });
                let others_load = std::sync::Arc::clone(&load);
                let others = crate::serve::ranks::RankWorkers::start(1..ranks, move |rank| others_load(rank, reopen()?).map(|(d, _)| d))?;
                // Rank 0 reads through the handle opened above.
                let rank0 = load(0, ckpt);
                others.loaded()?;
                let (decoder, ckpt) = rank0?;
                (decoder, ckpt, Some(others))
            }
        };
        let device = decoder.device.clone();
        let tally = ckpt.linear_tally();
        if tally.e4m3 && matches!(activations, Some(Activations::Blocks16 | Activations::Blocks8)) {
            return Err(EngineError::Config(
                "quant_activations rounds activations to integers for weights of integer codes; this checkpoint's quantized weights are FP8, which take their activations as they are: leave it unset or \"exact\"".into(),
            ));
        }
        // A split model: the ranks' weights together (each rank tallies its own share).
        let bytes = dense_bytes.saturating_sub((tally.quantized_dense_bytes.saturating_sub(tally.quantized_bytes)) * ranks as u64);
        let stored = quantization_summary(&tally);
        crate::progress::log(|| format!("weights loaded ({:.2} GB{}{})", bytes as f64 / 1e9, if ranks > 1 { format!(", split over {ranks} ranks") } else { String::new() }, if stored.is_empty() { String::new() } else { format!("; {stored}") }));
        let (tokenizer, template) = text.get()?;
        // The load's temporaries (each tensor's values before conversion) and the tokenizer's
        // (a GGUF's vocabulary and merges as strings, built on a thread of its own that may end
        // after the weights) are freed by now, but the allocator keeps their pages.
        crate::weights::return_free_heap_pages();
        let c = &decoder.config;
        let eos_token_ids = if generation.eos_token_ids.is_empty() { c.eos_token_ids.clone() } else { generation.eos_token_ids.clone() };
        let max_context = max_context_setting.map_or(c.max_position_embeddings, |m| (m as usize).min(c.max_position_embeddings));
        // The paged KV cache, preallocated now from its budget.
        let block_tokens = optimization.kv_block_tokens as usize;
        let block_bytes = KvPool::block_bytes(c, kv_storage, block_tokens);
        // Memory an earlier model of this process left reserved in CubeCL's allocator (its
        // KV pool, its activation pages) is returned to the driver first, so that it counts
        // as free.
        inference_pio_kernels::memory::release_free_memory(&device);
        let device_free = gpu_memory().map(|(free, _)| free);
        let reserve = crate::serve::step_reserve_bytes(c, decoder.spec.moe.as_ref(), dtype.size_bytes(), &optimization);
        // A split model's block is a block on every rank: on GPUs each rank's device holds its
        // share of the weights and of each block; on the CPU one memory holds all of them.
        let (sizing_block, sizing_weights) = if on_gpu { (block_bytes, bytes / ranks as u64) } else { (block_bytes * ranks as u64, bytes) };
        let (blocks, sized_by) = crate::serve::kv_cache_blocks(&optimization, sizing_block, sizing_weights, limit, device_free, reserve, max_context)?;
        let kv_bytes = blocks as u64 * block_bytes * ranks as u64;
        crate::progress::log(|| format!("KV cache: {blocks} blocks of {block_tokens} tokens in {} ({:.3} GB; {sized_by})", kv_storage.name(), kv_bytes as f64 / 1e9));
        if let Some(others) = &others {
            others.new_kv_pools(blocks, block_tokens, max_context, kv_storage)?;
        }
        let mut decoder = decoder;
        decoder.store_kv_as(kv_storage);
        let pool = decoder.new_kv_pool(blocks, block_tokens);
        let model = Model { decoder, tokenizer, template, generation, eos_token_ids, max_context, output_format, grammar: Default::default(), image_processor };
        Ok((model, pool, others, Loaded { blocks, block_tokens, kv_bytes, sized_by, bytes, stored }))
    };
    let (engine, Loaded { blocks, block_tokens, kv_bytes, sized_by, bytes, stored }) = Engine::start(build, &settings.optimization, !on_gpu)?;
    let c = &engine.decoder.config;
    let info = ModelInfo {
        handle: 0,
        cpu_threads: None,
        architecture: c.architectures.first().cloned().unwrap_or_default(),
        parameter_count: parameter_count(c, &engine.decoder.spec),
        weight_bytes: bytes,
        dtype,
        device: device_name,
        max_context: engine.max_context as u64,
        vocab_size: c.vocab_size as u64,
        has_chat_template: engine.template.is_some(),
        generation_defaults: engine.generation.values.clone(),
        load_seconds: started.elapsed().as_secs_f64(),
        kv_cache_blocks: blocks as u64,
        kv_block_tokens: block_tokens as u64,
        kv_cache_dtype: kv_storage.name(),
        kv_cache_bytes: kv_bytes,
        kv_cache_sized_by: sized_by,
        quantization: stored,
    };
    Ok((engine, info))
}

/// What the step-loop thread's load reports back: the KV cache's blocks, tokens per block,
/// bytes and what sized it; the weights' bytes and their quantization summary.
struct Loaded {
    blocks: usize,
    block_tokens: usize,
    kv_bytes: u64,
    sized_by: String,
    bytes: u64,
    stored: String,
}

/// What [`ModelInfo::quantization`] says of the linear weights loaded: empty when none is
/// quantized, else the layout (`int8 per output channel`, `int4 in groups of 128`, `fp8 (E4M3)
/// with a scale per 128 inputs`, or `mixed 4- and 8-bit groups` for a GGUF file's several
/// block types) and how many of the linear weights.
fn quantization_summary(t: &crate::weights::LinearTally) -> String {
    if t.bits_seen == 0 && !t.e4m3 {
        return String::new();
    }
    let bits = t.bits_seen.trailing_zeros();
    let layout = if t.e4m3 && t.bits_seen != 0 {
        "mixed FP8 and integer groups".to_string()
    } else if t.e4m3 {
        match t.group {
            Some(group) => format!("fp8 (E4M3) with a scale per {group} inputs"),
            None => "fp8 (E4M3) in groups of several sizes".to_string(),
        }
    } else if t.bits_seen.count_ones() > 1 {
        "mixed 4- and 8-bit groups".to_string()
    } else if t.per_channel {
        format!("int{bits} per output channel")
    } else if let Some(group) = t.group {
        format!("int{bits} in groups of {group}")
    } else {
        format!("int{bits} in groups of several sizes")
    };
    format!(
        "{layout}: {} of {} linear weights, {:.3} GB (from {:.3} GB)",
        t.quantized,
        t.quantized + t.dense,
        t.quantized_bytes as f64 / 1e9,
        t.quantized_dense_bytes as f64 / 1e9
    )
}

/// Security level `medium`: every file loading will open, validated against the host's
/// allowlist before any is read (`inference_pio_core::file_access`). These are all the files
/// the engine reads from a model: the GGUF file itself, or the directory's config, generation
/// config, tokenizer, chat template and weights (the shards an index names included).
fn check_file_access(model: &Path, allowed: &[String]) -> Result<(), EngineError> {
    use inference_pio_core::file_access::validate_file_access;
    let check = |p: &Path| validate_file_access(p, allowed).map(|_| ()).map_err(EngineError::ResourceLimit);
    if model.is_file() {
        return check(model);
    }
    check(model)?;
    let names = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "chat_template.json",
        "model.safetensors",
        "model.safetensors.index.json",
    ];
    for name in names {
        let path = model.join(name);
        if path.exists() || path.is_symlink() {
            check(&path)?;
        }
    }
    let index = model.join("model.safetensors.index.json");
    if index.is_file() {
        for file in crate::weights::index_shard_files(&index)? {
            check(&model.join(file))?;
        }
    }
    Ok(())
}

/// Sizes the plugin's compute threads (burn-flex runs on this library's rayon pool): the
/// `threads` setting, capped at `cpu_percent` of the cores (rounded down, at least one).
/// Returns the thread count and what set it, or `None` when neither is set.
fn size_cpu_threads(threads: Option<u32>, cpu_percent: Option<f64>) -> Result<Option<u32>, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cap = |p: f64| ((cores as f64 * p / 100.0).floor() as usize).clamp(1, cores);
    let (wanted, why) = match (threads, cpu_percent) {
        (None, None) => return Ok(None),
        (Some(t), None) => (t as usize, format!("threads {t}")),
        (None, Some(p)) => (cap(p), format!("cpu_percent {p} of {cores} cores")),
        (Some(t), Some(p)) => ((t as usize).min(cap(p)), format!("threads {t} capped by cpu_percent {p}")),
    };
    match rayon::ThreadPoolBuilder::new().num_threads(wanted).build_global() {
        Ok(()) => Ok(Some(wanted as u32)),
        // Already built (an earlier initialize in this process): fine if it has that size.
        Err(_) if rayon::current_num_threads() == wanted => Ok(Some(wanted as u32)),
        Err(_) => Err(format!(
            "{why} asks for {wanted} threads, but this plugin's thread pool already runs {}; restart to change it",
            rayon::current_num_threads()
        )),
    }
}

/// A [`ModelFamily`] served as a plugin.
pub struct EnginePlugin {
    family: &'static ModelFamily,
    cpu_threads: RwLock<Option<u32>>,
    settings: RwLock<PluginSettings>,
    models: RwLock<HashMap<u64, (Arc<Engine>, ModelInfo)>>,
    next_handle: AtomicU64,
}

impl EnginePlugin {
    pub fn new(family: &'static ModelFamily) -> Self {
        Self {
            family,
            cpu_threads: RwLock::new(None),
            settings: RwLock::new(PluginSettings::default()),
            models: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
        }
    }

    fn settings(&self) -> PluginSettings {
        self.settings.read().map(|s| s.clone()).unwrap_or_default()
    }

    fn model(&self, handle: u64) -> Result<Arc<Engine>, PluginError> {
        self.models
            .read()
            .map_err(|_| PluginError::internal("model table lock poisoned"))?
            .get(&handle)
            .map(|(e, _)| e.clone())
            .ok_or_else(|| PluginError::new(ErrorKind::UnknownModel, format!("no model with handle {handle}")))
    }
}

fn as_plugin_error(e: EngineError) -> PluginError {
    e.into()
}

impl Plugin for EnginePlugin {
    fn metadata(&self) -> PluginMetadata {
        let f = self.family;
        let primary = serde_json::from_str(f.primary_config_json)
            .map_err(|e| EngineError::Config(e.to_string()))
            .and_then(|v| f.config(&v))
            .and_then(|c| (f.spec)(&c).map(|s| (c, s)));
        let takes_images = primary.as_ref().is_ok_and(|(_, spec)| spec.vision.is_some());
        let (params, bytes) = match primary {
            Ok((c, spec)) => {
                let native = match c.torch_dtype.as_deref() {
                    Some("float32") => DType::F32,
                    Some("float16") => DType::F16,
                    _ => DType::Bf16,
                };
                (parameter_count(&c, &spec), weight_bytes(&c, &spec, native))
            }
            Err(_) => (0, 0),
        };
        PluginMetadata {
            id: f.id.into(),
            version: f.version.into(),
            description: f.description.into(),
            architectures: f.architectures.iter().map(|s| s.to_string()).collect(),
            primary_model: PrimaryModel { name: f.primary_model_name.into(), parameter_count: params, memory_bytes: bytes },
            modalities: if takes_images { vec!["text".into(), "image".into()] } else { vec!["text".into()] },
            capabilities: [
                "streaming",
                "cancellation",
                "chat-template",
                "kv-cache",
                "score",
                "batched-forward",
                "infer-batch",
                "chunked-prefill",
                "continuous-batching",
                "paged-kv-cache",
                "prefix-caching",
                "stats",
            ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            optimizations: OptimizationSettings::KEYS.iter().map(|s| s.to_string()).collect(),
            backends: vec!["cpu".into(), "cuda".into()],
            build: BuildInfo {
                rustc: option_env!("INFERENCE_PIO_RUSTC_VERSION").unwrap_or("unknown").into(),
                burn: BURN_VERSION.into(),
                abi_major: ABI_MAJOR,
                abi_minor: ABI_MINOR,
            },
        }
    }

    fn supports_config(&self, config: &serde_json::Value) -> Support {
        let archs: Vec<String> = config
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default();
        if !archs.iter().any(|a| self.family.architectures.contains(&a.as_str())) {
            return Support { supported: false, reason: format!("architectures {archs:?} not in {:?}", self.family.architectures) };
        }
        match self.family.config(config).and_then(|c| (self.family.spec)(&c)) {
            Ok(_) => Support { supported: true, reason: String::new() },
            Err(e) => Support { supported: false, reason: e.to_string() },
        }
    }

    fn initialize(&self, settings: PluginSettings) -> Result<(), PluginError> {
        crate::weights::keep_freed_heap_blocks();
        settings.security.check_supported().map_err(PluginError::invalid)?;
        settings.limits.validate().map_err(|(k, r)| PluginError::invalid(format!("limits.{k}: {r}")))?;
        settings
            .limits
            .check_enforceable(settings.security)
            .map_err(|(k, r)| PluginError::invalid(format!("limits.{k}: {r}")))?;
        settings.optimization.validate().map_err(|(k, r)| PluginError::invalid(format!("{k}: {r}")))?;
        let key = if settings.optimization.threads.is_some() { "threads" } else { "limits.cpu_percent" };
        if let Some(threads) = size_cpu_threads(settings.optimization.threads, settings.limits.cpu_percent).map_err(|r| PluginError::invalid(format!("{key}: {r}")))? {
            crate::progress::log(|| format!("compute threads: {threads}"));
            *self.cpu_threads.write().map_err(|_| PluginError::internal("lock poisoned"))? = Some(threads);
        }
        *self.settings.write().map_err(|_| PluginError::internal("settings lock poisoned"))? = settings;
        Ok(())
    }

    fn load_model(&self, model_dir: &Path, options: LoadOptions) -> Result<ModelInfo, PluginError> {
        let (engine, mut info) = load_engine(self.family, model_dir, &options, &self.settings()).map_err(as_plugin_error)?;
        info.handle = self.next_handle.fetch_add(1, Ordering::SeqCst);
        info.cpu_threads = self.cpu_threads.read().map(|t| *t).unwrap_or(None);
        self.models
            .write()
            .map_err(|_| PluginError::internal("model table lock poisoned"))?
            .insert(info.handle, (Arc::new(engine), info.clone()));
        Ok(info)
    }

    fn infer(&self, model: u64, request: InferRequest, on_token: &mut TokenCallback<'_>) -> Result<InferResponse, PluginError> {
        let engine = self.model(model)?;
        let settings = self.settings();
        engine
            .generate_request(&request, &settings.sampling_defaults, &settings.optimization, on_token)
            .map_err(as_plugin_error)
    }

    fn infer_batch(&self, model: u64, request: BatchInferRequest) -> Result<BatchInferResponse, PluginError> {
        let engine = self.model(model)?;
        let settings = self.settings();
        engine
            .generate_batch(&request.requests, &settings.sampling_defaults, &settings.optimization)
            .map_err(as_plugin_error)
    }

    fn stats(&self, model: u64) -> Result<SchedulerStats, PluginError> {
        Ok(self.model(model)?.stats())
    }

    fn score(&self, model: u64, request: ScoreRequest) -> Result<ScoreResponse, PluginError> {
        self.model(model)?.score(&request.input, request.return_logits).map_err(as_plugin_error)
    }

    fn update_config(&self, update: ConfigUpdate) -> Result<UpdateOutcome, PluginError> {
        let mut outcome = UpdateOutcome::default();
        let mut settings = self.settings.write().map_err(|_| PluginError::internal("settings lock poisoned"))?;
        let models = self.models.read().map_err(|_| PluginError::internal("model table lock poisoned"))?;
        if let Some(sampling) = update.sampling_defaults {
            match inference_pio_core::config::validate_sampling(&sampling) {
                Ok(()) => {
                    settings.sampling_defaults = sampling;
                    outcome.applied.push("sampling_defaults".into());
                }
                Err((k, r)) => {
                    outcome.refused.insert(format!("sampling_defaults.{k}"), r);
                }
            }
        }
        if let Some(limits) = update.limits {
            let merged = settings.limits.merged_with(&limits);
            let loosens = |new: Option<f64>, old: Option<f64>| matches!((new, old), (Some(n), Some(o)) if n > o) || (new.is_none() && old.is_some());
            let largest_cpu = models.values().filter(|(_, i)| i.device == "cpu").map(|(_, i)| i.weight_bytes).max().unwrap_or(0);
            let largest_gpu = models.values().filter(|(_, i)| i.device != "cpu").map(|(_, i)| i.weight_bytes).max().unwrap_or(0);
            if let Err((k, r)) = merged.validate().and_then(|_| merged.check_enforceable(settings.security)) {
                outcome.refused.insert(format!("limits.{k}"), r);
            } else if loosens(merged.memory_gb, settings.limits.memory_gb) || loosens(merged.gpu_memory_gb, settings.limits.gpu_memory_gb) {
                outcome.refused.insert("limits".into(), "limits can only tighten while running; restart to loosen them".into());
            } else if merged.memory_gb.is_some_and(|l| largest_cpu as f64 > l * 1e9) || merged.gpu_memory_gb.is_some_and(|l| largest_gpu as f64 > l * 1e9) {
                outcome.refused.insert("limits".into(), "a loaded model already uses more than the new limit; clean it up first".into());
            } else {
                settings.limits = merged;
                outcome.applied.push("limits".into());
            }
        }
        if let Some(opt) = update.optimization {
            let changed = opt.load_time_keys_changed(&settings.optimization);
            if let Err((k, r)) = opt.validate() {
                outcome.refused.insert(format!("optimization.{k}"), r);
            } else if let Some(key) = changed.first().filter(|_| !models.is_empty()) {
                outcome.refused.insert(format!("optimization.{key}"), "sizes the model or its KV cache at load; clean up and reload".into());
            } else {
                for (engine, _) in models.values() {
                    engine.configure(&opt);
                }
                settings.optimization = opt;
                outcome.applied.push("optimization".into());
            }
        }
        if let Some(level) = update.security
            && level != settings.security
        {
            outcome.refused.insert("security".into(), "the security level is fixed when the plugin starts".into());
        }
        Ok(outcome)
    }

    fn cleanup(&self, model: u64) -> Result<(), PluginError> {
        let (engine, _) = self
            .models
            .write()
            .map_err(|_| PluginError::internal("model table lock poisoned"))?
            .remove(&model)
            .ok_or_else(|| PluginError::new(ErrorKind::UnknownModel, format!("no model with handle {model}")))?;
        let device = engine.decoder.device.clone();
        // The last handle (no request in flight) drops the model here: its step loop joins,
        // and its device memory goes back to the driver.
        let dropped = Arc::strong_count(&engine) == 1;
        drop(engine);
        if dropped {
            inference_pio_kernels::memory::release_free_memory(&device);
            // The model's host memory, freed into the allocator, back to the kernel.
            crate::weights::return_free_heap_pages();
        }
        Ok(())
    }
}

/// Exports a `static` [`ModelFamily`] as this crate's plugin; `$id` is its `id` (a `const`),
/// also stored in the library's declaration so the host can check a pinned sha256 before
/// loading it (`inference_pio_core::export::plugin_note`).
///
/// ```ignore
/// pub const ID: &str = "my-model";
/// pub static FAMILY: ModelFamily = ModelFamily { id: ID, /* ... */ };
/// inference_pio_engine::export_model!(FAMILY, ID);
/// ```
#[macro_export]
macro_rules! export_model {
    ($family:path, $id:expr) => {
        $crate::__core::export_plugin!(id = $id, $crate::plugin::EnginePlugin, || {
            $crate::plugin::EnginePlugin::new(&$family)
        });
    };
}

/// How the KV cache stores keys and values for `kv_cache_dtype` and the model's `dtype`: in
/// the model's dtype (`auto`, or that dtype named), as int8 or FP8 codes, or on the CPU, for
/// an f32 model, as f16 or bf16 (half the bytes attention reads, as llama.cpp's default f16
/// cache; CUDA runs its kernels in the cache's dtype, so there the 16-bit caches are bf16 or
/// f16 models').
pub fn kv_storage(choice: KvCacheDtype, dtype: DType, on_gpu: bool) -> Result<KvStorage, EngineError> {
    let named = match choice {
        KvCacheDtype::Auto => dtype,
        KvCacheDtype::Int8 => return Ok(KvStorage::Coded(KvCodes::Int8)),
        KvCacheDtype::Fp8 => return Ok(KvStorage::Coded(KvCodes::Fp8)),
        KvCacheDtype::Bf16 => DType::Bf16,
        KvCacheDtype::F16 => DType::F16,
        KvCacheDtype::F32 => DType::F32,
    };
    let half_of_f32 = dtype == DType::F32 && matches!(named, DType::Bf16 | DType::F16);
    if half_of_f32 && !on_gpu {
        return Ok(KvStorage::Dense(burn_dtype(named)));
    }
    if named != dtype {
        let f32_model_on_cpu = if on_gpu && half_of_f32 { "; 16-bit caches of an f32 model are the CPU's" } else { "" };
        return Err(EngineError::Config(format!(
            "kv_cache_dtype = \"{}\" differs from the model's dtype ({}): the KV cache is stored in the attention's dtype (\"auto\") or as \"int8\" or \"fp8\"{f32_model_on_cpu}",
            choice.name(),
            dtype
        )));
    }
    Ok(KvStorage::Dense(burn_dtype(dtype)))
}

#[cfg(test)]
mod tests {
    use super::tokenizer_first;
    use inference_pio_formats::gguf::{Gguf, GgmlType, TensorInfo, Value};

    fn file(tokens: usize, merges: usize, weight_bytes: u64) -> Gguf {
        let strings = |n: usize| Value::Array(vec![Value::String(String::new()); n]);
        let mut metadata = std::collections::BTreeMap::new();
        if tokens > 0 {
            metadata.insert("tokenizer.ggml.tokens".to_string(), strings(tokens));
            metadata.insert("tokenizer.ggml.merges".to_string(), strings(merges));
        }
        let tensor = TensorInfo { name: "w".into(), dims: vec![weight_bytes], ggml_type: GgmlType::from_id(GgmlType::F32).expect("F32 is a GGML type"), offset: 0, n_elements: weight_bytes, n_bytes: weight_bytes };
        Gguf { version: 3, metadata, tensors: vec![tensor], alignment: 32, data_offset: 0 }
    }

    #[test]
    fn a_vocabulary_large_beside_the_weights_is_built_before_them() {
        // The Qwen3-small benchmark file: 151,936 tokens and 151,387 merges, 64.4 MB of weights.
        assert!(tokenizer_first(&file(151_936, 151_387, 64_387_072)));
        // The built-in SmolLM2-135M Q4_1: 49,152 tokens and 48,900 merges, 93.8 MB.
        assert!(!tokenizer_first(&file(49_152, 48_900, 93_800_000)));
        // Qwen3-4B in 4 bits: the same vocabulary beside 2.5 GB.
        assert!(!tokenizer_first(&file(151_936, 151_387, 2_500_000_000)));
        assert!(!tokenizer_first(&file(0, 0, 1_000)));
    }

    /// 16-bit caches of an f32 model are the CPU's; on CUDA the cache is the model's dtype or
    /// codes, and the refusal says so.
    #[test]
    fn sixteen_bit_caches_of_an_f32_model_are_taken_on_the_cpu_only() {
        use super::kv_storage;
        use inference_pio_core::config::KvCacheDtype;
        use inference_pio_core::types::DType;
        use inference_pio_kernels::KvStorage;
        use burn::tensor::DType as Burn;
        assert_eq!(kv_storage(KvCacheDtype::F16, DType::F32, false).ok(), Some(KvStorage::Dense(Burn::F16)));
        assert_eq!(kv_storage(KvCacheDtype::Bf16, DType::F32, false).ok(), Some(KvStorage::Dense(Burn::BF16)));
        assert_eq!(kv_storage(KvCacheDtype::Auto, DType::F32, false).ok(), Some(KvStorage::Dense(Burn::F32)));
        assert_eq!(kv_storage(KvCacheDtype::Bf16, DType::Bf16, true).ok(), Some(KvStorage::Dense(Burn::BF16)));
        let err = kv_storage(KvCacheDtype::F16, DType::F32, true).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("kv_cache_dtype = \"f16\" differs from the model's dtype (f32)") && err.contains("the CPU's"), "{err}");
        let err = kv_storage(KvCacheDtype::F32, DType::Bf16, false).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("differs from the model's dtype (bf16)") && !err.contains("the CPU's"), "{err}");
    }
}
