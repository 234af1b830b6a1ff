//! Choosing the plugin for a model from its `config.json` `architectures` (and each
//! candidate's own `supports_config`). A GGUF file has no `config.json`: its metadata is
//! turned into the equivalent one (`inference_pio_formats::gguf::hf::config`).

use crate::discovery::Discovery;
use crate::stamped_cache::{FileStamp, StampedCache};
use crate::handle::PluginHandle;
use std::path::{Path, PathBuf};

/// Opens a plugin file (id, path) at the level its config section asks for.
pub type Opener<'a> = dyn Fn(&str, &Path) -> Result<PluginHandle, String> + 'a;

/// A model directory's `config.json`, read and checked.
pub struct ModelConfig {
    pub text: String,
    pub architectures: Vec<String>,
}

/// Most metadata a GGUF file may carry before its tensor table ends (SmolLM2's is 2 MB).
const GGUF_METADATA_LIMIT: u64 = 256 << 20;

/// The config of a GGUF file, from its metadata. Reads only the file's head: 1 MiB first,
/// doubled while the metadata runs past it, up to [`GGUF_METADATA_LIMIT`].
fn read_gguf_config(path: &Path) -> anyhow::Result<ModelConfig> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let len = file.metadata().map_err(|e| anyhow::anyhow!("cannot stat {}: {e}", path.display()))?.len();
    let mut prefix = Vec::new();
    let mut want = (1u64 << 20).min(len);
    let gguf = loop {
        let missing = want - prefix.len() as u64;
        (&mut file)
            .take(missing)
            .read_to_end(&mut prefix)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        match inference_pio_formats::gguf::Gguf::parse_prefix(&prefix, len) {
            Ok(g) => break g,
            Err(e) if e.to_string().contains("truncated") && want < len.min(GGUF_METADATA_LIMIT) => {
                want = (want * 2).min(len).min(GGUF_METADATA_LIMIT);
            }
            Err(e) if e.to_string().contains("truncated") && len > GGUF_METADATA_LIMIT => {
                anyhow::bail!("{}: GGUF metadata larger than {} MiB", path.display(), GGUF_METADATA_LIMIT >> 20)
            }
            Err(e) => anyhow::bail!("{} is not a valid GGUF file: {e}", path.display()),
        }
    };
    let value = inference_pio_formats::gguf::hf::config(&gguf).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(ModelConfig { text: value.to_string(), architectures: architectures_of(&value) })
}

/// The GGUF configs kept between runs, in the cache directory: the metadata of a multi-MB
/// head is parsed once per file version (keyed as the plugin probes are, by the file's and
/// this executable's [`FileStamp`]), not at every start (27-36 ms of the README main job's
/// start on two cores).
pub const GGUF_CONFIG_CACHE_FILE: &str = "gguf-configs.json";

/// [`read_model_config`], with a GGUF file's config taken from `cache_dir`'s
/// [`GGUF_CONFIG_CACHE_FILE`] when the file and this executable have not changed since it was
/// derived, and stored there otherwise (best effort: a cache that cannot be read or written
/// only means the metadata is parsed).
pub fn read_model_config_cached(dir: &Path, cache_dir: Option<&Path>) -> anyhow::Result<ModelConfig> {
    let (Some(cache_dir), true) = (cache_dir, dir.is_file() && inference_pio_formats::gguf::is_gguf_file(dir)) else {
        return read_model_config(dir);
    };
    let cache = cache_dir.join(GGUF_CONFIG_CACHE_FILE);
    let host = FileStamp::of_this_executable();
    let (Some(host), Some(stamp)) = (host, FileStamp::of(dir)) else {
        return read_model_config(dir);
    };
    let key = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut kept: StampedCache<String> = StampedCache::read(&cache, &host);
    if let Some(text) = kept.get(&key, &stamp)
        && let Ok(value) = serde_json::from_str::<serde_json::Value>(text)
    {
        return Ok(ModelConfig { text: text.clone(), architectures: architectures_of(&value) });
    }
    let config = read_gguf_config(dir)?;
    kept.insert(key, stamp, config.text.clone());
    kept.write(&cache, host);
    Ok(config)
}

fn architectures_of(value: &serde_json::Value) -> Vec<String> {
    value["architectures"].as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default()
}

/// Reads `DIR/config.json` (or a GGUF file's metadata), with errors that say what is wrong.
pub fn read_model_config(dir: &Path) -> anyhow::Result<ModelConfig> {
    if !dir.exists() {
        anyhow::bail!("model directory {} does not exist", dir.display());
    }
    if dir.is_file() {
        if inference_pio_formats::gguf::is_gguf_file(dir) {
            return read_gguf_config(dir);
        }
        anyhow::bail!("model path {} is neither a directory nor a GGUF file", dir.display());
    }
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is not valid JSON: {e}", path.display()))?;
    let architectures = value
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect::<Vec<_>>())
        .unwrap_or_default();
    if architectures.is_empty() {
        anyhow::bail!("{} has no `architectures` list; pass --plugin ID", path.display());
    }
    Ok(ModelConfig { text, architectures })
}

/// The chosen plugin, in this process or in its worker.
pub struct Selected {
    pub id: String,
    pub path: PathBuf,
    pub plugin: PluginHandle,
}

/// Picks by `--plugin ID`, or by architecture + `supports_config`; `open` loads each
/// candidate at its security level (a worker process at `high` and `maximum`).
pub fn select(discovery: &Discovery, model: &ModelConfig, plugin_id: Option<&str>, open: &Opener<'_>) -> anyhow::Result<Selected> {
    if let Some(id) = plugin_id {
        let record = discovery.find(id).ok_or_else(|| {
            let known: Vec<_> = discovery.accepted().map(|(_, m)| m.id.clone()).collect();
            anyhow::anyhow!("no plugin with id `{id}` (available: {})", list_or_none(&known))
        })?;
        let plugin = open(id, &record.path).map_err(|e| anyhow::anyhow!("{}: {e}", record.path.display()))?;
        let support = plugin.supports_config(&model.text)?;
        if !support.supported {
            anyhow::bail!("plugin `{id}` cannot load this model: {}", support.reason);
        }
        return Ok(Selected { id: id.to_string(), path: record.path.clone(), plugin });
    }
    let by_arch: Vec<_> = discovery
        .accepted()
        .filter(|(_, m)| m.architectures.iter().any(|a| model.architectures.contains(a)))
        .collect();
    if by_arch.is_empty() {
        let known: Vec<_> = discovery
            .accepted()
            .map(|(_, m)| format!("{} ({})", m.id, m.architectures.join(", ")))
            .collect();
        anyhow::bail!(
            "no plugin handles architecture {}; available plugins: {}",
            model.architectures.join(", "),
            list_or_none(&known)
        );
    }
    let mut supported = Vec::new();
    let mut refusals = Vec::new();
    for (path, meta) in by_arch {
        let plugin = match open(&meta.id, path) {
            Ok(p) => p,
            Err(e) => {
                refusals.push(format!("{}: {e}", meta.id));
                continue;
            }
        };
        match plugin.supports_config(&model.text) {
            Ok(s) if s.supported => supported.push(Selected { id: meta.id.clone(), path: path.clone(), plugin }),
            Ok(s) => refusals.push(format!("{}: {}", meta.id, s.reason)),
            Err(e) => refusals.push(format!("{}: {e}", meta.id)),
        }
    }
    match supported.len() {
        1 => Ok(supported.remove(0)),
        0 => anyhow::bail!(
            "plugins for architecture {} refused this model: {}",
            model.architectures.join(", "),
            refusals.join("; ")
        ),
        _ => {
            let ids: Vec<_> = supported.iter().map(|s| s.id.clone()).collect();
            anyhow::bail!(
                "several plugins can load this model ({}); choose one with --plugin ID",
                ids.join(", ")
            )
        }
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() { "none".to_string() } else { items.join(", ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF file's config is derived once per file version: a second read takes it from the
    /// cache (shown by marking the kept text), a rewritten file is parsed again.
    #[test]
    fn a_gguf_config_is_kept_for_an_unchanged_file_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/llama/tests/fixtures/llama-tiny-tied.gguf");
        let file = dir.path().join("model.gguf");
        std::fs::copy(&fixture, &file).expect("copy");
        let cache = dir.path().join("cache");
        let first = read_model_config_cached(&file, Some(&cache)).expect("parsed");
        assert_eq!(first.architectures, ["LlamaForCausalLM"]);
        assert_eq!(first.text, read_model_config(&file).expect("parsed").text);
        // Mark the kept config: a read that uses it says so.
        let path = cache.join(GGUF_CONFIG_CACHE_FILE);
        let mut kept: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).expect("cache written")).expect("json");
        let key = file.canonicalize().expect("path");
        let entry = &mut kept["entries"][key.to_str().expect("utf-8")];
        assert!(entry.is_array(), "{kept}");
        entry[1] = serde_json::json!(r#"{"architectures": ["Marked"]}"#);
        std::fs::write(&path, serde_json::to_vec(&kept).expect("json")).expect("write");
        assert_eq!(read_model_config_cached(&file, Some(&cache)).expect("kept").architectures, ["Marked"]);
        // The same bytes written again: new times, parsed again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, std::fs::read(&fixture).expect("read")).expect("rewrite");
        assert_eq!(read_model_config_cached(&file, Some(&cache)).expect("parsed").architectures, ["LlamaForCausalLM"]);
    }
}
