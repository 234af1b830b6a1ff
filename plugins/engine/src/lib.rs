//! The Inference-PIO engine: what model plugins are built on.
//!
//! HF config parsing ([`hf_config`]), safetensors loading ([`weights`]), the dense decoder
//! ([`decoder`]: RMSNorm, RoPE, grouped-query attention with optional QK-norm, SwiGLU or
//! mixture-of-experts feed-forward ([`moe`]), tied embeddings) over a paged KV cache, the
//! serving core ([`serve`]: block pool with prefix caching, continuous-batching scheduler,
//! step loop, per-sequence output), sampling ([`sampling`]), the request entry points
//! ([`generate`]), tokenizer and streaming detokenizer ([`tokenizer`]), the model's chat
//! template ([`chat_template`]), the vision tower of vision-language models ([`vision`]), where compiled GPU kernels are cached ([`kernel_cache`]) and the plugin export glue ([`plugin`], [`export_model!`]).
//! Tensors come from burn; the device (CPU via flex, or CUDA) is chosen at run time.

pub mod chat_template;
pub mod constrain;
pub mod decoder;
pub mod error;
pub mod generate;
pub mod hf_config;
pub mod kernel_cache;
pub mod moe;
pub mod multimodal;
pub mod progress;
pub mod plugin;
pub mod rope;
pub mod sampling;
pub mod serve;
pub mod tensor_parallel;
pub mod testing;
pub mod tokenizer;
pub mod vision;
pub mod weights;

pub use decoder::DecoderSpec;
pub use error::EngineError;
pub use hf_config::DecoderConfig;
pub use moe::{MoeSpec, Router};
pub use inference_pio_chat_output::OutputFormat;
pub use plugin::ModelFamily;

#[doc(hidden)]
pub use inference_pio_core as __core;
