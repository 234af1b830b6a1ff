//! Any bytes as the body of `POST /v1/chat/completions` and of `POST /v1/completions`,
//! through the server's own parser and checks (`src/server/request.rs`, compiled here from
//! its path). What must hold: no panic, and whatever is accepted is within the limits the
//! checks promise — `max_tokens` between 1 and the context (and the key's limit when there is
//! one), at most 16 non-empty stop strings, a temperature in [0, 2], a top_p in (0, 1], a
//! deadline no longer than the server's.
#![no_main]

#[path = "../../src/server/request.rs"]
#[allow(dead_code)]
mod request;

use libfuzzer_sys::fuzz_target;
use request::{ChatBody, Checked, CompletionBody, Sampling};

const CONTEXT: u64 = 4096;
const KEY_LIMIT: u32 = 16;
const SERVER_TIMEOUT_S: f64 = 600.0;

fn holds(c: &Checked, most: u64) {
    assert!(c.max_tokens.is_none_or(|n| n >= 1 && n as u64 <= most), "{c:?}");
    assert!((1..=request::MAX_CHOICES).contains(&c.n), "{c:?}");
    assert!(c.stop.len() <= 16 && c.stop.iter().all(|s| !s.is_empty()), "{c:?}");
    assert!(c.temperature.is_none_or(|t| t > 0.0 && t <= 2.0), "{c:?}");
    assert!(c.top_p.is_none_or(|p| p > 0.0 && p <= 1.0), "{c:?}");
    assert!(c.presence_penalty.is_none_or(|p| (-2.0..=2.0).contains(&p) && p != 0.0), "{c:?}");
    assert!(c.frequency_penalty.is_none_or(|p| (-2.0..=2.0).contains(&p) && p != 0.0), "{c:?}");
    assert!(c.repetition_penalty.is_none_or(|r| r > 0.0 && r.is_finite()), "{c:?}");
    assert!(c.logprobs.is_none_or(|k| k <= request::MAX_TOP_LOGPROBS), "{c:?}");
}

fn check(sampling: &Sampling) {
    if let Ok(c) = sampling.check(CONTEXT, None) {
        holds(&c, CONTEXT);
    }
    if let Ok(c) = sampling.check(CONTEXT, Some((KEY_LIMIT, "fuzz"))) {
        holds(&c, KEY_LIMIT as u64);
        assert!(c.max_tokens.is_some(), "a key's limit always caps: {c:?}");
    }
    if let Ok(t) = sampling.timeout(SERVER_TIMEOUT_S) {
        assert!(t > 0.0 && t <= SERVER_TIMEOUT_S, "{t}");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = request::parse::<ChatBody>(data) {
        // No image directory: a path is refused without touching the file system.
        let _ = body.messages(&[]);
        check(&body.sampling);
    }
    if let Ok(body) = request::parse::<CompletionBody>(data) {
        let _ = body.prompt();
        check(&body.sampling);
    }
});
