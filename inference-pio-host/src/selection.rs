//! Choosing the plugin for a model directory from its `config.json` `architectures` (and
//! each candidate's own `supports_config`).

use crate::discovery::Discovery;
use crate::plugin::LoadedPlugin;
use std::path::{Path, PathBuf};

/// A model directory's `config.json`, read and checked.
pub struct ModelConfig {
    pub text: String,
    pub architectures: Vec<String>,
}

/// Reads `DIR/config.json`, with errors that say what is wrong.
pub fn read_model_config(dir: &Path) -> anyhow::Result<ModelConfig> {
    if !dir.exists() {
        anyhow::bail!("model directory {} does not exist", dir.display());
    }
    if !dir.is_dir() {
        anyhow::bail!("model path {} is not a directory", dir.display());
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

/// The chosen plugin, loaded into this process.
pub struct Selected {
    pub id: String,
    pub path: PathBuf,
    pub plugin: LoadedPlugin,
}

/// Picks by `--plugin ID`, or by architecture + `supports_config`.
pub fn select(discovery: &Discovery, model: &ModelConfig, plugin_id: Option<&str>) -> anyhow::Result<Selected> {
    if let Some(id) = plugin_id {
        let record = discovery.find(id).ok_or_else(|| {
            let known: Vec<_> = discovery.accepted().map(|(_, m)| m.id.clone()).collect();
            anyhow::anyhow!("no plugin with id `{id}` (available: {})", list_or_none(&known))
        })?;
        let plugin = LoadedPlugin::open(&record.path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", record.path.display()))?;
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
        let plugin = match LoadedPlugin::open(path) {
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
