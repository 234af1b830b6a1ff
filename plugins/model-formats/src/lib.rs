//! Model file containers, parsed without a tensor library so that the host (to select a
//! plugin), the engine (to load weights) and the fuzz targets share one validated parser.
//!
//! - [`gguf`]: llama.cpp's GGUF (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>):
//!   header, typed metadata, tensor table, alignment, and dequantization of F32, F16, BF16,
//!   Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K blocks; plus the mapping of its metadata and tensor names to the
//!   Hugging Face config and names (`transformers.integrations.gguf`).
//! - [`packed`]: GPTQ and AWQ packed 4/8-bit linear weights in safetensors checkpoints,
//!   unpacked to the same affine groups as GGUF's blocks.
//! - [`safetensors_header`]: the safetensors header (<https://huggingface.co/docs/safetensors>),
//!   checked against the file length, with shapes whose element counts cannot overflow.

pub mod gguf;
pub mod packed;
pub mod safetensors_header;

/// A malformed or unsupported file, with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub String);

impl FormatError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}
