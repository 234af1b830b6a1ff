//! The host's file-access policy for in-process plugins at security level `medium`: a plugin
//! may open only paths under the allowlist the host hands it (its own library, the model
//! directory or file, the cache directory). Paths are resolved (`..`, symlinks) before they are
//! compared, so a symlink inside the model directory that points elsewhere is refused.
//! In-process this binds plugins that route their file opens through it — every plugin built
//! on the shared engine does; containing a plugin that does not is what the worker process of
//! level `high` is for.

use std::path::{Path, PathBuf};

/// Whether `path` lies under one of `allowed`, after resolving both. The error names the
/// path and the allowlist.
pub fn validate_file_access(path: &Path, allowed: &[String]) -> Result<PathBuf, String> {
    let resolved = path
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
    for root in allowed {
        if let Ok(root) = Path::new(root).canonicalize()
            && resolved.starts_with(&root)
        {
            return Ok(resolved);
        }
    }
    Err(format!(
        "security level `medium`: {} (resolved to {}) is outside the paths this plugin may open ({})",
        path.display(),
        resolved.display(),
        allowed.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_under_the_allowlist_and_no_symlink_escapes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("model");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&model).expect("dir");
        std::fs::create_dir_all(&outside).expect("dir");
        std::fs::write(model.join("config.json"), "{}").expect("write");
        std::fs::write(outside.join("secret"), "x").expect("write");
        let allowed = vec![model.to_string_lossy().into_owned()];
        assert!(validate_file_access(&model.join("config.json"), &allowed).is_ok());
        let err = validate_file_access(&outside.join("secret"), &allowed).expect_err("outside");
        assert!(err.contains("outside the paths"), "{err}");
        assert!(validate_file_access(&model.join("../outside/secret"), &allowed).is_err());
        std::os::unix::fs::symlink(outside.join("secret"), model.join("link")).expect("symlink");
        assert!(validate_file_access(&model.join("link"), &allowed).is_err(), "a symlink out is refused");
        assert!(validate_file_access(&model.join("missing"), &allowed).is_err());
    }
}
