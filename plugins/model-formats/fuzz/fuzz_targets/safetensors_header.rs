//! Any bytes given to the safetensors header parser: an error or a header whose tensors'
//! byte ranges lie inside the data; never a panic.
#![no_main]

use inference_pio_formats::safetensors_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = safetensors_header::parse(data) {
        for (_, info) in header.metadata.tensors() {
            let (start, end) = info.data_offsets;
            assert!(start <= end && header.data_start + end <= data.len());
        }
    }
});
