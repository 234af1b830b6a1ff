//! The Inference-PIO plugin seam.
//!
//! Everything a host and a plugin agree on, and nothing else: the ABI (an `abi_stable` root
//! module whose fields can only be appended, see [`abi`]), the serde types that cross it as
//! JSON ([`types`]), the configuration file with profiles, resource limits and security levels
//! ([`config`]), and the plugin-side export glue ([`export`]). No tensor library.
//!
//! Reference design: polars expression plugins (a small, versioned, boring ABI) and
//! `abi_stable`'s prefix-type root modules.

pub mod abi;
pub mod config;
pub mod export;
pub mod file_access;
pub mod metrics;
pub mod types;

pub use abi::{ABI_MAJOR, ABI_MINOR, ErrorKind, PluginError, PluginModule, PluginModuleRef};
pub use export::Plugin;

#[doc(hidden)]
pub use abi_stable as __abi_stable;
