//! sha256 digests, hex: a plugin file against the value pinned in the config (security
//! levels, `sha256 = "…"`), and the built-in models' packages against their pins.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of what `reader` (named `path` in messages) holds from where it stands, read in
/// 1 MiB pieces, hex.
pub fn sha256_of(reader: &mut impl Read, path: &Path) -> Result<String, String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    sha256_of(&mut file, path)
}

/// Refuses the plugin file `path` unless its sha256 is `expected`.
pub fn check_sha256(path: &Path, expected: &str) -> Result<(), String> {
    check_digest(path, &sha256_file(path)?, expected)
}

/// Refuses the plugin file `path`, whose digest is `actual`, unless it is `expected`.
pub fn check_digest(path: &Path, actual: &str, expected: &str) -> Result<(), String> {
    if actual.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(format!(
            "sha256 mismatch for {}: the config pins {expected}, the file has {actual}; refusing to load it",
            path.display()
        ))
    }
}
