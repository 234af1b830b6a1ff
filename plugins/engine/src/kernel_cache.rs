//! Where CubeCL keeps compiled kernels and autotune results between runs (CubeCL's
//! `CubeClRuntimeConfig`: `environment.path`, `compilation.cache`, `autotune`).
//!
//! Without a persistent cache every process compiles each kernel again through NVRTC and
//! re-tunes every matmul shape (about 20 candidates, 1-3 s each), which dominated the time to
//! first token on the GPU. The plugin points CubeCL at `<cache_dir>/cubecl` (the host's cache
//! directory, `~/.cache/inference-pio` by default) before the first CUDA device is made, so a
//! later start can reuse both, and switches kernel caching on. A location the operator set
//! (`environment.path` in a `cubecl.toml`, other `CUBECL_*` settings) is kept: only the
//! default location (`target/environment` below the working directory's Cargo workspace) is
//! replaced.

use cubecl_runtime::config::cache::CacheConfig;
use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Sets CubeCL's cache location under `cache_dir` once per process; returns the directory in
/// use (`None`: no cache directory was given and none was configured, or CubeCL's
/// configuration was already fixed by an earlier caller).
pub fn configure(cache_dir: Option<&Path>) -> Option<PathBuf> {
    static CHOSEN: OnceLock<Option<PathBuf>> = OnceLock::new();
    CHOSEN
        .get_or_init(|| {
            let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
            let root = match (&config.environment.path, cache_dir) {
                (CacheConfig::Target, Some(dir)) => {
                    let root = dir.join("cubecl");
                    config.environment.path = CacheConfig::Directory(root.clone());
                    root
                }
                (CacheConfig::Directory(root), _) => root.clone(),
                (other, _) => other.root(),
            };
            config.compilation.cache = true;
            CubeClRuntimeConfig::try_set(config).then_some(root)
        })
        .clone()
}
