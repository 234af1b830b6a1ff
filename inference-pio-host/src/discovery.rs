//! Finding plugin files and checking each one in a throw-away process.
//!
//! Directories, in order: `--plugin-dir` (repeatable), `INFERENCE_PIO_PLUGIN_DIR`
//! (`:`-separated), `[host] plugin_dirs` of the config file, `plugins/` next to the executable,
//! and — when the executable sits in a cargo target directory (`target/debug`,
//! `target/release`) — that directory itself, so `cargo build` makes the workspace's own
//! plugins visible with no copying.
//!
//! Every candidate file is *probed* by re-executing this binary (`inference-pio __probe FILE`)
//! so that a library that crashes, aborts or hangs while loading or answering `metadata` only
//! takes the probe down: listing never crashes because of one bad file. The probe jails itself
//! before it opens the file (where the kernel allows): its own empty network namespace, a
//! landlock ruleset that allows reading but no write anywhere, the seccomp deny-list of level
//! `maximum`, no core dumps. So code of a file that is not yet trusted runs only there, unable
//! to write or connect.
//!
//! Before the probe, the file's declaration is read without loading it (the
//! `.inference_pio` ELF section that `export_plugin!(id = ...)` writes): a file declaring an
//! id whose sha256 the config pins is hashed first and, when it does not match, refused
//! before any of its code runs, in the probe or anywhere. A file's probe must then answer the
//! id it declares. Files without a declaration are probed as before.
//!
//! A probe's answer is remembered in the cache directory (`plugin-probes.json`,
//! [`crate::stamped_cache`]), keyed by the file's identity (device, inode, size, modification
//! and status-change times) and this executable's, as GStreamer's plugin registry cache does: a later run reuses it for a file
//! that has not changed instead of starting a process per file (40-60 ms of the README main
//! job's start on two cores). Any change to the file or to the host probes again; answers
//! that may not repeat (a probe that timed out or could not start) are not kept, and a file
//! whose id the config pins a sha256 for is always hashed and probed.

use crate::plugin::LoadedPlugin;
pub use crate::stamped_cache::FileStamp;
use crate::stamped_cache::StampedCache;
use inference_pio_core::abi::ABI_MAJOR;
use inference_pio_core::export::{NOTE_SECTION, parse_plugin_note};
use inference_pio_core::types::PluginMetadata;
use std::collections::BTreeMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable with extra plugin directories.
pub const PLUGIN_DIR_ENV: &str = "INFERENCE_PIO_PLUGIN_DIR";

/// The platform's shared-library suffix.
pub const LIBRARY_SUFFIX: &str = std::env::consts::DLL_SUFFIX;

/// Where plugins are looked for, in priority order, without duplicates.
pub fn plugin_dirs(cli_dirs: &[PathBuf], config_dirs: &[PathBuf], exe: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = cli_dirs.to_vec();
    if let Some(env) = std::env::var_os(PLUGIN_DIR_ENV) {
        dirs.extend(std::env::split_paths(&env).filter(|p| !p.as_os_str().is_empty()));
    }
    dirs.extend(config_dirs.iter().cloned());
    if let Some(exe_dir) = exe.and_then(Path::parent) {
        dirs.push(exe_dir.join("plugins"));
        if is_cargo_profile_dir(exe_dir) {
            dirs.push(exe_dir.to_path_buf());
        }
    }
    let mut seen = BTreeSet::new();
    dirs.retain(|d| seen.insert(d.canonicalize().unwrap_or_else(|_| d.clone())));
    dirs
}

/// `target/<profile>` holds a `.fingerprint` directory that cargo maintains.
fn is_cargo_profile_dir(dir: &Path) -> bool {
    dir.join(".fingerprint").is_dir()
}

/// Shared-library files directly inside `dirs` (sorted, per directory).
pub fn candidate_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut here: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.to_string_lossy().ends_with(LIBRARY_SUFFIX))
            .collect();
        here.sort();
        files.extend(here);
    }
    files
}

/// What the probe found out about one file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeOutcome {
    Accepted(Box<PluginMetadata>),
    Rejected(String),
}

/// One discovered file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PluginRecord {
    pub path: PathBuf,
    #[serde(flatten)]
    pub outcome: ProbeOutcome,
}

impl PluginRecord {
    pub fn metadata(&self) -> Option<&PluginMetadata> {
        match &self.outcome {
            ProbeOutcome::Accepted(m) => Some(m),
            ProbeOutcome::Rejected(_) => None,
        }
    }
}

/// All plugins found, accepted and rejected.
#[derive(Clone, Debug, Default)]
pub struct Discovery {
    pub dirs: Vec<PathBuf>,
    pub records: Vec<PluginRecord>,
}

impl Discovery {
    /// Probes every candidate in `dirs` (in parallel) with `probe_exe __probe FILE`. `pins`:
    /// plugin id -> the sha256 the config pins for it.
    pub fn run(dirs: Vec<PathBuf>, probe_exe: &Path, timeout: Duration, pins: &BTreeMap<String, String>) -> Self {
        Self::run_cached(dirs, probe_exe, timeout, pins, None)
    }

    /// [`Self::run`], reusing and updating the answers kept in `cache` (a JSON file, see the
    /// module header) for files that have not changed since they were probed.
    pub fn run_cached(dirs: Vec<PathBuf>, probe_exe: &Path, timeout: Duration, pins: &BTreeMap<String, String>, cache: Option<&Path>) -> Self {
        let files = candidate_files(&dirs);
        let host = FileStamp::of(probe_exe);
        let mut kept = match (cache, &host) {
            (Some(path), Some(host)) => StampedCache::read(path, host),
            _ => StampedCache::default(),
        };
        let results = std::thread::scope(|scope| {
            let handles: Vec<_> = files
                .iter()
                .map(|file| {
                    let stamp = FileStamp::of(file);
                    let cached = stamp.as_ref().and_then(|s| kept_answer(&kept, file, s, pins));
                    scope.spawn(move || match cached {
                        Some(outcome) => (outcome, None),
                        None => {
                            let (outcome, repeatable) = probe_file_once(probe_exe, file, timeout, pins);
                            let keep = repeatable.then_some(stamp).flatten();
                            (outcome, keep)
                        }
                    })
                })
                .collect();
            files
                .iter()
                .zip(handles)
                .map(|(file, handle)| {
                    let (outcome, keep) = handle
                        .join()
                        .unwrap_or_else(|_| (ProbeOutcome::Rejected("probe thread panicked".into()), None));
                    (PluginRecord { path: file.clone(), outcome }, keep)
                })
                .collect::<Vec<_>>()
        });
        let mut changed = false;
        let records = results
            .into_iter()
            .map(|(record, keep)| {
                if let Some(stamp) = keep {
                    kept.insert(record.path.clone(), stamp, record.outcome.clone());
                    changed = true;
                }
                record
            })
            .collect();
        if let (Some(path), Some(host), true) = (cache, host, changed) {
            kept.write(path, host);
        }
        let mut discovery = Self { dirs, records };
        discovery.reject_duplicate_ids();
        discovery
    }

    /// Two accepted files with the same id: the first (by directory priority) wins.
    fn reject_duplicate_ids(&mut self) {
        let mut seen: std::collections::BTreeMap<String, PathBuf> = Default::default();
        for record in &mut self.records {
            if let ProbeOutcome::Accepted(meta) = &record.outcome {
                if let Some(first) = seen.get(&meta.id) {
                    record.outcome = ProbeOutcome::Rejected(format!(
                        "duplicate plugin id `{}` (already provided by {})",
                        meta.id,
                        first.display()
                    ));
                } else {
                    seen.insert(meta.id.clone(), record.path.clone());
                }
            }
        }
    }

    pub fn accepted(&self) -> impl Iterator<Item = (&PathBuf, &PluginMetadata)> {
        self.records.iter().filter_map(|r| r.metadata().map(|m| (&r.path, m)))
    }

    pub fn find(&self, id: &str) -> Option<&PluginRecord> {
        self.records.iter().find(|r| r.metadata().is_some_and(|m| m.id == id))
    }
}

/// The kept answer for `file` at `stamp`, unless its declared id has a pinned hash (those are
/// checked at every run).
fn kept_answer(kept: &StampedCache<ProbeOutcome>, file: &Path, stamp: &FileStamp, pins: &BTreeMap<String, String>) -> Option<ProbeOutcome> {
    let outcome = kept.get(file, stamp)?;
    let pinned = |id: &str| pins.contains_key(id);
    match outcome {
        ProbeOutcome::Accepted(m) if pinned(&m.id) => None,
        _ if !pins.is_empty() && declared_id(file).ok().flatten().is_some_and(|id| pinned(&id)) => None,
        outcome => Some(outcome.clone()),
    }
}

/// Checks the file's first bytes before handing it to the dynamic loader.
fn check_header(path: &Path) -> Result<(), String> {
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let read = file.read(&mut magic).map_err(|e| format!("cannot read: {e}"))?;
    if cfg!(target_os = "linux") && (read < 4 || magic != *b"\x7fELF") {
        return Err("not a shared library (no ELF header)".to_string());
    }
    Ok(())
}

/// The plugin id a library declares in its `.inference_pio` section
/// (`inference_pio_core::export::plugin_note`), read from the file without loading it; `None`
/// when it declares none.
pub fn declared_id(path: &Path) -> Result<Option<String>, String> {
    use object::{Object, ObjectSection};
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(|e| format!("not a readable shared library: {e}"))?;
    let Some(section) = elf.section_by_name(NOTE_SECTION) else { return Ok(None) };
    let data = section.data().map_err(|e| format!("cannot read its {NOTE_SECTION} section: {e}"))?;
    let (major, _, id) = parse_plugin_note(data)?;
    if major != ABI_MAJOR {
        return Err(format!("declares plugin ABI {major}; this host speaks ABI {ABI_MAJOR}"));
    }
    Ok(Some(id))
}

/// Probes one file in a child process (after its declaration and pinned hash, see the module
/// header); never fails, never panics.
pub fn probe_file(probe_exe: &Path, path: &Path, timeout: Duration, pins: &BTreeMap<String, String>) -> ProbeOutcome {
    probe_file_once(probe_exe, path, timeout, pins).0
}

/// [`probe_file`], and whether the answer would be the same on a second try of the same file
/// (not for a probe that timed out or could not be started or waited for).
fn probe_file_once(probe_exe: &Path, path: &Path, timeout: Duration, pins: &BTreeMap<String, String>) -> (ProbeOutcome, bool) {
    if let Err(reason) = check_header(path) {
        return (ProbeOutcome::Rejected(reason), true);
    }
    let declared = match declared_id(path) {
        Ok(declared) => declared,
        Err(reason) => return (ProbeOutcome::Rejected(reason), true),
    };
    if let Some(expected) = declared.as_ref().and_then(|id| pins.get(id))
        && let Err(reason) = crate::digest::check_sha256(path, expected)
    {
        return (ProbeOutcome::Rejected(format!("{reason} (checked before any of its code ran)")), false);
    }
    let (outcome, repeatable) = run_probe(probe_exe, path, timeout);
    let outcome = match outcome {
        ProbeOutcome::Accepted(meta) if declared.as_ref().is_some_and(|d| *d != meta.id) => ProbeOutcome::Rejected(format!(
            "declares plugin id `{}` in its {NOTE_SECTION} section but its metadata answers `{}`",
            declared.unwrap_or_default(),
            meta.id
        )),
        outcome => outcome,
    };
    (outcome, repeatable)
}

/// The probe's answer, and whether it came from the probe process itself (its JSON line or
/// its exit): a timeout or a failure to start or wait for it may not repeat.
fn run_probe(probe_exe: &Path, path: &Path, timeout: Duration) -> (ProbeOutcome, bool) {
    let child = Command::new(probe_exe)
        .arg("__probe")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (ProbeOutcome::Rejected(format!("cannot start probe process: {e}")), false),
    };
    // Drain stdout while waiting, so a chatty library cannot stall the probe on a full pipe.
    let reader = child.stdout.take().map(|mut out| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            text
        })
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return (
                    ProbeOutcome::Rejected(format!(
                        "did not answer the metadata probe within {:.0} s (hung while loading?)",
                        timeout.as_secs_f64()
                    )),
                    false,
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return (ProbeOutcome::Rejected(format!("probe process failed: {e}")), false),
        }
    };
    let stdout = reader.and_then(|r| r.join().ok()).unwrap_or_default();
    if let Some(line) = stdout.lines().rev().find(|l| l.starts_with('{'))
        && let Ok(outcome) = serde_json::from_str::<ProbeOutcome>(line)
    {
        return (outcome, true);
    }
    // A SIGKILL may have come from outside (the out-of-memory killer), not from the file.
    #[cfg(unix)]
    let repeatable = std::os::unix::process::ExitStatusExt::signal(&status) != Some(libc::SIGKILL);
    #[cfg(not(unix))]
    let repeatable = true;
    (ProbeOutcome::Rejected(describe_exit(status)), repeatable)
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            let name = match signal {
                libc::SIGABRT => "SIGABRT (abort)",
                libc::SIGSEGV => "SIGSEGV (segmentation fault)",
                libc::SIGBUS => "SIGBUS (bus error)",
                libc::SIGILL => "SIGILL (illegal instruction)",
                libc::SIGKILL => "SIGKILL",
                libc::SIGFPE => "SIGFPE",
                _ => "a signal",
            };
            return format!("crashed while loading or answering metadata: killed by {name} ({signal})");
        }
    }
    format!("probe process exited with {status} without an answer")
}

/// The probe's jail (best effort: discovery lists plugins; the levels' own sandboxes are
/// checked strictly when a plugin is used).
fn jail_probe() {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() } as u32;
    let spec = crate::sandbox::SandboxSpec {
        level: inference_pio_core::config::SecurityLevel::Maximum,
        parent_pid: parent,
        read_only: vec![PathBuf::from("/")],
        read_write: Vec::new(),
        devices: Vec::new(),
        cgroup_procs: Vec::new(),
        file_size_bytes: 0,
        open_files: 256,
        jail: None,
        seccomp: Some(crate::sandbox::SeccompMode::DenyList),
    };
    let _ = crate::sandbox::apply(&spec);
}

/// The child side of the probe: jail, load, check, ask for metadata, print one JSON line.
pub fn probe_main(path: &Path) -> i32 {
    jail_probe();
    let outcome = match LoadedPlugin::open(path) {
        Err(reason) => ProbeOutcome::Rejected(reason),
        Ok(plugin) => match plugin.metadata() {
            Ok(meta) => ProbeOutcome::Accepted(Box::new(meta)),
            Err(e) => ProbeOutcome::Rejected(format!("metadata() failed: {e}")),
        },
    };
    match serde_json::to_string(&outcome) {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(_) => 1,
    }
}
