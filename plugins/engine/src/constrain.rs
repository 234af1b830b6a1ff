//! Constrained decoding: a request's [`OutputConstraint`] (any JSON object, a JSON schema, a
//! Lark grammar) compiled by `llguidance` (the grammar engine of vLLM, SGLang, llama.cpp and
//! mistral.rs) against the model's vocabulary, then one token mask per step that the sampler
//! applies before it draws (OpenAI's `response_format`, vLLM's `structured_outputs`).
//!
//! Budgets, so one request cannot stall the server (vLLM #54003): a schema or grammar text of at
//! most [`MAX_GRAMMAR_BYTES`]; llguidance's own fuel limits (lexer construction, grammar size,
//! Earley items per mask); and [`COMPILE_BUDGET`] of wall time, checked once the compilation
//! returns. Compilation runs on the caller's thread, never on the model's step thread, so a slow
//! one only delays its own request; a mask is computed on the step thread while the device runs
//! the step's forward pass, within llguidance's per-step fuel.

use crate::error::EngineError;
use crate::tokenizer::TextTokenizer;
use inference_pio_core::types::OutputConstraint;
use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest schema or grammar text a request may carry.
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;
/// The most wall time compiling one constraint may take.
pub const COMPILE_BUDGET: Duration = Duration::from_secs(2);

/// llguidance's limits for one request: the defaults (documented speeds: lexer fuel ~50k/ms,
/// Earley items ~20k/ms) with a smaller grammar and lexer, so a compilation stays near 100 ms and
/// a mask near 10 ms.
fn limits() -> ParserLimits {
    ParserLimits {
        initial_lexer_fuel: 5_000_000,
        step_lexer_fuel: 200_000,
        step_max_items: 50_000,
        max_grammar_size: 200_000,
        max_lexer_states: 100_000,
        verbose_errors: false,
        ..ParserLimits::default()
    }
}

/// JSON is written compactly ([`inference_pio_chat_output::compact_json_options`], as the
/// tool-call grammars write it) unless the schema's `x-guidance` says otherwise.
fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(inference_pio_chat_output::compact_json_options);
    }
    schema
}

/// The model's vocabulary as llguidance sees it (each token's bytes), built on first use.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl GrammarCompiler {
    /// `vocab_size`: the model's output width (it may exceed the tokenizer's vocabulary; the
    /// extra ids are never allowed). `eos`: the first of the model's EOS ids.
    pub fn new(tokenizer: &TextTokenizer, vocab_size: usize, eos: u32) -> Result<Self, EngineError> {
        let json = tokenizer.to_json()?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| EngineError::Tokenizer(format!("cannot list the vocabulary's bytes for constrained decoding: {e}")))?;
        words.resize(vocab_size.max(words.len()), Vec::new());
        let trie = TokTrie::from(&TokRxInfo::new(words.len() as u32, eos), &words);
        let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| EngineError::Tokenizer(format!("cannot start the grammar engine: {e}")))?;
        factory.quiet();
        *factory.limits_mut() = limits();
        Ok(Self { factory })
    }

    /// Compiles `constraint` within the budgets; errors name the budget or the grammar's fault.
    pub fn compile(&self, constraint: &OutputConstraint) -> Result<RowConstraint, EngineError> {
        let grammar = match constraint {
            OutputConstraint::JsonObject => TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"}))),
            OutputConstraint::JsonSchema { schema } => {
                let size = schema.to_string().len();
                if size > MAX_GRAMMAR_BYTES {
                    return Err(EngineError::InvalidRequest(format!(
                        "the JSON schema is {size} bytes, over the grammar budget of {MAX_GRAMMAR_BYTES} bytes"
                    )));
                }
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(EngineError::InvalidRequest("the JSON schema must be an object".into()));
                }
                TopLevelGrammar::from_json_schema(compact(schema.clone()))
            }
            OutputConstraint::ToolCalls { .. } => {
                return Err(EngineError::InvalidRequest("a tool-call constraint is compiled from the model's tool-call format (Model::compile_constraint)".into()));
            }
            OutputConstraint::Grammar { lark } => {
                if lark.len() > MAX_GRAMMAR_BYTES {
                    return Err(EngineError::InvalidRequest(format!(
                        "the grammar is {} bytes, over the grammar budget of {MAX_GRAMMAR_BYTES} bytes",
                        lark.len()
                    )));
                }
                TopLevelGrammar::from_lark(lark.clone())
            }
        };
        let start = Instant::now();
        let parser = self.factory.create_parser(grammar);
        let took = start.elapsed();
        let parser = parser.map_err(|e| {
            let e = e.to_string();
            if e.contains("fuel") || e.contains("limit") || e.contains("too many") || e.contains("too large") {
                EngineError::InvalidRequest(format!("the grammar is past the compilation budget (llguidance: {e})"))
            } else {
                EngineError::InvalidRequest(format!("the grammar does not compile: {e}"))
            }
        })?;
        if took > COMPILE_BUDGET {
            return Err(EngineError::InvalidRequest(format!(
                "compiling the grammar took {:.1} s, over the budget of {} s",
                took.as_secs_f64(),
                COMPILE_BUDGET.as_secs()
            )));
        }
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(EngineError::InvalidRequest(format!("the grammar does not start: {e}")));
        }
        Ok(RowConstraint { matcher, next: None })
    }
}

/// One sequence's grammar state.
#[derive(Clone)]
pub struct RowConstraint {
    matcher: Matcher,
    /// The next token's mask, when computed ahead ([`Self::prepare`]).
    next: Option<SimpleVob>,
}

impl std::fmt::Debug for RowConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowConstraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl RowConstraint {
    /// Sets every token the grammar does not allow next to minus infinity. `eos`: the model's
    /// EOS ids, allowed together once the grammar may end (llguidance knows one EOS id).
    pub fn mask(&mut self, logits: &mut [f32], eos: &[u32]) -> Result<(), EngineError> {
        let mask = match self.next.take() {
            Some(mask) => mask,
            None => self.compute()?,
        };
        let eos_ok = eos.first().is_some_and(|&e| mask.is_allowed(e));
        for (id, l) in logits.iter_mut().enumerate() {
            let id = id as u32;
            if !(mask.is_allowed(id) || eos_ok && eos.contains(&id)) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Computes the next token's mask now, for [`Self::mask`] to use.
    pub fn prepare(&mut self) -> Result<(), EngineError> {
        if self.next.is_none() {
            self.next = Some(self.compute()?);
        }
        Ok(())
    }

    fn compute(&mut self) -> Result<SimpleVob, EngineError> {
        self.matcher.compute_mask_or_eos().map_err(|e| EngineError::InvalidRequest(format!("constrained decoding failed: {e}")))
    }

    /// Advances past the sampled token. Returns whether the grammar is complete (nothing more
    /// may follow).
    pub fn commit(&mut self, id: u32, eos: &[u32]) -> Result<bool, EngineError> {
        if eos.contains(&id) {
            return Ok(true);
        }
        self.next = None;
        self.matcher.consume_token(id).map_err(|e| EngineError::InvalidRequest(format!("constrained decoding failed: {e}")))?;
        Ok(self.matcher.is_stopped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen_tokenizer() -> TextTokenizer {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../qwen3-4b-instruct-2507/tests/fixtures/qwen3-tokenizer/tokenizer.json");
        TextTokenizer::from_file(&path).expect("the Qwen3 tokenizer fixture")
    }

    const EOS: [u32; 2] = [151645, 151643];

    fn allowed(c: &mut RowConstraint, vocab: usize) -> Vec<f32> {
        let mut logits = vec![0.0f32; vocab];
        c.mask(&mut logits, &EOS).expect("mask");
        logits
    }

    #[test]
    fn a_schema_masks_what_would_leave_it_and_ends_with_it() {
        let tok = qwen_tokenizer();
        let vocab = 151_936; // Qwen3's output width, past the tokenizer's 151,669 ids
        let compiler = GrammarCompiler::new(&tok, vocab, EOS[0]).expect("compiler");
        let schema = serde_json::json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": false});
        let mut c = compiler.compile(&OutputConstraint::JsonSchema { schema }).expect("compiles");
        let id = |s: &str| tok.encode(s, false).expect("encode");
        let logits = allowed(&mut c, vocab);
        assert!(logits[id("Sure")[0] as usize].is_infinite(), "prose is masked before the object");
        assert!(logits[id("{")[0] as usize].is_finite());
        assert!(logits[EOS[0] as usize].is_infinite(), "no end before the object");
        assert!(logits[151_900].is_infinite(), "ids past the vocabulary are never allowed");
        for t in id("{\"n\": ") {
            assert!(allowed(&mut c, vocab)[t as usize].is_finite(), "{t}");
            assert!(!c.commit(t, &EOS).expect("commit"));
        }
        let logits = allowed(&mut c, vocab);
        assert!(logits[id("\"")[0] as usize].is_infinite(), "a string where the schema wants an integer");
        assert!(logits[id("1")[0] as usize].is_finite());
        let mut done = false;
        for t in id("12}") {
            assert!(allowed(&mut c, vocab)[t as usize].is_finite(), "{t}");
            done = c.commit(t, &EOS).expect("commit");
        }
        if !done {
            // Complete: only an end may follow, and every EOS id is allowed.
            let logits = allowed(&mut c, vocab);
            assert!(EOS.iter().all(|&e| logits[e as usize].is_finite()));
            assert!(logits[id(",")[0] as usize].is_infinite());
            assert!(c.commit(EOS[1], &EOS).expect("commit"));
        }

        let mut c = compiler.compile(&OutputConstraint::JsonObject).expect("compiles");
        assert!(allowed(&mut c, vocab)[id("[")[0] as usize].is_infinite(), "json_object: an object, not an array");
        let mut c = compiler.compile(&OutputConstraint::Grammar { lark: "start: \"yes\" | \"no\"".into() }).expect("lark compiles");
        let logits = allowed(&mut c, vocab);
        assert!(logits[id("yes")[0] as usize].is_finite() && logits[id("maybe")[0] as usize].is_infinite());
    }

    #[test]
    fn budgets_and_bad_grammars_are_named() {
        let tok = qwen_tokenizer();
        let compiler = GrammarCompiler::new(&tok, tok.vocab_size(), EOS[0]).expect("compiler");
        let huge = serde_json::json!({"type": "object", "description": "x".repeat(MAX_GRAMMAR_BYTES)});
        let e = compiler.compile(&OutputConstraint::JsonSchema { schema: huge }).expect_err("too big").to_string();
        assert!(e.contains("grammar budget of 65536 bytes"), "{e}");
        let e = compiler.compile(&OutputConstraint::JsonSchema { schema: serde_json::json!({"type": "wat"}) }).expect_err("bad").to_string();
        assert!(e.contains("does not compile"), "{e}");
        let e = compiler.compile(&OutputConstraint::Grammar { lark: "start: missing_rule".into() }).expect_err("bad lark").to_string();
        assert!(e.contains("grammar"), "{e}");
        // A short schema whose string pattern needs an exponential automaton compiles at once
        // (the automaton is built lazily), and each mask stays within llguidance's step fuel:
        // a mask either comes or fails its own request, quickly.
        let start = Instant::now();
        let schema = serde_json::json!({"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a|b)*a(a|b){40}$"}}, "required": ["s"]});
        let mut c = compiler.compile(&OutputConstraint::JsonSchema { schema }).expect("compiles");
        let mut logits = vec![0.0f32; tok.vocab_size()];
        for t in tok.encode("{\"s\": \"abab", false).expect("encode") {
            if c.mask(&mut logits, &EOS).is_err() || c.commit(t, &EOS).is_err() {
                break;
            }
        }
        assert!(start.elapsed() < COMPILE_BUDGET, "{:?}", start.elapsed());
    }

    /// Walks `text` token by token through the constraint: every token allowed, and the grammar
    /// complete at the end (stopped, or only an end allowed).
    fn walk(c: &mut RowConstraint, tok: &TextTokenizer, text: &str) -> Result<(), String> {
        let vocab = tok.vocab_size();
        let mut done = false;
        for t in tok.encode(text, false).expect("encode") {
            if done {
                return Err("the grammar ended before the text".into());
            }
            let logits = allowed(c, vocab);
            if !logits[t as usize].is_finite() {
                return Err(format!("token {t} ({:?}) masked", tok.decode(&[t], false)));
            }
            done = c.commit(t, &EOS).map_err(|e| e.to_string())?;
        }
        if done || allowed(c, vocab)[EOS[0] as usize].is_finite() { Ok(()) } else { Err("the grammar is not complete".into()) }
    }

    #[test]
    fn tool_choice_grammars_take_the_calls_their_parsers_read_and_nothing_else() {
        use inference_pio_chat_output::{OutputFormat, parse, tool_call_grammar};
        let tok = qwen_tokenizer();
        let compiler = GrammarCompiler::new(&tok, tok.vocab_size(), EOS[0]).expect("compiler");
        let tools = serde_json::json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
        ]);
        let grammar = |format, function: Option<&str>| {
            let lark = tool_call_grammar(format, Some(&tools), function).expect("grammar");
            compiler.compile(&OutputConstraint::Grammar { lark: lark.clone() }).unwrap_or_else(|e| panic!("{e}\n{lark}"))
        };
        let qwen = "<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco, CA\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>";
        let ping = "<tool_call>\n<function=ping>\n</function>\n</tool_call>";
        for (function, text, ok) in [
            (None, qwen.to_string(), true),
            (None, format!("{qwen}\n{ping}"), true),
            (Some("get_weather"), qwen.to_string(), true),
            (Some("ping"), qwen.to_string(), false),
            (None, "Sure, let me check.".to_string(), false),
            (None, qwen.replace("<parameter=city>\nSan Francisco, CA\n</parameter>\n", ""), false), // city is required
            (None, qwen.replace("\n3\n", "\nthree\n"), false),                                    // days is an integer
            (None, qwen.replace("get_weather", "get_time"), false),
        ] {
            let mut c = grammar(OutputFormat::Qwen3Coder, function);
            assert_eq!(walk(&mut c, &tok, &text).is_ok(), ok, "{function:?} {text:?}: {:?}", walk(&mut grammar(OutputFormat::Qwen3Coder, function), &tok, &text));
            if ok {
                let parsed = parse(OutputFormat::Qwen3Coder, Some(&tools), &text);
                assert_eq!(parsed.tool_calls[0].name, "get_weather");
                assert_eq!(parsed.tool_calls[0].arguments["days"], serde_json::json!(3));
                assert_eq!(parsed.tool_calls[0].arguments["city"], serde_json::json!("San Francisco, CA"));
            }
        }
        let glm = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>unit</arg_key>\n<arg_value>c</arg_value>\n</tool_call>";
        let mut c = grammar(OutputFormat::Glm4 { starts_in_reasoning: false }, None);
        walk(&mut c, &tok, glm).expect("a GLM call");
        let mut c = grammar(OutputFormat::Glm4 { starts_in_reasoning: false }, None);
        walk(&mut c, &tok, &format!("<think>Paris, then.</think>\n{glm}")).expect("reasoning, then the call");
        let mut c = grammar(OutputFormat::Glm4 { starts_in_reasoning: false }, None);
        assert!(walk(&mut c, &tok, &glm.replace("<arg_value>c<", "<arg_value>kelvin<")).is_err(), "an enum outside its values");
        let parsed = parse(OutputFormat::Glm4 { starts_in_reasoning: false }, Some(&tools), glm);
        assert_eq!((parsed.tool_calls[0].name.as_str(), &parsed.tool_calls[0].arguments["unit"]), ("get_weather", &serde_json::json!("c")));

        // Hermes (Qwen3 dense): a JSON object per call, its arguments valid against the schema.
        let hermes = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}\n</tool_call>";
        for (function, text, ok) in [
            (None, hermes.to_string(), true),
            (Some("get_weather"), hermes.to_string(), true),
            (None, format!("{hermes}\n<tool_call>\n{{\"name\": \"ping\", \"arguments\": {{}}}}\n</tool_call>"), true),
            (Some("ping"), hermes.to_string(), false),
            (None, hermes.replace("3}", "\"three\"}"), false),
            (None, hermes.replace("\"city\": \"Paris\", ", ""), false),
            (None, "I will call it.".to_string(), false),
        ] {
            let mut c = grammar(OutputFormat::Hermes, function);
            assert_eq!(walk(&mut c, &tok, &text).is_ok(), ok, "{function:?} {text:?}: {:?}", walk(&mut grammar(OutputFormat::Hermes, function), &tok, &text));
        }
        let parsed = parse(OutputFormat::Hermes, Some(&tools), hermes);
        assert_eq!((parsed.tool_calls[0].name.as_str(), &parsed.tool_calls[0].arguments["days"]), ("get_weather", &serde_json::json!(3)));

        let e = tool_call_grammar(OutputFormat::Plain, Some(&tools), None).expect_err("plain");
        assert!(e.contains("no tool-call format"), "{e}");
        assert!(tool_call_grammar(OutputFormat::Qwen3Coder, Some(&tools), Some("nope")).expect_err("unknown").contains("`nope`"));
        assert!(tool_call_grammar(OutputFormat::Qwen3Coder, None, None).expect_err("no tools").contains("needs `tools`"));
    }
}
