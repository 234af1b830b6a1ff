//! Times decoding and preprocessing one image file as Qwen3-VL takes it (`qwen3_vl()`).
//! `cargo run -p inference-pio-image-input --example preprocess_time -- FILE [repeats]`
fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: preprocess_time FILE [repeats]");
        std::process::exit(2);
    };
    let repeats: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(5);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let p = inference_pio_image_input::ImageProcessor::qwen3_vl();
    for _ in 0..repeats {
        let t = std::time::Instant::now();
        let rgb = inference_pio_image_input::decode::decode_image(&bytes, &Default::default()).expect("decode");
        let decoded = t.elapsed();
        let patches = p.preprocess(&rgb.pixels, rgb.width, rgb.height).expect("preprocess");
        println!("decode {:.2} ms, preprocess {:.2} ms, grid {:?}", decoded.as_secs_f64() * 1e3, (t.elapsed() - decoded).as_secs_f64() * 1e3, patches.grid_thw);
    }
}
