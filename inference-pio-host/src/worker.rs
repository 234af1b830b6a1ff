//! Security levels `high` and `maximum`: the plugin runs in a worker process — this binary
//! re-executed as `inference-pio __worker` — and the host supervises it.
//!
//! Protocol (version [`PROTOCOL_VERSION`]), over a Unix socket pair whose worker end is the
//! worker's stdin: frames of a little-endian `u32` length and a JSON document. The host sends
//! [`ToWorker::Setup`] (plugin, pinned hash, sandbox); the worker applies the sandbox, answers
//! [`FromWorker::Hello`] (protocol version, ABI major, the mechanisms in force); the host checks
//! them against the level and sends [`ToWorker::Open`], and only then does the worker check the
//! plugin file's sha256 and open the library. Calls mirror the in-process ones
//! ([`Call`]) and are multiplexed: each carries a request id, the worker runs each on its own
//! thread (the engine batches concurrent requests), `infer` streams [`FromWorker::Token`]
//! frames tagged with its id before its [`FromWorker::Reply`], and the host answers a sink's
//! "stop" with [`ToWorker::Cancel`] for that id. A host thread reads every frame and hands it
//! to the call waiting for that id.
//!
//! Supervision: a watchdog thread reads the worker's memory and CPU from `/proc`, its GPU
//! memory through NVML and its scratch directory's size, and kills it with a named reason on
//! a breach; a call that hears nothing for `timeout_s` kills it as hung. A dead worker (panic,
//! abort, segfault, OOM kill, breach, hang) fails the call in flight with an error naming what
//! happened, and the next call starts a new worker, replaying `initialize` and the loaded
//! models.
//!
//! Reference: the in-process wrapper [`crate::plugin::LoadedPlugin`], whose calls this
//! mirrors; Chromium's and Firefox's utility-process model (broker restarts a crashed worker).

use crate::cgroup::{self, WorkerCgroup};
use crate::plugin::LoadedPlugin;
use crate::sandbox::{self, Mechanism, SandboxSpec};
use inference_pio_core::abi::{ABI_MAJOR, ErrorKind, PluginError};
use inference_pio_core::export::TokenCallback;
use inference_pio_core::config::{DEFAULT_WORKER_ID, ResourceLimits, SecurityLevel};
use inference_pio_core::types::{
    BatchInferRequest, BatchInferResponse, ChatRequest, ConfigUpdate, GenerateTextRequest, InferRequest, InferResponse, LoadOptions, ModelInfo, PluginMetadata, PluginSettings,
    SchedulerStats, ScoreRequest, ScoreResponse, Support, TokenDetail, UpdateOutcome,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bumped on any incompatible change of the messages below.
pub const PROTOCOL_VERSION: u32 = 4;
/// Largest frame accepted (a logits matrix of a long prompt fits).
const MAX_FRAME: usize = 1 << 30;
/// Default `timeout_s`.
pub const DEFAULT_TIMEOUT_S: f64 = 600.0;
/// RLIMIT_FSIZE when `disk_space_gb` is not set.
const DEFAULT_FILE_SIZE: u64 = 8 << 30;
/// RLIMIT_NOFILE.
const OPEN_FILES: u64 = 1024;

/// The worker's setup.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSetup {
    pub protocol: u32,
    pub plugin: PathBuf,
    pub sha256: Option<String>,
    pub sandbox: SandboxSpec,
}

/// One call, mirroring [`LoadedPlugin`]'s methods.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    Metadata,
    SupportsConfig(String),
    Initialize(PluginSettings),
    LoadModel { dir: PathBuf, options: LoadOptions },
    Infer { model: u64, request: InferRequest },
    GenerateText { model: u64, request: GenerateTextRequest },
    ChatCompletion { model: u64, request: ChatRequest },
    InferBatch { model: u64, request: BatchInferRequest },
    Score { model: u64, request: ScoreRequest },
    Stats { model: u64 },
    UpdateConfig(ConfigUpdate),
    Cleanup(u64),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToWorker {
    Setup(Box<WorkerSetup>),
    Open,
    Call { id: u64, call: Box<Call> },
    Cancel(u64),
    Shutdown,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FromWorker {
    Hello { protocol: u32, abi_major: u32, pid: u32, mechanisms: Vec<Mechanism> },
    Token {
        id: u64,
        token: u32,
        text: String,
        /// What else the token carries (ABI 1.4), when anything.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<TokenDetail>,
    },
    Reply { id: u64, result: Result<serde_json::Value, WireError> },
    /// The sandbox could not be applied; the worker exits.
    Fatal(String),
}

fn write_frame<T: Serialize>(stream: &mut impl Write, message: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(|_| std::io::Error::other("frame too large"))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    stream.write_all(&frame)
}

fn read_frame<T: DeserializeOwned>(stream: &mut impl Read) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("frame of {len} bytes is larger than {MAX_FRAME}")));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(|e| std::io::Error::other(format!("malformed frame: {e}")))
}

// ---------------------------------------------------------------------------------------
// Worker side.

/// `inference-pio __worker`: serve one plugin over the socket on stdin. Returns the exit code.
pub fn worker_main() -> i32 {
    // The socket stays descriptor 0: the sandbox closes every descriptor above 2.
    // SAFETY: descriptor 0 is the socket the host passed as stdin; nothing else in this
    // process owns it (standard input is never read here), so this is its only owner.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(0) };
    let mut stream = UnixStream::from(fd);
    match serve(&mut stream) {
        Ok(()) => 0,
        Err(message) => {
            let _ = write_frame(&mut stream, &FromWorker::Fatal(message.clone()));
            eprintln!("inference-pio worker: {message}");
            71
        }
    }
}

fn serve(stream: &mut UnixStream) -> Result<(), String> {
    let setup = match read_frame::<ToWorker>(stream).map_err(|e| format!("no setup message: {e}"))? {
        ToWorker::Setup(setup) => setup,
        other => return Err(format!("expected the setup message, got {other:?}")),
    };
    if setup.protocol != PROTOCOL_VERSION {
        return Err(format!("host speaks worker protocol {}, this worker {PROTOCOL_VERSION}", setup.protocol));
    }
    let mechanisms = sandbox::apply(&setup.sandbox)?;
    let hello = FromWorker::Hello { protocol: PROTOCOL_VERSION, abi_major: ABI_MAJOR, pid: std::process::id(), mechanisms };
    write_frame(stream, &hello).map_err(|e| format!("cannot greet the host: {e}"))?;
    match read_frame::<ToWorker>(stream) {
        Ok(ToWorker::Open) => {}
        Ok(ToWorker::Shutdown) | Err(_) => return Ok(()),
        Ok(other) => return Err(format!("expected open, got {other:?}")),
    }
    // Checked again here, on the very file the worker maps, before any plugin code: the
    // library is hashed through an open descriptor and loaded through that descriptor
    // (`/proc/self/fd/N`), so swapping the file at its path after the check changes nothing.
    // The descriptor stays open for the worker's life.
    let opened = LoadedPlugin::open_pinned(&setup.plugin, setup.sha256.as_deref());
    let plugin = match opened {
        Ok(plugin) => {
            write_frame(stream, &FromWorker::Reply { id: 0, result: Ok(serde_json::Value::Null) }).map_err(|e| e.to_string())?;
            plugin
        }
        Err(message) => {
            let reply = FromWorker::Reply { id: 0, result: Err(WireError { kind: ErrorKind::Unsupported, message }) };
            write_frame(stream, &reply).map_err(|e| e.to_string())?;
            return Ok(());
        }
    };

    // Each call on its own thread; replies and tokens share one writer; `Cancel` raises the
    // flag that call's sink reads.
    let plugin = Arc::new(plugin);
    let writer = Arc::new(Mutex::new(stream.try_clone().map_err(|e| e.to_string())?));
    let cancels: Arc<Mutex<std::collections::HashMap<u64, Arc<AtomicBool>>>> = Arc::default();
    loop {
        match read_frame::<ToWorker>(stream) {
            Ok(ToWorker::Call { id, call }) => {
                let flag = Arc::new(AtomicBool::new(false));
                if let Ok(mut c) = cancels.lock() {
                    c.insert(id, Arc::clone(&flag));
                }
                let (plugin, writer, cancels) = (Arc::clone(&plugin), Arc::clone(&writer), Arc::clone(&cancels));
                std::thread::spawn(move || {
                    let result = run_call(&plugin, *call, id, &writer, &flag);
                    if let Ok(mut c) = cancels.lock() {
                        c.remove(&id);
                    }
                    if let Ok(mut w) = writer.lock() {
                        let _ = write_frame(&mut *w, &FromWorker::Reply { id, result });
                    }
                });
            }
            Ok(ToWorker::Cancel(id)) => {
                if let Some(flag) = cancels.lock().ok().and_then(|c| c.get(&id).cloned()) {
                    flag.store(true, Ordering::SeqCst);
                }
            }
            Ok(_) | Err(_) => return Ok(()),
        }
    }
}

fn run_call(plugin: &LoadedPlugin, call: Call, call_id: u64, writer: &Mutex<UnixStream>, cancel: &AtomicBool) -> Result<serde_json::Value, WireError> {
    fn value<T: Serialize>(result: Result<T, PluginError>) -> Result<serde_json::Value, WireError> {
        match result {
            Ok(v) => serde_json::to_value(v).map_err(|e| WireError { kind: ErrorKind::Internal, message: e.to_string() }),
            Err(e) => Err(WireError { kind: e.kind, message: e.message.to_string() }),
        }
    }
    // Streamed calls send each token as a frame; a cancel frame stops the stream.
    let mut on_token = |token: u32, text: &str, detail: &TokenDetail| {
        if cancel.load(Ordering::SeqCst) {
            return false;
        }
        let detail = (!detail.is_empty()).then(|| detail.clone());
        let frame = FromWorker::Token { id: call_id, token, text: text.to_string(), detail };
        writer.lock().map(|mut w| write_frame(&mut *w, &frame).is_ok()).unwrap_or(false)
    };
    match call {
        Call::Metadata => value(plugin.metadata()),
        Call::SupportsConfig(text) => value(plugin.supports_config(&text)),
        Call::Initialize(settings) => value(plugin.initialize(&settings)),
        Call::LoadModel { dir, options } => value(plugin.load_model(&dir, &options)),
        Call::Infer { model, request } => value(plugin.infer(model, &request, &mut on_token)),
        Call::GenerateText { model, request } => value(plugin.generate_text(model, &request, &mut on_token)),
        Call::ChatCompletion { model, request } => value(plugin.chat_completion(model, &request, &mut on_token)),
        Call::InferBatch { model, request } => value(plugin.infer_batch(model, &request)),
        Call::Score { model, request } => value(plugin.score(model, &request)),
        Call::Stats { model } => value(plugin.stats(model)),
        Call::UpdateConfig(update) => value(plugin.update_config(&update)),
        Call::Cleanup(model) => value(plugin.cleanup(model)),
    }
}

// ---------------------------------------------------------------------------------------
// Host side.

/// Everything needed to start (and restart) one plugin's worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The `inference-pio` executable (re-executed as `__worker`).
    pub exe: PathBuf,
    pub id: String,
    pub plugin: PathBuf,
    pub level: SecurityLevel,
    pub limits: ResourceLimits,
    pub allow_degraded: bool,
    pub sha256: Option<String>,
    pub timeout: Duration,
    /// The model file or directory the plugin may read (none for `plugins info`).
    pub model: Option<PathBuf>,
    /// The ids the worker runs as when the host is root (default
    /// [`inference_pio_core::config::DEFAULT_WORKER_ID`]).
    pub worker_uid: Option<u32>,
    pub worker_gid: Option<u32>,
    /// A directory of this plugin's own that outlives its workers (compiled GPU kernels, the
    /// CUDA JIT cache), its cache directory instead of the throw-away scratch directory;
    /// created for the worker's uid, bound read-write into the jail, counted by the disk
    /// watchdog. `None`: the scratch directory serves as the cache (nothing is reused).
    pub cache_dir: Option<PathBuf>,
    /// Jail in a user namespace (default true); see `user_namespace` in the config.
    pub user_namespace: bool,
}

/// Environment variables a worker inherits (by name, or by prefix when ending in `*`); the
/// host's others (credentials, tokens, whatever its operator exported) are withheld.
pub const WORKER_ENV: &[&str] = &[
    "PATH", "LD_LIBRARY_PATH", "LANG", "LC_ALL", "TZ", "RUST_BACKTRACE", "RUST_LOG", "CUDA_*", "NVIDIA_*", "CUBECL_*", "BURN_*", "INFERENCE_PIO_*", "PIO_*",
];

fn passes_to_worker(name: &str) -> bool {
    WORKER_ENV.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == *p,
    })
}

/// The longest line of plugin output logged as one line (longer ones are split).
const MAX_OUTPUT_LINE: usize = 4096;

/// Reads one of the worker's output pipes and logs each line as `[plugin ID] …` through
/// `tracing`, with control characters escaped (a plugin cannot forge the host's own lines
/// or move the cursor). Ends when every process of the worker has closed the pipe.
fn label_output(id: String, pipe: std::io::PipeReader) {
    use std::io::BufRead;
    let emit = |line: &[u8]| {
        let text = String::from_utf8_lossy(line);
        let clean: String = text.chars().flat_map(|c| if c.is_control() && c != '\t' { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect();
        tracing::info!("[plugin {id}] {clean}");
    };
    let mut reader = std::io::BufReader::with_capacity(MAX_OUTPUT_LINE, pipe);
    let mut line = Vec::new();
    loop {
        let (complete, used) = match reader.fill_buf() {
            Ok([]) => break,
            Ok(buf) => match buf.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    line.extend_from_slice(&buf[..i]);
                    (true, i + 1)
                }
                None => {
                    line.extend_from_slice(buf);
                    (line.len() >= MAX_OUTPUT_LINE, buf.len())
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        reader.consume(used);
        if complete {
            emit(&line);
            line.clear();
        }
    }
    if !line.is_empty() {
        emit(&line);
    }
}

/// Whether `uid`/`gid` may read `path` by its mode bits (and enter it, for a directory).
fn readable_by(meta: &std::fs::Metadata, uid: u32, gid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let need = if meta.is_dir() { 0o5 } else { 0o4 };
    let mode = meta.mode();
    let bits = if meta.uid() == uid {
        mode >> 6
    } else if meta.gid() == gid {
        mode >> 3
    } else {
        mode
    };
    bits & need == need
}

/// A root host's worker runs as another uid: the plugin file and the model (the directory
/// and the files in it) must be readable by it, or the load fails deep in the plugin.
/// Refuses with what to change instead.
fn check_readable(path: &Path, what: &str, uid: u32, gid: u32, id: &str) -> Result<(), String> {
    let Ok(meta) = std::fs::metadata(path) else { return Ok(()) };
    let mut unreadable: Vec<PathBuf> = Vec::new();
    if !readable_by(&meta, uid, gid) {
        unreadable.push(path.to_path_buf());
    }
    if meta.is_dir()
        && let Ok(entries) = std::fs::read_dir(path)
    {
        for entry in entries.filter_map(Result::ok) {
            if let Ok(m) = std::fs::metadata(entry.path())
                && !readable_by(&m, uid, gid)
            {
                unreadable.push(entry.path());
            }
        }
    }
    if unreadable.is_empty() {
        return Ok(());
    }
    unreadable.truncate(4);
    Err(format!(
        "the {what} {} is not readable by the worker's uid {uid} / gid {gid} (the jail runs plugin `{id}` unprivileged): {} — make it readable (e.g. `chmod -R o+rX`) or set `worker_uid`/`worker_gid` in [plugins.{id}] to its owner",
        path.display(),
        unreadable.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    ))
}

/// The mechanisms a worker of this config has in force, and which of them are missing.
#[derive(Clone, Debug, Serialize)]
pub struct Enforcement {
    pub level: SecurityLevel,
    pub mechanisms: Vec<Mechanism>,
    /// Names of required mechanisms not in force (the level runs degraded, by permission).
    pub degraded: Vec<String>,
}

/// Why the last worker ended, filled in by whoever saw it (watchdog, timeout).
type KillReason = Arc<Mutex<Option<String>>>;

/// Where the reader thread hands each frame: the waiting call's channel, by request id.
/// `None` once the connection has ended: a call sent after that (to a worker that died while
/// idle) gets no route, so its wait sees the end at once instead of waiting forever.
type Routes = Arc<Mutex<Option<std::collections::HashMap<u64, std::sync::mpsc::Sender<FromWorker>>>>>;

struct Worker {
    child: Child,
    /// Writes (calls, cancels); the reader thread holds its own clone for reading.
    stream: Arc<Mutex<UnixStream>>,
    routes: Routes,
    /// When the reader last heard anything from the worker (any call's frame).
    last_heard: Arc<Mutex<Instant>>,
    next_id: u64,
    /// Which worker of this plugin this is (counts restarts), so a call that saw its worker
    /// die knows whether the one in place now is another.
    generation: u64,
    kill_reason: KillReason,
    stop_watchdog: Arc<AtomicBool>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    // Dropped after the child is reaped: kills leftovers and removes the groups.
    cgroup: WorkerCgroup,
    scratch: tempfile::TempDir,
    /// The plugin's persistent cache directory, else the scratch directory.
    cache: PathBuf,
    /// The empty directory the worker's new root is mounted on (in its namespace only).
    _root_dir: tempfile::TempDir,
}

/// The settings as this worker sees them: its own cache directory (or scratch directory)
/// replaces the host's (the only places it may write), also in the file allowlist, whose paths are
/// canonical (the jail binds them there, and the worker's working directory is its root).
fn localize(settings: &PluginSettings, scratch: &Path) -> PluginSettings {
    let mut local = settings.clone();
    let scratch = scratch.to_string_lossy().into_owned();
    if let Some(allowed) = &mut local.allowed_paths {
        allowed.retain(|p| Some(p) != settings.cache_dir.as_ref());
        for p in allowed.iter_mut() {
            *p = canonical(Path::new(p.as_str())).to_string_lossy().into_owned();
        }
        allowed.push(scratch.clone());
    }
    local.cache_dir = Some(scratch);
    local
}

impl Worker {
    fn kill(&mut self, reason: Option<String>) {
        if let Some(reason) = reason
            && let Ok(mut slot) = self.kill_reason.lock()
            && slot.is_none()
        {
            *slot = Some(reason);
        }
        kill_group(self.child.id());
    }

    /// Reaps the worker and says how it ended.
    fn death(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                _ => {
                    kill_group(self.child.id());
                    break self.child.wait().ok();
                }
            }
        };
        self.stop_watchdog.store(true, Ordering::SeqCst);
        if let Some(handle) = self.watchdog.take() {
            let _ = handle.join();
        }
        kill_group(self.child.id());
        if let Some(reason) = self.kill_reason.lock().ok().and_then(|r| r.clone()) {
            return reason;
        }
        if self.cgroup.oom_kills() > 0 {
            return "killed by the kernel's OOM killer: the cgroup memory limit (memory_gb) was reached".into();
        }
        match status {
            Some(status) => describe_status(status),
            None => "the worker could not be reaped".into(),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(mut stream) = self.stream.lock() {
            let _ = write_frame(&mut *stream, &ToWorker::Shutdown);
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        kill_group(self.child.id());
        let _ = self.child.wait();
        self.stop_watchdog.store(true, Ordering::SeqCst);
        if let Some(handle) = self.watchdog.take() {
            let _ = handle.join();
        }
    }
}

/// Gives `dir` and everything beneath it (not following links) to `uid`/`gid`.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(dir)?.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// `path` with symlinks resolved, made absolute; as given when it does not exist.
fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().or_else(|_| std::path::absolute(path)).unwrap_or_else(|_| path.to_path_buf())
}

fn kill_group(pid: u32) {
    // SAFETY: kill takes a process-group id and a signal; the group is the worker's own
    // (spawned with process_group(0)), so nothing else is signalled.
    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
}

/// How a worker process ended, in words.
pub fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(signal) = status.signal() {
        let name = match signal {
            libc::SIGABRT => "aborted (SIGABRT)".to_string(),
            libc::SIGSEGV => "killed by SIGSEGV (segmentation fault)".to_string(),
            libc::SIGBUS => "killed by SIGBUS (bus error)".to_string(),
            libc::SIGILL => "killed by SIGILL (illegal instruction)".to_string(),
            libc::SIGFPE => "killed by SIGFPE (arithmetic fault)".to_string(),
            libc::SIGKILL => "killed by SIGKILL".to_string(),
            libc::SIGSYS => "killed by SIGSYS (forbidden system call)".to_string(),
            libc::SIGXCPU => "killed by SIGXCPU (CPU time limit)".to_string(),
            other => format!("killed by signal {other}"),
        };
        return name;
    }
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => format!("ended: {status}"),
    }
}

/// A plugin running in a supervised worker process.
pub struct WorkerPlugin {
    config: WorkerConfig,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    worker: Option<Worker>,
    enforcement: Option<Enforcement>,
    settings: Option<PluginSettings>,
    /// (host handle, dir, options, handle in the current worker).
    models: Vec<(u64, PathBuf, LoadOptions, Option<u64>)>,
    restarts: u32,
    /// Workers started so far (the next one's generation).
    generations: u64,
    /// How the last worker that died ended, for the other calls that were waiting on it.
    last_death: Option<(u64, String)>,
}

/// A call sent to the worker, waiting for its frames.
struct Sent {
    id: u64,
    events: std::sync::mpsc::Receiver<FromWorker>,
    stream: Arc<Mutex<UnixStream>>,
    last_heard: Arc<Mutex<Instant>>,
    pid: u32,
    kill_reason: KillReason,
    generation: u64,
}

/// How a call ended: the worker's reply, or the connection lost (the worker died or was
/// killed), with what the connection said.
enum Waited {
    Reply(Result<serde_json::Value, WireError>),
    Lost(String),
}

fn internal(message: impl Into<String>) -> PluginError {
    PluginError::internal(message)
}

impl WorkerPlugin {
    /// Starts the worker: hash check, sandbox, handshake, library opened. Fails (killing the
    /// worker) when a required mechanism is missing and the config does not allow degrading.
    pub fn start(config: WorkerConfig) -> Result<Self, String> {
        let this = Self { config, state: Mutex::new(State::default()) };
        {
            let mut state = this.state.lock().map_err(|_| "worker state poisoned".to_string())?;
            state.generations = 1;
            let (worker, enforcement) = this.spawn(1)?;
            state.worker = Some(worker);
            state.enforcement = Some(enforcement);
        }
        Ok(this)
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// The mechanisms in force for the current (last) worker.
    pub fn enforcement(&self) -> Option<Enforcement> {
        self.state.lock().ok().and_then(|s| s.enforcement.clone())
    }

    /// How many times the worker was restarted after dying.
    pub fn restarts(&self) -> u32 {
        self.state.lock().map(|s| s.restarts).unwrap_or(0)
    }

    /// The current worker's scratch directory (its only writable place).
    pub fn scratch_dir(&self) -> Option<PathBuf> {
        self.state.lock().ok().and_then(|s| s.worker.as_ref().map(|w| w.scratch.path().to_path_buf()))
    }

    /// How often the current worker's cpu cgroup throttled it (`None` without one).
    pub fn cpu_throttled(&self) -> Option<u64> {
        self.state.lock().ok().and_then(|s| s.worker.as_ref().and_then(|w| w.cgroup.cpu_throttled()))
    }

    /// The current worker's pid.
    pub fn worker_pid(&self) -> Option<u32> {
        self.state.lock().ok().and_then(|s| s.worker.as_ref().map(|w| w.child.id()))
    }

    fn spawn(&self, generation: u64) -> Result<(Worker, Enforcement), String> {
        let c = &self.config;
        if let Some(expected) = &c.sha256 {
            crate::digest::check_sha256(&c.plugin, expected)?;
        } else if c.level == SecurityLevel::Maximum {
            return Err("security level `maximum` needs the plugin's sha256 pinned in the config".into());
        }
        let mut host_mechanisms = Vec::new();
        if let Some(expected) = &c.sha256 {
            host_mechanisms.push(Mechanism::active("pinned sha256", format!("{expected} checked by the host before starting the worker and by the worker on the descriptor it loads the library from")));
        }
        let scratch = tempfile::Builder::new()
            .prefix(&format!("inference-pio-{}-scratch-", c.id))
            .tempdir()
            .map_err(|e| format!("cannot create the worker's scratch directory: {e}"))?;
        let ncpu = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
        let wanted = cgroup::Wanted {
            memory_bytes: c.limits.memory_gb.map(|gb| {
                // At `maximum` the watchdog kills at the limit; the kernel's limit is the backstop.
                let factor = if c.level == SecurityLevel::Maximum { 2.0 } else { 1.0 };
                (gb * factor * 1e9) as u64
            }),
            // At `maximum` a CPU breach kills (watchdog); at `high` the kernel throttles.
            cpu_cores: c.limits.cpu_percent.filter(|_| c.level == SecurityLevel::High).map(|p| p / 100.0 * ncpu),
        };
        let cgroup = WorkerCgroup::create(&wanted);
        host_mechanisms.extend(cgroup.mechanisms.iter().cloned().map(|mut m| {
            // Without a memory cgroup, memory_gb is still enforced by the watchdog.
            if m.name == "cgroup memory.max" {
                m.required = false;
            }
            m
        }));
        let memory_cgroup = cgroup.mechanisms.iter().any(|m| m.name == "cgroup memory.max" && m.active);
        let cache = match &c.cache_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| format!("cannot create the plugin's cache directory {}: {e}", dir.display()))?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| format!("cannot restrict {}: {e}", dir.display()))?;
                canonical(dir)
            }
            None => scratch.path().to_path_buf(),
        };
        let watch = WatchPlan::new(c, ncpu, &[scratch.path().to_path_buf(), cache.clone()], memory_cgroup);
        host_mechanisms.extend(watch.mechanisms.iter().cloned());

        // SAFETY: geteuid has no preconditions.
        let host_root = unsafe { libc::geteuid() } == 0;
        let uid = c.worker_uid.unwrap_or(DEFAULT_WORKER_ID);
        let gid = c.worker_gid.unwrap_or(DEFAULT_WORKER_ID);
        let plugin = canonical(&c.plugin);
        let model = c.model.as_deref().map(canonical);
        if host_root {
            check_readable(&plugin, "plugin file", uid, gid, &c.id)?;
            if let Some(model) = &model {
                check_readable(model, "model", uid, gid, &c.id)?;
            }
            // The scratch directory is the worker's to write.
            std::os::unix::fs::chown(scratch.path(), Some(uid), Some(gid)).map_err(|e| format!("cannot give the scratch directory to uid {uid}: {e}"))?;
            chown_tree(&cache, uid, gid).map_err(|e| format!("cannot give the cache directory {} to uid {uid}: {e}", cache.display()))?;
        }
        let root_dir = tempfile::Builder::new()
            .prefix(&format!("inference-pio-{}-root-", c.id))
            .tempdir()
            .map_err(|e| format!("cannot create the worker's root mount point: {e}"))?;
        let mut read_only = sandbox::system_read_only_paths();
        // The loader's extra directories (cuBLAS from a Python wheel, say).
        if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
            // As named: the jail binds each at its canonical path and recreates the links.
            read_only.extend(std::env::split_paths(&paths).filter(|p| p.is_absolute() && p.exists()));
        }
        read_only.push(plugin.clone());
        if let Some(model) = &model {
            read_only.push(model.clone());
        }
        let sandbox_spec = SandboxSpec {
            level: c.level,
            parent_pid: std::process::id(),
            read_only,
            read_write: if cache == scratch.path() { vec![cache.clone()] } else { vec![scratch.path().to_path_buf(), cache.clone()] },
            devices: sandbox::nvidia_devices(),
            cgroup_procs: cgroup.procs_files(),
            file_size_bytes: c.limits.disk_space_gb.map(|gb| (gb * 1e9) as u64).unwrap_or(DEFAULT_FILE_SIZE),
            open_files: OPEN_FILES,
            jail: Some(sandbox::JailSpec { root_dir: root_dir.path().to_path_buf(), uid, gid, user_namespace: c.user_namespace }),
            seccomp: Some(if c.level == SecurityLevel::Maximum { sandbox::SeccompMode::AllowList } else { sandbox::SeccompMode::DenyList }),
        };
        let passed: Vec<(String, std::ffi::OsString)> = std::env::vars_os()
            .filter_map(|(k, v)| k.into_string().ok().filter(|k| passes_to_worker(k)).map(|k| (k, v)))
            .collect();
        host_mechanisms.push(Mechanism::active(
            "environment",
            format!(
                "the worker gets only {} (of the host's: {}), HOME/TMPDIR = its scratch directory",
                WORKER_ENV.join(", "),
                if passed.is_empty() { "none".to_string() } else { passed.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", ") }
            ),
        ));
        let (host_end, worker_end) = UnixStream::pair().map_err(|e| format!("cannot create the worker socket: {e}"))?;
        let (out_read, out_write) = std::io::pipe().map_err(|e| format!("cannot create the worker's output pipe: {e}"))?;
        let (err_read, err_write) = std::io::pipe().map_err(|e| format!("cannot create the worker's output pipe: {e}"))?;
        use std::os::unix::process::CommandExt;
        let child = Command::new(&c.exe)
            .arg("__worker")
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(worker_end)))
            .stdout(Stdio::from(out_write))
            .stderr(Stdio::from(err_write))
            .env_clear()
            .envs(passed)
            .env("CUDA_CACHE_PATH", cache.join("cuda-cache"))
            .env("TMPDIR", scratch.path())
            .env("HOME", scratch.path())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start the worker process {}: {e}", c.exe.display()))?;
        for pipe in [out_read, err_read] {
            let id = c.id.clone();
            std::thread::spawn(move || label_output(id, pipe));
        }
        host_mechanisms.push(Mechanism::active(
            "plugin output",
            format!("the worker's stdout and stderr are pipes the host reads: each line is logged as `[plugin {}] …` (control characters escaped), never written to the host's own", c.id),
        ));
        let kill_reason: KillReason = Arc::new(Mutex::new(None));
        let stop_watchdog = Arc::new(AtomicBool::new(false));
        let mut hs = host_end;
        let writer = hs.try_clone().map_err(|e| format!("cannot share the worker's socket: {e}"))?;
        let routes: Routes = Arc::new(Mutex::new(Some(Default::default())));
        let last_heard = Arc::new(Mutex::new(Instant::now()));
        let heard = Arc::clone(&last_heard);
        let mut worker = Worker {
            child,
            stream: Arc::new(Mutex::new(writer)),
            routes: Arc::clone(&routes),
            last_heard,
            next_id: 1,
            generation,
            kill_reason: Arc::clone(&kill_reason),
            stop_watchdog: Arc::clone(&stop_watchdog),
            watchdog: None,
            cgroup,
            scratch,
            cache,
            _root_dir: root_dir,
        };
        let handshake_timeout = Duration::from_secs(30);
        let _ = hs.set_read_timeout(Some(handshake_timeout));
        let setup = WorkerSetup { protocol: PROTOCOL_VERSION, plugin, sha256: c.sha256.clone(), sandbox: sandbox_spec };
        write_frame(&mut hs, &ToWorker::Setup(Box::new(setup))).map_err(|e| format!("cannot send the worker its setup: {e}"))?;
        let mechanisms = match read_frame::<FromWorker>(&mut hs) {
            Ok(FromWorker::Hello { protocol, abi_major, mechanisms, .. }) => {
                if protocol != PROTOCOL_VERSION || abi_major != ABI_MAJOR {
                    return Err(format!("worker speaks protocol {protocol} / ABI {abi_major}, the host {PROTOCOL_VERSION} / {ABI_MAJOR}"));
                }
                mechanisms
            }
            Ok(FromWorker::Fatal(message)) => return Err(format!("the worker could not apply its sandbox: {message}")),
            Ok(other) => return Err(format!("unexpected first message from the worker: {other:?}")),
            Err(e) => return Err(format!("the worker did not complete the handshake: {e} ({})", worker.death())),
        };
        let mut all = mechanisms;
        all.extend(host_mechanisms);
        let degraded: Vec<String> = all.iter().filter(|m| m.required && !m.active).map(|m| format!("{} ({})", m.name, m.detail)).collect();
        let enforcement = Enforcement { level: c.level, mechanisms: all, degraded: degraded.clone() };
        if !degraded.is_empty() {
            if !c.allow_degraded {
                return Err(format!(
                    "security level `{}` cannot be enforced for plugin `{}` on this machine: missing {}; refusing (set `allow_degraded = true` in [plugins.{}] to run without them)",
                    c.level.as_str(),
                    c.id,
                    degraded.join("; "),
                    c.id
                ));
            }
            eprintln!(
                "warning: plugin `{}` runs at security level `{}` DEGRADED (allow_degraded = true): missing {}",
                c.id,
                c.level.as_str(),
                degraded.join("; ")
            );
        }
        write_frame(&mut hs, &ToWorker::Open).map_err(|e| format!("cannot ask the worker to open the plugin: {e}"))?;
        match read_frame::<FromWorker>(&mut hs) {
            Ok(FromWorker::Reply { result: Ok(_), .. }) => {}
            Ok(FromWorker::Reply { result: Err(e), .. }) => return Err(e.message),
            Ok(other) => return Err(format!("unexpected answer to open: {other:?}")),
            Err(e) => return Err(format!("the worker died opening the plugin: {} ({e})", worker.death())),
        }
        // From here on a reader thread takes every frame to the call waiting for its id; when
        // the connection ends it drops every waiting call's channel.
        let _ = hs.set_read_timeout(None);
        std::thread::spawn(move || {
            loop {
                let (id, frame) = match read_frame::<FromWorker>(&mut hs) {
                    Ok(frame @ FromWorker::Token { id, .. }) | Ok(frame @ FromWorker::Reply { id, .. }) => (id, frame),
                    Ok(_) | Err(_) => break,
                };
                if let Ok(mut at) = heard.lock() {
                    *at = Instant::now();
                }
                let route = routes.lock().ok().and_then(|r| r.as_ref().and_then(|r| r.get(&id).cloned()));
                if let Some(tx) = route {
                    let _ = tx.send(frame);
                }
            }
            if let Ok(mut r) = routes.lock() {
                *r = None;
            }
        });
        let pid = worker.child.id();
        worker.watchdog = Some(std::thread::spawn(move || watch.run(pid, &kill_reason, &stop_watchdog)));
        Ok((worker, enforcement))
    }

    /// A live worker with the plugin initialised and the models loaded again, after a death.
    fn ensure_worker(&self, state: &mut State) -> Result<(), PluginError> {
        if state.worker.is_some() {
            return Ok(());
        }
        state.generations += 1;
        let (worker, enforcement) = self.spawn(state.generations).map_err(|e| internal(format!("cannot restart the worker of `{}`: {e}", self.config.id)))?;
        state.worker = Some(worker);
        state.enforcement = Some(enforcement);
        state.restarts += 1;
        if let Some(settings) = state.settings.clone() {
            let local = localize(&settings, state.worker.as_ref().map(|w| w.cache.as_path()).unwrap_or(Path::new("/")));
            self.exchange(state, &Call::Initialize(local), &mut |_, _, _| true)?;
        }
        for i in 0..state.models.len() {
            let (_, dir, options, _) = state.models[i].clone();
            let info: ModelInfo = decode(self.exchange(state, &Call::LoadModel { dir, options }, &mut |_, _, _| true)?)?;
            state.models[i].3 = Some(info.handle);
        }
        Ok(())
    }

    /// Sends one call to the current worker and registers where its frames go.
    fn send(&self, state: &mut State, call: &Call) -> Result<Sent, PluginError> {
        let Some(worker) = state.worker.as_mut() else { return Err(internal("no worker")) };
        let id = worker.next_id;
        worker.next_id += 1;
        let (tx, events) = std::sync::mpsc::channel();
        if let Ok(mut routes) = worker.routes.lock()
            && let Some(routes) = routes.as_mut()
        {
            routes.insert(id, tx);
        }
        let sent = Sent {
            id,
            events,
            stream: Arc::clone(&worker.stream),
            last_heard: Arc::clone(&worker.last_heard),
            pid: worker.child.id(),
            kill_reason: Arc::clone(&worker.kill_reason),
            generation: worker.generation,
        };
        // A failed write means the connection is gone: the reader then drops the route (or
        // already has, and none was made) and the wait reports the worker's end.
        if let Ok(mut stream) = sent.stream.lock() {
            let _ = write_frame(&mut *stream, &ToWorker::Call { id, call: Box::new(call.clone()) });
        }
        Ok(sent)
    }

    /// Waits for a sent call's reply, streaming its tokens. When this call and the whole
    /// worker have been silent for `timeout_s`, the worker is killed as hung (the wait then
    /// sees the connection end); a call only queued behind others that are streaming waits on.
    fn wait(&self, sent: &Sent, on_token: &mut TokenCallback<'_>) -> Waited {
        let timeout = self.config.timeout;
        let mut cancelled = false;
        loop {
            match sent.events.recv_timeout(timeout) {
                Ok(FromWorker::Token { token, text, detail, .. }) => {
                    if !cancelled && !on_token(token, &text, &detail.unwrap_or_default()) {
                        cancelled = true;
                        if let Ok(mut stream) = sent.stream.lock() {
                            let _ = write_frame(&mut *stream, &ToWorker::Cancel(sent.id));
                        }
                    }
                }
                Ok(FromWorker::Reply { result, .. }) => return Waited::Reply(result),
                Ok(other) => return Waited::Lost(format!("unexpected message {other:?}")),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let worker_silent = sent.last_heard.lock().map_or(true, |at| at.elapsed() >= timeout);
                    if !worker_silent {
                        continue;
                    }
                    if let Ok(mut slot) = sent.kill_reason.lock()
                        && slot.is_none()
                    {
                        *slot = Some(format!("timed out: no answer for {:.1} s (timeout_s), the worker was killed as hung", timeout.as_secs_f64()));
                    }
                    kill_group(sent.pid);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Waited::Lost(String::new()),
            }
        }
    }

    /// The outcome of a call: its reply, or an error naming how the worker ended (reaped here
    /// by the first call that saw it die; a poisoned worker is replaced too).
    fn settle(&self, state: &mut State, sent: &Sent, waited: Waited) -> Result<serde_json::Value, PluginError> {
        if let Some(worker) = state.worker.as_ref()
            && let Ok(mut routes) = worker.routes.lock()
            && let Some(routes) = routes.as_mut()
        {
            routes.remove(&sent.id);
        }
        let current = state.worker.as_ref().is_some_and(|w| w.generation == sent.generation);
        match waited {
            Waited::Reply(Ok(value)) => Ok(value),
            Waited::Reply(Err(e)) => {
                if e.kind == ErrorKind::Poisoned && current {
                    // A fresh process for the next request: the panicked one's state is suspect.
                    if let Some(mut worker) = state.worker.take() {
                        worker.kill(None);
                        let how = worker.death();
                        state.last_death = Some((sent.generation, how));
                    }
                }
                Err(PluginError::new(e.kind, e.message))
            }
            Waited::Lost(io) => {
                let how = if current {
                    let mut worker = state.worker.take().ok_or_else(|| internal("no worker"))?;
                    let how = worker.death();
                    drop(worker);
                    state.last_death = Some((sent.generation, how.clone()));
                    how
                } else {
                    match &state.last_death {
                        Some((generation, how)) if *generation == sent.generation => how.clone(),
                        _ => "it ended".to_string(),
                    }
                };
                let kind = if how.contains("limit") { ErrorKind::ResourceLimit } else { ErrorKind::Internal };
                // When the host killed it, the broken connection is only the consequence.
                let detail = if io.is_empty() || how.starts_with("killed by the host") { String::new() } else { format!(" (connection: {io})") };
                Err(PluginError::new(
                    kind,
                    format!("the worker of plugin `{}` died: {how}; it is restarted for the next request{detail}", self.config.id),
                ))
            }
        }
    }

    /// Sends one call and waits for its reply with the state held (the calls that change
    /// what the worker holds: initialize, load, cleanup, ...).
    fn exchange(&self, state: &mut State, call: &Call, on_token: &mut TokenCallback<'_>) -> Result<serde_json::Value, PluginError> {
        let sent = self.send(state, call)?;
        let waited = self.wait(&sent, on_token);
        self.settle(state, &sent, waited)
    }

    /// A call on a loaded model that may run beside others (infer, batch, score, stats): the
    /// state is held only to send it and to settle its outcome, not while it runs.
    fn concurrent(&self, model: u64, make: impl FnOnce(u64) -> Call, on_token: &mut TokenCallback<'_>) -> Result<serde_json::Value, PluginError> {
        let sent = {
            let mut state = self.state.lock().map_err(|_| internal("worker state poisoned"))?;
            self.ensure_worker(&mut state)?;
            let handle = Self::model_handle(&state, model)?;
            self.send(&mut state, &make(handle))?
        };
        let waited = self.wait(&sent, on_token);
        let mut state = self.state.lock().map_err(|_| internal("worker state poisoned"))?;
        self.settle(&mut state, &sent, waited)
    }

    fn call(&self, call: Call, on_token: &mut TokenCallback<'_>) -> Result<serde_json::Value, PluginError> {
        let mut state = self.state.lock().map_err(|_| internal("worker state poisoned"))?;
        self.ensure_worker(&mut state)?;
        self.exchange(&mut state, &call, on_token)
    }

    fn model_handle(state: &State, host: u64) -> Result<u64, PluginError> {
        state
            .models
            .iter()
            .find(|m| m.0 == host)
            .and_then(|m| m.3)
            .ok_or_else(|| PluginError::new(ErrorKind::UnknownModel, format!("model handle {host} is not loaded")))
    }

    pub fn metadata(&self) -> Result<PluginMetadata, PluginError> {
        decode(self.call(Call::Metadata, &mut |_, _, _| true)?)
    }

    pub fn supports_config(&self, config_json: &str) -> Result<Support, PluginError> {
        decode(self.call(Call::SupportsConfig(config_json.to_string()), &mut |_, _, _| true)?)
    }

    pub fn initialize(&self, settings: &PluginSettings) -> Result<(), PluginError> {
        let mut state = self.state.lock().map_err(|_| internal("worker state poisoned"))?;
        self.ensure_worker(&mut state)?;
        let local = localize(settings, state.worker.as_ref().map(|w| w.cache.as_path()).unwrap_or(Path::new("/")));
        self.exchange(&mut state, &Call::Initialize(local), &mut |_, _, _| true)?;
        state.settings = Some(settings.clone());
        Ok(())
    }

    pub fn load_model(&self, dir: &Path, options: &LoadOptions) -> Result<ModelInfo, PluginError> {
        let mut state = self.state.lock().map_err(|_| internal("worker state poisoned"))?;
        self.ensure_worker(&mut state)?;
        // The worker sees the model at its canonical path (that is where the jail binds it).
        let dir = canonical(dir);
        let call = Call::LoadModel { dir: dir.clone(), options: options.clone() };
        let info: ModelInfo = decode(self.exchange(&mut state, &call, &mut |_, _, _| true)?)?;
        state.models.push((info.handle, dir, options.clone(), Some(info.handle)));
        Ok(info)
    }

    /// A cancelled request's answer is what the consumer took: the worker sees the cancel a
    /// token or more later (it travels as a frame), so the tokens it made meanwhile are cut,
    /// as the engine cuts them in process.
    pub fn infer(&self, model: u64, request: &InferRequest, on_token: &mut TokenCallback<'_>) -> Result<InferResponse, PluginError> {
        let (mut taken, mut text, mut stopped) = (0usize, String::new(), false);
        let mut counting = |id: u32, t: &str, detail: &TokenDetail| {
            if stopped {
                return false;
            }
            taken += 1;
            text.push_str(t);
            stopped = !on_token(id, t, detail);
            !stopped
        };
        let mut response: InferResponse = decode(self.concurrent(model, |handle| Call::Infer { model: handle, request: request.clone() }, &mut counting)?)?;
        if stopped && response.token_ids.len() > taken {
            response.token_ids.truncate(taken);
            response.logprobs.truncate(taken);
            response.text = text;
            response.finish_reason = inference_pio_core::types::FinishReason::Cancelled;
            response.timings.generated_tokens = taken as u64;
        }
        Ok(response)
    }

    pub fn infer_batch(&self, model: u64, request: &BatchInferRequest) -> Result<BatchInferResponse, PluginError> {
        decode(self.concurrent(model, |handle| Call::InferBatch { model: handle, request: request.clone() }, &mut |_, _, _| true)?)
    }

    /// The ABI's `generate_text` (a plain prompt), streamed.
    pub fn generate_text(&self, model: u64, request: &GenerateTextRequest, on_token: &mut TokenCallback<'_>) -> Result<InferResponse, PluginError> {
        decode(self.concurrent(model, |handle| Call::GenerateText { model: handle, request: request.clone() }, on_token)?)
    }

    /// The ABI's `chat_completion` (messages through the chat template), streamed.
    pub fn chat_completion(&self, model: u64, request: &ChatRequest, on_token: &mut TokenCallback<'_>) -> Result<InferResponse, PluginError> {
        decode(self.concurrent(model, |handle| Call::ChatCompletion { model: handle, request: request.clone() }, on_token)?)
    }

    pub fn stats(&self, model: u64) -> Result<SchedulerStats, PluginError> {
        decode(self.concurrent(model, |handle| Call::Stats { model: handle }, &mut |_, _, _| true)?)
    }

    pub fn score(&self, model: u64, request: &ScoreRequest) -> Result<ScoreResponse, PluginError> {
        decode(self.concurrent(model, |handle| Call::Score { model: handle, request: request.clone() }, &mut |_, _, _| true)?)
    }

    pub fn update_config(&self, update: &ConfigUpdate) -> Result<UpdateOutcome, PluginError> {
        decode(self.call(Call::UpdateConfig(update.clone()), &mut |_, _, _| true)?)
    }

    pub fn cleanup(&self, model: u64) -> Result<(), PluginError> {
        let mut state = self.state.lock().map_err(|_| internal("worker state poisoned"))?;
        let Some(position) = state.models.iter().position(|m| m.0 == model) else {
            return Err(PluginError::new(ErrorKind::UnknownModel, format!("model handle {model} is not loaded")));
        };
        let (_, _, _, current) = state.models.remove(position);
        match (current, state.worker.is_some()) {
            (Some(handle), true) => self.exchange(&mut state, &Call::Cleanup(handle), &mut |_, _, _| true).map(|_| ()),
            // No worker: nothing is loaded anywhere.
            _ => Ok(()),
        }
    }
}

fn decode<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, PluginError> {
    serde_json::from_value(value).map_err(|e| internal(format!("the worker answered malformed JSON: {e}")))
}

// ---------------------------------------------------------------------------------------
// Watchdog.

/// What the watchdog checks for one worker.
struct WatchPlan {
    memory_bytes: Option<u64>,
    /// At `maximum` only: kill above this share of the machine.
    cpu_cores: Option<f64>,
    cpu_percent: f64,
    disk_bytes: Option<u64>,
    /// The directories the disk limit counts (scratch and cache).
    writable: Vec<PathBuf>,
    gpu_bytes: Option<u64>,
    nvml: Option<nvml_wrapper::Nvml>,
    mechanisms: Vec<Mechanism>,
}

/// CPU use is averaged over this window before a breach kills.
const CPU_WINDOW: Duration = Duration::from_secs(2);

impl WatchPlan {
    /// At `high` a memory cgroup enforces `memory_gb` (the kernel OOM-kills); the watchdog
    /// does where there is none, and always at `maximum` (kill at the limit, the cgroup at
    /// twice the limit as a backstop).
    fn new(c: &WorkerConfig, ncpu: f64, writable: &[PathBuf], memory_cgroup: bool) -> Self {
        // The scratch directory doubles as the cache when the plugin has none: count it once.
        let mut writable = writable.to_vec();
        writable.dedup();
        let mut mechanisms = Vec::new();
        let watch_memory = c.level == SecurityLevel::Maximum || !memory_cgroup;
        let memory_bytes = c.limits.memory_gb.filter(|_| watch_memory).map(|gb| (gb * 1e9) as u64);
        if let Some(gb) = c.limits.memory_gb.filter(|_| watch_memory) {
            mechanisms.push(Mechanism::active("memory watchdog", format!("the host kills the worker when its resident memory (with its children) exceeds {gb} GB, read from /proc every 10 ms")));
        }
        let cpu_cores = c.limits.cpu_percent.filter(|_| c.level == SecurityLevel::Maximum).map(|p| p / 100.0 * ncpu);
        if let Some(p) = c.limits.cpu_percent {
            if c.level == SecurityLevel::Maximum {
                mechanisms.push(Mechanism::active("cpu watchdog", format!("the host kills the worker when it uses more than {p} % of the machine's {ncpu} cores over {} s", CPU_WINDOW.as_secs())));
            }
            mechanisms.push(Mechanism { name: "cpu thread cap".into(), active: true, detail: format!("the plugin is told to compute with at most {p} % of the cores (cooperative)"), required: false });
        }
        let disk_bytes = c.limits.disk_space_gb.map(|gb| (gb * 1e9) as u64);
        if let Some(gb) = c.limits.disk_space_gb {
            mechanisms.push(Mechanism::active("disk watchdog", format!("the host kills the worker when its scratch and cache directories hold more than {gb} GB; RLIMIT_FSIZE caps each file; nothing else is writable")));
        }
        let gpu_bytes = c.limits.gpu_memory_gb.map(|gb| (gb * 1e9) as u64);
        let mut nvml = None;
        if let Some(gb) = c.limits.gpu_memory_gb {
            match nvml_wrapper::Nvml::init() {
                Ok(n) => {
                    nvml = Some(n);
                    mechanisms.push(Mechanism::active("gpu memory watchdog", format!("the host kills the worker when NVML reports more than {gb} GB of GPU memory used by it")));
                }
                Err(e) => mechanisms.push(Mechanism::missing("gpu memory watchdog", format!("NVML is not available ({e}): GPU memory of the worker cannot be watched"))),
            }
        }
        Self { memory_bytes, cpu_cores, cpu_percent: c.limits.cpu_percent.unwrap_or(0.0), disk_bytes, writable, gpu_bytes, nvml, mechanisms }
    }

    fn run(self, pid: u32, reason: &KillReason, stop: &AtomicBool) {
        let ticks = {
            // SAFETY: sysconf takes a constant and has no preconditions.
            let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
            if t > 0 { t as f64 } else { 100.0 }
        };
        let mut cpu_samples: std::collections::VecDeque<(Instant, f64)> = Default::default();
        let mut tick = 0u64;
        let kill = |why: String| {
            if let Ok(mut slot) = reason.lock()
                && slot.is_none()
            {
                *slot = Some(why);
            }
            kill_group(pid);
        };
        while !stop.load(Ordering::SeqCst) {
            tick += 1;
            // The worker's processes, read once per tick for both watchdogs.
            let pids = if self.memory_bytes.is_some() || self.cpu_cores.is_some() { tree(pid) } else { Vec::new() };
            if let Some(limit) = self.memory_bytes {
                let rss = tree_rss_bytes(&pids);
                if rss > limit {
                    kill(format!("killed by the host: memory limit {:.3} GB exceeded (resident {:.3} GB)", limit as f64 / 1e9, rss as f64 / 1e9));
                    break;
                }
            }
            if let Some(cores) = self.cpu_cores
                && let Some(cpu) = cpu_seconds(&pids, ticks)
            {
                let now = Instant::now();
                cpu_samples.push_back((now, cpu));
                while cpu_samples.len() > 2 && now.duration_since(cpu_samples[1].0) >= CPU_WINDOW {
                    cpu_samples.pop_front();
                }
                if let Some(&(t0, c0)) = cpu_samples.front() {
                    let span = now.duration_since(t0).as_secs_f64();
                    if span >= CPU_WINDOW.as_secs_f64() && (cpu - c0) / span > cores * 1.05 {
                        kill(format!(
                            "killed by the host: CPU limit exceeded ({:.0} % of the machine over {:.1} s, limit cpu_percent = {})",
                            (cpu - c0) / span / cores * self.cpu_percent,
                            span,
                            self.cpu_percent
                        ));
                        break;
                    }
                }
            }
            if tick.is_multiple_of(20) {
                if let Some(limit) = self.disk_bytes {
                    let used: u64 = self.writable.iter().map(|d| dir_bytes(d)).sum();
                    if used > limit {
                        kill(format!("killed by the host: disk limit {:.3} GB exceeded (scratch and cache hold {:.3} GB)", limit as f64 / 1e9, used as f64 / 1e9));
                        break;
                    }
                }
                if let (Some(limit), Some(nvml)) = (self.gpu_bytes, &self.nvml) {
                    let used = gpu_bytes(nvml, pid);
                    if used > limit {
                        kill(format!("killed by the host: GPU memory limit {:.3} GB exceeded (NVML: {:.3} GB)", limit as f64 / 1e9, used as f64 / 1e9));
                        break;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for task in tasks.filter_map(Result::ok) {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

/// `pid` and its descendants (the worker's relay, its jail's reaper, the worker and what it
/// started), at most 4096.
fn tree(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if out.len() >= 4096 {
            break;
        }
        out.push(p);
        stack.extend(children(p));
    }
    out
}

/// Resident memory of these processes (a [`tree`], or any pids).
pub(crate) fn tree_rss_bytes(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/statm")).ok())
        .filter_map(|text| text.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .sum()
}

/// utime + stime of these processes (a [`tree`]: all threads) and their reaped children, in
/// seconds (`ticks`: `sysconf(_SC_CLK_TCK)`); `None` when the first, the worker's own, is gone.
pub(crate) fn cpu_seconds(pids: &[u32], ticks: f64) -> Option<f64> {
    let one = |p: &u32| -> Option<f64> {
        let text = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let after = &text[text.rfind(')')? + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        // Fields 14..17 of stat(5), counted after the command name: utime, stime, cutime, cstime.
        Some(fields.get(11..15)?.iter().filter_map(|f| f.parse::<f64>().ok()).sum())
    };
    let mut each = pids.iter().map(one);
    let first = each.next()??;
    Some((first + each.flatten().sum::<f64>()) / ticks)
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.filter_map(Result::ok) {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                // Files' lengths, as RLIMIT_FSIZE counts them (a file cut at that limit is not
                // over the disk limit because its last block is partly empty).
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// GPU memory NVML reports in use by process `pid` and its descendants, summed over devices
/// (0 when none).
pub fn gpu_bytes(nvml: &nvml_wrapper::Nvml, pid: u32) -> u64 {
    let mut total = 0;
    let pids = tree(pid);
    let count = nvml.device_count().unwrap_or(0);
    for index in 0..count {
        let Ok(device) = nvml.device_by_index(index) else { continue };
        for process in device.running_compute_processes().unwrap_or_default() {
            if pids.contains(&process.pid)
                && let nvml_wrapper::enums::device::UsedGpuMemory::Used(bytes) = process.used_gpu_memory
            {
                total += bytes;
            }
        }
    }
    total
}
