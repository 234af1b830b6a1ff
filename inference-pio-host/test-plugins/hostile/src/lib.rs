//! Test plugin for the attack suite of security levels `high` and `maximum`. A request's
//! prompt text names one attack; the response text says how the attempt ended (`ok…` or
//! `err:ERRNO`), so the tests can assert the specific denial:
//!
//! `read:PATH`, `write:PATH:BYTES`, `connect:ADDR`, `fork` (fork until refused),
//! `alloc:MB` (touch memory, 8 MiB at a time), `spin:SECONDS`, `panic`, `abort`, `segv`,
//! `hang`, `ptrace`, `stream:N` (N tokens, for the overhead benchmark), `echo`; and against
//! the jail: `kill:PID` (SIGKILL; `-1` for every process it may signal), `kill-parent`,
//! `proc-pids` (the pids /proc lists), `unix-connect:PATH`, `abstract-connect:NAME`,
//! `exec:PATH` (runs `PATH -c id`), `print:TEXT` (to stdout and stderr), `setuid:UID`,
//! `init-module`, `finit-module`, `ids` (uid, gid and effective capabilities).
//!
//! Its library constructor writes a marker file into `$PIO_TEST_MARKER_DIR` when that is set,
//! so a test can tell whether any of its code ran. Loading a model directory that holds a file
//! `load-delay-ms` takes that many milliseconds (a slow load, for the server's readiness).

use inference_pio_core::abi::{ABI_MAJOR, ABI_MINOR, PluginError};
use inference_pio_core::export::{Plugin, TokenCallback};
use inference_pio_core::types::*;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

extern "C" fn constructor() {
    if let Some(dir) = std::env::var_os("PIO_TEST_MARKER_DIR") {
        let _ = std::fs::write(Path::new(&dir).join(format!("constructor-ran-{}", std::process::id())), b"ran");
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static CONSTRUCTOR: extern "C" fn() = constructor;

fn errno_name(e: &std::io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EACCES) => "EACCES",
        Some(libc::EPERM) => "EPERM",
        Some(libc::ENETUNREACH) => "ENETUNREACH",
        Some(libc::EAGAIN) => "EAGAIN",
        Some(libc::EFBIG) => "EFBIG",
        Some(libc::ENOENT) => "ENOENT",
        Some(libc::ECONNREFUSED) => "ECONNREFUSED",
        Some(libc::EROFS) => "EROFS",
        Some(libc::EAFNOSUPPORT) => "EAFNOSUPPORT",
        Some(libc::ESRCH) => "ESRCH",
        Some(libc::ENOSYS) => "ENOSYS",
        Some(libc::EBADF) => "EBADF",
        Some(libc::EINVAL) => "EINVAL",
        Some(n) => return format!("err:errno {n}"),
        None => return format!("err:{e}"),
    };
    format!("err:{name}")
}

fn attack(command: &str, on_token: &mut TokenCallback<'_>) -> String {
    let (verb, arg) = command.split_once(':').unwrap_or((command, ""));
    match verb {
        "echo" => "ok".into(),
        "read" => match std::fs::read(arg) {
            Ok(bytes) => format!("ok:{} bytes", bytes.len()),
            Err(e) => errno_name(&e),
        },
        "write" => {
            let (path, bytes) = arg.rsplit_once(':').unwrap_or((arg, "1"));
            let bytes: usize = bytes.parse().unwrap_or(1);
            let result = std::fs::File::create(path).and_then(|mut f| f.write_all(&vec![7u8; bytes]));
            match result {
                Ok(()) => format!("ok:{bytes} bytes"),
                Err(e) => errno_name(&e),
            }
        }
        // What the CUDA driver does at cuInit: name another thread, which writes
        // /proc/self/task/TID/comm.
        "name-thread" => {
            use std::os::unix::thread::JoinHandleExt;
            let (done, wait) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                let _ = wait.recv();
            });
            // SAFETY: the thread is alive until `done` is dropped below; the name is a
            // NUL-terminated string of at most 15 bytes, as pthread_setname_np requires.
            let rc = unsafe { libc::pthread_setname_np(thread.as_pthread_t(), c"pio-named".as_ptr()) };
            drop(done);
            let _ = thread.join();
            if rc == 0 { "ok".into() } else { errno_name(&std::io::Error::from_raw_os_error(rc)) }
        }
        "connect" => match arg.parse::<std::net::SocketAddr>() {
            Ok(addr) => match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(_) => "ok:connected".into(),
                Err(e) => errno_name(&e),
            },
            Err(e) => format!("bad address: {e}"),
        },
        "fork" => fork_until_refused(),
        "alloc" => {
            let mb: usize = arg.parse().unwrap_or(1024);
            let mut chunks: Vec<Vec<u8>> = Vec::new();
            while chunks.len() * 8 < mb {
                chunks.push(vec![1u8; 8 << 20]);
                std::thread::sleep(Duration::from_millis(5));
            }
            format!("ok:{} MiB resident", chunks.len() * 8)
        }
        "spin" => {
            let seconds: f64 = arg.parse().unwrap_or(1.0);
            let start = Instant::now();
            let mut x = 0u64;
            while start.elapsed().as_secs_f64() < seconds {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            let mut usage = zeroed_rusage();
            // SAFETY: `usage` is a valid, writable rusage.
            unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
            let cpu = usage.ru_utime.tv_sec as f64 + usage.ru_utime.tv_usec as f64 / 1e6 + usage.ru_stime.tv_sec as f64 + usage.ru_stime.tv_usec as f64 / 1e6;
            format!("ok:cpu={cpu:.3} wall={:.3} ({})", start.elapsed().as_secs_f64(), x % 2)
        }
        "panic" => panic!("hostile plugin panics on request"),
        "abort" => std::process::abort(),
        "segv" => {
            // SAFETY: restoring the default disposition (Rust's runtime installs a handler for
            // stack overflows) and raising a signal pass no memory; the default action kills us.
            unsafe {
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                libc::raise(libc::SIGSEGV);
            }
            "err:still alive after SIGSEGV".into()
        }
        "hang" => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        "ptrace" => {
            // SAFETY: PTRACE_TRACEME takes no pointers.
            let r = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            if r == 0 { "ok:traced".into() } else { errno_name(&std::io::Error::last_os_error()) }
        }
        "stream" => {
            let n: u32 = arg.parse().unwrap_or(16);
            for i in 0..n {
                if !on_token(i, "tok ", &Default::default()) {
                    return format!("cancelled after {i}");
                }
            }
            format!("ok:{n} tokens")
        }
        "detail" => {
            // Three tokens, each carrying reasoning and a log-probability (ABI 1.4 detail).
            for i in 0..3u32 {
                let detail = inference_pio_core::types::TokenDetail {
                    reasoning: format!("r{i}"),
                    logprobs: Some(inference_pio_core::types::TokenLogprobs {
                        token: inference_pio_core::types::TokenLogprob { id: i, text: format!("t{i}"), logprob: -(i as f32) },
                        top: Vec::new(),
                    }),
                    ..Default::default()
                };
                if !on_token(i, "tok ", &detail) {
                    return format!("cancelled after {i}");
                }
            }
            "ok:3 tokens".into()
        }
        "kill" => match arg.parse::<i32>() {
            Ok(pid) => errno_of(
                // SAFETY: kill takes integers.
                unsafe { libc::kill(pid, libc::SIGKILL) },
            ),
            Err(e) => format!("bad pid: {e}"),
        },
        "kill-parent" => errno_of(
            // SAFETY: getppid and kill take integers.
            unsafe { libc::kill(libc::getppid(), libc::SIGKILL) },
        ),
        "proc-pids" => match std::fs::read_dir("/proc") {
            Ok(entries) => {
                let mut pids: Vec<u32> = entries.filter_map(Result::ok).filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok())).collect();
                pids.sort_unstable();
                format!("ok:{}", pids.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
            }
            Err(e) => errno_name(&e),
        },
        "unix-connect" => match std::os::unix::net::UnixStream::connect(arg) {
            Ok(mut stream) => {
                let mut got = String::new();
                let _ = std::io::Read::read_to_string(&mut stream, &mut got);
                format!("ok:connected, read `{got}`")
            }
            Err(e) => errno_name(&e),
        },
        "abstract-connect" => {
            use std::os::linux::net::SocketAddrExt;
            match std::os::unix::net::SocketAddr::from_abstract_name(arg.as_bytes()).and_then(|a| std::os::unix::net::UnixStream::connect_addr(&a)) {
                Ok(_) => "ok:connected".into(),
                Err(e) => errno_name(&e),
            }
        }
        "exec" => match std::process::Command::new(arg).args(["-c", "id"]).output() {
            Ok(out) => format!("ok:ran: {}", String::from_utf8_lossy(&out.stdout).trim()),
            Err(e) => errno_name(&e),
        },
        "print" => {
            println!("{arg}");
            eprintln!("{arg}");
            let _ = std::io::stdout().flush();
            "ok".into()
        }
        "setuid" => errno_of(
            // SAFETY: setuid takes an integer.
            unsafe { libc::setuid(arg.parse().unwrap_or(0)) },
        ),
        "init-module" => errno_of(
            // SAFETY: init_module with an empty image: the kernel reads nothing past length 0.
            unsafe { libc::syscall(libc::SYS_init_module, std::ptr::null::<u8>(), 0usize, c"".as_ptr()) } as i32,
        ),
        "finit-module" => errno_of(
            // SAFETY: finit_module on descriptor 0 (our socket, not a module) with no params.
            unsafe { libc::syscall(libc::SYS_finit_module, 0, c"".as_ptr(), 0) } as i32,
        ),
        "ids" => {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let field = |n: &str| status.lines().find_map(|l| l.strip_prefix(n)).map(|v| v.split_whitespace().next().unwrap_or("").to_string()).unwrap_or_default();
            // SAFETY: getuid/getgid have no preconditions.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            format!("ok:uid={uid} gid={gid} CapEff={} CapBnd={}", field("CapEff:"), field("CapBnd:"))
        }
        other => format!("unknown attack `{other}`"),
    }
}

/// `ok` for a call that returned 0, else the errno's name.
fn errno_of(rc: i32) -> String {
    if rc == 0 { "ok".into() } else { errno_name(&std::io::Error::last_os_error()) }
}

fn zeroed_rusage() -> libc::rusage {
    // SAFETY: rusage is plain integers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Forks children that wait, until the kernel refuses; then reaps them.
fn fork_until_refused() -> String {
    let mut children = Vec::new();
    let outcome = loop {
        if children.len() >= 4096 {
            break "ok:4096 forks, never refused".to_string();
        }
        // SAFETY: the child only calls async-signal-safe functions (pause, _exit).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            loop {
                // SAFETY: pause is async-signal-safe.
                unsafe { libc::pause() };
            }
        }
        if pid < 0 {
            break format!("{} after {} forks", errno_name(&std::io::Error::last_os_error()), children.len());
        }
        children.push(pid);
    };
    for pid in children {
        // SAFETY: our own child processes.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    outcome
}

pub struct Hostile;

impl Plugin for Hostile {
    fn metadata(&self) -> PluginMetadata {
        PluginMetadata {
            id: "test-hostile".into(),
            version: "0.0.1".into(),
            description: "hostile test plugin: every request is an attack".into(),
            architectures: vec!["PioTestHostileForCausalLM".into()],
            primary_model: PrimaryModel { name: "none".into(), parameter_count: 0, memory_bytes: 0 },
            modalities: vec!["text".into()],
            capabilities: vec!["streaming".into()],
            optimizations: vec![],
            backends: vec!["cpu".into()],
            build: BuildInfo { rustc: "n/a".into(), burn: "n/a".into(), abi_major: ABI_MAJOR, abi_minor: ABI_MINOR },
        }
    }
    fn supports_config(&self, _config: &serde_json::Value) -> Support {
        Support { supported: true, reason: String::new() }
    }
    fn initialize(&self, _settings: PluginSettings) -> Result<(), PluginError> {
        Ok(())
    }
    fn load_model(&self, dir: &Path, _options: LoadOptions) -> Result<ModelInfo, PluginError> {
        if let Ok(text) = std::fs::read_to_string(dir.join("load-delay-ms")) {
            let ms = text.trim().parse::<u64>().map_err(|e| PluginError::invalid(format!("load-delay-ms: {e}")))?;
            std::thread::sleep(Duration::from_millis(ms));
        }
        Ok(ModelInfo {
            handle: 7,
            cpu_threads: None,
            architecture: "PioTestHostileForCausalLM".into(),
            parameter_count: 0,
            weight_bytes: 0,
            dtype: DType::F32,
            device: "cpu".into(),
            max_context: 1 << 20,
            vocab_size: 16,
            has_chat_template: false,
            generation_defaults: SamplingOverrides::default(),
            load_seconds: 0.0,
            kv_cache_blocks: 0,
            kv_block_tokens: 0,
            kv_cache_bytes: 0,
            kv_cache_sized_by: String::new(),
            kv_cache_dtype: String::new(),
            quantization: String::new(),
        })
    }
    fn infer(&self, _m: u64, request: InferRequest, on_token: &mut TokenCallback<'_>) -> Result<InferResponse, PluginError> {
        let PromptInput::Text(command) = &request.input else {
            return Err(PluginError::invalid("the hostile plugin takes a text prompt naming the attack"));
        };
        let text = attack(command, on_token);
        Ok(InferResponse {
            prompt_token_ids: vec![],
            token_ids: vec![],
            text,
            reasoning: String::new(),
            tool_calls: Vec::new(),
            finish_reason: FinishReason::Length,
            timings: Timings::default(),
            logprobs: Vec::new(),
        })
    }
    fn score(&self, _m: u64, _r: ScoreRequest) -> Result<ScoreResponse, PluginError> {
        Err(PluginError::invalid("test plugin"))
    }
    fn update_config(&self, _u: ConfigUpdate) -> Result<UpdateOutcome, PluginError> {
        Ok(UpdateOutcome::default())
    }
    fn cleanup(&self, _m: u64) -> Result<(), PluginError> {
        Ok(())
    }
}

inference_pio_core::export_plugin!(id = "test-hostile", Hostile, || Hostile);
