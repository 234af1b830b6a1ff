//! Choosing the plugin for a model from its `config.json` `architectures` (and each
//! candidate's own `supports_config`). A GGUF file has no `config.json`: its metadata is
//! turned into the equivalent one (`inference_pio_formats::gguf::hf::config`).

use crate::discovery::Discovery;
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
    let architectures = value["architectures"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default();
    Ok(ModelConfig { text: value.to_string(), architectures })
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
