//! Any bytes given to the GGUF parser: an error or a file whose every tensor range lies inside
//! the bytes and dequantizes without panicking; never a panic, never a huge allocation
//! (libFuzzer's `-rss_limit_mb` / `-malloc_limit_mb` catch those).
#![no_main]

use inference_pio_formats::gguf::{self, Gguf};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = Gguf::parse(data) {
        let _ = gguf::hf::config(&file);
        for info in &file.tensors {
            let bytes = file.tensor_bytes(data, info).expect("parse validated every tensor range");
            if info.n_elements <= 1 << 20 {
                let _ = gguf::dequantize(info, bytes);
            }
        }
    }
});
