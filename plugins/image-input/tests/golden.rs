//! The processor against transformers' (`Qwen2VLImageProcessorPil`, fixtures from
//! `tests/fixtures/make_fixtures.py`): the same grid, and every pixel value from the same 8-bit
//! level (the resize bit-exact with Pillow) within f32 rounding of the normalisation.

use inference_pio_image_input::ImageProcessor;
use std::path::Path;

#[test]
fn pixel_values_match_transformers_for_upscaled_downscaled_and_unresized_images() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let fixtures: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("fixtures.json")).expect("fixtures.json")).expect("json");
    let s = &fixtures["settings"];
    let get = |k: &str| s[k].as_u64().expect(k) as usize;
    let processor = ImageProcessor {
        patch_size: get("patch_size"),
        temporal_patch_size: get("temporal_patch_size"),
        merge_size: get("merge_size"),
        min_pixels: get("min_pixels"),
        max_pixels: get("max_pixels"),
        mean: [0.5; 3],
        std: [0.5; 3],
    };
    for case in fixtures["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let (w, h) = (case["width"].as_u64().expect("width") as usize, case["height"].as_u64().expect("height") as usize);
        let rgb = std::fs::read(dir.join(format!("{name}.rgb"))).expect("rgb");
        let want: Vec<f32> = std::fs::read(dir.join(format!("{name}.f32"))).expect("f32").chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let got = processor.preprocess(&rgb, w, h).expect(name);
        let grid: Vec<usize> = case["grid_thw"].as_array().expect("grid").iter().map(|v| v.as_u64().expect("dim") as usize).collect();
        assert_eq!(got.grid_thw.to_vec(), grid, "{name}");
        assert_eq!(got.values.len(), want.len(), "{name}");
        let level = |v: f32| ((v * 0.5 + 0.5) * 255.0).round() as i32;
        let mut off = 0;
        for (i, (a, b)) in got.values.iter().zip(&want).enumerate() {
            assert_eq!(level(*a), level(*b), "{name}: value {i} (patch {}, offset {}): {a} vs {b}", i / got.patch_width, i % got.patch_width);
            if (a - b).abs() > 1e-6 {
                off += 1;
            }
        }
        assert_eq!(off, 0, "{name}: {off} values differ past f32 rounding");
    }
}
