//! The attack suite of security levels `high` and `maximum`: the hostile test plugin
//! (`test-plugins/hostile`, built by `cargo build --workspace`) runs in a real worker process
//! and every attack must end in its specific denial (errno, kill reason). Mechanisms the
//! kernel lacks must be reported missing and refuse the level; the containment assertions
//! then cover the mechanisms reported in force.

use inference_pio_core::ErrorKind;
use inference_pio_core::config::{ResourceLimits, SecurityLevel};
use inference_pio_core::types::{InferRequest, LoadOptions, PluginSettings, PromptInput};
use inference_pio_host::digest::sha256_file;
use inference_pio_host::worker::{WorkerConfig, WorkerPlugin};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_inference-pio");

fn hostile() -> PathBuf {
    let path = Path::new(BIN).parent().expect("dir").join(format!("libpio_test_plugin_hostile{}", std::env::consts::DLL_SUFFIX));
    assert!(path.is_file(), "{} is missing: run `cargo build --workspace` before the tests", path.display());
    path
}

fn config(level: SecurityLevel, limits: ResourceLimits, model: &Path) -> WorkerConfig {
    // A root host's worker runs as `nobody`: the model must be readable by it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(model, std::fs::Permissions::from_mode(0o755)).expect("chmod model");
    WorkerConfig {
        exe: PathBuf::from(BIN),
        id: "test-hostile".into(),
        plugin: hostile(),
        level,
        limits,
        allow_degraded: false,
        sha256: (level == SecurityLevel::Maximum).then(|| sha256_file(&hostile()).expect("hash")),
        timeout: Duration::from_secs(20),
        model: Some(model.to_path_buf()),
        worker_uid: None,
        worker_gid: None,
        cache_dir: None,
        user_namespace: true,
    }
}

/// Starts the worker strictly; where the machine lacks a required mechanism, asserts the
/// refusal names it and starts again with `allow_degraded`.
fn start(config: WorkerConfig) -> (WorkerPlugin, u64) {
    let worker = match WorkerPlugin::start(config.clone()) {
        Ok(w) => w,
        Err(refusal) => {
            assert!(refusal.contains("cannot be enforced") && refusal.contains("missing"), "{refusal}");
            eprintln!("level refused on this machine, as it must be: {refusal}");
            WorkerPlugin::start(WorkerConfig { allow_degraded: true, ..config }).expect("degraded start")
        }
    };
    for m in worker.enforcement().expect("enforcement").mechanisms {
        eprintln!("[{}] {}: {}", if m.active { "on" } else { "MISSING" }, m.name, m.detail);
    }
    worker.initialize(&PluginSettings::default()).expect("initialize");
    let model = worker.load_model(Path::new("/nonexistent-model"), &LoadOptions::default()).expect("load");
    (worker, model.handle)
}

/// Whether this test process runs as root (effective uid 0), as the host's own check sees it.
fn host_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").unwrap_or_default().lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

fn active(worker: &WorkerPlugin, name: &str) -> bool {
    let enforcement = worker.enforcement().expect("enforcement");
    let m = enforcement.mechanisms.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("mechanism {name} not reported: {enforcement:?}"));
    if !m.active {
        assert!(enforcement.degraded.iter().any(|d| d.starts_with(name)), "missing {name} must be reported as degrading: {enforcement:?}");
    }
    m.active
}

fn attack(worker: &WorkerPlugin, model: u64, command: &str) -> Result<String, inference_pio_core::PluginError> {
    let request = InferRequest { input: PromptInput::Text(command.into()), sampling: Default::default(), stop: vec![], cache_salt: String::new(), logprobs: None, constraint: None, images: Vec::new() };
    worker.infer(model, &request, &mut |_, _, _| true).map(|r| r.text)
}

fn ok(worker: &WorkerPlugin, model: u64, command: &str) -> String {
    attack(worker, model, command).unwrap_or_else(|e| panic!("{command}: {e}"))
}

#[test]
fn high_contains_file_network_process_and_disk_attacks() {
    let dirs = tempfile::tempdir().expect("tempdir");
    let model = dirs.path().join("model");
    std::fs::create_dir(&model).expect("model dir");
    std::fs::write(model.join("config.json"), "{}").expect("model file");
    let secret = dirs.path().join("secret.txt");
    std::fs::write(&secret, "do not read").expect("secret");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let limits = ResourceLimits { disk_space_gb: Some(0.001), ..Default::default() };
    let (worker, m) = start(config(SecurityLevel::High, limits, &model));
    let scratch = worker.scratch_dir().expect("scratch");

    assert!(active(&worker, "die with the host"));
    assert!(active(&worker, "rlimits"));
    let jailed = active(&worker, "mount namespace");
    if jailed || active(&worker, "landlock") {
        // Outside the view (the jail: not there at all; landlock alone: not allowed).
        let denied = if jailed { "err:ENOENT" } else { "err:EACCES" };
        assert_eq!(ok(&worker, m, &format!("read:{}", secret.display())), denied);
        assert_eq!(ok(&worker, m, "read:/etc/hostname"), denied);
        assert_eq!(ok(&worker, m, &format!("read:{}", model.join("config.json").display())), "ok:2 bytes");
        // (In the jail the directory exists, on the read-only root, as the model's parent.)
        assert_eq!(ok(&worker, m, &format!("write:{}:10", dirs.path().join("planted").display())), if jailed { "err:EROFS" } else { denied });
        assert!(!dirs.path().join("planted").exists());
        // The model is read-only (a read-only bind in the jail).
        let planted = ok(&worker, m, &format!("write:{}:10", model.join("planted").display()));
        assert!(planted == "err:EROFS" || planted == "err:EACCES", "{planted}");
        assert!(!model.join("planted").exists());
        // Its own threads' names can be written (the CUDA driver needs it), another
        // process's files in /proc cannot (an invalid value: EINVAL if it ever got through).
        assert_eq!(ok(&worker, m, "name-thread"), "ok");
        assert_eq!(ok(&worker, m, "write:/proc/1/oom_score_adj:1"), "err:EACCES");
    }
    assert_eq!(ok(&worker, m, &format!("write:{}:1000", scratch.join("ok.bin").display())), "ok:1000 bytes");
    // `high`'s seccomp deny-list refuses the socket itself; without it the empty network
    // namespace has no route.
    if active(&worker, "seccomp") {
        assert_eq!(ok(&worker, m, &format!("connect:127.0.0.1:{port}")), "err:EPERM");
    } else if active(&worker, "network namespace") {
        assert_eq!(ok(&worker, m, &format!("connect:127.0.0.1:{port}")), "err:ENETUNREACH");
    }
    if active(&worker, "cgroup pids.max") {
        let forks = ok(&worker, m, "fork");
        let n: u64 = forks.strip_prefix("err:EAGAIN after ").and_then(|r| r.strip_suffix(" forks")).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{forks}"));
        assert!(n < inference_pio_host::cgroup::PIDS_MAX, "{forks}");
    }
    // The worker survived all of it and still answers.
    assert_eq!(ok(&worker, m, "echo"), "ok");
    assert_eq!(worker.restarts(), 0);

    // Last, because it ends this worker: disk_space_gb = 0.001, so RLIMIT_FSIZE stops a 2 MB
    // file at 1 MB with EFBIG (and no SIGXFSZ death). That 1 MB beside `ok.bin` is over the
    // limit, so the disk watchdog kills the worker at its next check, and says why.
    assert_eq!(ok(&worker, m, &format!("write:{}:2000000", scratch.join("big.bin").display())), "err:EFBIG");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let killed = loop {
        match attack(&worker, m, "echo") {
            Err(e) => break e.to_string(),
            Ok(_) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(50)),
            Ok(_) => panic!("the worker outlived its disk limit"),
        }
    };
    assert!(killed.contains("killed by the host: disk limit 0.001 GB exceeded"), "{killed}");
    // A fresh worker (with a fresh scratch directory) answers the next request.
    assert_eq!(ok(&worker, m, "echo"), "ok");
    assert_eq!(worker.restarts(), 1);
}

#[test]
fn maximum_denies_syscalls_and_non_unix_sockets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let (worker, m) = start(config(SecurityLevel::Maximum, ResourceLimits::default(), dir.path()));
    assert!(active(&worker, "pinned sha256"));
    if active(&worker, "seccomp") {
        // seccomp answers before the network namespace could: socket(AF_INET) is EPERM.
        assert_eq!(ok(&worker, m, &format!("connect:127.0.0.1:{port}")), "err:EPERM");
        assert_eq!(ok(&worker, m, "ptrace"), "err:EPERM");
    }
    assert_eq!(ok(&worker, m, "echo"), "ok");
}

/// What a plugin with bad intent tries from inside `infer` against the machine and its host
/// (issue: "The worker jail holds against a root host"), at `high` and at `maximum`. Each
/// attempt ends in its specific error; the host, the decoy process and the listeners
/// survive; the same worker serves the next request.
#[test]
fn the_jail_holds_signals_sockets_exec_ids_modules_and_proc() {
    use std::os::linux::net::SocketAddrExt;
    let dirs = tempfile::tempdir().expect("tempdir");
    let model = dirs.path().join("model");
    std::fs::create_dir(&model).expect("model dir");
    // A decoy process of the machine, a pathname and an abstract UNIX socket listening
    // outside the allowlist.
    let mut decoy = std::process::Command::new("sleep").arg("600").spawn().expect("decoy");
    let socket_path = dirs.path().join("control.sock");
    let pathname = std::os::unix::net::UnixListener::bind(&socket_path).expect("pathname listener");
    let abstract_name = format!("pio-jail-test-{}", std::process::id());
    let abstract_addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()).expect("abstract name");
    let abstract_listener = std::os::unix::net::UnixListener::bind_addr(&abstract_addr).expect("abstract listener");
    pathname.set_nonblocking(true).expect("nonblocking");
    abstract_listener.set_nonblocking(true).expect("nonblocking");
    let host_root = host_is_root();

    for level in [SecurityLevel::High, SecurityLevel::Maximum] {
        let (worker, m) = start(config(level, ResourceLimits::default(), &model));
        let seccomp_allowlist = level == SecurityLevel::Maximum && active(&worker, "seccomp");
        let enforcement = worker.enforcement().expect("enforcement");
        // Without user namespaces a root host drops to the worker's uid with setresuid (not
        // a degradation).
        let userns = enforcement.mechanisms.iter().any(|m| m.name == "user namespace" && m.active);
        let scoped = enforcement.mechanisms.iter().any(|m| m.name == "landlock" && m.active && m.detail.contains("scoped:"));
        // Denied by the allowlist at `maximum`, else by what `high` has.
        let expect = |high: &str| if seccomp_allowlist { "err:EPERM".to_string() } else { high.to_string() };

        if host_root {
            assert!(active(&worker, "unprivileged uid"), "{enforcement:?}");
            assert_eq!(ok(&worker, m, "ids"), "ok:uid=65534 gid=65534 CapEff=0000000000000000 CapBnd=0000000000000000", "{level:?}");
        }
        assert!(active(&worker, "capabilities"), "{enforcement:?}");
        assert!(active(&worker, "descriptors"), "{enforcement:?}");
        if active(&worker, "pid namespace") {
            // Alone in its PID namespace: its reaper (1) and itself (2).
            assert_eq!(ok(&worker, m, "proc-pids"), "ok:1,2", "{level:?}");
            // Its parent is the reaper, outside its landlock domain (an init process would
            // ignore the signal anyway).
            assert_eq!(ok(&worker, m, "kill-parent"), if scoped || seccomp_allowlist { "err:EPERM" } else { "ok" }, "{level:?}");
            // The host and the decoy do not exist in its namespace.
            assert_eq!(ok(&worker, m, &format!("kill:{}", std::process::id())), expect("err:ESRCH"), "{level:?}");
            assert_eq!(ok(&worker, m, &format!("kill:{}", decoy.id())), expect("err:ESRCH"), "{level:?}");
            // Shown alone above, so kill(-1) may be sent: nobody it may signal.
            assert_eq!(ok(&worker, m, "kill:-1"), expect("err:ESRCH"), "{level:?}");
        }
        if active(&worker, "mount namespace") {
            // (`maximum` allows AF_UNIX sockets: the CUDA driver makes one.) Not in the view.
            assert_eq!(ok(&worker, m, &format!("unix-connect:{}", socket_path.display())), "err:ENOENT", "{level:?}");
            assert_eq!(ok(&worker, m, "read:/proc/1/environ"), "err:EACCES", "{level:?}");
        }
        if active(&worker, "network namespace") {
            // Abstract sockets belong to a network namespace.
            assert_eq!(ok(&worker, m, &format!("abstract-connect:{abstract_name}")), "err:ECONNREFUSED", "{level:?}");
        }
        if active(&worker, "seccomp") {
            assert_eq!(ok(&worker, m, "exec:/bin/sh"), "err:EPERM", "{level:?}");
            assert_eq!(ok(&worker, m, "init-module"), "err:EPERM", "{level:?}");
            assert_eq!(ok(&worker, m, "finit-module"), "err:EPERM", "{level:?}");
        }
        // setuid(0): root does not exist in its user namespace (EINVAL); without one, no
        // capability allows it (EPERM).
        assert_eq!(ok(&worker, m, "setuid:0"), expect(if userns { "err:EINVAL" } else { "err:EPERM" }), "{level:?}");
        // The same worker serves on.
        assert_eq!(ok(&worker, m, "echo"), "ok");
        assert_eq!(worker.restarts(), 0, "{level:?}");
    }
    // Everything outside survived and nothing reached the listeners.
    assert!(decoy.try_wait().expect("decoy").is_none(), "the decoy process was killed");
    assert!(pathname.accept().is_err() && abstract_listener.accept().is_err(), "a worker reached a listener");
    let _ = decoy.kill();
    let _ = decoy.wait();
}

/// `user_namespace = false` (for kernels hardened against user namespaces): a root host
/// still jails the worker (PID, mount, network, … namespaces made as root) and drops it to
/// the worker's uid with setresuid; a host that is not root cannot, and the level is refused.
#[test]
fn without_user_namespaces_a_root_host_drops_the_worker_with_setuid() {
    let dirs = tempfile::tempdir().expect("tempdir");
    let model = dirs.path().join("model");
    std::fs::create_dir(&model).expect("model dir");
    let cfg = WorkerConfig { user_namespace: false, ..config(SecurityLevel::High, ResourceLimits::default(), &model) };
    let host_root = host_is_root();
    if !host_root {
        let refusal = WorkerPlugin::start(cfg).err().expect("refused");
        assert!(refusal.contains("user namespace") && refusal.contains("user_namespace = false"), "{refusal}");
        return;
    }
    let (worker, m) = start(cfg);
    let enforcement = worker.enforcement().expect("enforcement");
    let user = enforcement.mechanisms.iter().find(|m| m.name == "user namespace").expect("reported");
    assert!(!user.active && !user.required && user.detail.contains("user_namespace = false"), "{user:?}");
    assert!(active(&worker, "setuid"));
    assert!(active(&worker, "unprivileged uid") && active(&worker, "capabilities") && active(&worker, "pid namespace") && active(&worker, "mount namespace"));
    assert_eq!(ok(&worker, m, "ids"), "ok:uid=65534 gid=65534 CapEff=0000000000000000 CapBnd=0000000000000000");
    assert_eq!(ok(&worker, m, "proc-pids"), "ok:1,2");
    // Root exists here (no user namespace), but no capability allows becoming it.
    assert_eq!(ok(&worker, m, "setuid:0"), "err:EPERM");
    assert_eq!(ok(&worker, m, &format!("kill:{}", std::process::id())), "err:ESRCH");
    assert_eq!(ok(&worker, m, "read:/etc/passwd"), "err:ENOENT");
    assert_eq!(ok(&worker, m, "echo"), "ok");
}

#[test]
fn crashes_and_hangs_are_named_and_the_next_request_gets_a_new_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(SecurityLevel::High, ResourceLimits::default(), dir.path());
    cfg.timeout = Duration::from_millis(1500);
    let (worker, m) = start(cfg.clone());
    let (bystander, b) = start(cfg);
    let cases = [
        ("panic", "plugin panicked: hostile plugin panics on request"),
        ("abort", "aborted (SIGABRT)"),
        ("segv", "killed by SIGSEGV (segmentation fault)"),
        ("hang", "timed out: no answer for 1.5 s"),
    ];
    for (i, (command, expected)) in cases.iter().enumerate() {
        let first = worker.worker_pid();
        let err = attack(&worker, m, command).expect_err(command);
        assert!(err.message.contains(expected), "{command}: {err}");
        if *command == "panic" {
            assert_eq!(err.kind, ErrorKind::Poisoned);
        } else {
            assert!(err.message.contains("restarted for the next request"), "{err}");
        }
        // The next request is served by a new worker process, with the model loaded again.
        assert_eq!(ok(&worker, m, "echo"), "ok");
        assert_ne!(worker.worker_pid(), first);
        assert_eq!(worker.restarts(), i as u32 + 1);
        // Another plugin's worker is untouched.
        assert_eq!(ok(&bystander, b, "echo"), "ok");
    }
    assert_eq!(bystander.restarts(), 0);
}

#[test]
fn memory_breach_kills_the_worker_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = ResourceLimits { memory_gb: Some(0.25), ..Default::default() };
    // maximum: the host's watchdog kills at the limit.
    let (worker, m) = start(config(SecurityLevel::Maximum, limits.clone(), dir.path()));
    let err = attack(&worker, m, "alloc:2000").expect_err("killed");
    assert!(err.message.contains("killed by the host: memory limit 0.250 GB exceeded"), "{err}");
    assert_eq!(err.kind, ErrorKind::ResourceLimit);
    assert_eq!(ok(&worker, m, "alloc:64"), "ok:64 MiB resident");
    // high: a memory cgroup where there is one (the kernel OOM-kills), else the watchdog.
    let (worker, m) = start(config(SecurityLevel::High, limits, dir.path()));
    let err = attack(&worker, m, "alloc:2000").expect_err("killed");
    if active(&worker, "cgroup memory.max") {
        assert!(err.message.contains("killed by the kernel's OOM killer"), "{err}");
    } else {
        assert!(err.message.contains("killed by the host: memory limit 0.250 GB exceeded"), "{err}");
    }
    assert_eq!(ok(&worker, m, "echo"), "ok");
}

#[test]
fn cpu_limit_throttles_at_high_and_kills_at_maximum() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ncpu = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    // A quarter of one core.
    let percent = 25.0 / ncpu;
    let limits = ResourceLimits { cpu_percent: Some(percent), ..Default::default() };
    let (worker, m) = start(config(SecurityLevel::High, limits.clone(), dir.path()));
    if active(&worker, "cgroup cpu.max") {
        let text = ok(&worker, m, "spin:1.2");
        let cpu: f64 = text.split("cpu=").nth(1).and_then(|r| r.split(' ').next()).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{text}"));
        assert!(cpu < 0.6, "a spinning thread got {cpu} s of CPU in 1.2 s under a 0.25-core quota: {text}");
        assert!(worker.cpu_throttled().expect("cpu cgroup") > 0);
    }
    let (worker, m) = start(config(SecurityLevel::Maximum, limits, dir.path()));
    let started = Instant::now();
    let err = attack(&worker, m, "spin:30").expect_err("killed");
    assert!(err.message.contains("killed by the host: CPU limit exceeded"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(ok(&worker, m, "echo"), "ok");
}

#[test]
fn a_maximum_plugin_whose_hash_differs_never_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tampered = dir.path().join("libpio_test_plugin_hostile.so");
    let mut bytes = std::fs::read(hostile()).expect("read");
    bytes.extend_from_slice(b"tampered");
    std::fs::write(&tampered, bytes).expect("write");
    let mut cfg = config(SecurityLevel::Maximum, ResourceLimits::default(), dir.path());
    cfg.plugin = tampered.clone();
    let err = WorkerPlugin::start(cfg).err().expect("refused");
    assert!(err.contains("sha256 mismatch") && err.contains(&sha256_file(&tampered).expect("hash")), "{err}");
}

#[test]
fn a_missing_mechanism_refuses_the_level_unless_degrading_is_allowed() {
    // gpu_memory_gb needs NVML: on a machine without the NVIDIA driver the level is refused by
    // name, and with allow_degraded it runs and says what is missing.
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = ResourceLimits { gpu_memory_gb: Some(1.0), ..Default::default() };
    let strict = config(SecurityLevel::High, limits, dir.path());
    match WorkerPlugin::start(strict.clone()) {
        Ok(worker) => assert!(active(&worker, "gpu memory watchdog"), "a strict start must have every required mechanism"),
        Err(refusal) => {
            assert!(refusal.contains("security level `high` cannot be enforced") && refusal.contains("gpu memory watchdog (NVML is not available"), "{refusal}");
            assert!(refusal.contains("allow_degraded = true"), "{refusal}");
            let worker = WorkerPlugin::start(WorkerConfig { allow_degraded: true, ..strict }).expect("degraded start");
            let enforcement = worker.enforcement().expect("enforcement");
            assert_eq!(enforcement.degraded.len(), 1, "{enforcement:?}");
            assert!(enforcement.degraded[0].starts_with("gpu memory watchdog"), "{enforcement:?}");
            assert!(!active(&worker, "gpu memory watchdog"));
        }
    }
}

#[test]
fn concurrent_calls_through_the_worker_are_multiplexed_and_cancelled_by_id() {
    let dirs = tempfile::tempdir().expect("tempdir");
    let model = dirs.path().join("model");
    std::fs::create_dir(&model).expect("model dir");
    let (worker, handle) = start(config(SecurityLevel::High, ResourceLimits::default(), &model));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (answered_tx, answered_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        // A long stream that stops only once a second call, sent while it streams, has been
        // answered: one call at a time on the socket would deadlock here (and time out).
        let worker = &worker;
        let streaming = scope.spawn(move || {
            let request = InferRequest { input: PromptInput::Text("stream:100000000".into()), sampling: Default::default(), stop: vec![], cache_salt: String::new(), logprobs: None, constraint: None, images: Vec::new() };
            let mut seen = 0u32;
            let mut other = None;
            let response = worker.infer(handle, &request, &mut |_, _, _| {
                seen += 1;
                if seen == 1 {
                    let _ = started_tx.send(());
                    other = Some(answered_rx.recv_timeout(Duration::from_secs(20)).is_ok());
                    return other == Some(true);
                }
                false
            });
            (response.map(|r| r.text), other)
        });
        started_rx.recv_timeout(Duration::from_secs(20)).expect("the stream started");
        assert_eq!(ok(worker, handle, "echo"), "ok", "a call beside a streaming one");
        answered_tx.send(()).expect("tell the stream");
        let (text, other) = streaming.join().expect("stream thread");
        assert_eq!(other, Some(true), "the second call was answered while the first streamed");
        let text = text.expect("the cancelled stream answers");
        assert!(text.starts_with("cancelled after"), "{text}");
    });
    // The worker serves on, and each token's detail (ABI 1.4) crosses the socket with it.
    assert_eq!(ok(&worker, handle, "echo"), "ok");
    let request = InferRequest { input: PromptInput::Text("detail".into()), sampling: Default::default(), stop: vec![], cache_salt: String::new(), logprobs: None, constraint: None, images: Vec::new() };
    let mut details = Vec::new();
    worker.infer(handle, &request, &mut |id, _, detail| {
        details.push((id, detail.reasoning.clone(), detail.logprobs.as_ref().map(|l| (l.token.text.clone(), l.token.logprob))));
        true
    }).expect("detail");
    assert_eq!(details, (0..3u32).map(|i| (i, format!("r{i}"), Some((format!("t{i}"), -(i as f32))))).collect::<Vec<_>>());
}
