//! The worker process's sandbox for security levels `high` and `maximum`, applied by the
//! worker to itself before it opens the plugin library: die with the host, rlimits, its own
//! network namespace, a landlock filesystem allowlist, `no_new_privs`, and at `maximum` a
//! seccomp deny-list. Every mechanism is reported as applied or not, with the kernel's
//! reason; the host decides whether a missing one refuses the level.
//!
//! References: landlock(7) and the `landlock` crate's sandboxer example; seccomp(2) through
//! `seccompiler` (Firecracker's filter compiler); setrlimit(2), prctl(2), unshare(2).

use inference_pio_core::config::SecurityLevel;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
    /// Apply the seccomp deny-list (level `maximum`).
    pub seccomp: bool,
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

fn errno_text() -> String {
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

    report.push(network_namespace());
    report.push(landlock_rules(spec)?);

    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!("prctl(PR_SET_NO_NEW_PRIVS): {}", errno_text()));
    }
    report.push(Mechanism::active("no_new_privs", "setuid binaries and file capabilities cannot raise privileges"));

    if spec.seccomp {
        report.push(seccomp_deny_list()?);
    }
    Ok(report)
}

/// A new, empty network namespace (only a loopback that is down): no route anywhere. As
/// root directly; otherwise inside a new user namespace.
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
    use landlock::{ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, path_beneath_rules};
    const NAME: &str = "landlock";
    let abi = ABI::V5;
    let existing = |paths: &[PathBuf]| paths.iter().filter(|p| p.exists()).cloned().collect::<Vec<_>>();
    let read_only = existing(&spec.read_only);
    let read_write = existing(&spec.read_write);
    let devices = existing(&spec.devices);
    let device_access = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(&read_only, AccessFs::from_read(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(&read_write, AccessFs::from_all(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(&devices, device_access)))
        .and_then(|r| r.add_rules(path_beneath_rules(THREAD_NAMES, AccessFs::WriteFile | AccessFs::Truncate)))
        .and_then(|r| r.restrict_self())
        .map_err(|e| format!("landlock: {e}"))?;
    let show = |paths: &[PathBuf]| paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    let allowed = format!(
        "read-only: {}; read-write: {}; devices: {}; write: {} (thread names)",
        show(&read_only),
        show(&read_write),
        if devices.is_empty() { "none".into() } else { show(&devices) },
        THREAD_NAMES.join(", ")
    );
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Mechanism::active(NAME, format!("filesystem allowlist fully enforced ({allowed})")),
        RulesetStatus::PartiallyEnforced => Mechanism::active(NAME, format!("filesystem allowlist enforced with this kernel's older landlock ABI ({allowed})")),
        RulesetStatus::NotEnforced => Mechanism::missing(NAME, format!("the kernel does not enforce landlock ({:?})", status.landlock)),
    })
}

/// System calls the worker never needs; each answers EPERM.
const DENIED_SYSCALLS: &[(i64, &str)] = &[
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_pivot_root, "pivot_root"),
    (libc::SYS_chroot, "chroot"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_reboot, "reboot"),
    (libc::SYS_swapon, "swapon"),
    (libc::SYS_swapoff, "swapoff"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_acct, "acct"),
    (libc::SYS_settimeofday, "settimeofday"),
];

fn seccomp_deny_list() -> Result<Mechanism, String> {
    use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, _) in DENIED_SYSCALLS {
        rules.insert(*nr, Vec::new());
    }
    // Sockets: only AF_UNIX (the host connection is one already).
    let not_unix = || -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        Ok(vec![SeccompRule::new(vec![SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, libc::AF_UNIX as u64)?])?])
    };
    rules.insert(libc::SYS_socket, not_unix().map_err(|e| format!("seccomp rule: {e}"))?);
    rules.insert(libc::SYS_socketpair, not_unix().map_err(|e| format!("seccomp rule: {e}"))?);
    let arch = std::env::consts::ARCH.try_into().map_err(|e| format!("seccomp: {e:?}"))?;
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch)
        .map_err(|e| format!("seccomp filter: {e}"))?;
    let program: seccompiler::BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| format!("seccomp filter: {e}"))?;
    match seccompiler::apply_filter_all_threads(&program) {
        Ok(()) => {
            let names: Vec<&str> = DENIED_SYSCALLS.iter().map(|(_, n)| *n).collect();
            Ok(Mechanism::active("seccomp", format!("EPERM for {} and for sockets other than AF_UNIX", names.join(", "))))
        }
        Err(e) => Ok(Mechanism::missing("seccomp", format!("the kernel refused the filter: {e}"))),
    }
}
