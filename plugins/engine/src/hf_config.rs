//! Hugging Face `config.json` for decoder-only transformers (Llama / Qwen2 / Qwen3 family),
//! as read by `transformers.PretrainedConfig`, including both the hub keys (`rope_theta`,
//! `rope_scaling`, `partial_rotary_factor`) and the transformers-5 `rope_parameters` table.

use crate::error::EngineError;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// How rotary frequencies are scaled for long context.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The rotary embedding parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Fraction of each head's channels that rotate (GLM, Phi: < 1).
    pub partial_rotary_factor: f64,
    pub scaling: RopeScaling,
}

/// The fields of `config.json` the engine uses, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    pub architectures: Vec<String>,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub hidden_act: String,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// `torch_dtype` / `dtype` as written (`bfloat16`, `float32`, ...).
    pub torch_dtype: Option<String>,
    /// Per layer, the sliding attention window (`None`: full causal attention). transformers'
    /// Qwen3 config: `sliding_window` when `use_sliding_window`, on the layers `layer_types`
    /// marks `sliding_attention` (without `layer_types`: layers from `max_window_layers` on).
    pub layer_windows: Vec<Option<usize>>,
    /// The whole `config.json`, for the keys only one family uses (its model crate reads them).
    pub raw: Value,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: String,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    partial_rotary_factor: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

/// Token ids given as a number, a list, or null.
pub fn token_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_u64().map(|v| v as u32)).collect(),
        _ => Vec::new(),
    }
}

fn required(name: &str, value: Option<usize>) -> Result<usize, EngineError> {
    match value {
        Some(v) if v > 0 => Ok(v),
        Some(_) => Err(EngineError::Config(format!("`{name}` must be positive"))),
        None => Err(EngineError::Config(format!("`{name}` is missing"))),
    }
}

fn f64_field(table: &Value, key: &str) -> Option<f64> {
    table.get(key).and_then(Value::as_f64)
}

fn parse_scaling(table: Option<&Value>) -> Result<RopeScaling, EngineError> {
    let Some(table) = table.filter(|t| t.is_object()) else {
        return Ok(RopeScaling::None);
    };
    let kind = table
        .get("rope_type")
        .or_else(|| table.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = || {
        f64_field(table, "factor")
            .filter(|f| *f > 0.0)
            .ok_or_else(|| EngineError::Config(format!("rope scaling `{kind}` needs a positive `factor`")))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: factor()? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: f64_field(table, "low_freq_factor").unwrap_or(1.0),
            high_freq_factor: f64_field(table, "high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: f64_field(table, "original_max_position_embeddings").unwrap_or(8192.0),
        }),
        other => Err(EngineError::Unsupported(format!(
            "rope scaling type `{other}` is not implemented (supported: default, linear, llama3)"
        ))),
    }
}

impl DecoderConfig {
    /// A `config.json` file as JSON (parse it with [`crate::ModelFamily::config`], which adds
    /// the family's defaults).
    pub fn read_json(path: &Path) -> Result<Value, EngineError> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::Io(format!("cannot read {}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| EngineError::Config(format!("{}: not valid JSON: {e}", path.display())))
    }

    pub fn from_json_str(text: &str) -> Result<Self, EngineError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| EngineError::Config(format!("not valid JSON: {e}")))?;
        Self::from_value(&value)
    }

    pub fn from_value(value: &Value) -> Result<Self, EngineError> {
        let value = &text_config_view(value);
        let raw: Raw = serde_json::from_value(value.clone())
            .map_err(|e| EngineError::Config(format!("unexpected field type: {e}")))?;
        let hidden_size = required("hidden_size", raw.hidden_size)?;
        let num_attention_heads = required("num_attention_heads", raw.num_attention_heads)?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(EngineError::Config(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => required("head_dim", Some(d))?,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => return Err(EngineError::Config("hidden_size is not a multiple of num_attention_heads and head_dim is missing".into())),
        };
        // transformers 5 keeps theta, scaling and partial rotary together in `rope_parameters`.
        let params = raw.rope_parameters.as_ref().filter(|v| v.is_object());
        let theta = params
            .and_then(|p| f64_field(p, "rope_theta"))
            .or(raw.rope_theta)
            .unwrap_or(10_000.0);
        let partial = params
            .and_then(|p| f64_field(p, "partial_rotary_factor"))
            .or(raw.partial_rotary_factor)
            .unwrap_or(1.0);
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(EngineError::Config(format!("partial_rotary_factor must be in (0, 1], got {partial}")));
        }
        let rotary_dim = (head_dim as f64 * partial) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(EngineError::Config(format!("rotary dimension {rotary_dim} must be even and positive")));
        }
        let scaling = parse_scaling(params.or(raw.rope_scaling.as_ref()))?;
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        let num_hidden_layers = required("num_hidden_layers", raw.num_hidden_layers)?;
        let layer_windows = layer_windows(value, num_hidden_layers)?;
        Ok(Self {
            architectures: raw.architectures,
            model_type: raw.model_type,
            vocab_size: required("vocab_size", raw.vocab_size)?,
            hidden_size,
            intermediate_size: required("intermediate_size", raw.intermediate_size)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope: RopeConfig { theta, partial_rotary_factor: partial, scaling },
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(false),
            hidden_act: raw.hidden_act.unwrap_or_else(|| "silu".into()),
            bos_token_id: token_ids(raw.bos_token_id.as_ref()).first().copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
            pad_token_id: token_ids(raw.pad_token_id.as_ref()).first().copied(),
            torch_dtype: raw.torch_dtype.or(raw.dtype),
            layer_windows,
            raw: value.clone(),
        })
    }

    /// The distinct attention windows the layers use (`None`: full attention).
    pub fn distinct_windows(&self) -> Vec<Option<usize>> {
        let mut out: Vec<Option<usize>> = Vec::new();
        for w in &self.layer_windows {
            if !out.contains(w) {
                out.push(*w);
            }
        }
        out
    }

    /// A key of the raw config read by `read` (`None` when absent or null); a value `read`
    /// refuses is an error saying what was `expected`.
    fn get_typed<T>(&self, key: &str, expected: &str, read: impl Fn(&Value) -> Option<T>) -> Result<Option<T>, EngineError> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => read(v).map(Some).ok_or_else(|| EngineError::Config(format!("`{key}` must be {expected}, got {v}"))),
        }
    }

    /// A non-negative integer key of the raw config (`None` when absent or null).
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>, EngineError> {
        self.get_typed(key, "a non-negative integer", |v| v.as_u64().map(|n| n as usize))
    }

    /// A required non-negative integer key.
    pub fn need_usize(&self, key: &str) -> Result<usize, EngineError> {
        self.get_usize(key)?.ok_or_else(|| EngineError::Config(format!("`{key}` is missing")))
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, EngineError> {
        self.get_typed(key, "true or false", Value::as_bool)
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, EngineError> {
        self.get_typed(key, "a number", Value::as_f64)
    }

    /// A list of non-negative integers (`mlp_only_layers`); absent = empty.
    pub fn get_usize_list(&self, key: &str) -> Result<Vec<usize>, EngineError> {
        let list = self.get_typed(key, "a list of non-negative integers", |v| {
            v.as_array()?.iter().map(|x| x.as_u64().map(|n| n as usize)).collect::<Option<Vec<_>>>()
        })?;
        Ok(list.unwrap_or_default())
    }

    /// `value` with `defaults` (a JSON object) filled in for keys it does not have: the
    /// model family's config-class defaults (transformers' `PretrainedConfig` subclasses).
    pub fn with_defaults(value: &Value, defaults: &str) -> Result<Value, EngineError> {
        let mut merged = value.clone();
        let defaults: Value = serde_json::from_str(defaults)
            .map_err(|e| EngineError::Config(format!("the plugin's config defaults are not valid JSON: {e}")))?;
        if let (Some(target), Some(defaults)) = (merged.as_object_mut(), defaults.as_object()) {
            for (k, v) in defaults {
                target.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        Ok(merged)
    }

    /// The interleaved multimodal RoPE's `mrope_section` (Qwen3-VL: in `rope_scaling` or
    /// `rope_parameters`), `None` when the config has none. Qwen2-VL's contiguous sections
    /// (`mrope_interleaved` false) are refused by name.
    pub fn mrope_section(&self) -> Result<Option<[usize; 3]>, EngineError> {
        let table = ["rope_parameters", "rope_scaling"].iter().find_map(|k| self.raw.get(*k).filter(|t| t.get("mrope_section").is_some()));
        let Some(table) = table else { return Ok(None) };
        let section = table["mrope_section"]
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect::<Option<Vec<_>>>())
            .and_then(|v| <[usize; 3]>::try_from(v).ok())
            .ok_or_else(|| EngineError::Config(format!("`mrope_section` must be three non-negative integers, got {}", table["mrope_section"])))?;
        if table.get("mrope_interleaved").and_then(Value::as_bool) != Some(true) {
            return Err(EngineError::Unsupported("contiguous M-RoPE sections (Qwen2-VL; `mrope_interleaved` not true) are not implemented; only Qwen3-VL's interleaved layout".into()));
        }
        if 2 * section.iter().sum::<usize>() != self.rotary_dim() {
            return Err(EngineError::Config(format!("mrope_section {section:?} must add up to half the rotary dimension {}", self.rotary_dim())));
        }
        Ok(Some(section))
    }

    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.rope.partial_rotary_factor) as usize
    }
}

/// A vision-language model's `config.json` (`text_config` beside `vision_config`, as
/// transformers' composite configs are) seen as its text decoder's: the `text_config` keys,
/// with the top level's other keys where `text_config` lacks them (`tie_word_embeddings`,
/// the image token ids, `vision_config`) and the top level's `architectures` and
/// `model_type`. Any other config is returned as it is.
pub fn text_config_view(value: &Value) -> Value {
    let (Some(top), Some(text)) = (value.as_object(), value.get("text_config").and_then(Value::as_object)) else {
        return value.clone();
    };
    let mut merged = text.clone();
    for (k, v) in top {
        if k == "text_config" {
            continue;
        }
        if k == "architectures" || k == "model_type" || !merged.contains_key(k) {
            merged.insert(k.clone(), v.clone());
        }
    }
    Value::Object(merged)
}

/// [`DecoderConfig::layer_windows`] from `config.json`.
fn layer_windows(value: &Value, layers: usize) -> Result<Vec<Option<usize>>, EngineError> {
    let bad = |key: &str, v: &Value, expected: &str| EngineError::Config(format!("`{key}` must be {expected}, got {v}"));
    let get = |key: &str| value.get(key).filter(|v| !v.is_null());
    let enabled = match get("use_sliding_window") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| bad("use_sliding_window", v, "true or false"))?,
    };
    let window = match get("sliding_window") {
        Some(v) if enabled => {
            let w = v.as_u64().filter(|&w| w > 0).ok_or_else(|| bad("sliding_window", v, "a positive integer"))?;
            Some(w as usize)
        }
        _ => None,
    };
    match get("layer_types") {
        Some(v) => {
            let list = v.as_array().ok_or_else(|| bad("layer_types", v, "a list"))?;
            if list.len() != layers {
                return Err(EngineError::Config(format!("`layer_types` has {} entries for {layers} layers", list.len())));
            }
            list.iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(None),
                    Some("sliding_attention") => Ok(window),
                    _ => Err(bad("layer_types", t, "\"full_attention\" or \"sliding_attention\"")),
                })
                .collect()
        }
        None => {
            let first = match get("max_window_layers") {
                None => 28,
                Some(v) => v.as_u64().ok_or_else(|| bad("max_window_layers", v, "a non-negative integer"))? as usize,
            };
            Ok((0..layers).map(|l| if l >= first { window } else { None }).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN3_4B: &str = include_str!("../testdata/qwen3-4b-config.json");

    #[test]
    fn reads_the_real_qwen3_4b_config() {
        let c = DecoderConfig::from_json_str(QWEN3_4B).expect("config");
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.rope.theta, 5_000_000.0);
        assert_eq!(c.rope.scaling, RopeScaling::None);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![151645]);
        // Qwen3-4B: 4.02 B parameters.
        let params = crate::decoder::parameter_count(&c, &crate::DecoderSpec::dense(&c, true));
        assert!((4_000_000_000..4_050_000_000).contains(&params), "{params}");
    }

    #[test]
    fn reads_the_text_side_of_the_real_qwen3_vl_2b_config() {
        let c = DecoderConfig::from_json_str(include_str!("../testdata/qwen3-vl-2b-config.json")).expect("config");
        assert_eq!(c.architectures, vec!["Qwen3VLForConditionalGeneration".to_string()]);
        assert_eq!((c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim), (2048, 28, 16, 8, 128));
        assert_eq!((c.rope.theta, c.eos_token_ids.clone(), c.tie_word_embeddings), (5_000_000.0, vec![151645], true));
        assert_eq!(c.mrope_section().expect("section"), Some([24, 20, 20]));
        assert_eq!(c.raw["vision_config"]["depth"], 24);
        assert_eq!(c.get_usize("image_token_id").expect("id"), Some(151655));
        // A plain config has no sections; Qwen2-VL's contiguous ones are refused by name.
        assert_eq!(DecoderConfig::from_json_str(QWEN3_4B).expect("config").mrope_section().expect("none"), None);
        let mut v: Value = serde_json::from_str(include_str!("../testdata/qwen3-vl-2b-config.json")).expect("json");
        v["text_config"]["rope_scaling"]["mrope_interleaved"] = false.into();
        let err = DecoderConfig::from_value(&v).expect("config").mrope_section().expect_err("contiguous");
        assert!(err.to_string().contains("mrope_interleaved"), "{err}");
    }

    #[test]
    fn accepts_transformers5_rope_parameters() {
        let text = r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "head_dim": 8,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0, "partial_rotary_factor": 0.5}}"#;
        let c = DecoderConfig::from_json_str(text).expect("config");
        assert_eq!(c.rope.theta, 1000.0);
        assert_eq!(c.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(c.rotary_dim(), 4);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let err = DecoderConfig::from_json_str(r#"{"vocab_size": 10}"#).expect_err("missing");
        assert!(err.to_string().contains("hidden_size"), "{err}");
        let err = DecoderConfig::from_json_str(
            r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 3, "num_key_value_heads": 2}"#,
        )
        .expect_err("heads");
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
        let err = DecoderConfig::from_json_str(
            r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
        )
        .expect_err("yarn");
        assert!(err.to_string().contains("yarn"), "{err}");
    }

    #[test]
    fn sliding_windows_follow_transformers_qwen3_config() {
        let base = serde_json::json!({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 3, "num_attention_heads": 2});
        let with = |extra: serde_json::Value| {
            let mut v = base.clone();
            for (k, x) in extra.as_object().expect("object") {
                v[k] = x.clone();
            }
            DecoderConfig::from_value(&v)
        };
        assert_eq!(with(serde_json::json!({})).expect("ok").layer_windows, vec![None; 3]);
        // Off unless use_sliding_window (Qwen3-4B ships sliding_window: null, use false).
        assert_eq!(with(serde_json::json!({"sliding_window": 4})).expect("ok").layer_windows, vec![None; 3]);
        let on = with(serde_json::json!({"sliding_window": 4, "use_sliding_window": true, "max_window_layers": 1})).expect("ok");
        assert_eq!(on.layer_windows, vec![None, Some(4), Some(4)]);
        assert_eq!(on.distinct_windows(), vec![None, Some(4)]);
        let typed = serde_json::json!({"sliding_window": 4, "use_sliding_window": true,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]});
        assert_eq!(with(typed).expect("ok").layer_windows, vec![Some(4), None, Some(4)]);
        let err = with(serde_json::json!({"layer_types": ["full_attention"]})).expect_err("wrong length");
        assert!(err.to_string().contains("layer_types"), "{err}");
        let err = with(serde_json::json!({"layer_types": ["full_attention", "x", "full_attention"]})).expect_err("bad type");
        assert!(err.to_string().contains("sliding_attention"), "{err}");
    }
}
