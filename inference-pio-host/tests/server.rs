//! `inference-pio serve` end to end: the real binary serving the tiny Qwen3 fixture on a free
//! loopback port, driven over HTTP as an OpenAI client would (chat and completions, whole and
//! streamed, models, metrics), with concurrent clients, a client that leaves mid-stream,
//! overload, API keys and bad requests; and a server that listens while its models load.

mod common;

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_inference-pio");

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tiny-a")
}

/// A running server; killed on drop.
struct Server {
    child: Child,
    base: String,
    _cwd: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Server {
    start_in(tempfile::tempdir().expect("cwd"), extra)
}

/// Starts the server in `cwd` (where an `inference-pio.toml` may wait) and waits until its
/// model is loaded (`/health` 200).
fn start_in(cwd: tempfile::TempDir, extra: &[&str]) -> Server {
    let server = listening(cwd, &["--model", fixture().to_str().expect("utf8"), "--served-model-name", "tiny"], extra);
    let deadline = Instant::now() + Duration::from_secs(120);
    while get(&server, "/health").0 != 200 {
        assert!(Instant::now() < deadline, "the model did not load in time");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Starts `serve` with `models` in `cwd`; returns once it listens (models may still load).
fn listening(cwd: tempfile::TempDir, models: &[&str], extra: &[&str]) -> Server {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(models)
        .args(["--port", "0"])
        .args(extra)
        .current_dir(cwd.path())
        .env_remove("INFERENCE_PIO_CONFIG")
        .env_remove("INFERENCE_PIO_PLUGIN_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(at) = line.split("listening on ").nth(1) {
                let _ = tx.send(at.split_whitespace().next().unwrap_or_default().to_string());
            }
        }
    });
    let base = rx.recv_timeout(Duration::from_secs(60)).expect("the server did not start listening");
    Server { child, base, _cwd: cwd }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().into()
}

/// POSTs JSON text; returns the status and the body as JSON (or as a string).
fn post(server: &Server, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    let mut request = agent().post(&format!("{}{path}", server.base)).header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("authorization", &format!("Bearer {key}"));
    }
    let mut response = request.send(body).expect("request");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn get(server: &Server, path: &str) -> (u16, String) {
    let mut response = agent().get(&format!("{}{path}", server.base)).call().expect("request");
    (response.status().as_u16(), response.body_mut().read_to_string().expect("body"))
}

/// The `data:` payloads of a streamed answer.
fn stream(server: &Server, path: &str, body: &Value) -> Vec<String> {
    let mut response = agent().post(&format!("{}{path}", server.base)).header("content-type", "application/json").send(body.to_string()).expect("request");
    assert_eq!(response.status().as_u16(), 200);
    let text = response.body_mut().read_to_string().expect("body");
    text.lines().filter_map(|l| l.strip_prefix("data: ").map(str::to_string)).collect()
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
}

fn streamed_text(events: &[String]) -> (String, Value) {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let mut text = String::new();
    let mut usage = Value::Null;
    for e in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(e).expect("chunk json");
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(t) = chunk["choices"][0]["text"].as_str() {
            text.push_str(t);
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
    }
    (text, usage)
}

/// The metric `name`'s value in /metrics.
fn metric(server: &Server, name: &str) -> f64 {
    let (_, text) = get(server, "/metrics");
    text.lines().find(|l| l.starts_with(&format!("inference_pio:{name}"))).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(-1.0)
}

#[test]
fn chat_and_completions_match_run_whole_streamed_and_concurrent() {
    let server = start(&[]);
    let (status, models) = get(&server, "/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).expect("json");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(get(&server, "/health"), (200, "ok".to_string()));

    // The same greedy request through `inference-pio run`.
    let out = Command::new(BIN)
        .args(["run", "--model", fixture().to_str().expect("utf8"), "--prompt", "What is 2+2?", "--greedy", "--max-new-tokens", "12", "--json"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run: Value = serde_json::from_slice(&out.stdout).expect("run json");

    let (status, answer) = post(&server, "/v1/chat/completions", &chat("What is 2+2?", 12).to_string(), None);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(answer["choices"][0]["message"]["content"], run["text"], "the server's answer differs from `run`'s");
    assert_eq!(answer["usage"]["prompt_tokens"], run["prompt_token_ids"].as_array().expect("ids").len());
    assert_eq!(answer["usage"]["completion_tokens"], 12);
    assert_eq!(answer["choices"][0]["finish_reason"], "length");

    // Streamed: the deltas add up to the same text; usage comes last when asked for.
    let mut body = chat("What is 2+2?", 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = stream(&server, "/v1/chat/completions", &body);
    let (text, usage) = streamed_text(&events);
    assert_eq!(text, run["text"].as_str().expect("text"));
    assert_eq!(usage, answer["usage"]);

    // Completions from token ids and from text.
    let (status, completion) = post(&server, "/v1/completions", &json!({"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": 5, "temperature": 0}).to_string(), None);
    assert_eq!(status, 200, "{completion}");
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(completion["usage"]["completion_tokens"], 5);
    let streamed = stream(&server, "/v1/completions", &json!({"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": 5, "temperature": 0, "stream": true}));
    assert_eq!(streamed_text(&streamed).0, completion["choices"][0]["text"].as_str().expect("text"));

    // 64 concurrent clients, most streamed, each given what it gets alone.
    let prompts: Vec<String> = (0..64).map(|i| format!("Count to {i}, please.")).collect();
    let alone: Vec<Value> = prompts.iter().map(|p| post(&server, "/v1/chat/completions", &chat(p, 10).to_string(), None).1["choices"][0]["message"]["content"].clone()).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let server = &server;
                scope.spawn(move || {
                    if i % 4 == 0 {
                        post(server, "/v1/chat/completions", &chat(p, 10).to_string(), None).1["choices"][0]["message"]["content"].clone()
                    } else {
                        let mut body = chat(p, 10);
                        body["stream"] = json!(true);
                        Value::String(streamed_text(&stream(server, "/v1/chat/completions", &body)).0)
                    }
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.join().expect("client"), alone[i], "client {i}");
        }
    });
    assert!(metric(&server, "request_success_total") >= 132.0);
    // Every answered request observed its latencies (TTFT once per request, ITL per later token).
    assert!(metric(&server, "time_to_first_token_seconds_count") >= 132.0);
    assert!(metric(&server, "e2e_request_latency_seconds_count") >= 132.0);
    assert!(metric(&server, "request_queue_time_seconds_count") >= 132.0);
    assert!(metric(&server, "inter_token_latency_seconds_count") >= 132.0 * 4.0);
    assert_eq!(metric(&server, "num_requests_running{model_name=\"tiny\"}"), 0.0);
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_stays_up() {
    let server = start(&[]);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/chat/completions", "{\"model\": \"tiny\", \"messages\": [".into(), 400, "malformed"),
        ("/v1/chat/completions", json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).to_string(), 404, "`nope` does not exist"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": 5}).to_string(), 400, "malformed"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": []}).to_string(), 400, "must not be empty"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}).to_string(), 400, "unknown message role"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 0}).to_string(), 400, "`n`"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000000}).to_string(), 400, "max_tokens"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 2.5}).to_string(), 400, "presence_penalty"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": "yes"}).to_string(), 400, "logprobs"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}).to_string(), 400, "response_format"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).to_string(), 400, "local image paths are not read"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).to_string(), 400, "malformed"),
        ("/v1/completions", json!({"model": "tiny", "prompt": {"a": 1}}).to_string(), 400, "prompt"),
        ("/v1/nothing", "{}".into(), 404, "no such endpoint"),
    ];
    for (path, body, status, needle) in cases {
        let (got, answer) = post(&server, path, &body, None);
        assert_eq!(got, status, "{path} {body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_else(|| panic!("not OpenAI's error shape: {answer}"));
        assert!(message.contains(needle), "{body}: {message}");
    }
    // A deadline: the request is stopped and answered 504; one past the server's is refused.
    let (got, answer) = post(&server, "/v1/chat/completions", &json!({"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 3000, "temperature": 0, "timeout_s": 0.05}).to_string(), None);
    assert_eq!(got, 504, "{answer}");
    assert!(answer["error"]["message"].as_str().expect("message").contains("deadline of 0.05 s"), "{answer}");
    let (got, _) = post(&server, "/v1/chat/completions", &json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "timeout_s": 100000}).to_string(), None);
    assert_eq!(got, 400);
    // A body past the limit is refused from its declared length, before any of it is sent.
    // (Over a raw socket: a client still writing 33 MiB when the server answers and closes may
    // see its connection reset before it reads the answer.)
    let address = server.base.trim_start_matches("http://").to_string();
    let mut socket = std::net::TcpStream::connect(&address).expect("connect");
    write!(socket, "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", 33 << 20).expect("send");
    socket.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buffer).expect("an answer before the body");
        assert!(n > 0, "closed without an answer");
        answer.extend_from_slice(&buffer[..n]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Still serving.
    let (status, answer) = post(&server, "/v1/chat/completions", &chat("hello", 3).to_string(), None);
    assert_eq!(status, 200, "{answer}");
}

/// Starts a long streamed chat (4,000 tokens, EOS ignored) over a raw socket and returns once its first
/// events arrived: the request is running. Dropping the socket hangs up.
fn long_stream(server: &Server, key: Option<&str>) -> std::net::TcpStream {
    let address = server.base.trim_start_matches("http://").to_string();
    let mut socket = std::net::TcpStream::connect(&address).expect("connect");
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 4000, "ignore_eos": true, "temperature": 0, "stream": true}).to_string();
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    write!(socket, "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).expect("send");
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while seen.windows(6).filter(|w| w == b"data: ").count() < 3 {
        let n = socket.read(&mut buffer).expect("read");
        assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buffer[..n]);
    }
    socket
}

#[test]
fn a_client_that_leaves_mid_stream_frees_its_request_and_a_full_queue_answers_503() {
    let server = start(&["--max-queue", "1"]);
    // Read the first events of a long stream, then hang up.
    let socket = long_stream(&server, None);
    // Running now, it holds the only place in the queue: another request is refused at once.
    let mut response = agent().post(&format!("{}/v1/chat/completions", server.base)).send(chat("hi", 2).to_string()).expect("request");
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let text = response.body_mut().read_to_string().expect("body");
    assert!(text.contains("limit of 1 requests"), "{text}");
    drop(socket);
    // The engine stops it within a step or so: cancelled, nothing running, no KV block held.
    let started = Instant::now();
    while metric(&server, "request_cancelled_total") < 1.0 {
        assert!(started.elapsed() < Duration::from_secs(20), "the abandoned stream was not cancelled");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric(&server, "num_requests_running{model_name=\"tiny\"}"), 0.0);
    assert_eq!(metric(&server, "kv_cache_usage_perc{model_name=\"tiny\"}"), 0.0);
    // The place is free again.
    let (status, answer) = post(&server, "/v1/chat/completions", &chat("hi", 2).to_string(), None);
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn api_keys_are_required_when_given_and_open_addresses_need_them() {
    let dir = tempfile::tempdir().expect("dir");
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "# tenants\nsk-tenant-a-0123456789abcdef\n").expect("keys");
    let server = start(&["--api-key-file", keys.to_str().expect("utf8")]);
    let body = chat("hi", 2).to_string();
    let (status, answer) = post(&server, "/v1/chat/completions", &body, None);
    assert_eq!(status, 401, "{answer}");
    assert!(answer["error"]["message"].as_str().expect("message").contains("missing API key"));
    assert_eq!(post(&server, "/v1/chat/completions", &body, Some("sk-wrong-0123456789abcdef")).0, 401);
    assert_eq!(post(&server, "/v1/chat/completions", &body, Some("sk-tenant-a-0123456789abcdef")).0, 200);
    // Health stays open (load balancers probe it).
    assert_eq!(get(&server, "/health").0, 200);

    // The config file's [server] table gives the same defaults (flags override it).
    let cwd = tempfile::tempdir().expect("cwd");
    std::fs::write(keys.parent().expect("dir").join("more-keys"), "sk-tenant-b-0123456789abcdef\n").expect("keys");
    std::fs::write(cwd.path().join("inference-pio.toml"), format!("[server]\napi_key_file = \"{}\"\n", dir.path().join("more-keys").display())).expect("config");
    let configured = start_in(cwd, &[]);
    assert_eq!(post(&configured, "/v1/chat/completions", &body, None).0, 401);
    assert_eq!(post(&configured, "/v1/chat/completions", &body, Some("sk-tenant-b-0123456789abcdef")).0, 200);
    drop(configured);

    // An open address without keys is refused at start; a short key is refused by name.
    let out = Command::new(BIN).args(["serve", "--model", fixture().to_str().expect("utf8"), "--host", "0.0.0.0", "--port", "0"]).output().expect("serve");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("without API keys"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&keys, "short\n").expect("keys");
    let out = Command::new(BIN).args(["serve", "--model", fixture().to_str().expect("utf8"), "--api-key-file", keys.to_str().expect("utf8"), "--port", "0"]).output().expect("serve");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("shorter than 16"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// POSTs with a key; returns the status, the Retry-After header and the body.
fn post_keyed(server: &Server, body: &Value, key: &str) -> (u16, Option<String>, Value) {
    let mut response = agent()
        .post(&format!("{}/v1/chat/completions", server.base))
        .header("content-type", "application/json")
        .header("authorization", &format!("Bearer {key}"))
        .send(body.to_string())
        .expect("request");
    let status = response.status().as_u16();
    let retry = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    let text = response.body_mut().read_to_string().expect("body");
    (status, retry, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[test]
fn each_key_is_a_tenant_with_its_own_limits_and_prefix_cache() {
    let dir = tempfile::tempdir().expect("dir");
    let keys = dir.path().join("keys");
    let (alice, bob, carol, dave, erin) =
        ("sk-alice-0123456789abcdef", "sk-bob-00123456789abcdef", "sk-carol-0123456789abcdef", "sk-dave-00123456789abcdef", "sk-erin-00123456789abcdef");
    std::fs::write(
        &keys,
        format!("{alice} id=alice max_tokens=4\n{bob} id=bob tokens_per_minute=1\n{carol} id=carol\n{dave} id=dave\n{erin} id=erin max_concurrent=1\n"),
    )
    .expect("keys");
    let server = start(&["--api-key-file", keys.to_str().expect("utf8")]);

    // max_tokens: past the key's limit is a 400 naming it; unsaid, the limit applies.
    let (status, _, answer) = post_keyed(&server, &chat("hi", 8), alice);
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"]["message"].as_str().expect("message").contains("past API key `alice`'s limit of 4"), "{answer}");
    let (status, _, answer) = post_keyed(&server, &json!({"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 0, "ignore_eos": true}), alice);
    assert_eq!((status, answer["usage"]["completion_tokens"].as_u64()), (200, Some(4)), "{answer}");

    // tokens_per_minute: the first request fits the empty window, the next waits for it.
    assert_eq!(post_keyed(&server, &chat("hi", 2), bob).0, 200);
    let (status, retry, answer) = post_keyed(&server, &chat("hi", 2), bob);
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["error"]["type"], "rate_limit_exceeded");
    assert!(answer["error"]["message"].as_str().expect("message").contains("tokens_per_minute = 1"), "{answer}");
    let seconds: u32 = retry.expect("Retry-After").parse().expect("seconds");
    assert!((1..=60).contains(&seconds), "{seconds}");
    // Other keys are not slowed by bob's limit.
    assert_eq!(post_keyed(&server, &chat("hi", 2), carol).0, 200);

    // max_concurrent: erin's second request while the first streams is a 429; after it, fine.
    let running = long_stream(&server, Some(erin));
    let (status, retry, answer) = post_keyed(&server, &chat("hi", 2), erin);
    assert_eq!((status, retry.as_deref()), (429, Some("1")), "{answer}");
    assert!(answer["error"]["message"].as_str().expect("message").contains("max_concurrent = 1"), "{answer}");
    drop(running);
    let started = Instant::now();
    loop {
        let (status, _, answer) = post_keyed(&server, &chat("hi", 2), erin);
        if status == 200 {
            break;
        }
        assert!(status == 429 && started.elapsed() < Duration::from_secs(20), "{status} {answer}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(metric(&server, "request_rate_limited_total") >= 2.0);

    // The prefix cache is partitioned by key: carol's second identical prompt hits her cached
    // blocks, dave's same prompt finds none of them (and then hits his own).
    let long = chat(&"The quick brown fox jumps over the lazy dog. ".repeat(12), 2);
    let hits = || metric(&server, "prefix_cache_hits{model_name=\"tiny\"}");
    assert_eq!(post_keyed(&server, &long, carol).0, 200);
    let before = hits();
    assert_eq!(post_keyed(&server, &long, carol).0, 200);
    let carol_hit = hits() - before;
    assert!(carol_hit >= 16.0, "carol's repeat found {carol_hit} cached tokens");
    let before = hits();
    assert_eq!(post_keyed(&server, &long, dave).0, 200);
    assert_eq!(hits() - before, 0.0, "dave hit carol's cached prompt");
    let before = hits();
    assert_eq!(post_keyed(&server, &long, dave).0, 200);
    assert_eq!(hits() - before, carol_hit, "dave's own repeat hits as carol's did");
}

#[test]
fn sigterm_drains_running_requests_up_to_the_drain_timeout_then_exits_0() {
    // A request that would run for long is cut at the 1 s drain timeout; the server exits 0.
    let mut server = start(&["--drain-timeout-s", "1"]);
    let mut socket = long_stream(&server, None);
    let pid = server.child.id();
    let sent = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill").success());
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break status;
        }
        assert!(sent.elapsed() < Duration::from_secs(30), "the server did not exit after its drain timeout");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    // Cut, not finished: the stream ends without `[DONE]`.
    let mut rest = Vec::new();
    let _ = socket.read_to_end(&mut rest);
    assert!(!String::from_utf8_lossy(&rest).contains("[DONE]"), "the long request finished within the drain timeout");
    assert!(sent.elapsed() >= Duration::from_millis(900), "exited before the drain timeout: {:?}", sent.elapsed());

    // A short request in flight at SIGTERM is finished, not cut.
    let server = start(&["--drain-timeout-s", "30"]);
    let base = server.base.clone();
    let client = std::thread::spawn(move || {
        let mut response = agent().post(&format!("{base}/v1/chat/completions")).send(chat("Tell me a story.", 200).to_string()).expect("request");
        (response.status().as_u16(), response.body_mut().read_to_string().expect("body"))
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().expect("kill").success());
    let (status, body) = client.join().expect("client");
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("json");
    assert!(answer["usage"]["completion_tokens"].as_u64().is_some_and(|n| n > 0), "{answer}");
}

#[test]
fn a_soak_of_mixed_requests_has_no_errors_and_stable_memory() {
    let server = start(&[]);
    let rss_kib = || {
        std::fs::read_to_string(format!("/proc/{}/status", server.child.id()))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()))
            .expect("VmRSS")
    };
    let round = |n: usize| {
        std::thread::scope(|scope| {
            for t in 0..16 {
                let server = &server;
                scope.spawn(move || {
                    for i in (t..n).step_by(16) {
                        let status = match i % 4 {
                            0 => post(server, "/v1/chat/completions", &chat(&format!("Say {i}."), 6).to_string(), None).0,
                            1 => post(server, "/v1/completions", &json!({"model": "tiny", "prompt": format!("Number {i}:"), "max_tokens": 6, "temperature": 0.7, "seed": i}).to_string(), None).0,
                            2 => {
                                let mut body = chat(&format!("Stream {i}."), 6);
                                body["stream"] = json!(true);
                                let events = stream(server, "/v1/chat/completions", &body);
                                assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
                                200
                            }
                            _ => post(server, "/v1/chat/completions", "{\"model\": \"tiny\", \"messages\": [", None).0,
                        };
                        assert_eq!(status, if i % 4 == 3 { 400 } else { 200 }, "request {i}");
                    }
                });
            }
        });
    };
    let started = Instant::now();
    round(64);
    let warm = rss_kib();
    round(320);
    let end = rss_kib();
    assert!(started.elapsed() < Duration::from_secs(60), "the soak took {:?}", started.elapsed());
    assert_eq!(metric(&server, "request_failure_total"), 0.0);
    assert!(end <= warm + 32 * 1024, "the server's RSS grew from {warm} KiB to {end} KiB over 320 requests");
}

#[test]
fn presence_and_frequency_penalties_reach_the_engine_as_run_applies_them() {
    let server = start(&[]);
    let body = |penalty: f64| json!({"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 30, "temperature": 0, "frequency_penalty": penalty, "presence_penalty": penalty / 2.0}).to_string();
    let (status, plain) = post(&server, "/v1/chat/completions", &body(0.0), None);
    assert_eq!(status, 200, "{plain}");
    let (status, penalised) = post(&server, "/v1/chat/completions", &body(2.0), None);
    assert_eq!(status, 200, "{penalised}");
    let text = |v: &Value| v["choices"][0]["message"]["content"].as_str().expect("content").to_string();
    // Greedy decoding of the tiny fixture repeats itself; the penalties break the repeats.
    assert_ne!(text(&plain), text(&penalised));
    let out = Command::new(BIN)
        .args(["run", "--model", fixture().to_str().expect("utf8"), "--prompt", "Hello", "--temperature", "0", "--max-new-tokens", "30"])
        .args(["--frequency-penalty", "2", "--presence-penalty", "1", "--json"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run: Value = serde_json::from_slice(&out.stdout).expect("run json");
    assert_eq!(text(&penalised), run["text"].as_str().expect("text"), "the server and `run` apply the penalties alike");
    // Out of range is refused by name, at the server and at `run`.
    let (status, answer) = post(&server, "/v1/chat/completions", &body(2.5), None);
    assert_eq!((status, answer["error"]["param"].as_str()), (400, Some("frequency_penalty")), "{answer}");
    let out = Command::new(BIN).args(["run", "--model", fixture().to_str().expect("utf8"), "--prompt", "Hi", "--presence-penalty", "3"]).output().expect("run");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--presence-penalty: must be in [-2, 2]"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn n_choices_are_each_what_a_single_request_with_its_seed_gets() {
    let server = start(&[]);
    // Sampled from the 4 likeliest tokens: the tiny random model's distribution is nearly
    // uniform over 151,936 tokens, where a batched step's products (summed in another order
    // than one row's, a last-bit difference) move a draw across a neighbour's bound often
    // enough to make a full-vocabulary sample a coin toss between arithmetic changes. Among 4
    // candidates the bounds are a quarter apart, so the test checks the seeds, which is its
    // point, not the last bit of the products.
    let body = |n: u32, seed: u64, stream: bool| {
        json!({"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8, "temperature": 1.0,
               "top_k": 4, "seed": seed, "n": n, "stream": stream, "stream_options": {"include_usage": true}})
    };
    let (status, answer) = post(&server, "/v1/chat/completions", &body(3, 40, false).to_string(), None);
    assert_eq!(status, 200, "{answer}");
    let choices = answer["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    let mut total = 0;
    let mut prompt = 0;
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        let (_, alone) = post(&server, "/v1/chat/completions", &body(1, 40 + i as u64, false).to_string(), None);
        assert_eq!(choice["message"]["content"], alone["choices"][0]["message"]["content"], "choice {i}");
        total += alone["usage"]["completion_tokens"].as_u64().expect("tokens");
        prompt = alone["usage"]["prompt_tokens"].as_u64().expect("prompt");
    }
    // The prompt counted once, the completions summed.
    assert_eq!(answer["usage"]["completion_tokens"], total);
    assert_eq!(answer["usage"]["prompt_tokens"], prompt);
    // Streamed: each choice's deltas add up to its whole text; usage covers all of them.
    let events = stream(&server, "/v1/chat/completions", &body(3, 40, true));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut texts = vec![String::new(); 3];
    let mut usage = Value::Null;
    for e in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(e).expect("chunk");
        if let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) {
            let i = choice["index"].as_u64().expect("index") as usize;
            texts[i].push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        } else {
            usage = chunk["usage"].clone();
        }
    }
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(text, choices[i]["message"]["content"].as_str().expect("content"), "streamed choice {i}");
    }
    assert_eq!(usage, answer["usage"]);
    // Completions too; past the limit is a 400.
    let (status, completion) = post(&server, "/v1/completions", &json!({"model": "tiny", "prompt": "Once", "max_tokens": 4, "n": 2, "temperature": 0}).to_string(), None);
    assert_eq!(status, 200, "{completion}");
    assert_eq!(completion["choices"][0]["text"], completion["choices"][1]["text"], "greedy choices are equal");
    let (status, answer) = post(&server, "/v1/chat/completions", &body(17, 1, false).to_string(), None);
    assert_eq!((status, answer["error"]["param"].as_str()), (400, Some("n")), "{answer}");
}

#[test]
fn health_is_503_while_the_models_load_and_requests_are_told_to_retry() {
    // The hostile test plugin loads a directory holding `load-delay-ms` that slowly.
    let model = tempfile::tempdir().expect("model dir");
    std::fs::write(model.path().join("config.json"), r#"{"architectures": ["PioTestHostileForCausalLM"]}"#).expect("config");
    std::fs::write(model.path().join("load-delay-ms"), "1500").expect("delay");
    let server = listening(
        tempfile::tempdir().expect("cwd"),
        &["--model", model.path().to_str().expect("utf8"), "--served-model-name", "slow", "--plugin", "test-hostile"],
        &[],
    );
    let request = json!({"model": "slow", "prompt": "echo", "max_tokens": 4}).to_string();
    let started = Instant::now();
    let mut response = agent().get(&format!("{}/health", server.base)).call().expect("health");
    assert_eq!(response.status().as_u16(), 503, "{}", response.body_mut().read_to_string().unwrap_or_default());
    assert!(response.headers().get("retry-after").is_some());
    let mut response = agent().post(&format!("{}/v1/completions", server.base)).header("content-type", "application/json").send(&request).expect("request");
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().get("retry-after").is_some());
    let body: Value = serde_json::from_str(&response.body_mut().read_to_string().expect("body")).expect("json");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("loading")), "{body}");
    assert_eq!(get(&server, "/v1/models").0, 200);
    // Then it loads, and answers.
    while get(&server, "/health").0 != 200 {
        assert!(started.elapsed() < Duration::from_secs(60), "the slow model never loaded");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(started.elapsed() >= Duration::from_millis(1000), "loaded before its delay");
    let (status, body) = post(&server, "/v1/completions", &request, None);
    assert_eq!(status, 200, "{body}");
    let (_, models) = get(&server, "/v1/models");
    assert!(models.contains("\"slow\""), "{models}");
}

#[test]
fn a_model_that_fails_to_load_stops_the_server_with_its_error() {
    let model = tempfile::tempdir().expect("model dir");
    std::fs::write(model.path().join("config.json"), r#"{"architectures": ["PioTestHostileForCausalLM"]}"#).expect("config");
    std::fs::write(model.path().join("load-delay-ms"), "not a number").expect("delay");
    let output = Command::new(BIN)
        .args(["serve", "--model", model.path().to_str().expect("utf8"), "--plugin", "test-hostile", "--port", "0"])
        .env_remove("INFERENCE_PIO_CONFIG")
        .env_remove("INFERENCE_PIO_PLUGIN_DIR")
        .output()
        .expect("serve");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("load-delay-ms") && stderr.contains("could not be loaded"), "{stderr}");
}

#[test]
fn tool_choice_none_leaves_the_tools_out_of_the_prompt_and_bad_choices_are_refused_by_name() {
    let server = start(&[]);
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let ask = |extra: Value| {
        let mut body = chat("What is the weather in Paris?", 6);
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let (status, answer) = post(&server, "/v1/chat/completions", &body.to_string(), None);
        assert_eq!(status, 200, "{answer}");
        (answer["usage"]["prompt_tokens"].as_u64().expect("usage"), answer["choices"][0]["message"]["content"].clone())
    };
    let plain = ask(json!({}));
    let offered = ask(json!({"tools": tools, "tool_choice": "auto"}));
    let none = ask(json!({"tools": tools, "tool_choice": "none"}));
    assert!(offered.0 > plain.0, "the tools are in the prompt with `auto`: {} vs {} tokens", offered.0, plain.0);
    assert_eq!(none, plain, "`none` renders the prompt without the tools");
    // A choice that names no offered tool, or is not a choice, is refused by name.
    for (choice, needle) in [
        (json!({"type": "function", "function": {"name": "get_time"}}), "not among `tools`"),
        (json!("sometimes"), "must be"),
    ] {
        let mut body = chat("hi", 4);
        body["tools"] = tools.clone();
        body["tool_choice"] = choice;
        let (status, error) = post(&server, "/v1/chat/completions", &body.to_string(), None);
        assert_eq!(status, 400, "{error}");
        assert!(error["error"]["message"].as_str().expect("message").contains(needle), "{error}");
    }
}

#[test]
fn tool_choice_required_and_named_make_the_model_call_tools_in_its_own_format() {
    // The tiny Qwen3-MoE fixture (random weights) is served by the Qwen3-Coder plugin, whose
    // models write `<tool_call><function=…>` calls.
    let coder = tempfile::tempdir().expect("model dir");
    common::full_vocabulary_moe(coder.path());
    let server = listening(tempfile::tempdir().expect("cwd"), &["--model", coder.path().to_str().expect("utf8"), "--served-model-name", "coder"], &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while get(&server, "/health").0 != 200 {
        assert!(Instant::now() < deadline, "the model did not load in time");
        std::thread::sleep(Duration::from_millis(20));
    }
    let tools = json!([
        {"type": "function", "function": {"name": "set_alarm", "parameters": {"type": "object",
            "properties": {"hour": {"type": "integer"}, "loud": {"type": "boolean"}, "day": {"enum": ["mon", "tue"]}}, "required": ["hour", "day"]}}},
        {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
    ]);
    let body = |choice: Value, stream: bool| {
        json!({"model": "coder", "messages": [{"role": "user", "content": "Wake me up"}], "tools": tools, "tool_choice": choice,
               "max_tokens": 1200, "temperature": 0, "stream": stream})
    };
    // Whatever the random weights prefer, the answer is calls of the offered tools with
    // arguments their schemas allow.
    let check = |call: &Value| {
        let name = call["function"]["name"].as_str().expect("name");
        let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("arguments")).expect("arguments are JSON");
        match name {
            "set_alarm" => {
                assert!(args["hour"].is_i64() && (args["day"] == "mon" || args["day"] == "tue"), "{args}");
                assert!(args.get("loud").is_none_or(Value::is_boolean), "{args}");
            }
            "ping" => assert_eq!(args, json!({})),
            other => panic!("a call of {other}"),
        }
        name.to_string()
    };
    let (status, answer) = post(&server, "/v1/chat/completions", &body(json!("required"), false).to_string(), None);
    assert_eq!(status, 200, "{answer}");
    let calls = answer["choices"][0]["message"]["tool_calls"].as_array().expect("tool calls").clone();
    assert!(!calls.is_empty() && answer["choices"][0]["finish_reason"] == "tool_calls", "{answer}");
    calls.iter().for_each(|c| {
        check(c);
    });
    let (status, answer) = post(&server, "/v1/chat/completions", &body(json!({"type": "function", "function": {"name": "set_alarm"}}), false).to_string(), None);
    assert_eq!(status, 200, "{answer}");
    let calls = answer["choices"][0]["message"]["tool_calls"].as_array().expect("tool calls").clone();
    assert_eq!(calls.len(), 1, "{answer}");
    assert_eq!(check(&calls[0]), "set_alarm");
    // Streamed as OpenAI streams calls: a delta with the index, id and name (arguments ""),
    // then the arguments in fragments, one per argument, which add up to the whole answer's;
    // then the finish reason.
    let events = stream(&server, "/v1/chat/completions", &body(json!({"type": "function", "function": {"name": "set_alarm"}}), true));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).expect("chunk")).collect();
    let deltas: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array()).flatten().collect();
    assert!(deltas.len() >= 3, "a start and at least the two required arguments: {events:?}");
    assert_eq!((deltas[0]["index"].as_u64(), deltas[0]["id"].as_str(), deltas[0]["function"]["name"].as_str()), (Some(0), Some("call_0"), Some("set_alarm")));
    assert_eq!(deltas[0]["function"]["arguments"], "");
    assert!(deltas[1..].iter().all(|d| d["index"] == 0 && d.get("id").is_none() && d["function"].get("name").is_none()), "{deltas:?}");
    let arguments: String = deltas.iter().map(|d| d["function"]["arguments"].as_str().expect("fragment")).collect();
    assert_eq!(arguments, calls[0]["function"]["arguments"].as_str().expect("whole"), "the fragments add up to the whole answer's arguments");
    assert_eq!(chunks.last().expect("last")["choices"][0]["finish_reason"], "tool_calls");
    // A named function and a response_format do not combine.
    let mut both = body(json!("required"), false);
    both["response_format"] = json!({"type": "json_object"});
    let (status, error) = post(&server, "/v1/chat/completions", &both.to_string(), None);
    assert_eq!((status, error["error"]["param"].as_str()), (400, Some("response_format")), "{error}");
}

#[test]
fn logprobs_come_whole_and_streamed_and_json_schema_answers_validate() {
    let server = start(&[]);
    // Chat: greedy, so each token is the most likely of its alternatives.
    let mut body = chat("Hello there", 8);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (status, whole) = post(&server, "/v1/chat/completions", &body.to_string(), None);
    assert_eq!(status, 200, "{whole}");
    let content = whole["choices"][0]["logprobs"]["content"].as_array().expect("logprobs content").clone();
    assert_eq!(content.len() as u64, whole["usage"]["completion_tokens"].as_u64().expect("usage"));
    for entry in &content {
        let top = entry["top_logprobs"].as_array().expect("top");
        assert_eq!(top.len(), 3, "{entry}");
        let lp = entry["logprob"].as_f64().expect("logprob");
        assert!(lp <= 0.0 && top.windows(2).all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()), "{entry}");
        assert_eq!(top[0]["token"], entry["token"], "greedy takes the most likely token: {entry}");
        assert_eq!(top[0]["logprob"], entry["logprob"]);
        assert!(entry["bytes"].is_array());
    }
    body["stream"] = json!(true);
    let events = stream(&server, "/v1/chat/completions", &body);
    let streamed: Vec<Value> = events[..events.len() - 1]
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed, content, "the stream carries each token's log-probabilities");
    // Completions: the legacy shape.
    let (status, done) = post(&server, "/v1/completions", &json!({"model": "tiny", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "logprobs": 2}).to_string(), None);
    assert_eq!(status, 200, "{done}");
    let l = &done["choices"][0]["logprobs"];
    assert_eq!(l["tokens"].as_array().map(Vec::len), Some(5), "{l}");
    assert_eq!(l["token_logprobs"].as_array().map(Vec::len), Some(5), "{l}");
    assert!(l["top_logprobs"].as_array().expect("top").iter().all(|m| m.as_object().is_some_and(|m| (1..=2).contains(&m.len()))), "{l}");
    // Without them: null, as OpenAI answers.
    let (_, plain) = post(&server, "/v1/chat/completions", &chat("Hello there", 4).to_string(), None);
    assert!(plain["choices"][0]["logprobs"].is_null());

    // response_format: the random tiny model writes whatever its weights say, yet every answer
    // is valid against the schema (constrained decoding), whole and streamed.
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["ok", "n"], "additionalProperties": false});
    for (i, prompt) in ["Give me JSON", "Hello there", "Say something"].iter().enumerate() {
        let mut body = chat(prompt, 40);
        body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "answer", "strict": true, "schema": schema}});
        if i == 2 {
            body["stream"] = json!(true);
        }
        let text = if i == 2 {
            streamed_text(&stream(&server, "/v1/chat/completions", &body)).0
        } else {
            let (status, answer) = post(&server, "/v1/chat/completions", &body.to_string(), None);
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["choices"][0]["finish_reason"], "stop", "the grammar ends the answer: {answer}");
            answer["choices"][0]["message"]["content"].as_str().expect("content").to_string()
        };
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
        assert!(value["ok"].is_boolean() && value["n"].as_u64().is_some_and(|n| n <= 99), "{value}");
        assert_eq!(value.as_object().map(|o| o.len()), Some(2), "{value}");
    }
    let mut body = chat("Hello", 20);
    body["response_format"] = json!({"type": "json_object"});
    let (status, answer) = post(&server, "/v1/chat/completions", &body.to_string(), None);
    assert_eq!(status, 200, "{answer}");
    let text = answer["choices"][0]["message"]["content"].as_str().expect("content");
    if answer["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(text).expect("json").is_object(), "{text}");
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
    // Past the grammar budget, or not a grammar: 400 naming it, and the server stays up.
    let mut body = chat("Hello", 4);
    body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "big", "schema": {"type": "object", "description": "x".repeat(70_000)}}});
    let (status, error) = post(&server, "/v1/chat/completions", &body.to_string(), None);
    assert_eq!(status, 400, "{error}");
    assert!(error["error"]["message"].as_str().expect("message").contains("grammar budget"), "{error}");
    body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "wat"}}});
    let (status, error) = post(&server, "/v1/chat/completions", &body.to_string(), None);
    assert_eq!(status, 400, "{error}");
    assert_eq!(get(&server, "/health").0, 200);
}

#[test]
fn tool_choice_required_on_qwen3_dense_gives_hermes_json_calls() {
    // Qwen3 dense models write Hermes calls (`<tool_call>{"name": .., "arguments": {..}}`). The
    // arguments follow the schema exactly (a random model would otherwise write digits without
    // end: the hour is bounded).
    let server = start(&[]);
    let tools = json!([{"type": "function", "function": {"name": "set_alarm", "parameters": {"type": "object",
        "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}, "day": {"enum": ["mon", "tue"]}}, "required": ["hour", "day"]}}}]);
    for choice in [json!("required"), json!({"type": "function", "function": {"name": "set_alarm"}})] {
        let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Wake me up"}], "tools": tools, "tool_choice": choice,
                          "max_tokens": 600, "temperature": 0});
        let (status, answer) = post(&server, "/v1/chat/completions", &body.to_string(), None);
        assert_eq!(status, 200, "{answer}");
        let calls = answer["choices"][0]["message"]["tool_calls"].as_array().expect("tool calls").clone();
        assert!(!calls.is_empty() && answer["choices"][0]["finish_reason"] == "tool_calls", "{answer}");
        for call in &calls {
            assert_eq!(call["function"]["name"], "set_alarm");
            let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("arguments")).expect("JSON arguments");
            assert!(args["hour"].as_i64().is_some_and(|h| (0..=23).contains(&h)) && (args["day"] == "mon" || args["day"] == "tue"), "{args}");
        }
    }
}

/// The tiny Qwen3-VL fixture's one-image chat: a `data:` URL image part, and a path inside
/// the `--image-dir`, give the answer `run --image` gives for the same file and prompt
/// (transformers' tokens, checked in tests/images.rs); an `http(s)` URL, a path outside the
/// allowed directory, video and malformed data are refused by name; the text-only model
/// refuses images.
#[test]
fn image_url_parts_reach_the_vision_model_and_what_cannot_is_named() {
    use base64::Engine as _;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/qwen3-vl-2b/tests/fixtures");
    let model = fixtures.join("vl-tiny-a");
    let image = fixtures.join("image-40x56.png");
    let cwd = tempfile::tempdir().expect("cwd");
    let run = Command::new(BIN)
        .args(["run", "--model", model.to_str().expect("utf8"), "--image", image.to_str().expect("utf8"), "--prompt", "What is this?"])
        .args(["--greedy", "--ignore-eos", "--max-new-tokens", "8", "--json", "--device", "cpu", "--dtype", "f32"])
        .current_dir(cwd.path())
        .env_remove("INFERENCE_PIO_CONFIG")
        .env_remove("INFERENCE_PIO_PLUGIN_DIR")
        .output()
        .expect("run");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let want: Value = serde_json::from_slice(&run.stdout).expect("json");

    let server = listening(
        tempfile::tempdir().expect("cwd"),
        &["--model", model.to_str().expect("utf8"), "--served-model-name", "vl", "--device", "cpu", "--dtype", "f32"],
        &["--image-dir", fixtures.to_str().expect("utf8")],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while get(&server, "/health").0 != 200 {
        assert!(Instant::now() < deadline, "the model did not load in time");
        std::thread::sleep(Duration::from_millis(20));
    }
    let data = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&image).expect("png"));
    let ask = |part: Value| {
        let body = json!({"model": "vl", "max_tokens": 8, "temperature": 0, "ignore_eos": true,
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}]});
        post(&server, "/v1/chat/completions", &body.to_string(), None)
    };
    let (status, body) = ask(json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{data}")}}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], want["text"]);
    assert_eq!(body["usage"]["prompt_tokens"], json!(want["prompt_token_ids"].as_array().expect("ids").len()));
    let (status, body) = ask(json!({"type": "image_url", "image_url": {"url": format!("file://{}", image.display())}}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], want["text"]);
    for (part, says) in [
        (json!({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}), "not fetched by this server"),
        (json!({"type": "image_url", "image_url": {"url": "/etc/passwd"}}), "outside the directories this server reads images from"),
        (json!({"type": "image_url", "image_url": {"url": format!("{}/../../src/lib.rs", fixtures.display())}}), "outside the directories"),
        (json!({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}), "must be `data:image/<format>;base64"),
        (json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}), "does not decode"),
        (json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}), "not a PNG, JPEG or WebP"),
        (json!({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}), "video input is not supported"),
    ] {
        let (status, body) = ask(part);
        assert_eq!(status, 400, "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains(says)), "{says}: {body}");
    }
    drop(server);
    let server = start(&[]);
    let (status, body) = post(&server, "/v1/chat/completions", &json!({"model": "tiny", "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{data}")}}]}]}).to_string(), None);
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("does not take images")), "{body}");
}
