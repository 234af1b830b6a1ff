//! `inference-pio plugins check`: the conformance suite every plugin passes, through the same
//! calls the host makes (in process, or through the sandboxed worker at `high`). Each check
//! is named, passes or fails with the reason, and never stops the others; a plugin that
//! panics or misbehaves fails its check, not the suite.
//!
//! Checks: metadata complete and consistent with `supports_config`; `initialize`; `load_model`
//! and what it reports; the ABI's `generate_text` and `chat_completion` agreeing with `infer`
//! of the same input, each with the streamed text equal to the final text, and token ids as
//! input giving the same tokens; cancellation within a step;
//! concurrent requests each equal to their single run; bad requests (no prompt, ids outside
//! the vocabulary, a prompt past the context) refused with errors and the plugin still
//! serving; images answered by a plugin whose metadata lists the `image` modality and refused
//! by any other (never answered as if unseen), a corrupt image refused by both;
//! `update_config` applying what it claims and refusing the rest; `cleanup` making the handle
//! unknown and giving memory back over load/cleanup cycles.

use crate::handle::PluginHandle;
use inference_pio_core::abi::{ABI_MAJOR, ErrorKind};
use inference_pio_core::config::{OptimizationSettings, SecurityLevel};
use inference_pio_core::types::{
    ChatMessage, ChatRequest, ConfigUpdate, ContentPart, ImageData, FinishReason, GenerateTextRequest, InferRequest, InferResponse, LoadOptions, ModelInfo, PluginSettings, PromptInput, SamplingOverrides, SamplingParams,
};
use std::path::Path;

/// One check's outcome: what it saw, or why it failed.
#[derive(Debug, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

/// New tokens each generation check asks for.
const NEW_TOKENS: u32 = 8;
/// Growth of this process's memory over the load/cleanup cycles past which memory is called
/// leaked (in-process plugins), at least this many bytes.
const LEAK_FLOOR_BYTES: u64 = 64 << 20;

fn greedy(input: PromptInput, new_tokens: Option<u32>) -> InferRequest {
    InferRequest {
        input,
        sampling: SamplingParams { greedy: true, values: SamplingOverrides { max_new_tokens: new_tokens, ..Default::default() }, ..Default::default() },
        stop: Vec::new(),
        cache_salt: String::new(),
        logprobs: None,
        constraint: None,
        images: Vec::new(),
    }
}

/// Runs `request`, collecting the streamed token ids and text.
fn streamed(plugin: &PluginHandle, model: u64, request: &InferRequest) -> Result<(InferResponse, Vec<u32>, String), String> {
    let (mut ids, mut text) = (Vec::new(), String::new());
    let response = plugin
        .infer(model, request, &mut |id, t, _| {
            ids.push(id);
            text.push_str(t);
            true
        })
        .map_err(|e| e.to_string())?;
    Ok((response, ids, text))
}

/// This process's resident memory in bytes.
fn rss_bytes() -> u64 {
    crate::worker::tree_rss_bytes(&[std::process::id()])
}

struct Suite<'a> {
    plugin: &'a PluginHandle,
    checks: Vec<Check>,
}

impl Suite<'_> {
    fn record(&mut self, name: &'static str, outcome: Result<String, String>) -> bool {
        let passed = outcome.is_ok();
        let detail = outcome.unwrap_or_else(|e| e);
        self.checks.push(Check { name, passed, detail });
        passed
    }
}

/// Runs every check on `plugin` (opened at `level`) with the model in `model_dir`.
pub fn run(plugin: &PluginHandle, level: SecurityLevel, model_dir: &Path, settings: &PluginSettings, options: &LoadOptions) -> Vec<Check> {
    let mut s = Suite { plugin, checks: Vec::new() };
    // The model's config.json, or the config a GGUF file's metadata gives (as selection reads it).
    let config_text = crate::selection::read_model_config(model_dir).map(|c| c.text).unwrap_or_else(|e| e.to_string());
    let metadata = plugin.metadata();
    s.record(
        "metadata",
        metadata.as_ref().map_err(|e| e.to_string()).and_then(|m| {
            let mut missing = Vec::new();
            for (field, empty) in [
                ("id", m.id.is_empty()),
                ("version", m.version.is_empty()),
                ("description", m.description.is_empty()),
                ("architectures", m.architectures.is_empty()),
                ("modalities", m.modalities.is_empty()),
                ("backends", m.backends.is_empty()),
                ("primary_model.name", m.primary_model.name.is_empty()),
            ] {
                if empty {
                    missing.push(field);
                }
            }
            if !missing.is_empty() {
                return Err(format!("empty: {}", missing.join(", ")));
            }
            if m.build.abi_major != ABI_MAJOR {
                return Err(format!("built for ABI {}, the host speaks {ABI_MAJOR}", m.build.abi_major));
            }
            if let Some(unknown) = m.optimizations.iter().find(|k| !OptimizationSettings::KEYS.contains(&k.as_str())) {
                return Err(format!("claims optimization setting `{unknown}`, which the host does not know"));
            }
            Ok(format!("{} {} (ABI {}.{}), architectures {}", m.id, m.version, m.build.abi_major, m.build.abi_minor, m.architectures.join(", ")))
        }),
    );
    s.record(
        "supports_config",
        (|| {
            let support = plugin.supports_config(&config_text).map_err(|e| e.to_string())?;
            if !support.supported {
                return Err(format!("does not support the model's config.json: {}", support.reason));
            }
            let config: serde_json::Value = serde_json::from_str(&config_text).map_err(|e| format!("the model's config.json: {e}"))?;
            let archs: Vec<&str> = config["architectures"].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
            if let Ok(m) = &metadata
                && !archs.iter().any(|a| m.architectures.iter().any(|b| b == a))
            {
                return Err(format!("supports architectures {archs:?}, which its metadata does not list ({:?})", m.architectures));
            }
            let mut other = config.clone();
            other["architectures"] = serde_json::json!(["NoSuchModelForCausalLM"]);
            let refused = plugin.supports_config(&other.to_string()).map_err(|e| e.to_string())?;
            if refused.supported {
                return Err("claims to support an unknown architecture".into());
            }
            Ok(format!("supports {archs:?}; refuses an unknown architecture ({})", refused.reason))
        })(),
    );
    if !s.record("initialize", plugin.initialize(settings).map(|()| format!("at security level {}", level.as_str())).map_err(|e| e.to_string())) {
        return s.checks;
    }
    let info = match plugin.load_model(model_dir, options) {
        Ok(info) if info.vocab_size > 0 && info.max_context > 0 => {
            s.record("load_model", Ok(format!("{} on {} ({} tokens of context, {} KV blocks)", info.architecture, info.device, info.max_context, info.kv_cache_blocks)));
            info
        }
        Ok(info) => {
            s.record("load_model", Err(format!("reports an empty vocabulary or context: {info:?}")));
            return s.checks;
        }
        Err(e) => {
            s.record("load_model", Err(e.to_string()));
            return s.checks;
        }
    };
    let model = info.handle;
    let takes_images = metadata.as_ref().is_ok_and(|m| m.modalities.iter().any(|x| x == "image"));
    generation_checks(&mut s, &info);
    bad_request_checks(&mut s, &info);
    image_check(&mut s, &info, takes_images);
    update_config_check(&mut s, &info);
    cleanup_check(&mut s, level, model_dir, options, model);
    s.checks
}

fn generation_checks(s: &mut Suite<'_>, info: &ModelInfo) {
    let plugin = s.plugin;
    let model = info.handle;
    const PROMPT: &str = "The quick brown fox";
    let text_request = greedy(PromptInput::Text(PROMPT.into()), Some(NEW_TOKENS));
    let text = streamed(plugin, model, &text_request);
    // The ABI's own entry point for a plain prompt, against `infer` of the same text.
    let sampling = text_request.sampling.clone();
    let abi = {
        let (mut ids, mut t) = (Vec::new(), String::new());
        plugin
            .generate_text(model, &GenerateTextRequest { prompt: PROMPT.into(), sampling: sampling.clone(), stop: Vec::new() }, &mut |id, piece, _| {
                ids.push(id);
                t.push_str(piece);
                true
            })
            .map(|r| (r, ids, t))
            .map_err(|e| e.to_string())
    };
    let ok = s.record(
        "generate_text",
        text.as_ref().map_err(String::clone).and_then(|(r, ids, t)| {
            if r.token_ids.is_empty() {
                return Err("no token generated".into());
            }
            if *ids != r.token_ids {
                return Err(format!("streamed ids {ids:?} differ from the answer's {:?}", r.token_ids));
            }
            if *t != r.text {
                return Err(format!("streamed text {t:?} differs from the answer's {:?}", r.text));
            }
            let (a, a_ids, a_text) = abi.as_ref().map_err(|e| format!("generate_text: {e}"))?;
            if a.token_ids != r.token_ids || *a_ids != a.token_ids || *a_text != a.text {
                return Err(format!("generate_text gave {:?} (streamed {a_ids:?}), infer gave {:?}", a.token_ids, r.token_ids));
            }
            Ok(format!("{} tokens through generate_text and infer alike, streamed text equals the final text", r.token_ids.len()))
        }),
    );
    if ok && let Ok((r, _, _)) = &text {
        let again = streamed(plugin, model, &greedy(PromptInput::TokenIds(r.prompt_token_ids.clone()), Some(NEW_TOKENS)));
        s.record(
            "token_ids_input",
            again.and_then(|(a, _, _)| {
                if a.token_ids == r.token_ids { Ok("the prompt's token ids give the same greedy tokens".into()) } else { Err(format!("{:?} from ids, {:?} from text", a.token_ids, r.token_ids)) }
            }),
        );
    }
    if info.has_chat_template {
        let messages = vec![ChatMessage::new("user", "Hello, who are you?")];
        let chat = greedy(PromptInput::Chat { messages: messages.clone(), tools: None }, Some(NEW_TOKENS));
        let request = ChatRequest { messages, tools: None, sampling: chat.sampling.clone(), stop: Vec::new() };
        let mut t = String::new();
        let abi = plugin
            .chat_completion(model, &request, &mut |_, piece, _| {
                t.push_str(piece);
                true
            })
            .map_err(|e| format!("chat_completion: {e}"));
        s.record(
            "chat_completion",
            abi.and_then(|a| {
                let (r, _, _) = streamed(plugin, model, &chat)?;
                if t != a.text {
                    return Err(format!("streamed {t:?}, answered {:?}", a.text));
                }
                if a.token_ids != r.token_ids {
                    return Err(format!("chat_completion gave {:?}, infer of the same chat {:?}", a.token_ids, r.token_ids));
                }
                Ok(format!("{} tokens through chat_completion and infer alike (the chat template), streamed text equals the final text", a.token_ids.len()))
            }),
        );
    } else {
        s.record("chat_completion", Ok("the model has no chat template: a chat is refused, checked with the bad requests".into()));
    }
    // Cancellation: the sink says stop at the second token; the plugin stops within a step.
    let long = greedy(PromptInput::Text("Count with me: one, two, three,".into()), Some(64));
    let mut seen = 0;
    let cancelled = plugin.infer(model, &long, &mut |_, _, _| {
        seen += 1;
        seen < 2
    });
    s.record(
        "cancellation",
        match cancelled {
            Ok(r) if r.finish_reason == FinishReason::Cancelled && r.token_ids.len() == 2 => Ok("stopped at the token the consumer refused, 2 of 64".into()),
            Ok(r) => Err(format!("went on to {} tokens, finish {:?} (the sink was called {seen} times; text {:?})", r.token_ids.len(), r.finish_reason, r.text)),
            Err(e) => Err(e.to_string()),
        },
    );
    // Concurrency: requests at once each give what they give alone.
    let prompts = ["Hello", "The sky is", "One two three", "Why do birds"];
    let alone: Vec<Result<Vec<u32>, String>> = prompts.iter().map(|p| streamed(plugin, model, &greedy(PromptInput::Text((*p).into()), Some(NEW_TOKENS))).map(|r| r.0.token_ids)).collect();
    let together: Vec<Result<Vec<u32>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| scope.spawn(move || streamed(plugin, model, &greedy(PromptInput::Text((*p).into()), Some(NEW_TOKENS))).map(|r| r.0.token_ids)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("the request's thread panicked".into()))).collect()
    });
    s.record(
        "concurrency",
        if alone == together && alone.iter().all(Result::is_ok) {
            Ok(format!("{} concurrent requests each equal their single run", prompts.len()))
        } else {
            Err(format!("alone {alone:?}, together {together:?}"))
        },
    );
}

fn bad_request_checks(s: &mut Suite<'_>, info: &ModelInfo) {
    let plugin = s.plugin;
    let model = info.handle;
    let mut cases = vec![
        ("no prompt", greedy(PromptInput::TokenIds(Vec::new()), Some(NEW_TOKENS))),
        ("a token id outside the vocabulary", greedy(PromptInput::TokenIds(vec![info.vocab_size as u32 + 7]), Some(NEW_TOKENS))),
        ("a prompt past the context", greedy(PromptInput::TokenIds(vec![1; info.max_context as usize + 1]), Some(NEW_TOKENS))),
    ];
    if !info.has_chat_template {
        cases.push(("a chat without a chat template", greedy(PromptInput::Chat { messages: vec![ChatMessage::new("user", "Hi")], tools: None }, Some(2))));
    }
    let mut accepted = Vec::new();
    for (what, request) in &cases {
        match plugin.infer(model, request, &mut |_, _, _| true) {
            Err(e) if e.kind != ErrorKind::Poisoned => {}
            Err(e) => accepted.push(format!("{what}: the plugin panicked ({e})")),
            Ok(_) => accepted.push(format!("{what}: accepted")),
        }
    }
    let still = streamed(plugin, model, &greedy(PromptInput::Text("Hello".into()), Some(2)));
    s.record(
        "bad_requests",
        match (accepted.is_empty(), still) {
            (true, Ok(_)) => Ok(format!("{} bad requests refused with errors; the plugin serves on", cases.len())),
            (false, _) => Err(accepted.join("; ")),
            (true, Err(e)) => Err(format!("the plugin no longer serves after the bad requests: {e}")),
        },
    );
}

/// A 48x32 PNG (109 bytes) the image check sends.
const PROBE_PNG: &[u8] = include_bytes!("conformance_probe.png");

/// Images: answered with tokens by a plugin that lists the `image` modality, refused with an
/// error by one that does not (an older plugin is refused by the host itself); a truncated
/// image refused by both; the plugin serving on after them.
fn image_check(s: &mut Suite<'_>, info: &ModelInfo, takes_images: bool) {
    let plugin = s.plugin;
    let model = info.handle;
    let request = |bytes: &[u8]| {
        let parts = vec![ContentPart::Image { image: 0 }, ContentPart::Text { text: "What is this?".into() }];
        let chat = PromptInput::Chat { messages: vec![ChatMessage::with_parts("user", parts)], tools: None };
        InferRequest { images: vec![ImageData(bytes.to_vec())], ..greedy(chat, Some(NEW_TOKENS)) }
    };
    let whole = plugin.infer(model, &request(PROBE_PNG), &mut |_, _, _| true);
    let truncated = plugin.infer(model, &request(&PROBE_PNG[..60]), &mut |_, _, _| true);
    let still = streamed(plugin, model, &greedy(PromptInput::Text("Hello".into()), Some(2)));
    let poisoned = |r: &Result<InferResponse, inference_pio_core::abi::PluginError>| matches!(r, Err(e) if e.kind == ErrorKind::Poisoned);
    let outcome = if poisoned(&whole) || poisoned(&truncated) {
        Err("the plugin panicked on an image request".to_string())
    } else if let Err(e) = still {
        Err(format!("the plugin no longer serves after the image requests: {e}"))
    } else if truncated.is_ok() {
        Err("a truncated PNG was accepted".to_string())
    } else {
        match (takes_images, whole) {
            (true, Ok(r)) if !r.token_ids.is_empty() => Ok(format!("answered an image prompt of {} tokens; refused a truncated PNG", r.prompt_token_ids.len())),
            (true, Ok(_)) => Err("answered an image prompt with no tokens".to_string()),
            (true, Err(e)) => Err(format!("lists the image modality but refused a PNG: {e}")),
            (false, Ok(_)) => Err("does not list the image modality but answered an image prompt (as if it saw nothing?)".to_string()),
            (false, Err(e)) => Ok(format!("refused an image (no image modality): {e}")),
        }
    };
    s.record("images", outcome);
}

fn update_config_check(s: &mut Suite<'_>, info: &ModelInfo) {
    let plugin = s.plugin;
    let outcome = (|| {
        let update = ConfigUpdate { sampling_defaults: Some(SamplingOverrides { max_new_tokens: Some(3), ..Default::default() }), ..Default::default() };
        let applied = plugin.update_config(&update).map_err(|e| e.to_string())?;
        if !applied.applied.iter().any(|k| k == "sampling_defaults") {
            return Err(format!("sampling_defaults not applied: {applied:?}"));
        }
        let (r, _, _) = streamed(plugin, info.handle, &greedy(PromptInput::Text("Hello there".into()), None))?;
        if r.token_ids.len() > 3 {
            return Err(format!("claims to apply max_new_tokens = 3 and generated {} tokens", r.token_ids.len()));
        }
        let bad = ConfigUpdate { sampling_defaults: Some(SamplingOverrides { temperature: Some(-1.0), ..Default::default() }), ..Default::default() };
        let refused = plugin.update_config(&bad).map_err(|e| e.to_string())?;
        if refused.applied.iter().any(|k| k == "sampling_defaults") || refused.refused.is_empty() {
            return Err(format!("accepted a temperature of -1: {refused:?}"));
        }
        plugin.update_config(&ConfigUpdate { sampling_defaults: Some(SamplingOverrides::default()), ..Default::default() }).map_err(|e| e.to_string())?;
        Ok(format!("applies sampling defaults (max_new_tokens = 3 gave {} tokens), refuses a negative temperature ({})", r.token_ids.len(), refused.refused.keys().cloned().collect::<Vec<_>>().join(", ")))
    })();
    s.record("update_config", outcome);
}

fn cleanup_check(s: &mut Suite<'_>, level: SecurityLevel, model_dir: &Path, options: &LoadOptions, model: u64) {
    let plugin = s.plugin;
    let outcome = (|| {
        plugin.cleanup(model).map_err(|e| format!("cleanup: {e}"))?;
        match plugin.infer(model, &greedy(PromptInput::Text("Hello".into()), Some(2)), &mut |_, _, _| true) {
            Err(e) if e.kind == ErrorKind::UnknownModel => {}
            Err(e) => return Err(format!("a request on the cleaned-up handle failed with {e}, not as an unknown model")),
            Ok(_) => return Err("a request on the cleaned-up handle was answered".into()),
        }
        if level.uses_worker() {
            return Ok("the handle is unknown after cleanup (the model's memory lives in the worker process)".into());
        }
        // Memory: load and clean up again; this process may not keep growing.
        let before = rss_bytes();
        let mut weights = 0;
        for _ in 0..3 {
            let info = plugin.load_model(model_dir, options).map_err(|e| format!("reload: {e}"))?;
            weights = info.weight_bytes + info.kv_cache_bytes;
            plugin.cleanup(info.handle).map_err(|e| format!("cleanup: {e}"))?;
        }
        let grown = rss_bytes().saturating_sub(before);
        let allowed = LEAK_FLOOR_BYTES.max(weights / 2);
        if grown > allowed {
            return Err(format!("the process grew {:.1} MiB over 3 load/cleanup cycles (allowed {:.1} MiB)", grown as f64 / 1048576.0, allowed as f64 / 1048576.0));
        }
        Ok(format!("the handle is unknown after cleanup; 3 more load/cleanup cycles grew the process {:.1} MiB", grown as f64 / 1048576.0))
    })();
    s.record("cleanup", outcome);
}
