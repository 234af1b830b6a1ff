//! The `inference-pio` host as a library: plugin discovery and probing, in-process loading
//! behind a safe wrapper, selection by HF `architectures`, and the CLI commands.

pub mod cli;
pub mod discovery;
pub mod models;
pub mod plugin;
pub mod selection;
