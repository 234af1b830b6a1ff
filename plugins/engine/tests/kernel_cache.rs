//! The CubeCL cache location is taken from the host's cache directory (its own test binary:
//! CubeCL's configuration is fixed once per process).

use cubecl_runtime::config::cache::CacheConfig;
use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
use inference_pio_engine::kernel_cache;

#[test]
fn kernels_and_autotune_results_go_under_the_cache_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chosen = kernel_cache::configure(Some(dir.path()));
    assert_eq!(chosen, Some(dir.path().join("cubecl")));
    let config = CubeClRuntimeConfig::get();
    assert!(config.compilation.cache, "compiled kernels are cached");
    assert!(matches!(&config.environment.path, CacheConfig::Directory(p) if p == &dir.path().join("cubecl")));
    // Fixed once per process: a second caller gets the same answer.
    assert_eq!(kernel_cache::configure(Some(std::path::Path::new("/elsewhere"))), chosen);
}
