//! Helpers for plugin parity tests against transformers fixtures (`tests/parity.rs` of each
//! model crate): load a model on the CPU, read a fixture's reference JSON, compare logits by
//! relative L2, generate greedily, score every position.

/// Loads on the CPU with weights split into column blocks as on a GPU (see
/// `inference_pio_kernels::linear`), so the GPU layout's code path has CPU parity tests.
pub use inference_pio_kernels::with_cpu_split;
use crate::decoder::{Decoder, DecoderSpec, StepBatch};
use crate::error::EngineError;
use crate::hf_config::DecoderConfig;
use crate::tensor_parallel::{Collective, InProcessGroup, plan};
use crate::weights::Checkpoint;
use burn::tensor::Device;
use std::sync::Arc;
use crate::generate::{Engine, RowRequest};
use inference_pio_kernels::paged::{Span, slot_of};
use crate::plugin::{ModelFamily, load_engine};
use inference_pio_core::config::QuantActivations;
use inference_pio_core::types::{DType, DeviceRequest, LoadOptions, PluginSettings, PromptInput, SamplingParams};
use serde_json::Value;
use std::path::Path;

/// Loads `path` with `family` on the CPU in `dtype`, prompts in one pass, quantized weights'
/// products with exact activations.
pub fn load_cpu(family: &ModelFamily, path: &Path, dtype: DType) -> Engine {
    load_cpu_with(family, path, dtype, |_| {})
}

/// [`load_cpu`] with plugin settings changed by `change` (after prompts are set to one pass).
pub fn load_cpu_with(family: &ModelFamily, path: &Path, dtype: DType, change: impl FnOnce(&mut PluginSettings)) -> Engine {
    let options = LoadOptions { device: DeviceRequest::Cpu, dtype: Some(dtype), random_weights: None };
    let mut settings = PluginSettings::default();
    settings.optimization.prefill_chunk_tokens = Some(0);
    // Quantized weights' products take the activations exact, the math the parity fixtures
    // hold (the CPU's default rounds them to 8-bit blocks, `plugins/llama/tests/quantization.rs`).
    settings.optimization.quant_activations = Some(QuantActivations::Exact);
    change(&mut settings);
    match load_engine(family, path, &options, &settings) {
        Ok((engine, _)) => engine,
        Err(e) => panic!("cannot load {}: {e}", path.display()),
    }
}

/// A fixture's `NAME.reference.json` in `dir`.
pub fn reference(dir: &Path, name: &str) -> Value {
    let path = dir.join(format!("{name}.reference.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// A JSON list of token ids (anything else in the fixture is a panic, not an empty list).
pub fn ids(v: &Value) -> Vec<u32> {
    let list = v.as_array().unwrap_or_else(|| panic!("expected a list of token ids, got {v}"));
    list.iter().map(|x| x.as_u64().unwrap_or_else(|| panic!("not a token id: {x}")) as u32).collect()
}

/// A JSON list of rows of numbers.
pub fn matrix(v: &Value) -> Vec<Vec<f32>> {
    let rows = v.as_array().unwrap_or_else(|| panic!("expected a list of rows, got {v}"));
    rows.iter()
        .map(|r| {
            let row = r.as_array().unwrap_or_else(|| panic!("expected a row of numbers, got {r}"));
            row.iter().map(|x| x.as_f64().unwrap_or_else(|| panic!("not a number: {x}")) as f32).collect()
        })
        .collect()
}

/// `|got - want| / |want|`.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// `n` greedy tokens after `prompt` (stopping early only at the model's EOS).
pub fn greedy(engine: &Engine, prompt: &[u32], n: u32) -> Vec<u32> {
    let mut params = SamplingParams { greedy: true, ..Default::default() };
    params.values.max_new_tokens = Some(n);
    engine
        .generate(&PromptInput::TokenIds(prompt.to_vec()), &params, &[], &Default::default(), &Default::default(), &mut |_, _| true)
        .unwrap_or_else(|e| panic!("generate: {e}"))
        .token_ids
}

/// `n` greedy tokens after `prompt`, EOS ids included like any other token.
pub fn greedy_ignoring_eos(engine: &Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let request = RowRequest::greedy(prompt.to_vec(), n).ignoring_eos();
    let rows = engine
        .generate_rows(vec![request], &Default::default(), &mut |_, _, _| true, &mut Default::default())
        .unwrap_or_else(|e| panic!("generate: {e}"));
    rows.into_iter().next().map(|r| r.new_ids).unwrap_or_default()
}

/// f32 logits at every position of `prompt`.
pub fn all_logits(engine: &Engine, prompt: &[u32]) -> Vec<Vec<f32>> {
    engine
        .score(&PromptInput::TokenIds(prompt.to_vec()), true)
        .unwrap_or_else(|e| panic!("score: {e}"))
        .logits
        .unwrap_or_default()
}

/// f32 logits at every position of `prompt`, computed incrementally straight through the
/// decoder over a private paged cache (blocks of `block_tokens`, laid out in reverse order):
/// the first `prefill` tokens in one pass, then one token per step.
pub fn incremental_logits(engine: &Engine, prompt: &[u32], prefill: usize, block_tokens: usize) -> Vec<Vec<f32>> {
    let mut sequence = Sequence::new(&engine.decoder, prompt.len(), block_tokens);
    let mut rows = Vec::new();
    let mut start = 0;
    while start < prompt.len() {
        let end = if start == 0 { prefill.max(1) } else { start + 1 }.min(prompt.len());
        rows.extend(sequence.step(prompt, start, end).unwrap_or_else(|e| panic!("step at {start}: {e}")));
        start = end;
    }
    rows
}

/// One sequence stepped straight through a decoder over a private paged cache, its blocks
/// laid out in reverse order.
struct Sequence<'a> {
    decoder: &'a Decoder,
    pool: crate::decoder::KvPool,
    table: Vec<u32>,
    block_tokens: usize,
}

impl<'a> Sequence<'a> {
    /// Room for `tokens` tokens in blocks of `block_tokens`.
    fn new(decoder: &'a Decoder, tokens: usize, block_tokens: usize) -> Self {
        let blocks = tokens.div_ceil(block_tokens);
        Self { decoder, pool: decoder.new_kv_pool(blocks, block_tokens), table: (0..blocks as u32).rev().collect(), block_tokens }
    }

    /// `tokens[start..end]` as one step (the earlier ones already cached): f32 logits of each.
    fn step(&mut self, tokens: &[u32], start: usize, end: usize) -> Result<Vec<Vec<f32>>, EngineError> {
        let n = end - start;
        let batch = StepBatch {
            tokens: tokens[start..end].to_vec(),
            positions: (start..end).collect(),
            slots: (start..end).map(|p| slot_of(&self.table, self.block_tokens, p)).collect(),
            spans: vec![Span { queries: n, context: end, blocks: self.table.clone() }],
            logit_rows: (0..n).collect(),
            mrope: Vec::new(),
        };
        let logits = self.decoder.forward(&batch, &mut self.pool)?;
        let values = logits.into_data().convert::<f32>().try_to_vec::<f32>().map_err(|e| EngineError::Device(format!("logits: {e:?}")))?;
        Ok(values.chunks(self.decoder.config.vocab_size).map(<[f32]>::to_vec).collect())
    }
}

/// Submits greedy requests for `prompts` (each `max_new` tokens, EOS ignored) together and
/// checks that each row gets the tokens it gets alone.
pub fn check_rows_equal_alone(engine: &Engine, prompts: &[Vec<u32>], max_new: usize) {
    let requests: Vec<RowRequest> = prompts.iter().map(|p| RowRequest::greedy(p.clone(), max_new).ignoring_eos()).collect();
    let mut timings = Default::default();
    let together = engine
        .generate_rows(requests.clone(), &Default::default(), &mut |_, _, _| true, &mut timings)
        .unwrap_or_else(|e| panic!("together: {e}"));
    for (request, row) in requests.into_iter().zip(together) {
        let prompt = request.prompt.clone();
        let alone = engine
            .generate_rows(vec![request], &Default::default(), &mut |_, _, _| true, &mut Default::default())
            .unwrap_or_else(|e| panic!("alone: {e}"));
        assert_eq!(row.new_ids, alone[0].new_ids, "prompt {prompt:?}: together vs alone");
    }
}

/// The standard parity check of a fixture made by a `make_fixtures.py`: for every prompt,
/// f32 logits at every position within `1e-4` relative L2 and the greedy continuation
/// identical; with `bf16`, the bf16 logits of all positions within `2e-2` of a reference.
/// The reference is, per position, transformers' own bf16 run or its f32 run, whichever is
/// closer: bf16 rounding can legitimately flip a mixture-of-experts routing decision, and
/// transformers' bf16 run flips some that ours does not (it is then up to 0.18 from its own
/// f32 run while ours stays within 0.03). Our bf16 run flips some of its own too (Qwen3-MoE's
/// router multiplies in the model's dtype, as transformers' does), at other positions, so a
/// prompt also passes when ours is no further than 0.05 from the f32 run and within 2x of
/// transformers' own bf16 run's distance from it (seen: 0.031 against 0.020).
pub fn check_fixture(family: &ModelFamily, dir: &Path, name: &str, bf16: bool) {
    check_model(family, &dir.join(name), &reference(dir, name), name, bf16);
}

/// GGUF twins of the safetensors fixture `dir/name` (`name.bf16.gguf`, `name.q.gguf`, as the
/// plugins' `make_gguf_fixtures.py` write them): the BF16 file holds the checkpoint's values, so
/// it must give that checkpoint's logits (1e-6 relative L2) and greedy tokens; the quantized
/// file, its blocks kept (its `plugins info` quantization starting `quantization`), must give
/// what the same file dequantized gives, prompt and decode (1e-5).
pub fn check_gguf_twins(family: &ModelFamily, dir: &Path, name: &str, quantization: &str) {
    use inference_pio_core::config::Quantization;
    let prompt: Vec<u32> = (0..16).map(|i| (i * 37 + 11) % 500 + 3).collect();
    let safetensors = load_cpu(family, &dir.join(name), DType::F32);
    let bf16 = load_cpu(family, &dir.join(format!("{name}.bf16.gguf")), DType::F32);
    let want = all_logits(&safetensors, &prompt);
    for (i, (g, w)) in all_logits(&bf16, &prompt).iter().zip(&want).enumerate() {
        assert!(rel_l2(g, w) <= 1e-6, "BF16 GGUF, position {i}: {}", rel_l2(g, w));
    }
    assert_eq!(greedy_ignoring_eos(&bf16, &prompt, 8), greedy_ignoring_eos(&safetensors, &prompt, 8));
    drop((safetensors, bf16));

    let load = |stored: Option<Quantization>| {
        let options = LoadOptions { device: DeviceRequest::Cpu, dtype: Some(DType::F32), random_weights: None };
        let mut settings = PluginSettings::default();
        settings.optimization.prefill_chunk_tokens = Some(0);
        settings.optimization.quantization = stored;
        load_engine(family, &dir.join(format!("{name}.q.gguf")), &options, &settings).expect("loads the quantized GGUF")
    };
    let (kept, info) = load(None);
    assert!(info.quantization.starts_with(quantization), "{}", info.quantization);
    let (dense, info) = load(Some(Quantization::None));
    assert_eq!(info.quantization, "");
    let want = all_logits(&dense, &prompt);
    for (i, (g, w)) in all_logits(&kept, &prompt).iter().zip(&want).enumerate() {
        assert!(rel_l2(g, w) <= 1e-5, "quantized GGUF, prompt position {i}: {}", rel_l2(g, w));
    }
    for (i, (g, w)) in incremental_logits(&kept, &prompt, 5, 4).iter().zip(&want).enumerate() {
        assert!(rel_l2(g, w) <= 1e-5, "quantized GGUF, decode position {i}: {}", rel_l2(g, w));
    }
}

/// [`check_fixture`] for a model at `model` (a directory or a GGUF file) and its reference.
pub fn check_model(family: &ModelFamily, model: &Path, reference: &Value, name: &str, bf16: bool) {
    let prompts = reference["prompts"].as_array().cloned().unwrap_or_default();
    assert!(!prompts.is_empty(), "{name}: no prompts in the fixture");
    let engine = load_cpu(family, model, DType::F32);
    for prompt in &prompts {
        let input = ids(&prompt["ids"]);
        let got = all_logits(&engine, &input);
        let want = matrix(&prompt["logits"]);
        assert_eq!(got.len(), want.len(), "{name}: positions");
        for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
            let err = rel_l2(g, w);
            assert!(err <= 1e-4, "{name}, prompt of {} tokens, position {pos}: relative L2 {err}", input.len());
        }
        // The fixtures' greedy runs have EOS switched off (`generation_config.eos_token_id = None`).
        let want_greedy = ids(&prompt["greedy"]);
        assert_eq!(greedy_ignoring_eos(&engine, &input, want_greedy.len()), want_greedy, "{name}, prompt of {} tokens", input.len());
    }
    if bf16 {
        let engine = load_cpu(family, model, DType::Bf16);
        for prompt in &prompts {
            let input = ids(&prompt["ids"]);
            let rows = all_logits(&engine, &input);
            let want_rows = matrix(&prompt["logits_bf16"]);
            let f32_rows = matrix(&prompt["logits"]);
            let per_position: Vec<String> = rows
                .iter()
                .zip(&want_rows)
                .zip(&f32_rows)
                .map(|((g, w), f)| format!("{:.3}/{:.3}/{:.3}", rel_l2(g, w), rel_l2(g, f), rel_l2(w, f)))
                .collect();
            let closer: Vec<f32> = want_rows
                .iter()
                .zip(&f32_rows)
                .zip(&rows)
                .flat_map(|((b, f), g)| if rel_l2(g, b) <= rel_l2(g, f) { b.clone() } else { f.clone() })
                .collect();
            let err = rel_l2(&rows.concat(), &closer);
            let ours_from_f32 = rel_l2(&rows.concat(), &f32_rows.concat());
            let theirs_from_f32 = rel_l2(&want_rows.concat(), &f32_rows.concat());
            assert!(
                err <= 2e-2 || (ours_from_f32 <= 0.05 && ours_from_f32 <= 2.0 * theirs_from_f32),
                "{name} bf16, prompt of {} tokens: relative L2 {err} (ours from f32 {ours_from_f32}, theirs {theirs_from_f32}); per position (ours-vs-their-bf16 / ours-vs-f32 / theirs-vs-f32): {}",
                input.len(),
                per_position.join(" ")
            );
        }
    }
}

/// Checks the chat template of `model_dir` renders every conversation of a
/// `make_chat_template_fixtures.py` reference exactly as transformers did.
pub fn check_chat_template(family: &ModelFamily, model_dir: &Path, reference_path: &Path) {
    let text = std::fs::read_to_string(reference_path).unwrap_or_else(|e| panic!("cannot read {}: {e}", reference_path.display()));
    let reference: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON: {e}"));
    let engine = load_cpu(family, model_dir, DType::F32);
    let template = engine.template.as_ref().unwrap_or_else(|| panic!("{} has no chat template", model_dir.display()));
    let renders = reference["renders"].as_array().cloned().unwrap_or_default();
    assert!(!renders.is_empty(), "no renders in {}", reference_path.display());
    for case in renders {
        let messages: Vec<inference_pio_core::types::ChatMessage> =
            serde_json::from_value(case["messages"].clone()).unwrap_or_else(|e| panic!("messages: {e}"));
        let tools = case.get("tools").filter(|t| !t.is_null());
        let got = template.render(&messages, tools, true).unwrap_or_else(|e| panic!("render: {e}"));
        assert_eq!(got, case["text"].as_str().unwrap_or_default(), "conversation {messages:?}");
    }
}

/// The divergence of one model's next-token distributions from another's (shared with
/// `inference-pio bench`, which has no tensors).
pub use inference_pio_core::metrics::{Divergence, divergence};

/// The logits of every prompt position and of `new` greedy decode steps after it, and the
/// greedy tokens, straight through `decoder` over a private paged cache (blocks of 4 tokens,
/// laid out in reverse order): the prompt in one step, then one token a step.
pub fn prefill_and_greedy(decoder: &Decoder, prompt: &[u32], new: usize) -> Result<(Vec<Vec<f32>>, Vec<u32>), EngineError> {
    let mut sequence = Sequence::new(decoder, prompt.len() + new, 4);
    let mut tokens = prompt.to_vec();
    let mut rows = Vec::new();
    let mut start = 0;
    while tokens.len() < prompt.len() + new {
        let end = tokens.len();
        rows.extend(sequence.step(&tokens, start, end)?);
        tokens.push(crate::sampling::argmax(rows.last().map(Vec::as_slice).unwrap_or_default()));
        start = end;
    }
    Ok((rows, tokens.split_off(prompt.len())))
}

/// Tensor parallelism on the CPU ([`crate::tensor_parallel`]): `ranks` threads, each loading
/// its shard of the model at `dir` in f32 and meeting the others in an in-process all-reduce,
/// run `prompt` and `new` greedy steps together. Every rank's logits equal the unsharded
/// model's within 1e-5 relative L2 at every position, and its greedy tokens are the same.
/// Then the same through the serving loop (`tensor_parallel = ranks`, rank 0 on the loop's
/// thread and the others on theirs, each with its KV pool): the prompt's logits, greedy
/// generation, and a batch of three prompts equal to each alone.
pub fn check_tensor_parallel(family: &ModelFamily, dir: &Path, ranks: usize, prompt: &[u32], new: usize) {
    check_tensor_parallel_ranks(family, dir, ranks, prompt, new);
    let whole = load_cpu(family, dir, DType::F32);
    let split = load_cpu_with(family, dir, DType::F32, |s| s.optimization.tensor_parallel = Some(ranks as u32));
    for (pos, (g, w)) in all_logits(&split, prompt).iter().zip(&all_logits(&whole, prompt)).enumerate() {
        let err = rel_l2(g, w);
        assert!(err <= 1e-5, "served over {ranks} ranks, position {pos}: relative L2 {err}");
    }
    assert_eq!(greedy_ignoring_eos(&split, prompt, new), greedy_ignoring_eos(&whole, prompt, new), "served over {ranks} ranks: greedy tokens");
    // The decode steps went through the device-resident step (what CUDA records), every rank's
    // (a mixture of experts that places its experts on the host has none).
    if split.decoder.step_stays_on_device(1) {
        assert!(split.graph_counts().direct > 0, "served over {ranks} ranks: no decode step ran as the device-resident step");
    }
    let prompts: Vec<Vec<u32>> = (0..3).map(|k| prompt.iter().skip(k).map(|&t| t + k as u32).collect()).collect();
    check_rows_equal_alone(&split, &prompts, new);
}

fn check_tensor_parallel_ranks(family: &ModelFamily, dir: &Path, ranks: usize, prompt: &[u32], new: usize) {
    let load = || -> (DecoderConfig, DecoderSpec, Checkpoint) {
        let raw = DecoderConfig::read_json(&dir.join("config.json")).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let config = family.config(&raw).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let spec = (family.spec)(&config).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        (config, spec, Checkpoint::open(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())))
    };
    let (config, spec, ckpt) = load();
    let whole = Decoder::load(config.clone(), spec.clone(), &ckpt, &Device::flex(), DType::F32).unwrap_or_else(|e| panic!("unsharded: {e}"));
    let (want, want_tokens) = prefill_and_greedy(&whole, prompt, new).unwrap_or_else(|e| panic!("unsharded: {e}"));
    let shards = plan(&config, &spec, ranks).unwrap_or_else(|e| panic!("{e}"));
    let group = InProcessGroup::new(ranks);
    let results: Vec<(Vec<Vec<f32>>, Vec<u32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = shards
            .iter()
            .map(|shard| {
                let (group, load, shard) = (Arc::clone(&group), &load, shard.clone());
                s.spawn(move || {
                    let (config, spec, mut ckpt) = load();
                    let group: Arc<dyn Collective> = group;
                    let decoder = Decoder::load_rank(config, spec, &mut ckpt, &Device::flex(), DType::F32, &shard, group).unwrap_or_else(|e| panic!("rank {}: {e}", shard.rank));
                    prefill_and_greedy(&decoder, prompt, new).unwrap_or_else(|e| panic!("rank {}: {e}", shard.rank))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| panic!("a rank panicked"))).collect()
    });
    for (rank, (rows, tokens)) in results.iter().enumerate() {
        assert_eq!(rows.len(), want.len(), "rank {rank} of {ranks}: positions");
        for (pos, (g, w)) in rows.iter().zip(&want).enumerate() {
            let err = rel_l2(g, w);
            assert!(err <= 1e-5, "rank {rank} of {ranks}, position {pos}: relative L2 {err}");
        }
        assert_eq!(tokens, &want_tokens, "rank {rank} of {ranks}: greedy tokens");
    }
}

/// The decode step's rotary tables ([`crate::serve::graph::DecodeGraphs`]) start at
/// [`crate::serve::graph::ROPE_TABLE_START`] positions and grow when a step reaches past
/// them: the model at `dir`, its context cap raised to four times that, runs a prompt one
/// position past two growths in one pass, then decode steps at positions before, just past
/// the first table and past the second; each step's logits equal the prompt pass's at its
/// position (1e-5 relative L2), and the tables end at the cap.
pub fn check_rope_tables_grow(family: &ModelFamily, dir: &Path) {
    use crate::serve::graph::{DecodeGraphs, DecodeRow, ROPE_TABLE_START, RowToken};
    use std::{cell::RefCell, rc::Rc};
    let raw = DecoderConfig::read_json(&dir.join("config.json")).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut config = family.config(&raw).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let cap = 4 * ROPE_TABLE_START;
    config.max_position_embeddings = cap;
    let spec = (family.spec)(&config).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let ckpt = Checkpoint::open(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let decoder = Arc::new(Decoder::load(config, spec, &ckpt, &Device::flex(), DType::F32).unwrap_or_else(|e| panic!("load: {e}")));
    let block_tokens = 16;
    let len = 2 * ROPE_TABLE_START + 4;
    let blocks: Vec<u32> = (0..len.div_ceil(block_tokens) as u32).rev().collect();
    let vocab = decoder.config.vocab_size;
    let tokens: Vec<u32> = (0..len).map(|i| (i * 7 % vocab) as u32).collect();
    let probes = [ROPE_TABLE_START - 1, ROPE_TABLE_START + 5, len - 1];
    let pool = Rc::new(RefCell::new(decoder.new_kv_pool(blocks.len(), block_tokens)));
    let prompt = StepBatch {
        tokens: tokens.clone(),
        positions: (0..len).collect(),
        slots: (0..len).map(|p| slot_of(&blocks, block_tokens, p)).collect(),
        spans: vec![Span { queries: len, context: len, blocks: blocks.clone() }],
        logit_rows: probes.to_vec(),
        mrope: Vec::new(),
    };
    let logits = |t: burn::tensor::Tensor<2>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap_or_else(|e| panic!("logits: {e:?}"));
    let want = logits(decoder.forward(&prompt, &mut pool.borrow_mut()).unwrap_or_else(|e| panic!("prompt: {e}")));
    let mut graphs = DecodeGraphs::for_decoder(Arc::clone(&decoder) as Arc<dyn crate::serve::graph::StepDecoder>, cap);
    assert_eq!(graphs.rope_table_positions(), ROPE_TABLE_START);
    for (i, &p) in probes.iter().enumerate() {
        let row = DecodeRow { token: RowToken::Host(tokens[p]), position: p, rope_position: p, blocks: &blocks };
        let got = logits(graphs.step(&[row], &pool, None).unwrap_or_else(|e| panic!("step at {p}: {e}")));
        let err = rel_l2(&got[..vocab], &want[i * vocab..(i + 1) * vocab]);
        assert!(err < 1e-5, "decode step at position {p} (tables of {} positions): rel L2 {err:.2e}", graphs.rope_table_positions());
    }
    assert_eq!(graphs.rope_table_positions(), cap, "the tables grew by doubling to the cap");
}
