//! API keys and the tenants behind them: who a request is, what it may ask for, and the
//! prefix-cache partition it computes in.
//!
//! The key file holds one key per line, optionally followed by `name=value` settings:
//!
//! ```text
//! # id names the tenant in logs and metrics (default: key1, key2, … by line order)
//! sk-alice-0123456789abcdef  id=alice max_concurrent=4 tokens_per_minute=20000 max_tokens=1024
//! sk-bob-0123456789abcdef    id=bob
//! ```
//!
//! - `max_concurrent`: requests of this key in flight at once; one more gets 429.
//! - `tokens_per_minute`: prompt + generated tokens of this key's answered requests over the
//!   last 60 s; at or past it, a new request gets 429 with `Retry-After` = the seconds until
//!   enough of the window has passed (OpenAI's and vLLM's TPM limits count the same tokens).
//! - `max_tokens`: the most a request may ask for (more: 400 naming the limit; a request that
//!   does not say gets this many at most).
//!
//! Every key computes in its own prefix-cache partition: the server derives the salt from the
//! key's id, and the client cannot choose it (vLLM's client-chosen `cache_salt` lets one
//! tenant probe another's cached prompts through time to first token).
//!
//! References: OpenAI's rate-limit errors (429, `rate_limit_exceeded`, `Retry-After`);
//! vLLM's `cache_salt` (RFC #16016) for what a salt does to the block hashes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The window `tokens_per_minute` counts over.
const WINDOW: Duration = Duration::from_secs(60);

/// The shortest key accepted.
pub const MIN_KEY_CHARS: usize = 16;

/// One key's limits (each `None`: unlimited).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    pub max_concurrent: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub max_tokens: Option<u32>,
}

/// One key's tenant: its id, limits, prefix-cache salt and what it has in flight.
#[derive(Debug)]
pub struct Tenant {
    pub id: String,
    pub limits: Limits,
    running: AtomicU32,
    /// (when answered, tokens) of the last 60 s.
    window: Mutex<VecDeque<(Instant, u64)>>,
}

/// Why a key's request is refused before it runs (429).
#[derive(Debug, PartialEq)]
pub struct OverLimit {
    pub message: String,
    pub retry_after_s: u32,
}

/// A request counted against its tenant's concurrency while it lives.
#[derive(Debug)]
pub struct Admitted {
    tenant: Arc<Tenant>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.tenant.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Tenant {
    pub fn new(id: impl Into<String>, limits: Limits) -> Self {
        Self { id: id.into(), limits, running: AtomicU32::new(0), window: Mutex::new(VecDeque::new()) }
    }

    /// The prefix-cache salt of this tenant's requests.
    pub fn cache_salt(&self) -> String {
        format!("tenant:{}", self.id)
    }

    /// Admits one more request, or says which limit it is over and when to retry.
    pub fn admit(self: &Arc<Self>, now: Instant) -> Result<Admitted, OverLimit> {
        if let Some(limit) = self.limits.tokens_per_minute {
            let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
            while window.front().is_some_and(|(at, _)| now.duration_since(*at) >= WINDOW) {
                window.pop_front();
            }
            let used: u64 = window.iter().map(|(_, n)| n).sum();
            if used >= limit {
                // The oldest entries leave the window first: wait until the sum is below it.
                let mut left = used;
                let mut until = now;
                for (at, n) in window.iter() {
                    left -= n;
                    until = *at + WINDOW;
                    if left < limit {
                        break;
                    }
                }
                let seconds = until.saturating_duration_since(now).as_secs_f64().ceil().max(1.0) as u32;
                return Err(OverLimit {
                    message: format!("API key `{}` used {used} tokens in the last minute, its limit is tokens_per_minute = {limit}; retry in {seconds} s", self.id),
                    retry_after_s: seconds,
                });
            }
        }
        let running = self.running.fetch_add(1, Ordering::SeqCst);
        if let Some(limit) = self.limits.max_concurrent
            && running >= limit
        {
            self.running.fetch_sub(1, Ordering::SeqCst);
            return Err(OverLimit { message: format!("API key `{}` has {running} requests running, its limit is max_concurrent = {limit}", self.id), retry_after_s: 1 });
        }
        Ok(Admitted { tenant: Arc::clone(self) })
    }

    /// Counts an answered request's tokens against `tokens_per_minute`.
    pub fn record(&self, tokens: u64, now: Instant) {
        if self.limits.tokens_per_minute.is_some() {
            self.window.lock().unwrap_or_else(|p| p.into_inner()).push_back((now, tokens));
        }
    }

    /// Requests of this tenant in flight.
    pub fn running(&self) -> u32 {
        self.running.load(Ordering::SeqCst)
    }
}

/// The accepted keys and their tenants.
#[derive(Debug, Default)]
pub struct Tenants {
    by_key: HashMap<String, Arc<Tenant>>,
}

impl Tenants {
    /// Parses a key file's text (`source` names it in errors).
    pub fn parse(text: &str, source: &str) -> Result<Self, String> {
        let mut by_key = HashMap::new();
        let mut ids = std::collections::HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            let mut words = line.split_whitespace();
            let Some(key) = words.next() else { continue };
            let at = format!("{source}, line {}", n + 1);
            if key.chars().count() < MIN_KEY_CHARS {
                return Err(format!("{at}: the API key `{}…` is shorter than {MIN_KEY_CHARS} characters", key.chars().take(4).collect::<String>()));
            }
            let mut id = format!("key{}", by_key.len() + 1);
            let mut limits = Limits::default();
            for word in words {
                let (name, value) = word.split_once('=').ok_or_else(|| format!("{at}: `{word}` is not a `name=value` setting"))?;
                let number = |max: u64| -> Result<u64, String> {
                    value.parse::<u64>().ok().filter(|v| (1..=max).contains(v)).ok_or_else(|| format!("{at}: `{name}` must be a whole number from 1 to {max}, got `{value}`"))
                };
                match name {
                    "id" if !value.is_empty() && value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) => id = value.to_string(),
                    "id" => return Err(format!("{at}: `id` takes letters, digits, `-`, `_` and `.`, got `{value}`")),
                    "max_concurrent" => limits.max_concurrent = Some(number(u32::MAX as u64)? as u32),
                    "tokens_per_minute" => limits.tokens_per_minute = Some(number(u64::MAX)?),
                    "max_tokens" => limits.max_tokens = Some(number(u32::MAX as u64)? as u32),
                    other => return Err(format!("{at}: unknown setting `{other}` (known: id, max_concurrent, tokens_per_minute, max_tokens)")),
                }
            }
            if !ids.insert(id.clone()) {
                return Err(format!("{at}: the id `{id}` is used by an earlier key"));
            }
            if by_key.insert(key.to_string(), Arc::new(Tenant::new(id, limits))).is_some() {
                return Err(format!("{at}: the key is listed twice"));
            }
        }
        if by_key.is_empty() {
            return Err(format!("{source} holds no key"));
        }
        Ok(Self { by_key })
    }

    /// The tenant of a presented key.
    pub fn find(&self, key: &str) -> Option<Arc<Tenant>> {
        self.by_key.get(key).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sk-aaaaaaaaaaaaaaaa";

    #[test]
    fn key_files_parse_and_bad_lines_are_named() {
        let t = Tenants::parse(&format!("# keys\n{A} id=alice max_concurrent=2 tokens_per_minute=100 max_tokens=8\n\nsk-bbbbbbbbbbbbbbbb # bob\n"), "keys.txt").expect("parses");
        assert_eq!(t.len(), 2);
        let alice = t.find(A).expect("alice");
        assert_eq!((alice.id.as_str(), &alice.limits), ("alice", &Limits { max_concurrent: Some(2), tokens_per_minute: Some(100), max_tokens: Some(8) }));
        assert_eq!(t.find("sk-bbbbbbbbbbbbbbbb").expect("bob").id, "key2");
        assert!(t.find("sk-cccccccccccccccc").is_none());
        for (text, error) in [
            ("short", "keys.txt, line 1: the API key `shor…` is shorter than 16"),
            (&format!("{A} max_tokens=0"), "`max_tokens` must be a whole number from 1"),
            (&format!("{A} burst=3"), "unknown setting `burst`"),
            (&format!("{A} max_concurrent"), "`max_concurrent` is not a `name=value` setting"),
            (&format!("{A} id=a\nsk-bbbbbbbbbbbbbbbb id=a"), "line 2: the id `a` is used by an earlier key"),
            (&format!("{A}\n{A} id=b"), "line 2: the key is listed twice"),
            (&format!("{A} id=a/b"), "`id` takes letters"),
            ("# nothing\n", "keys.txt holds no key"),
        ] {
            let e = Tenants::parse(text, "keys.txt").expect_err(text);
            assert!(e.contains(error), "{text}: {e}");
        }
    }

    #[test]
    fn concurrency_is_counted_while_admitted() {
        let t = Arc::new(Tenant::new("a", Limits { max_concurrent: Some(2), ..Default::default() }));
        let now = Instant::now();
        let one = t.admit(now).expect("one");
        let two = t.admit(now).expect("two");
        let refused = t.admit(now).expect_err("three");
        assert!(refused.message.contains("has 2 requests running, its limit is max_concurrent = 2"), "{}", refused.message);
        assert_eq!(t.running(), 2);
        drop(one);
        let _three = t.admit(now).expect("a slot freed");
        drop(two);
        assert_eq!(t.running(), 1);
    }

    #[test]
    fn tokens_per_minute_refuses_until_the_window_has_room() {
        let t = Arc::new(Tenant::new("a", Limits { tokens_per_minute: Some(100), ..Default::default() }));
        let start = Instant::now();
        drop(t.admit(start).expect("empty window"));
        t.record(60, start);
        drop(t.admit(start).expect("60 < 100"));
        t.record(50, start + Duration::from_secs(10));
        let refused = t.admit(start + Duration::from_secs(20)).expect_err("110 >= 100");
        // The first 60 tokens leave the window at 60 s: 40 s from now.
        assert_eq!(refused.retry_after_s, 40);
        assert!(refused.message.contains("used 110 tokens in the last minute, its limit is tokens_per_minute = 100"), "{}", refused.message);
        assert!(t.admit(start + Duration::from_secs(61)).is_ok());
    }

    #[test]
    fn salts_differ_by_tenant() {
        assert_ne!(Tenant::new("a", Limits::default()).cache_salt(), Tenant::new("b", Limits::default()).cache_salt());
    }
}
