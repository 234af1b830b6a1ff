//! Parity with transformers (fixtures from tests/fixtures/make_fixtures.py) on two tiny
//! random-weight Qwen3-VL checkpoints, on the CPU: the vision tower's outputs, f32 logits at
//! every position and 16 greedy tokens for a text-only prompt, one image, two images of
//! different sizes and an image in the second turn — from transformers' `pixel_values` and
//! from the PNG files through our decoder and image processor — and bf16 within
//! transformers' own bf16 spread. Then the serving core's invariants with images: chunked
//! prefill (an image split over steps) equals one pass, a batch mixing text-only and image
//! requests equals each alone, and the prefix cache takes an image's blocks back for the same
//! image only.

use inference_pio_core::types::DType;
use inference_pio_engine::generate::{Engine, RowRequest};
use inference_pio_engine::multimodal::PromptMedia;
use inference_pio_engine::testing::{load_cpu, load_cpu_with, reference, rel_l2};
use inference_pio_engine::serve::vision_graph::{VisionCounts, VisionGraphs};
use inference_pio_engine::vision::PatchGrid;
use inference_pio_image_input::{DecodeLimits, Patches, decode_image};
use qwen3_vl_2b::FAMILY;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MODELS: [&str; 2] = ["vl-tiny-a", "vl-tiny-b"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn f32s(file: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixtures().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    inference_pio_engine::testing::ids(v)
}

/// transformers' `pixel_values` and grid of a fixture image.
fn reference_patches(name: &str) -> Patches {
    let images: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("images.json")).expect("images.json")).expect("json");
    let image = &images[name];
    let grid: Vec<usize> = image["grid_thw"].as_array().expect("grid").iter().map(|x| x.as_u64().expect("n") as usize).collect();
    Patches {
        values: f32s(image["pixels_file"].as_str().expect("file")),
        grid_thw: [grid[0], grid[1], grid[2]],
        patch_width: image["patch_width"].as_u64().expect("width") as usize,
    }
}

/// A fixture image from its PNG file, through our decoder and the model's image processor.
fn patches_from_file(engine: &Engine, name: &str) -> Patches {
    let bytes = std::fs::read(fixtures().join(format!("{name}.png"))).expect("png");
    let rgb = decode_image(&bytes, &DecodeLimits::default()).expect("decode");
    engine.image_patches(&rgb.pixels, rgb.width, rgb.height).expect("patches")
}

fn cases(name: &str) -> Vec<Value> {
    reference(&fixtures(), name)["cases"].as_array().expect("cases").clone()
}

fn case(name: &str, which: &str) -> Value {
    cases(name).into_iter().find(|c| c["case"] == which).unwrap_or_else(|| panic!("{name} has no case {which}"))
}

fn media(engine: &Engine, case: &Value, from_files: bool) -> Option<Arc<PromptMedia>> {
    let names: Vec<&str> = case["images"].as_array().expect("images").iter().map(|n| n.as_str().expect("name")).collect();
    if names.is_empty() {
        return None;
    }
    let images = names.iter().map(|n| if from_files { patches_from_file(engine, n) } else { reference_patches(n) }).collect();
    Some(engine.prompt_media(&ids(&case["ids"]), images).unwrap_or_else(|e| panic!("{}: {e}", case["case"])))
}

fn logits(engine: &Engine, prompt: &[u32], media: Option<Arc<PromptMedia>>) -> Vec<Vec<f32>> {
    engine.score_ids(prompt.to_vec(), media, true).unwrap_or_else(|e| panic!("score: {e}")).logits.expect("logits")
}

fn greedy(engine: &Engine, prompt: &[u32], media: Option<Arc<PromptMedia>>, n: usize) -> Vec<u32> {
    let request = RowRequest { media, ..RowRequest::greedy(prompt.to_vec(), n).ignoring_eos() };
    let rows = engine.generate_rows(vec![request], &Default::default(), &mut |_, _, _| true, &mut Default::default()).unwrap_or_else(|e| panic!("generate: {e}"));
    rows.into_iter().next().map(|r| r.new_ids).unwrap_or_default()
}

fn check_rows(name: &str, case: &Value, got: &[Vec<f32>], want: &[f32], tol: f64) {
    let vocab = want.len() / got.len();
    assert_eq!(got.len() * vocab, want.len(), "{name} {}: rows", case["case"]);
    for (i, row) in got.iter().enumerate() {
        let err = rel_l2(row, &want[i * vocab..(i + 1) * vocab]);
        assert!(err <= tol, "{name} {} position {i}: relative L2 {err}", case["case"]);
    }
}

#[test]
fn the_vision_tower_matches_transformers() {
    for name in MODELS {
        let engine = load_cpu(&FAMILY, &fixtures().join(name), DType::F32);
        let case = case(name, "one-image");
        let want = f32s(case["vision_file"].as_str().expect("file"));
        let rows: Vec<usize> = case["vision_rows"].as_array().expect("rows").iter().map(|x| x.as_u64().expect("n") as usize).collect();
        let image = reference_patches("image-40x56");
        let [t, h, w] = image.grid_thw;
        let tower = engine.decoder.vision.as_ref().expect("a vision tower");
        let features = tower.encode(&image.values, PatchGrid { t, h, w }).expect("encode");
        assert_eq!(features.deepstack.len() + 1, rows.len(), "{name}: DeepStack features");
        let width = engine.decoder.config.hidden_size;
        let mut offset = 0;
        for (k, got) in std::iter::once(&features.embeds).chain(&features.deepstack).enumerate() {
            let got: Vec<f32> = got.clone().into_data().convert::<f32>().try_to_vec::<f32>().expect("f32");
            let n = rows[k] * width;
            let err = rel_l2(&got, &want[offset..offset + n]);
            assert!(err <= 1e-4, "{name}: vision output {k} relative L2 {err}");
            offset += n;
        }
    }
}

/// The serving loop's cache of recorded encodings on the CPU, where nothing records: every
/// image gets the tower's features, bit for bit, encoded directly.
#[test]
fn images_through_the_recordings_cache_equal_the_tower_when_nothing_records() {
    let engine = load_cpu(&FAMILY, &fixtures().join(MODELS[0]), DType::F32);
    let image = reference_patches("image-40x56");
    let [t, h, w] = image.grid_thw;
    let grid = PatchGrid { t, h, w };
    let tower = engine.decoder.vision.as_ref().expect("a vision tower");
    let want = tower.encode(&image.values, grid).expect("encode");
    assert!(want.values().iter().all(|v| !v.is_empty()));
    let mut graphs = VisionGraphs::new(engine.shared_model(), true);
    for _ in 0..2 {
        let got = graphs.encode(&image.values, grid).expect("encode");
        assert_eq!(got.values(), want.values());
    }
    assert_eq!(graphs.counts, VisionCounts { recorded: 0, replayed: 0, direct: 2 });
}

#[test]
fn f32_logits_and_greedy_tokens_match_transformers_from_pixel_values() {
    for name in MODELS {
        let engine = load_cpu(&FAMILY, &fixtures().join(name), DType::F32);
        for case in cases(name) {
            let prompt = ids(&case["ids"]);
            let m = media(&engine, &case, false);
            let want = f32s(case["logits_file"].as_str().expect("file"));
            check_rows(name, &case, &logits(&engine, &prompt, m.clone()), &want, 1e-4);
            assert_eq!(greedy(&engine, &prompt, m, 16), ids(&case["greedy"]), "{name} {}", case["case"]);
        }
    }
}

#[test]
fn image_files_through_our_decoder_and_processor_give_the_same_answers() {
    for name in MODELS {
        let engine = load_cpu(&FAMILY, &fixtures().join(name), DType::F32);
        for which in ["one-image", "two-images"] {
            let case = case(name, which);
            let prompt = ids(&case["ids"]);
            // The pixels: within one 8-bit level of transformers' (the 48x80 image is already
            // a multiple of 16, so it is not resized: equal up to the normalisation's rounding).
            for n in case["images"].as_array().expect("images") {
                let n = n.as_str().expect("name");
                let (ours, theirs) = (patches_from_file(&engine, n), reference_patches(n));
                assert_eq!(ours.grid_thw, theirs.grid_thw, "{n}");
                let worst = ours.values.iter().zip(&theirs.values).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst <= 2.0 / 255.0 + 1e-6, "{n}: pixels differ by {worst}");
                if n == "image-48x80" {
                    // Not resized: the same pixels, normalised (f32 here, f64 in numpy).
                    assert!(worst <= 1e-6, "{n}: pixels differ by {worst}");
                }
            }
            let m = media(&engine, &case, true);
            let want = f32s(case["logits_file"].as_str().expect("file"));
            check_rows(name, &case, &logits(&engine, &prompt, m.clone()), &want, 1e-2);
            assert_eq!(greedy(&engine, &prompt, m, 16), ids(&case["greedy"]), "{name} {which} from files");
        }
    }
}

#[test]
fn bf16_logits_are_within_transformers_own_bf16_spread() {
    for name in MODELS {
        let engine = load_cpu(&FAMILY, &fixtures().join(name), DType::Bf16);
        let case = case(name, "one-image");
        let prompt = ids(&case["ids"]);
        let got: Vec<f32> = logits(&engine, &prompt, media(&engine, &case, false)).concat();
        let f32_run = f32s(case["logits_file"].as_str().expect("file"));
        let bf16_run = f32s(case["bf16_logits_file"].as_str().expect("file"));
        // transformers' bf16 run is this far from its f32 run; ours must be as close to either.
        let spread = case["bf16_vs_f32_rel_l2"].as_f64().expect("spread");
        let err = rel_l2(&got, &f32_run).min(rel_l2(&got, &bf16_run));
        assert!(err <= 2.0 * spread.max(1e-2), "{name}: bf16 relative L2 {err} (transformers' own spread {spread})");
    }
}

#[test]
fn chunked_prefill_splitting_images_equals_one_pass() {
    let name = "vl-tiny-b";
    let one_pass = load_cpu(&FAMILY, &fixtures().join(name), DType::F32);
    let chunked = load_cpu_with(&FAMILY, &fixtures().join(name), DType::F32, |s| {
        s.optimization.prefill_chunk_tokens = Some(5);
        s.optimization.prefix_caching = false;
    });
    for which in ["two-images", "second-turn"] {
        let case = case(name, which);
        let prompt = ids(&case["ids"]);
        let (a, b) = (media(&one_pass, &case, false), media(&chunked, &case, false));
        let (whole, split) = (greedy(&one_pass, &prompt, a, 8), greedy(&chunked, &prompt, b, 8));
        assert_eq!(whole, split, "{which}: chunks of 5 tokens (images split over steps) vs one pass");
        assert_eq!(whole, ids(&case["greedy"])[..8].to_vec());
    }
}

#[test]
fn a_batch_mixing_text_and_image_requests_equals_each_alone() {
    let name = "vl-tiny-a";
    let engine = load_cpu(&FAMILY, &fixtures().join(name), DType::F32);
    let requests: Vec<RowRequest> = cases(name)
        .iter()
        .map(|c| RowRequest { media: media(&engine, c, false), ..RowRequest::greedy(ids(&c["ids"]), 12).ignoring_eos() })
        .collect();
    let together = engine.generate_rows(requests.clone(), &Default::default(), &mut |_, _, _| true, &mut Default::default()).expect("together");
    for (request, row) in requests.into_iter().zip(together) {
        let want = request.media.is_some();
        let alone = engine.generate_rows(vec![request], &Default::default(), &mut |_, _, _| true, &mut Default::default()).expect("alone");
        assert_eq!(row.new_ids, alone[0].new_ids, "together vs alone (with images: {want})");
    }
}

#[test]
fn the_prefix_cache_takes_an_image_back_only_for_the_same_image() {
    let name = "vl-tiny-a";
    let engine = load_cpu_with(&FAMILY, &fixtures().join(name), DType::F32, |s| s.optimization.kv_block_tokens = 4);
    let case = case(name, "second-turn");
    let prompt = ids(&case["ids"]);
    let run = |images: Vec<Patches>| {
        let before = engine.stats().prefix_cache_hit_tokens;
        let m = engine.prompt_media(&prompt, images).expect("media");
        let out = greedy(&engine, &prompt, Some(m), 4);
        (out, engine.stats().prefix_cache_hit_tokens - before)
    };
    let image = || vec![reference_patches("image-48x80")];
    let (first, hits) = run(image());
    assert_eq!(hits, 0);
    // The same image again: every full block before the last token comes from the cache.
    let (again, hits) = run(image());
    assert_eq!(again, first);
    assert_eq!(hits as usize, (prompt.len() - 1) / 4 * 4);
    // Another image with the same tokens: only the blocks before the image are reused.
    let mut other = image();
    other[0].values.iter_mut().for_each(|v| *v = -*v);
    let (_, hits) = run(other);
    let image_start = prompt.iter().position(|&t| t == 261).expect("image token");
    assert_eq!(hits as usize, image_start / 4 * 4, "blocks up to the image's first");
}

#[test]
fn prompts_and_images_that_do_not_match_are_refused_by_name() {
    let engine = load_cpu(&FAMILY, &fixtures().join("vl-tiny-a"), DType::F32);
    let case = case("vl-tiny-a", "two-images");
    let prompt = ids(&case["ids"]);
    let err = engine.prompt_media(&prompt, vec![reference_patches("image-48x80")]).expect_err("one image short").to_string();
    assert!(err.contains("image tokens but only 1 image(s)"), "{err}");
    let mut bad = reference_patches("image-48x80");
    bad.patch_width = 100;
    let err = engine.prompt_media(&prompt, vec![bad]).expect_err("width").to_string();
    assert!(err.contains("do not fit the vision tower's 384"), "{err}");
    let err = engine.image_patches(&[0u8; 10], 2, 2).expect_err("bytes").to_string();
    assert!(err.contains("10 bytes of RGB8 pixels for a 2x2 image"), "{err}");
}
