//! The worker's seccomp filters. `high`: a deny-list (EPERM) of the calls a model never
//! needs and that reach outside a process (modules, mounts, namespaces, tracing, exec, other
//! processes' memory, …). `maximum`: an allowlist — every call not in
//! `inference-pio-host/seccomp/allowlist.txt` answers EPERM — made from what the worker
//! really calls on the CPU and on CUDA (recorded with `strace -f`; the file says how), with
//! arguments narrowed where a call can reach outside: sockets only AF_UNIX, `clone` without
//! namespace flags, signals (`tgkill`) only to its own threads, `prlimit64` only on itself.
//! Both levels answer `clone3` with ENOSYS (its flags sit in memory, where seccomp cannot
//! look), so the C library falls back to `clone`, whose flags are checked.
//!
//! Reference: seccomp(2); `seccompiler` (Firecracker's filter compiler); Chromium's and
//! Firefox's seccomp-bpf policies (allowlist, argument checks on clone/socket/kill).

use super::Mechanism;
use seccompiler::{BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompMode {
    /// `high`: everything but [`DENIED`] (and the argument checks).
    DenyList,
    /// `maximum`: nothing but `allowlist.txt` (with the argument checks).
    AllowList,
}

/// The allowlist of `maximum`, one system call name per line (`#` starts a comment).
pub const ALLOWLIST: &str = include_str!("../../seccomp/allowlist.txt");

/// System calls `high` refuses (EPERM).
pub const DENIED: &[&str] = &[
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd", "kcmp",
    "execve", "execveat",
    "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
    "setns", "unshare",
    "bpf", "perf_event_open", "userfaultfd", "fanotify_init",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "vhangup",
    "iopl", "ioperm", "uselib", "ustat", "sysfs", "lookup_dcookie",
    "keyctl", "add_key", "request_key",
    "open_by_handle_at", "name_to_handle_at",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
];

/// The namespace flags `clone` may not carry (CLONE_NEWTIME is 0x80).
const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u64
    | 0x80;

/// The number of system call `name` on this machine's architecture.
pub fn number(name: &str) -> Option<i64> {
    #[cfg(target_arch = "x86_64")]
    {
        NUMBERS.iter().find(|(n, _)| *n == name).map(|(_, nr)| *nr)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = name;
        None
    }
}

/// The allowlist's names, in file order.
pub fn allowlist_names() -> Vec<&'static str> {
    ALLOWLIST.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()).collect()
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(conditions)
}

fn arg_eq(index: u8, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>, mismatch: SeccompAction, matched: SeccompAction) -> Result<BpfProgram, String> {
    let arch = std::env::consts::ARCH.try_into().map_err(|e| format!("seccomp: {e:?}"))?;
    let filter = SeccompFilter::new(rules, mismatch, matched, arch).map_err(|e| format!("seccomp filter: {e}"))?;
    filter.try_into().map_err(|e: BackendError| format!("seccomp filter: {e}"))
}

/// The deny-list of `high`: [`DENIED`], sockets other than AF_UNIX and namespace flags on
/// `clone` answer EPERM.
fn deny_list() -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for name in DENIED {
        let nr = number(name).ok_or_else(|| format!("seccomp: unknown system call `{name}`"))?;
        rules.insert(nr, Vec::new());
    }
    let build = || -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
        let mut more = BTreeMap::new();
        let not_unix = vec![rule(vec![SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, libc::AF_UNIX as u64)?])?];
        more.insert(libc::SYS_socket, not_unix.clone());
        more.insert(libc::SYS_socketpair, not_unix);
        // Any one namespace flag set: EPERM.
        let mut clone = Vec::new();
        for bit in 0..64 {
            let flag = 1u64 << bit;
            if NAMESPACE_FLAGS & flag != 0 {
                clone.push(rule(vec![SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag)?])?);
            }
        }
        more.insert(libc::SYS_clone, clone);
        Ok(more)
    };
    rules.extend(build().map_err(|e| format!("seccomp rule: {e}"))?);
    compile(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32))
}

/// The allowlist of `maximum`: only [`ALLOWLIST`], with the argument checks.
fn allow_list() -> Result<BpfProgram, String> {
    // SAFETY: getpid has no preconditions.
    let tgid = unsafe { libc::getpid() } as u64;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let build = |name: &str| -> Result<Vec<SeccompRule>, BackendError> {
        Ok(match name {
            "socket" | "socketpair" => vec![rule(vec![SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?])?],
            "clone" => vec![rule(vec![SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(NAMESPACE_FLAGS), 0)?])?],
            "tgkill" => vec![rule(vec![arg_eq(0, tgid)?])?],
            "prlimit64" => vec![rule(vec![arg_eq(0, 0)?])?],
            _ => Vec::new(),
        })
    };
    for name in allowlist_names() {
        if matches!(name, "clone3" | "kill" | "tkill") {
            return Err(format!("seccomp allowlist: `{name}` cannot be allowed (its target or flags cannot be checked)"));
        }
        let nr = number(name).ok_or_else(|| format!("seccomp allowlist: unknown system call `{name}`"))?;
        rules.insert(nr, build(name).map_err(|e| format!("seccomp rule for {name}: {e}"))?);
    }
    // Allowed here so that the earlier filter's ENOSYS (which outranks an allow) is the answer.
    rules.insert(libc::SYS_clone3, Vec::new());
    compile(rules, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow)
}

/// `clone3` answers ENOSYS. Installed before the main filter (which allows `clone3`): the
/// kernel takes the highest-ranked answer of all filters, and an errno outranks an allow.
fn clone3_enosys() -> Result<BpfProgram, String> {
    let mut rules = BTreeMap::new();
    rules.insert(libc::SYS_clone3, Vec::new());
    compile(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32))
}

/// Installs `mode`'s filters on every thread of the process.
pub fn apply(mode: SeccompMode) -> Result<Mechanism, String> {
    if number("read").is_none() {
        return Ok(Mechanism::missing("seccomp", format!("no system call table for {}", std::env::consts::ARCH)));
    }
    let main = match mode {
        SeccompMode::DenyList => deny_list()?,
        SeccompMode::AllowList => allow_list()?,
    };
    for program in [clone3_enosys()?, main] {
        if let Err(e) = seccompiler::apply_filter_all_threads(&program) {
            return Ok(Mechanism::missing("seccomp", format!("the kernel refused the filter: {e}")));
        }
    }
    Ok(match mode {
        SeccompMode::DenyList => Mechanism::active(
            "seccomp",
            format!("deny-list: EPERM for {}, for sockets other than AF_UNIX and for clone with namespace flags; clone3 ENOSYS", DENIED.join(", ")),
        ),
        SeccompMode::AllowList => {
            let names = allowlist_names();
            Mechanism::active(
                "seccomp",
                format!(
                    "allowlist of {} system calls (inference-pio-host/seccomp/allowlist.txt), EPERM for every other; sockets only AF_UNIX, clone without namespace flags, tgkill only to its own threads, prlimit64 only on itself; clone3 ENOSYS",
                    names.len()
                ),
            )
        }
    })
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn every_listed_name_is_a_system_call_of_this_architecture() {
        for name in allowlist_names().into_iter().chain(DENIED.iter().copied()) {
            assert!(number(name).is_some(), "{name}");
        }
        let allowed = allowlist_names();
        for name in DENIED {
            assert!(!allowed.contains(name), "`{name}` is both denied at high and allowed at maximum");
        }
        for name in ["kill", "tkill", "clone3", "ptrace", "execve", "setuid", "init_module", "finit_module"] {
            assert!(!allowed.contains(&name), "`{name}` must not be in the allowlist");
        }
        assert!(deny_list().is_ok() && allow_list().is_ok() && clone3_enosys().is_ok());
    }
}

#[cfg(target_arch = "x86_64")]
/// System call names and their numbers on x86-64 (libc's `SYS_*`).
const NUMBERS: &[(&str, libc::c_long)] = &[
    ("read", libc::SYS_read),
    ("write", libc::SYS_write),
    ("open", libc::SYS_open),
    ("close", libc::SYS_close),
    ("stat", libc::SYS_stat),
    ("fstat", libc::SYS_fstat),
    ("lstat", libc::SYS_lstat),
    ("poll", libc::SYS_poll),
    ("lseek", libc::SYS_lseek),
    ("mmap", libc::SYS_mmap),
    ("mprotect", libc::SYS_mprotect),
    ("munmap", libc::SYS_munmap),
    ("brk", libc::SYS_brk),
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("ioctl", libc::SYS_ioctl),
    ("pread64", libc::SYS_pread64),
    ("pwrite64", libc::SYS_pwrite64),
    ("readv", libc::SYS_readv),
    ("writev", libc::SYS_writev),
    ("access", libc::SYS_access),
    ("pipe", libc::SYS_pipe),
    ("select", libc::SYS_select),
    ("sched_yield", libc::SYS_sched_yield),
    ("mremap", libc::SYS_mremap),
    ("msync", libc::SYS_msync),
    ("mincore", libc::SYS_mincore),
    ("madvise", libc::SYS_madvise),
    ("shmget", libc::SYS_shmget),
    ("shmat", libc::SYS_shmat),
    ("shmctl", libc::SYS_shmctl),
    ("dup", libc::SYS_dup),
    ("dup2", libc::SYS_dup2),
    ("pause", libc::SYS_pause),
    ("nanosleep", libc::SYS_nanosleep),
    ("getitimer", libc::SYS_getitimer),
    ("alarm", libc::SYS_alarm),
    ("setitimer", libc::SYS_setitimer),
    ("getpid", libc::SYS_getpid),
    ("sendfile", libc::SYS_sendfile),
    ("socket", libc::SYS_socket),
    ("connect", libc::SYS_connect),
    ("accept", libc::SYS_accept),
    ("sendto", libc::SYS_sendto),
    ("recvfrom", libc::SYS_recvfrom),
    ("sendmsg", libc::SYS_sendmsg),
    ("recvmsg", libc::SYS_recvmsg),
    ("shutdown", libc::SYS_shutdown),
    ("bind", libc::SYS_bind),
    ("listen", libc::SYS_listen),
    ("getsockname", libc::SYS_getsockname),
    ("getpeername", libc::SYS_getpeername),
    ("socketpair", libc::SYS_socketpair),
    ("setsockopt", libc::SYS_setsockopt),
    ("getsockopt", libc::SYS_getsockopt),
    ("clone", libc::SYS_clone),
    ("fork", libc::SYS_fork),
    ("vfork", libc::SYS_vfork),
    ("execve", libc::SYS_execve),
    ("exit", libc::SYS_exit),
    ("wait4", libc::SYS_wait4),
    ("kill", libc::SYS_kill),
    ("uname", libc::SYS_uname),
    ("semget", libc::SYS_semget),
    ("semop", libc::SYS_semop),
    ("semctl", libc::SYS_semctl),
    ("shmdt", libc::SYS_shmdt),
    ("msgget", libc::SYS_msgget),
    ("msgsnd", libc::SYS_msgsnd),
    ("msgrcv", libc::SYS_msgrcv),
    ("msgctl", libc::SYS_msgctl),
    ("fcntl", libc::SYS_fcntl),
    ("flock", libc::SYS_flock),
    ("fsync", libc::SYS_fsync),
    ("fdatasync", libc::SYS_fdatasync),
    ("truncate", libc::SYS_truncate),
    ("ftruncate", libc::SYS_ftruncate),
    ("getdents", libc::SYS_getdents),
    ("getcwd", libc::SYS_getcwd),
    ("chdir", libc::SYS_chdir),
    ("fchdir", libc::SYS_fchdir),
    ("rename", libc::SYS_rename),
    ("mkdir", libc::SYS_mkdir),
    ("rmdir", libc::SYS_rmdir),
    ("creat", libc::SYS_creat),
    ("link", libc::SYS_link),
    ("unlink", libc::SYS_unlink),
    ("symlink", libc::SYS_symlink),
    ("readlink", libc::SYS_readlink),
    ("chmod", libc::SYS_chmod),
    ("fchmod", libc::SYS_fchmod),
    ("chown", libc::SYS_chown),
    ("fchown", libc::SYS_fchown),
    ("lchown", libc::SYS_lchown),
    ("umask", libc::SYS_umask),
    ("gettimeofday", libc::SYS_gettimeofday),
    ("getrlimit", libc::SYS_getrlimit),
    ("getrusage", libc::SYS_getrusage),
    ("sysinfo", libc::SYS_sysinfo),
    ("times", libc::SYS_times),
    ("ptrace", libc::SYS_ptrace),
    ("getuid", libc::SYS_getuid),
    ("syslog", libc::SYS_syslog),
    ("getgid", libc::SYS_getgid),
    ("setuid", libc::SYS_setuid),
    ("setgid", libc::SYS_setgid),
    ("geteuid", libc::SYS_geteuid),
    ("getegid", libc::SYS_getegid),
    ("setpgid", libc::SYS_setpgid),
    ("getppid", libc::SYS_getppid),
    ("getpgrp", libc::SYS_getpgrp),
    ("setsid", libc::SYS_setsid),
    ("setreuid", libc::SYS_setreuid),
    ("setregid", libc::SYS_setregid),
    ("getgroups", libc::SYS_getgroups),
    ("setgroups", libc::SYS_setgroups),
    ("setresuid", libc::SYS_setresuid),
    ("getresuid", libc::SYS_getresuid),
    ("setresgid", libc::SYS_setresgid),
    ("getresgid", libc::SYS_getresgid),
    ("getpgid", libc::SYS_getpgid),
    ("setfsuid", libc::SYS_setfsuid),
    ("setfsgid", libc::SYS_setfsgid),
    ("getsid", libc::SYS_getsid),
    ("capget", libc::SYS_capget),
    ("capset", libc::SYS_capset),
    ("rt_sigpending", libc::SYS_rt_sigpending),
    ("rt_sigtimedwait", libc::SYS_rt_sigtimedwait),
    ("rt_sigqueueinfo", libc::SYS_rt_sigqueueinfo),
    ("rt_sigsuspend", libc::SYS_rt_sigsuspend),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("utime", libc::SYS_utime),
    ("mknod", libc::SYS_mknod),
    ("uselib", libc::SYS_uselib),
    ("personality", libc::SYS_personality),
    ("ustat", libc::SYS_ustat),
    ("statfs", libc::SYS_statfs),
    ("fstatfs", libc::SYS_fstatfs),
    ("sysfs", libc::SYS_sysfs),
    ("getpriority", libc::SYS_getpriority),
    ("setpriority", libc::SYS_setpriority),
    ("sched_setparam", libc::SYS_sched_setparam),
    ("sched_getparam", libc::SYS_sched_getparam),
    ("sched_setscheduler", libc::SYS_sched_setscheduler),
    ("sched_getscheduler", libc::SYS_sched_getscheduler),
    ("sched_get_priority_max", libc::SYS_sched_get_priority_max),
    ("sched_get_priority_min", libc::SYS_sched_get_priority_min),
    ("sched_rr_get_interval", libc::SYS_sched_rr_get_interval),
    ("mlock", libc::SYS_mlock),
    ("munlock", libc::SYS_munlock),
    ("mlockall", libc::SYS_mlockall),
    ("munlockall", libc::SYS_munlockall),
    ("vhangup", libc::SYS_vhangup),
    ("modify_ldt", libc::SYS_modify_ldt),
    ("pivot_root", libc::SYS_pivot_root),
    ("prctl", libc::SYS_prctl),
    ("arch_prctl", libc::SYS_arch_prctl),
    ("adjtimex", libc::SYS_adjtimex),
    ("setrlimit", libc::SYS_setrlimit),
    ("chroot", libc::SYS_chroot),
    ("sync", libc::SYS_sync),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("sethostname", libc::SYS_sethostname),
    ("setdomainname", libc::SYS_setdomainname),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("init_module", libc::SYS_init_module),
    ("delete_module", libc::SYS_delete_module),
    ("quotactl", libc::SYS_quotactl),
    ("gettid", libc::SYS_gettid),
    ("readahead", libc::SYS_readahead),
    ("setxattr", libc::SYS_setxattr),
    ("lsetxattr", libc::SYS_lsetxattr),
    ("fsetxattr", libc::SYS_fsetxattr),
    ("getxattr", libc::SYS_getxattr),
    ("lgetxattr", libc::SYS_lgetxattr),
    ("fgetxattr", libc::SYS_fgetxattr),
    ("listxattr", libc::SYS_listxattr),
    ("llistxattr", libc::SYS_llistxattr),
    ("flistxattr", libc::SYS_flistxattr),
    ("removexattr", libc::SYS_removexattr),
    ("lremovexattr", libc::SYS_lremovexattr),
    ("fremovexattr", libc::SYS_fremovexattr),
    ("tkill", libc::SYS_tkill),
    ("time", libc::SYS_time),
    ("futex", libc::SYS_futex),
    ("sched_setaffinity", libc::SYS_sched_setaffinity),
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("epoll_create", libc::SYS_epoll_create),
    ("remap_file_pages", libc::SYS_remap_file_pages),
    ("getdents64", libc::SYS_getdents64),
    ("set_tid_address", libc::SYS_set_tid_address),
    ("restart_syscall", libc::SYS_restart_syscall),
    ("semtimedop", libc::SYS_semtimedop),
    ("fadvise64", libc::SYS_fadvise64),
    ("timer_create", libc::SYS_timer_create),
    ("timer_settime", libc::SYS_timer_settime),
    ("timer_gettime", libc::SYS_timer_gettime),
    ("timer_getoverrun", libc::SYS_timer_getoverrun),
    ("timer_delete", libc::SYS_timer_delete),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("clock_getres", libc::SYS_clock_getres),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("exit_group", libc::SYS_exit_group),
    ("epoll_wait", libc::SYS_epoll_wait),
    ("epoll_ctl", libc::SYS_epoll_ctl),
    ("tgkill", libc::SYS_tgkill),
    ("utimes", libc::SYS_utimes),
    ("mbind", libc::SYS_mbind),
    ("set_mempolicy", libc::SYS_set_mempolicy),
    ("get_mempolicy", libc::SYS_get_mempolicy),
    ("mq_open", libc::SYS_mq_open),
    ("mq_unlink", libc::SYS_mq_unlink),
    ("mq_timedsend", libc::SYS_mq_timedsend),
    ("mq_timedreceive", libc::SYS_mq_timedreceive),
    ("mq_notify", libc::SYS_mq_notify),
    ("mq_getsetattr", libc::SYS_mq_getsetattr),
    ("kexec_load", libc::SYS_kexec_load),
    ("waitid", libc::SYS_waitid),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("keyctl", libc::SYS_keyctl),
    ("ioprio_set", libc::SYS_ioprio_set),
    ("ioprio_get", libc::SYS_ioprio_get),
    ("inotify_init", libc::SYS_inotify_init),
    ("inotify_add_watch", libc::SYS_inotify_add_watch),
    ("inotify_rm_watch", libc::SYS_inotify_rm_watch),
    ("migrate_pages", libc::SYS_migrate_pages),
    ("openat", libc::SYS_openat),
    ("mkdirat", libc::SYS_mkdirat),
    ("mknodat", libc::SYS_mknodat),
    ("fchownat", libc::SYS_fchownat),
    ("futimesat", libc::SYS_futimesat),
    ("newfstatat", libc::SYS_newfstatat),
    ("unlinkat", libc::SYS_unlinkat),
    ("renameat", libc::SYS_renameat),
    ("linkat", libc::SYS_linkat),
    ("symlinkat", libc::SYS_symlinkat),
    ("readlinkat", libc::SYS_readlinkat),
    ("fchmodat", libc::SYS_fchmodat),
    ("faccessat", libc::SYS_faccessat),
    ("pselect6", libc::SYS_pselect6),
    ("ppoll", libc::SYS_ppoll),
    ("unshare", libc::SYS_unshare),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("get_robust_list", libc::SYS_get_robust_list),
    ("splice", libc::SYS_splice),
    ("tee", libc::SYS_tee),
    ("sync_file_range", libc::SYS_sync_file_range),
    ("vmsplice", libc::SYS_vmsplice),
    ("move_pages", libc::SYS_move_pages),
    ("utimensat", libc::SYS_utimensat),
    ("epoll_pwait", libc::SYS_epoll_pwait),
    ("signalfd", libc::SYS_signalfd),
    ("timerfd_create", libc::SYS_timerfd_create),
    ("eventfd", libc::SYS_eventfd),
    ("fallocate", libc::SYS_fallocate),
    ("timerfd_settime", libc::SYS_timerfd_settime),
    ("timerfd_gettime", libc::SYS_timerfd_gettime),
    ("accept4", libc::SYS_accept4),
    ("signalfd4", libc::SYS_signalfd4),
    ("eventfd2", libc::SYS_eventfd2),
    ("epoll_create1", libc::SYS_epoll_create1),
    ("dup3", libc::SYS_dup3),
    ("pipe2", libc::SYS_pipe2),
    ("inotify_init1", libc::SYS_inotify_init1),
    ("preadv", libc::SYS_preadv),
    ("pwritev", libc::SYS_pwritev),
    ("rt_tgsigqueueinfo", libc::SYS_rt_tgsigqueueinfo),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("recvmmsg", libc::SYS_recvmmsg),
    ("fanotify_init", libc::SYS_fanotify_init),
    ("fanotify_mark", libc::SYS_fanotify_mark),
    ("prlimit64", libc::SYS_prlimit64),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("syncfs", libc::SYS_syncfs),
    ("sendmmsg", libc::SYS_sendmmsg),
    ("setns", libc::SYS_setns),
    ("getcpu", libc::SYS_getcpu),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kcmp", libc::SYS_kcmp),
    ("finit_module", libc::SYS_finit_module),
    ("sched_setattr", libc::SYS_sched_setattr),
    ("sched_getattr", libc::SYS_sched_getattr),
    ("renameat2", libc::SYS_renameat2),
    ("seccomp", libc::SYS_seccomp),
    ("getrandom", libc::SYS_getrandom),
    ("memfd_create", libc::SYS_memfd_create),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("bpf", libc::SYS_bpf),
    ("execveat", libc::SYS_execveat),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("membarrier", libc::SYS_membarrier),
    ("mlock2", libc::SYS_mlock2),
    ("copy_file_range", libc::SYS_copy_file_range),
    ("preadv2", libc::SYS_preadv2),
    ("pwritev2", libc::SYS_pwritev2),
    ("pkey_mprotect", libc::SYS_pkey_mprotect),
    ("pkey_alloc", libc::SYS_pkey_alloc),
    ("pkey_free", libc::SYS_pkey_free),
    ("statx", libc::SYS_statx),
    ("rseq", libc::SYS_rseq),
    ("pidfd_send_signal", libc::SYS_pidfd_send_signal),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("open_tree", libc::SYS_open_tree),
    ("move_mount", libc::SYS_move_mount),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("pidfd_open", libc::SYS_pidfd_open),
    ("clone3", libc::SYS_clone3),
    ("close_range", libc::SYS_close_range),
    ("openat2", libc::SYS_openat2),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("faccessat2", libc::SYS_faccessat2),
    ("process_madvise", libc::SYS_process_madvise),
    ("epoll_pwait2", libc::SYS_epoll_pwait2),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    ("landlock_create_ruleset", libc::SYS_landlock_create_ruleset),
    ("landlock_add_rule", libc::SYS_landlock_add_rule),
    ("landlock_restrict_self", libc::SYS_landlock_restrict_self),
    ("memfd_secret", libc::SYS_memfd_secret),
    ("process_mrelease", libc::SYS_process_mrelease),
    ("futex_waitv", libc::SYS_futex_waitv),
    ("set_mempolicy_home_node", libc::SYS_set_mempolicy_home_node),
    ("io_setup", libc::SYS_io_setup),
    ("io_destroy", libc::SYS_io_destroy),
    ("io_getevents", libc::SYS_io_getevents),
    ("io_submit", libc::SYS_io_submit),
    ("io_cancel", libc::SYS_io_cancel),
];
