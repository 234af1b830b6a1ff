//! The worker process's sandbox for security levels `high` and `maximum`, applied by the
//! worker to itself before it opens the plugin library: die with the host, rlimits, the jail
//! ([`jail`]: user, PID, mount, IPC, UTS and network namespaces, a pivot_root view of the
//! allowed paths, an unprivileged uid, no capabilities), landlock (filesystem allowlist plus
//! its signal and abstract-socket scopes) as a second layer, only the protocol socket and the
//! output pipes left open, `no_new_privs`, and seccomp ([`seccomp`]: a deny-list at `high`,
//! an allowlist at `maximum`). Every mechanism is reported as applied or not, with the
//! kernel's reason; the host decides whether a missing one refuses the level.
//!
//! References: landlock(7) and the `landlock` crate's sandboxer example; seccomp(2) through
//! `seccompiler` (Firecracker's filter compiler); setrlimit(2), prctl(2), unshare(2).

pub mod jail;
pub mod seccomp;

pub use jail::JailSpec;
pub use seccomp::SeccompMode;

use inference_pio_core::config::SecurityLevel;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One enforcement mechanism, as reported by the worker or set up by the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mechanism {
    /// What it is (`landlock`, `network namespace`, `cgroup pids.max`, …).
    pub name: String,
    /// Whether it is in force for this worker.
    pub active: bool,
    /// What it enforces, or why it is not in force.
    pub detail: String,
    /// Whether the level needs it: a required mechanism that is not active refuses the level
    /// unless the config allows degrading.
    pub required: bool,
}

impl Mechanism {
    pub fn active(name: &str, detail: impl Into<String>) -> Self {
        Self { name: name.into(), active: true, detail: detail.into(), required: true }
    }
    pub fn missing(name: &str, detail: impl Into<String>) -> Self {
        Self { name: name.into(), active: false, detail: detail.into(), required: true }
    }
}

/// What the worker applies to itself; sent by the host in the setup message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub level: SecurityLevel,
    /// The host's pid: the worker exits at once if its parent is already another process.
    pub parent_pid: u32,
    /// Read-only (and executable) paths: the plugin, the model, system and CUDA libraries.
    pub read_only: Vec<PathBuf>,
    /// Read-write paths: the scratch directory only.
    pub read_write: Vec<PathBuf>,
    /// Device nodes opened read-write with ioctls (`/dev/nvidia*`).
    pub devices: Vec<PathBuf>,
    /// `cgroup.procs` files the worker moves itself into before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// RLIMIT_FSIZE in bytes.
    pub file_size_bytes: u64,
    /// RLIMIT_NOFILE.
    pub open_files: u64,
    /// Namespaces, filesystem view and ids (`None`: the process keeps the host's, as the
    /// discovery probe does).
    pub jail: Option<JailSpec>,
    /// Which seccomp filter, if any.
    pub seccomp: Option<SeccompMode>,
}

/// Paths every worker reads: the dynamic loader's libraries and cache, CPU topology for
/// thread pools, CUDA installations. Missing ones are skipped.
pub fn system_read_only_paths() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = [
        "/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d",
        "/sys/devices/system/cpu", "/sys/fs/cgroup", "/proc/self", "/proc/cpuinfo", "/proc/meminfo",
        "/proc/sys/vm/mmap_min_addr",
        "/dev/null", "/dev/zero", "/dev/urandom", "/opt/cuda", "/usr/local/cuda",
        "/proc/driver/nvidia", "/sys/bus/pci", "/sys/devices",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    if let Ok(entries) = std::fs::read_dir("/usr/local") {
        paths.extend(entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("cuda"))
        }));
    }
    paths.retain(|p| p.exists());
    paths
}

/// The NVIDIA device nodes present (`/dev/nvidia0`, `/dev/nvidiactl`, `/dev/nvidia-uvm`, …).
pub fn nvidia_devices() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/dev") else { return Vec::new() };
    let mut devices: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("nvidia")))
        .collect();
    devices.sort();
    devices
}

pub(crate) fn errno_text() -> String {
    std::io::Error::last_os_error().to_string()
}

/// Applies `spec` to the calling process, which must still be single-threaded (landlock and
/// seccomp bind the calling thread and the threads it creates later). A failure of a
/// mechanism the kernel should have is an error; a mechanism the kernel lacks is reported
/// inactive.
pub fn apply(spec: &SandboxSpec) -> Result<Vec<Mechanism>, String> {
    let mut report = Vec::new();

    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(format!("prctl(PR_SET_PDEATHSIG): {}", errno_text()));
    }
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    if parent as u32 != spec.parent_pid {
        return Err(format!("the host (pid {}) is gone; parent is now {parent}", spec.parent_pid));
    }
    report.push(Mechanism::active("die with the host", "PR_SET_PDEATHSIG = SIGKILL"));

    for procs in &spec.cgroup_procs {
        std::fs::write(procs, std::process::id().to_string())
            .map_err(|e| format!("cannot join cgroup {}: {e}", procs.display()))?;
    }

    // A write past RLIMIT_FSIZE then fails with EFBIG instead of killing the worker.
    // SAFETY: installs the default-ignore disposition; no handler code runs.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let limits = [
        (libc::RLIMIT_CORE, 0, "core dumps 0"),
        (libc::RLIMIT_NOFILE, spec.open_files, "open files"),
        (libc::RLIMIT_FSIZE, spec.file_size_bytes, "file size"),
    ];
    let mut applied = Vec::new();
    for (resource, value, what) in limits {
        let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: `current` is a valid, writable rlimit.
        if unsafe { libc::getrlimit(resource, &mut current) } != 0 {
            return Err(format!("getrlimit({what}): {}", errno_text()));
        }
        let value = value.min(current.rlim_max);
        let new = libc::rlimit { rlim_cur: value, rlim_max: value };
        // SAFETY: `new` is a valid rlimit; lowering limits needs no privilege.
        if unsafe { libc::setrlimit(resource, &new) } != 0 {
            return Err(format!("setrlimit({what}): {}", errno_text()));
        }
        applied.push(if what == "core dumps 0" { what.to_string() } else { format!("{what} {value}") });
    }
    report.push(Mechanism::active("rlimits", applied.join(", ")));

    match &spec.jail {
        // Returns in the worker only (the processes that hold the jail end as it ends).
        Some(jail) => jail::enter(spec, jail, &mut report)?,
        None => report.push(network_namespace()),
    }
    report.push(landlock_rules(spec)?);

    if spec.jail.is_some() {
        jail::close_other_descriptors(&[]);
        // SAFETY: fcntl(F_GETFD) only asks whether a descriptor number is open.
        let open: Vec<i32> = (0..spec.open_files.min(4096) as i32).filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0).collect();
        report.push(Mechanism::active(
            "descriptors",
            format!("open: {open:?} (0: the host's socket; 1 and 2: pipes the host reads and labels); every other descriptor closed before the plugin is opened"),
        ));
    }

    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!("prctl(PR_SET_NO_NEW_PRIVS): {}", errno_text()));
    }
    report.push(Mechanism::active("no_new_privs", "setuid binaries and file capabilities cannot raise privileges"));

    if let Some(mode) = spec.seccomp {
        report.push(seccomp::apply(mode)?);
    }
    Ok(report)
}

/// A new, empty network namespace (only a loopback that is down): no route anywhere. As
/// root directly; otherwise inside a new user namespace. For processes without the jail.
fn network_namespace() -> Mechanism {
    const NAME: &str = "network namespace";
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
        return Mechanism::active(NAME, "own empty network namespace: no interface is up");
    }
    let first = errno_text();
    // SAFETY: as above.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } == 0 {
        return Mechanism::active(NAME, "own user and empty network namespace: no interface is up");
    }
    Mechanism::missing(NAME, format!("unshare(CLONE_NEWNET) failed ({first}), also with CLONE_NEWUSER ({})", errno_text()))
}

/// Files beneath these the worker may write (not create): its own threads' names,
/// `/proc/self/task/TID/comm`, which `pthread_setname_np` writes for a thread other than the
/// caller. The CUDA driver names its threads so and fails `cuInit` with
/// `CUDA_ERROR_OPERATING_SYSTEM` when it cannot (strace on the H200:
/// `benches/results/gpu-h200-2026-12-01-matvec/strace_cuinit_in_sandbox_excerpt.txt`). `/proc/self` resolves to the worker's own
/// directory when the rule is made, so no other process is reachable through it.
const THREAD_NAMES: &[&str] = &["/proc/self/task"];

fn landlock_rules(spec: &SandboxSpec) -> Result<Mechanism, String> {
    use landlock::{ABI, Access, AccessFs, LandlockStatus, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, path_beneath_rules};
    const NAME: &str = "landlock";
    // The newest ABI this crate knows; the kernel's older one is used where it has one
    // (best effort), and the status says which.
    let abi = ABI::V10;
    let existing = |paths: &[PathBuf]| paths.iter().filter(|p| p.exists()).cloned().collect::<Vec<_>>();
    let mut read_only = existing(&spec.read_only);
    // In the jail /proc is a fresh one of the worker's own PID namespace: listing it shows
    // only the worker's processes (other processes' files stay closed by their owners).
    if spec.jail.is_some() {
        read_only.push(PathBuf::from("/proc"));
    }
    let read_write = existing(&spec.read_write);
    let devices = existing(&spec.devices);
    // Nothing may be executed (the worker never execs; mapping a library is not execution
    // to landlock).
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let write = AccessFs::from_all(abi) & !AccessFs::Execute;
    let device_access = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.scope(Scope::from_all(abi)))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(&read_only, read)))
        .and_then(|r| r.add_rules(path_beneath_rules(&read_write, write)))
        .and_then(|r| r.add_rules(path_beneath_rules(&devices, device_access)))
        .and_then(|r| r.add_rules(path_beneath_rules(THREAD_NAMES, AccessFs::WriteFile | AccessFs::Truncate)))
        .and_then(|r| r.restrict_self())
        .map_err(|e| format!("landlock: {e}"))?;
    let show = |paths: &[PathBuf]| paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    let allowed = format!(
        "read-only: {}; read-write: {}; devices: {}; write: {} (thread names); nothing executable",
        show(&read_only),
        show(&read_write),
        if devices.is_empty() { "none".into() } else { show(&devices) },
        THREAD_NAMES.join(", ")
    );
    let version = match status.landlock {
        LandlockStatus::Available { effective_abi, kernel_abi } => {
            format!("ABI {}{}", effective_abi as i32, kernel_abi.map(|k| format!(" (the kernel has {k})")).unwrap_or_default())
        }
        other => format!("{other:?}"),
    };
    let scopes = if abi_at_least(&status.landlock, ABI::V6) {
        "; scoped: no signal to, and no abstract UNIX socket of, any process outside the sandbox"
    } else {
        "; this kernel's landlock has no scopes (signals and abstract sockets are left to the namespaces)"
    };
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Mechanism::active(NAME, format!("{version}: filesystem allowlist fully enforced ({allowed}){scopes}")),
        RulesetStatus::PartiallyEnforced => Mechanism::active(NAME, format!("{version}: filesystem allowlist enforced with this kernel's older landlock ({allowed}){scopes}")),
        RulesetStatus::NotEnforced => Mechanism::missing(NAME, format!("the kernel does not enforce landlock ({:?})", status.landlock)),
    })
}

fn abi_at_least(status: &landlock::LandlockStatus, abi: landlock::ABI) -> bool {
    matches!(status, landlock::LandlockStatus::Available { effective_abi, .. } if *effective_abi >= abi)
}

