//! Small JSON files in the cache directory that remember what was derived from a file, keyed by
//! the file's identity and this executable's ([`FileStamp`]): the plugin probes' answers
//! (`crate::discovery`) and the configs derived from GGUF files (`crate::selection`). The idea
//! is GStreamer's plugin registry cache (keyed by modification time and size); the stamp here
//! also has the inode and the status-change time, which a file's owner cannot set back.

use serde::{Deserialize, Serialize};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What identifies one version of a file: a rewrite, a replacement (rename over it), a copy
/// or a `touch` changes at least one of these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    /// The stamp of `path` (following links); `None` where it cannot be read.
    pub fn of(path: &Path) -> Option<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(path).ok()?;
            let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
            Some(Self { dev: m.dev(), ino: m.ino(), len: m.len(), mtime_ns: ns(m.mtime(), m.mtime_nsec()), ctime_ns: ns(m.ctime(), m.ctime_nsec()) })
        }
        #[cfg(not(unix))]
        {
            let _ = path;
            None
        }
    }

    /// This executable's stamp.
    pub fn of_this_executable() -> Option<Self> {
        std::env::current_exe().ok().and_then(|e| Self::of(&e))
    }
}

/// Values derived from files, each kept with the stamp of the file it came from, written by
/// one executable.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "V: Serialize + DeserializeOwned")]
pub struct StampedCache<V> {
    /// The executable that derived them; another one's are not used.
    host: Option<FileStamp>,
    entries: BTreeMap<PathBuf, (FileStamp, V)>,
}

impl<V> Default for StampedCache<V> {
    fn default() -> Self {
        Self { host: None, entries: BTreeMap::new() }
    }
}

impl<V: Serialize + DeserializeOwned + Clone> StampedCache<V> {
    /// The values kept at `path` by `host`; none when the file is missing, unreadable, or
    /// written by another executable.
    pub fn read(path: &Path, host: &FileStamp) -> Self {
        let kept: Option<Self> = std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok());
        kept.filter(|k| k.host.as_ref() == Some(host)).unwrap_or_default()
    }

    /// The value kept for `file` at `stamp`.
    pub fn get(&self, file: &Path, stamp: &FileStamp) -> Option<&V> {
        self.entries.get(file).filter(|(s, _)| s == stamp).map(|(_, v)| v)
    }

    pub fn insert(&mut self, file: PathBuf, stamp: FileStamp, value: V) {
        self.entries.insert(file, (stamp, value));
    }

    /// Writes the values of files that still exist, as `host`'s, through a temporary file
    /// renamed into place (concurrent hosts each leave a whole file; the last one wins). Best
    /// effort: a cache that cannot be written only means the next run derives them again.
    pub fn write(mut self, path: &Path, host: FileStamp) {
        self.host = Some(host);
        self.entries.retain(|file, _| file.exists());
        let Ok(text) = serde_json::to_vec(&self) else { return };
        let Some(dir) = path.parent() else { return };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}
