//! What the Llama plugin's integration tests share.

use std::path::PathBuf;

/// The default model where `inference-pio models fetch smollm2-135m-instruct` puts it
/// (`INFERENCE_PIO_SMOLLM2_GGUF` overrides); a test without it fails saying how to fetch it.
pub fn smollm2_path() -> PathBuf {
    let path = match std::env::var_os("INFERENCE_PIO_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .expect("HOME or XDG_CACHE_HOME")
            .join("inference-pio/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    assert!(
        path.is_file(),
        "{} is missing: run `./target/debug/inference-pio models fetch smollm2-135m-instruct` first (the README's test command does)",
        path.display()
    );
    path
}
