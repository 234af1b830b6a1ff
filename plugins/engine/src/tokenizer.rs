//! Text <-> token ids with the `tokenizers` crate (`tokenizer.json`, or rebuilt from a GGUF
//! file's `tokenizer.ggml.*` metadata as `transformers.integrations.gguf` rebuilds it), and incremental,
//! UTF-8-safe detokenization for streaming (the prefix/read-offset scheme of Hugging Face
//! text-generation-inference: text is released only once it no longer ends in a partial
//! character).

use crate::error::EngineError;
use inference_pio_formats::gguf::Gguf;
use std::path::Path;
use tokenizers::Tokenizer;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// GPT-2's byte -> printable character table (`bytes_to_unicode` in `convert_slow_tokenizer`).
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u32 {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex a GGUF `tokenizer.ggml.pre` names (transformers' `GGUF_PRE_TOKENIZER_SPLITS`,
/// the entries for the families the engine serves); `None`: GPT-2's own byte-level split.
fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    match pre {
        // GLM-4's (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_CHATGLM4`) is the same expression with
        // the contractions' cases spelled out.
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" | "chatglm-bpe" | "glm4" | "glm5" => Some(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

pub struct TextTokenizer {
    inner: Tokenizer,
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, EngineError> {
        if !path.is_file() {
            return Err(EngineError::Tokenizer(format!("{} is missing", path.display())));
        }
        let inner = Tokenizer::from_file(path)
            .map_err(|e| EngineError::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// Rebuilds the tokenizer a GGUF file describes. Byte-level BPE (`tokenizer.ggml.model =
    /// "gpt2"`) as transformers' `byte_level_tokenizer` + `add_gguf_special_tokens` +
    /// `set_split_regex` build it: vocabulary respelled into GPT-2's byte alphabet where needed,
    /// the file's merges, control tokens as special tokens, user-defined ones as added tokens,
    /// BOS/EOS added when `tokenizer.ggml.add_bos_token` / `add_eos_token` say so. The
    /// vocabulary and merges are moved out of `file` as they are used, not copied (a
    /// 151,936-token vocabulary's strings were held three times at once while the weights
    /// loaded beside them).
    pub fn from_gguf(mut file: Gguf) -> Result<Self, EngineError> {
        let err = |e: inference_pio_formats::FormatError| EngineError::Tokenizer(format!("GGUF metadata: {e}"));
        let model = file.get_str("tokenizer.ggml.model").map_err(err)?.ok_or_else(|| {
            EngineError::Tokenizer("the GGUF file has no `tokenizer.ggml.model`, so it carries no tokenizer".into())
        })?;
        if model != "gpt2" {
            return Err(EngineError::Unsupported(format!(
                "GGUF tokenizer model `{model}` is not supported (supported: gpt2, byte-level BPE)"
            )));
        }
        let types = file.get_ints("tokenizer.ggml.token_type").map_err(err)?.unwrap_or_default();
        let spelling = bytes_to_unicode();
        // The byte alphabet's 256 characters all lie below U+0144: a table, not a hash set
        // (49,152 tokens' characters are looked up).
        let mut alphabet = [false; 0x144];
        for c in spelling {
            if let Some(slot) = alphabet.get_mut(c as usize) {
                *slot = true;
            }
        }
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.get(c as usize).copied().unwrap_or(false));
        // What needs the token strings besides the vocabulary, before they are moved out:
        // control tokens become special tokens, user-defined ones plain added tokens (both only
        // when spelled in the byte alphabet: anything else is a llama.cpp mislabel), and BOS/EOS.
        let (specials, user_defined) = {
            let tokens = file
                .get_strings("tokenizer.ggml.tokens")
                .map_err(err)?
                .ok_or_else(|| EngineError::Tokenizer("GGUF metadata `tokenizer.ggml.tokens` is missing".into()))?;
            let added = |token_type: i64, special: bool| -> Vec<AddedToken> {
                tokens
                    .iter()
                    .zip(types.iter())
                    .filter(|(t, ty)| **ty == token_type && in_alphabet(t))
                    .map(|(t, _)| AddedToken::from(t.to_string(), special).normalized(false))
                    .collect()
            };
            (added(TOKEN_TYPE_CONTROL, true), added(TOKEN_TYPE_USER_DEFINED, false))
        };
        let token_of = |key: &str| -> Result<Option<(String, u32)>, EngineError> {
            Ok(file.special_token(key).map_err(err)?.map(|(t, id)| (t.to_string(), id)))
        };
        let add_bos = file.get_bool("tokenizer.ggml.add_bos_token").map_err(err)?.unwrap_or(false);
        let add_eos = file.get_bool("tokenizer.ggml.add_eos_token").map_err(err)?.unwrap_or(false);
        let bos = token_of("tokenizer.ggml.bos_token_id")?.filter(|_| add_bos);
        let eos = token_of("tokenizer.ggml.eos_token_id")?.filter(|_| add_eos);
        let pre = file.get_str("tokenizer.ggml.pre").map_err(err)?.unwrap_or("default").to_string();
        let space_prefix = file.get_bool("tokenizer.ggml.add_space_prefix").map_err(err)?.unwrap_or(false);
        let tokens = file.take_strings("tokenizer.ggml.tokens").map_err(err)?.unwrap_or_default();
        let vocab: Vocab = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let spelled = if in_alphabet(&t) { t } else { t.bytes().map(|b| spelling[b as usize]).collect() };
                (spelled, i as u32)
            })
            .collect();
        let merge_strings = file
            .take_strings("tokenizer.ggml.merges")
            .map_err(err)?
            .ok_or_else(|| EngineError::Tokenizer("GGUF metadata `tokenizer.ggml.merges` is missing".into()))?;
        // Sized once: collected through a fallible iterator the vector would grow by doubling
        // (151,387 Qwen3 merges: a 12.6 MB buffer instead of 7.3 MB, at the load's peak).
        let mut merges: Vec<(String, String)> = Vec::with_capacity(merge_strings.len());
        for m in merge_strings {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| EngineError::Tokenizer(format!("GGUF merge `{m}` is not two tokens separated by a space")))?;
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(String::new())
            // llama.cpp looks a GLM-4 piece up whole before merging (`ignore_merges`).
            .ignore_merges(matches!(pre.as_str(), "glm4" | "glm5"))
            .build()
            .map_err(|e| EngineError::Tokenizer(format!("cannot build the GGUF BPE model: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        match pre_tokenizer_split(&pre) {
            Some(regex) => {
                let split = Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| EngineError::Tokenizer(format!("split regex: {e}")))?;
                inner.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()])));
            }
            None => {
                inner.with_pre_tokenizer(Some(ByteLevel::new(space_prefix, true, true)));
            }
        }
        inner.with_decoder(Some(ByteLevel::default()));
        inner.add_special_tokens(&specials);
        inner.add_tokens(&user_defined);
        if bos.is_some() || eos.is_some() {
            let b = bos.as_ref().map(|(t, _)| format!("{t}:0 ")).unwrap_or_default();
            let e = eos.as_ref().map(|(t, _)| format!(" {t}:0")).unwrap_or_default();
            let b1 = bos.as_ref().map(|(t, _)| format!(" {t}:1")).unwrap_or_default();
            let e1 = eos.as_ref().map(|(t, _)| format!(" {t}:1")).unwrap_or_default();
            let single = format!("{b}$A:0{e}");
            let pair = format!("{single}{b1} $B:1{e1}");
            let processor = TemplateProcessing::builder()
                .try_single(single)
                .and_then(|t| t.try_pair(pair))
                .map_err(|e| EngineError::Tokenizer(format!("post-processor: {e}")))?
                .special_tokens(bos.into_iter().chain(eos).collect::<Vec<_>>())
                .build()
                .map_err(|e| EngineError::Tokenizer(format!("post-processor: {e}")))?;
            inner.with_post_processor(Some(processor));
        }
        Ok(Self { inner })
    }

    pub fn from_tokenizer(inner: Tokenizer) -> Self {
        Self { inner }
    }

    /// `add_special_tokens` as in transformers' `tokenizer(text)` (true) or
    /// `apply_chat_template` (false: the template writes them).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EngineError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EngineError::Tokenizer(format!("cannot encode: {e}")))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, EngineError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| EngineError::Tokenizer(format!("cannot decode: {e}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer as `tokenizer.json` would hold it (also for one rebuilt from GGUF).
    pub fn to_json(&self) -> Result<serde_json::Value, EngineError> {
        let text = self.inner.to_string(false).map_err(|e| EngineError::Tokenizer(format!("cannot serialise the tokenizer: {e}")))?;
        serde_json::from_str(&text).map_err(|e| EngineError::Tokenizer(format!("cannot serialise the tokenizer: {e}")))
    }
}

/// Turns a growing list of token ids into text deltas.
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String, EngineError> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let delta = match full.strip_prefix(prefix.as_str()) {
                Some(d) => d.to_string(),
                // Decoding is not always prefix-stable (cleanup of spaces); fall back to the
                // characters past the previous length.
                None => full.chars().skip(prefix.chars().count()).collect(),
            };
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}
