//! Phase timings on stderr for diagnosing slow starts (weights, first prefill, first decode
//! steps), switched on by `INFERENCE_PIO_LOG` (any value). Each plugin is its own shared
//! library with its own statics, so this is plain `eprintln!` rather than a logging framework
//! the host would have to share across the boundary.

use std::sync::OnceLock;
use std::time::Instant;

fn start() -> Option<&'static Instant> {
    static START: OnceLock<Option<Instant>> = OnceLock::new();
    START.get_or_init(|| std::env::var_os("INFERENCE_PIO_LOG").map(|_| Instant::now())).as_ref()
}

/// Whether phase timings are on.
pub fn enabled() -> bool {
    start().is_some()
}

/// Prints `message` with the seconds since the first call, when enabled.
pub fn log(message: impl FnOnce() -> String) {
    if let Some(t0) = start() {
        eprintln!("[inference-pio {:9.3} s] {}", t0.elapsed().as_secs_f64(), message());
    }
}
