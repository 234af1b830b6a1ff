//! The `inference-pio` host as a library: plugin discovery and probing, in-process loading
//! behind a safe wrapper, sandboxed worker processes for the higher security levels,
//! selection by HF `architectures`, the CLI commands, the conformance suite every plugin
//! passes and the OpenAI-compatible server.

pub mod bench;
pub mod bench_report;
pub mod cgroup;
pub mod cli;
pub mod conformance;
pub mod digest;
pub mod discovery;
pub mod handle;
pub mod models;
pub mod plugin;
pub mod sandbox;
pub mod selection;
pub mod server;
pub mod stamped_cache;
pub mod worker;
