//! The serving core on tiny Qwen3 checkpoints, on the CPU: requests submitted concurrently
//! (joining while others decode, finishing early, each with its own sampling settings) get
//! the tokens they get alone; the prefix cache, eviction, preemption by recomputation,
//! cancellation and the refusal of requests that can never fit.

use inference_pio_core::types::{DType, FinishReason, InferRequest, PluginSettings, PromptInput, SamplingOverrides, SamplingParams};
use inference_pio_engine::generate::{Engine, RowRequest, RowResult};
use inference_pio_engine::sampling::SamplingConfig;
use inference_pio_engine::testing::{all_logits, load_cpu_with, rel_l2};
use qwen3_4b_instruct_2507::FAMILY;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn load(change: impl FnOnce(&mut PluginSettings)) -> Engine {
    load_model("qwen3-tiny-b", DType::F32, change)
}

fn load_model(name: &str, dtype: DType, change: impl FnOnce(&mut PluginSettings)) -> Engine {
    load_cpu_with(&FAMILY, &fixture(name), dtype, |s| {
        s.optimization.kv_block_tokens = 4;
        change(s);
    })
}

/// Bytes of one 4-token block of qwen3-tiny-b in f32: 3 layers x (k, v) x 4 x 2 heads x 16.
const BLOCK_BYTES: f64 = (3 * 2 * 4 * 2 * 16 * 4) as f64;

fn prompt(len: usize, seed: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 37 + seed * 101 + 11) % 500 + 3) as u32).collect()
}

fn run(engine: &Engine, request: RowRequest) -> RowResult {
    let mut rows = engine
        .generate_rows(vec![request], &Default::default(), &mut |_, _, _| true, &mut Default::default())
        .expect("generate");
    rows.remove(0)
}

fn sampled(prompt: Vec<u32>, max_new: usize, seed: u64) -> RowRequest {
    let sampling = SamplingConfig { greedy: false, temperature: 1.3, top_k: 40, top_p: 0.95, min_p: 0.0, repetition_penalty: 1.1, presence_penalty: 0.0, frequency_penalty: 0.0, seed };
    RowRequest { sampling, ..RowRequest::greedy(prompt, max_new) }
}

#[test]
fn requests_joining_mid_decode_get_the_tokens_they_get_alone() {
    // A small step budget: prompts are chunked, and prefill chunks share steps with decodes.
    let engine = load(|s| {
        s.optimization.max_num_batched_tokens = 16;
        s.optimization.max_num_seqs = 8;
        s.optimization.prefill_chunk_tokens = Some(8);
    });
    let first = RowRequest::greedy(prompt(21, 0), 30).ignoring_eos();
    let joiners = [
        RowRequest::greedy(prompt(3, 1), 4).ignoring_eos(),
        sampled(prompt(40, 2), 12, 7),
        RowRequest { stop: vec!["never-produced".into()], ..RowRequest::greedy(prompt(9, 3), 20).ignoring_eos() },
        sampled(prompt(1, 4), 25, 9),
    ];
    let alone_first = run(&engine, first.clone());
    let alone: Vec<RowResult> = joiners.iter().map(|r| run(&engine, r.clone())).collect();

    let (started_tx, started_rx) = mpsc::channel();
    let together = std::thread::scope(|scope| {
        let first_run = scope.spawn(|| {
            let mut seen = 0;
            let mut rows = engine
                .generate_rows(
                    vec![first.clone()],
                    &Default::default(),
                    &mut |_, _, _| {
                        seen += 1;
                        if seen == 3 {
                            let _ = started_tx.send(());
                        }
                        true
                    },
                    &mut Default::default(),
                )
                .expect("first");
            rows.remove(0)
        });
        started_rx.recv().expect("the first request decodes");
        // Each joiner from its own thread, as the host's concurrent `infer` calls do.
        let handles: Vec<_> = joiners.iter().map(|r| scope.spawn(|| run(&engine, r.clone()))).collect();
        let joined: Vec<RowResult> = handles.into_iter().map(|h| h.join().expect("joiner")).collect();
        (first_run.join().expect("first"), joined)
    });
    assert_eq!(together.0.new_ids, alone_first.new_ids, "the first request");
    for (i, (got, want)) in together.1.iter().zip(&alone).enumerate() {
        assert_eq!(got.new_ids, want.new_ids, "joiner {i}");
        assert_eq!(got.finish, FinishReason::Length);
    }
    let stats = engine.stats();
    assert_eq!((stats.running, stats.waiting, stats.kv_blocks_used), (0, 0, 0), "{stats:?}");
    assert!(stats.decode_tokens_computed > 0 && stats.prompt_tokens_computed > 0, "{stats:?}");
}

#[test]
fn scoring_while_others_decode_gives_the_logits_of_scoring_alone() {
    let engine = load(|s| {
        s.optimization.max_num_batched_tokens = 8;
        s.optimization.max_num_seqs = 4;
    });
    let text = prompt(30, 5);
    let alone = all_logits(&engine, &text);
    let (under_load, _) = std::thread::scope(|scope| {
        let busy = scope.spawn(|| run(&engine, RowRequest::greedy(prompt(12, 6), 40).ignoring_eos()));
        (all_logits(&engine, &text), busy.join().expect("busy"))
    });
    assert_eq!(under_load.len(), alone.len());
    for (i, (a, b)) in under_load.iter().zip(&alone).enumerate() {
        assert!(rel_l2(a, b) <= 1e-4, "position {i}");
    }
}

#[test]
fn a_shared_system_prompt_is_prefilled_once_and_hits_equal_misses() {
    let system = prompt(20, 7);
    let with_tail = |t: u32| -> Vec<u32> { system.iter().copied().chain([t, t + 1, t + 2]).collect() };
    let requests: Vec<RowRequest> = (0..4).map(|i| RowRequest::greedy(with_tail(30 + 10 * i), 6).ignoring_eos()).collect();
    let cached = load(|_| {});
    let uncached = load(|s| s.optimization.prefix_caching = false);
    let mut computed = Vec::new();
    for r in &requests {
        let before = cached.stats().prompt_tokens_computed;
        let hit = run(&cached, r.clone());
        computed.push(cached.stats().prompt_tokens_computed - before);
        assert_eq!(hit.new_ids, run(&uncached, r.clone()).new_ids, "a prefix-cache hit differs from a miss");
    }
    // The first request computes its 23 prompt tokens; the others find the system prompt's
    // 5 full blocks (20 tokens) and compute their 3-token tails.
    assert_eq!(computed, vec![23, 3, 3, 3]);
    let stats = cached.stats();
    assert_eq!(stats.prefix_cache_hit_tokens, 60, "{stats:?}");
    assert_eq!(uncached.stats().prefix_cache_hit_tokens, 0);
    // Through the request API too: the cached prompt tokens are reported.
    let mut params = SamplingParams { greedy: true, ..Default::default() };
    params.values.max_new_tokens = Some(2);
    let response = cached
        .generate(&PromptInput::TokenIds(with_tail(200)), &params, &[], &Default::default(), &Default::default(), &mut |_, _| true)
        .expect("generate");
    assert_eq!(response.timings.cached_prompt_tokens, 20);
    assert_eq!(response.timings.kv_blocks_total, cached.kv_blocks().1 as u64);
}

#[test]
fn eviction_under_pressure_keeps_results_correct() {
    // 16 blocks: room for about two requests' prefixes at a time.
    let small = load(|s| s.optimization.kv_cache_gb = Some(16.0 * BLOCK_BYTES / 1e9));
    assert_eq!(small.kv_blocks().1, 16);
    let reference = load(|s| s.optimization.prefix_caching = false);
    let requests: Vec<RowRequest> = (0..6).map(|i| RowRequest::greedy(prompt(25, 20 + i), 5).ignoring_eos()).collect();
    // Twice over: the second round's prefixes were evicted by the first round's later ones.
    for round in 0..2 {
        for (i, r) in requests.iter().enumerate() {
            assert_eq!(run(&small, r.clone()).new_ids, run(&reference, r.clone()).new_ids, "round {round}, request {i}");
        }
    }
    assert_eq!(small.stats().prefix_cache_hit_tokens, 0, "everything was evicted before its reuse");
}

#[test]
fn too_small_a_cache_preempts_and_still_finishes_every_request_as_alone() {
    // 12 blocks of 4 (48 tokens) for four requests that each grow to 26 tokens (7 blocks).
    let small = load(|s| {
        s.optimization.kv_cache_gb = Some(12.0 * BLOCK_BYTES / 1e9);
        s.optimization.prefix_caching = false;
    });
    let requests: Vec<RowRequest> = (0..4).map(|i| RowRequest::greedy(prompt(8, 40 + i), 18).ignoring_eos()).collect();
    let alone: Vec<Vec<u32>> = requests.iter().map(|r| run(&small, r.clone()).new_ids).collect();
    let together = small
        .generate_rows(requests, &Default::default(), &mut |_, _, _| true, &mut Default::default())
        .expect("together");
    for (i, (got, want)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(&got.new_ids, want, "request {i}");
    }
    let stats = small.stats();
    assert!(stats.preemptions > 0, "{stats:?}");
    assert_eq!(stats.kv_blocks_used, 0);
}

#[test]
fn cancelling_mid_decode_frees_the_blocks() {
    let engine = load(|_| {});
    let mut params = SamplingParams { greedy: true, ..Default::default() };
    params.values.max_new_tokens = Some(60);
    let mut seen = 0;
    let response = engine
        .generate(&PromptInput::TokenIds(prompt(30, 9)), &params, &[], &Default::default(), &Default::default(), &mut |_, _| {
            seen += 1;
            seen < 4
        })
        .expect("generate");
    assert_eq!(response.finish_reason, FinishReason::Cancelled);
    assert_eq!(response.token_ids.len(), 4);
    let stats = engine.stats();
    assert_eq!((stats.kv_blocks_used, stats.running, stats.waiting), (0, 0, 0), "{stats:?}");
}

#[test]
fn a_request_that_can_never_fit_is_refused_naming_the_sizes() {
    let small = load(|s| s.optimization.kv_cache_gb = Some(8.0 * BLOCK_BYTES / 1e9));
    let err = small
        .generate_rows(vec![RowRequest::greedy(prompt(20, 1), 40)], &Default::default(), &mut |_, _, _| true, &mut Default::default())
        .expect_err("59 tokens cannot fit 32");
    let message = err.to_string();
    assert!(message.contains("59 tokens") && message.contains("32 tokens") && message.contains("kv_cache_gb"), "{message}");
    // One that fits still runs.
    assert_eq!(run(&small, RowRequest::greedy(prompt(20, 1), 5).ignoring_eos()).new_ids.len(), 5);
}

#[test]
fn settings_that_cannot_work_are_refused_with_the_key() {
    use inference_pio_core::types::{DeviceRequest, LoadOptions};
    let options = LoadOptions { device: DeviceRequest::Cpu, dtype: Some(DType::F32), random_weights: None };
    let bad = |change: fn(&mut PluginSettings)| {
        let mut s = PluginSettings::default();
        change(&mut s);
        match inference_pio_engine::plugin::load_engine(&FAMILY, &fixture("qwen3-tiny-b"), &options, &s) {
            Ok(_) => panic!("loaded with bad settings"),
            Err(e) => e.to_string(),
        }
    };
    assert!(bad(|s| s.optimization.max_num_seqs = 0).contains("max_num_seqs"));
    assert!(bad(|s| s.optimization.max_num_batched_tokens = 4).contains("max_num_batched_tokens"));
    assert!(bad(|s| s.optimization.kv_block_tokens = 12).contains("kv_block_tokens"));
    assert!(bad(|s| s.optimization.kv_cache_gb = Some(1e-9)).contains("no block"));
}

#[test]
fn device_resident_decode_steps_equal_host_built_steps() {
    // The step a CUDA graph records (padded rows, context gathered in 256-slot widths, inputs
    // refreshed in place) runs directly on the CPU; it must give the host-built step's tokens.
    // qwen3-tiny-c's context of 512 lets the longest row cross from a 256- to a 512-slot width.
    for dtype in [DType::F32, DType::Bf16] {
        let on = load_model("qwen3-tiny-c", dtype, |s| s.optimization.cuda_graphs = true);
        let off = load_model("qwen3-tiny-c", dtype, |s| s.optimization.cuda_graphs = false);
        let requests: Vec<RowRequest> =
            [(250, 1), (40, 2), (3, 3)].iter().map(|&(n, seed)| RowRequest::greedy(prompt(n, seed).iter().map(|t| t % 380).collect(), 12).ignoring_eos()).collect();
        let run_all = |engine: &Engine| -> Vec<Vec<u32>> {
            engine
                .generate_rows(requests.clone(), &Default::default(), &mut |_, _, _| true, &mut Default::default())
                .expect("generate")
                .into_iter()
                .map(|r| r.new_ids)
                .collect()
        };
        assert_eq!(run_all(&on), run_all(&off), "{dtype:?}");
        let counts = on.graph_counts();
        assert!(counts.direct >= 10, "{counts:?}");
        assert_eq!(off.graph_counts().direct, 0);
    }
}

#[test]
fn decode_steps_queued_before_the_last_is_read_back_give_the_same_tokens() {
    // With `async_scheduling` a greedy decode step is queued with its tokens gathered from the
    // previous step's picks on the device, before those are read back. Rows end at different
    // steps (by length, which is known ahead, and by their consumer stopping, which is not),
    // so the chained steps' rows change; the tokens must be those of the step-by-step loop.
    let on = load(|s| s.optimization.async_scheduling = true);
    let off = load(|s| s.optimization.async_scheduling = false);
    let requests: Vec<RowRequest> = (0..6).map(|i| RowRequest::greedy(prompt(3 + 5 * i, 40 + i), 5 + 4 * i).ignoring_eos()).collect();
    let run_all = |engine: &Engine| -> Vec<Vec<u32>> {
        let mut seen = [0usize; 6];
        engine
            .generate_rows(
                requests.clone(),
                &Default::default(),
                &mut |row, _, _| {
                    seen[row] += 1;
                    // Row 4's consumer stops after 7 tokens.
                    !(row == 4 && seen[row] == 7)
                },
                &mut Default::default(),
            )
            .expect("generate")
            .into_iter()
            .map(|r| r.new_ids)
            .collect()
    };
    let (chained, stepped) = (run_all(&on), run_all(&off));
    assert_eq!(chained, stepped);
    assert_eq!(chained.iter().map(Vec::len).collect::<Vec<_>>(), vec![5, 9, 13, 17, 7, 25]);
    let counts = on.graph_counts();
    assert!(counts.chained >= 15, "{counts:?}");
    assert_eq!(off.graph_counts().chained, 0);
    // Every block is back, and what the cache holds was computed from real tokens: a request
    // repeating row 5's prompt and tokens finds them and continues as the first did.
    assert_eq!(on.stats().kv_blocks_used, 0);
    let again: Vec<u32> = requests[5].prompt.iter().chain(&chained[5][..20]).copied().collect();
    let hit = run(&on, RowRequest::greedy(again, 5).ignoring_eos());
    assert_eq!(hit.new_ids, chained[5][20..25]);
    assert!(on.stats().prefix_cache_hit_tokens >= 40, "{:?}", on.stats());
}

#[test]
fn a_mixed_load_under_preemption_gives_the_same_results_with_async_scheduling_on_and_off() {
    // Twelve requests of varied prompts and lengths, greedy and sampled, some whose consumer
    // stops early, through a small step budget, a cap of five sequences (the rest join as
    // others end) and a cache too small for all of them (preemption, with placeholders in
    // flight), prefix caching on: the chained steps must change nothing.
    let engine = |on: bool| {
        load(move |s| {
            s.optimization.async_scheduling = on;
            s.optimization.max_num_batched_tokens = 24;
            s.optimization.max_num_seqs = 5;
            s.optimization.prefill_chunk_tokens = Some(8);
            s.optimization.kv_cache_gb = Some(20.0 * BLOCK_BYTES / 1e9);
        })
    };
    let requests: Vec<RowRequest> = (0..12)
        .map(|i| {
            let p = prompt(1 + (i * 7) % 30, 200 + i);
            let n = 3 + (i * 5) % 17;
            if i % 4 == 3 { sampled(p, n, 11 + i as u64) } else { RowRequest::greedy(p, n).ignoring_eos() }
        })
        .collect();
    let run_all = |engine: &Engine| -> (Vec<Vec<u32>>, u64) {
        let mut seen = [0usize; 12];
        let rows = engine
            .generate_rows(
                requests.clone(),
                &Default::default(),
                &mut |row, _, _| {
                    seen[row] += 1;
                    // Rows 2 and 7 are stopped by their consumers after 4 tokens.
                    !((row == 2 || row == 7) && seen[row] == 4)
                },
                &mut Default::default(),
            )
            .expect("generate");
        let stats = engine.stats();
        assert_eq!(stats.kv_blocks_used, 0, "{stats:?}");
        (rows.into_iter().map(|r| r.new_ids).collect(), stats.preemptions)
    };
    let (on, off) = (engine(true), engine(false));
    let ((chained, preempted_on), (stepped, preempted_off)) = (run_all(&on), run_all(&off));
    assert_eq!(chained, stepped);
    assert!(preempted_on > 0 && preempted_off > 0, "{preempted_on} / {preempted_off} preemptions");
    assert!(on.graph_counts().chained > 0, "{:?}", on.graph_counts());
    // Again on the same engines: the cached prefixes (real tokens only) give the same again.
    assert_eq!(run_all(&on).0, chained);
}

#[test]
fn many_greedy_rows_pick_their_tokens_on_the_device_as_alone() {
    // Plain greedy steps take the argmax where the logits are (our kernel on CubeCL devices,
    // burn's on the CPU) and read back only the ids: 70 rows together (a bucket of 128 when
    // recorded) must pick what each picks alone.
    let engine = load(|_| {});
    let prompts: Vec<Vec<u32>> = (0..70).map(|i| prompt(3 + i % 7, 100 + i)).collect();
    inference_pio_engine::testing::check_rows_equal_alone(&engine, &prompts, 4);
}

#[test]
fn a_request_waiting_for_a_place_reports_its_queue_time() {
    // One sequence at a time: the second request waits for the first to finish.
    let engine = load(|s| s.optimization.max_num_seqs = 1);
    let params = SamplingParams { greedy: true, ignore_eos: true, values: SamplingOverrides { max_new_tokens: Some(48), ..Default::default() }, ..Default::default() };
    let request = |seed| InferRequest { input: PromptInput::TokenIds(prompt(12, seed)), sampling: params.clone(), stop: vec![], cache_salt: String::new(), logprobs: None, constraint: None, images: Vec::new() };
    let batch = engine.generate_batch(&[request(1), request(2)], &Default::default(), &Default::default()).expect("batch");
    let (first, second) = (&batch.responses[0].timings, &batch.responses[1].timings);
    assert!(first.queued_s < first.time_to_first_token_s, "{first:?}");
    // It waited for the first's 48 steps. (The step loop takes a submission in between
    // steps, so the second may be taken a step or two after the first: not all 48.)
    assert!(second.queued_s >= first.total_s * 0.5, "second waited {} s, the first ran {} s", second.queued_s, first.total_s);
    assert!(first.queued_s < second.queued_s * 0.25, "first waited {} s, second {} s", first.queued_s, second.queued_s);
    assert!(second.time_to_first_token_s >= second.queued_s, "{second:?}");
}
