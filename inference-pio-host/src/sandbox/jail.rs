//! The worker's jail: new user, PID, mount, IPC, UTS and network namespaces; a filesystem
//! view of bind mounts on a read-only tmpfs, entered with `pivot_root`; an unprivileged uid
//! and gid; no capabilities in any set; `no_new_privs`.
//!
//! The process tree (all in the worker's own process group, so the host's kill reaches all):
//! - the *relay*: the process the host started. It stays outside the namespaces (it must, to
//!   write the child's uid/gid maps as the host's user), runs no plugin code, and when the
//!   worker ends it ends the same way (same exit code, or the same signal raised on itself),
//!   so the host reads the worker's fate from its own child;
//! - the *reaper*: pid 1 of the new PID namespace (cloned with every namespace at once). It
//!   builds the filesystem view, drops its privileges, starts the worker, reaps orphans and
//!   reports the worker's wait status to the relay. As a namespace's init it ignores every
//!   signal sent from inside, and the kernel kills everything in the namespace when it ends;
//! - the *worker*: pid 2, the only process that opens the plugin.
//!
//! Modes, tried in order: a user namespace whose only mapped ids are the worker's (the ids
//! are `worker_uid`/`worker_gid` when the host is root, else the host's own); where that is
//! refused and the host is root, the same namespaces without a user namespace, dropping from
//! root with setresuid; where neither works, none (each mechanism reported missing, so the
//! level is refused unless degrading is allowed).
//!
//! References: user_namespaces(7), pid_namespaces(7), mount_namespaces(7), pivot_root(2),
//! capabilities(7), mount_setattr(2); bubblewrap's `bwrap.c` (setup_newroot, drop_privs);
//! Firecracker's jailer (the order of the steps).

use super::{Mechanism, SandboxSpec, errno_text};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The jail's settings, part of the worker's setup.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JailSpec {
    /// An empty directory the host made; the new root's tmpfs is mounted on it (in the
    /// worker's mount namespace only).
    pub root_dir: PathBuf,
    /// The ids the worker runs as when the host is root (never 0).
    pub uid: u32,
    pub gid: u32,
    /// Try a user namespace first (the default); `false`: only the root host's setresuid mode.
    pub user_namespace: bool,
}

/// The hostname inside the UTS namespace.
const HOSTNAME: &str = "inference-pio-worker";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// New user namespace (and the others inside it).
    UserNamespace,
    /// The host is root and user namespaces are refused: the other namespaces as root, then
    /// setresuid to the worker's ids.
    RootSetuid,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    ReadOnly,
    ReadWrite,
    Device,
}

/// One path of the view: bound from the host at the same path.
struct Bind {
    path: PathBuf,
    kind: Kind,
}

/// What the view holds: bind mounts (at canonical paths) and the symbolic links that lead
/// to them from the paths as the host named them (`/usr/local/cuda` →
/// `/etc/alternatives/cuda` → `/usr/local/cuda-13.0`), recreated where no bind covers them.
struct View {
    binds: Vec<Bind>,
    links: Vec<(PathBuf, PathBuf)>,
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("path {} contains a NUL byte", path.display()))
}

fn check(rc: libc::c_int, what: impl FnOnce() -> String) -> Result<(), String> {
    if rc == 0 { Ok(()) } else { Err(format!("{}: {}", what(), errno_text())) }
}

/// Enters the jail. Returns only in the worker process; the relay and the reaper never
/// return (they exit as the worker did). On a machine where no namespace can be made the
/// calling process stays the worker, with the mechanisms reported missing.
pub(super) fn enter(spec: &SandboxSpec, jail: &JailSpec, report: &mut Vec<Mechanism>) -> Result<(), String> {
    // SAFETY: geteuid/getegid have no preconditions.
    let (host_uid, host_gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let root = host_uid == 0;
    let (uid, gid) = if root { (jail.uid, jail.gid) } else { (host_uid, host_gid) };
    if uid == 0 || gid == 0 {
        return Err("the worker's uid and gid must not be 0".into());
    }
    let view = view_plan(spec);
    let modes: &[Mode] = match (root, jail.user_namespace) {
        (true, true) => &[Mode::UserNamespace, Mode::RootSetuid],
        (true, false) => &[Mode::RootSetuid],
        (false, true) => &[Mode::UserNamespace],
        (false, false) => &[],
    };
    let mut refusals = Vec::new();
    if !jail.user_namespace {
        refusals.push("user_namespace = false in the config".to_string());
    }
    for &mode in modes {
        match attempt(mode, uid, gid, root, jail, &view, report) {
            Ok(()) => {
                if mode == Mode::RootSetuid {
                    report.push(Mechanism {
                        name: "user namespace".into(),
                        active: false,
                        detail: format!("not available ({}); the host is root, so the worker drops to uid {uid} with setresuid instead", refusals.join("; ")),
                        required: false,
                    });
                }
                return Ok(());
            }
            Err(why) => refusals.push(why),
        }
    }
    // No namespaces at all: stay in this process.
    let why = refusals.join("; ");
    report.push(Mechanism::missing("user namespace", format!("no namespaces could be made: {why}")));
    for name in ["pid namespace", "mount namespace", "ipc namespace", "uts namespace"] {
        report.push(Mechanism::missing(name, format!("not made: {why}")));
    }
    report.push(super::network_namespace());
    if root {
        set_ids(uid, gid, true)?;
    }
    drop_capabilities()?;
    report.extend(identity_report(uid, gid));
    Ok(())
}

/// What the reaper tells the relay first: the jail is ready, or why it could not be made.
const READY: u8 = b'R';
const FAILED: u8 = b'F';

/// One try at `mode`. `Ok` in the worker; `Err` (in the relay) when the jail could not be
/// made this way; the relay and the reaper of a jail that was made never return.
fn attempt(mode: Mode, uid: u32, gid: u32, root: bool, jail: &JailSpec, view: &View, report: &mut Vec<Mechanism>) -> Result<(), String> {
    let mut flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET;
    if mode == Mode::UserNamespace {
        flags |= libc::CLONE_NEWUSER;
    }
    let (go_read, mut go_write) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    let (mut status_read, status_write) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: raw clone without CLONE_VM and without a new stack behaves as fork(2): the
    // child gets a copy of this process, which is still single-threaded (the worker starts
    // no thread before its sandbox is in place), and returns 0 here.
    let pid = unsafe { libc::syscall(libc::SYS_clone, (flags | libc::SIGCHLD) as libc::c_ulong, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        return Err(format!("clone({}): {}", flag_names(flags), errno_text()));
    }
    if pid == 0 {
        drop(go_write);
        drop(status_read);
        let mut status = std::fs::File::from(OwnedFd::from(status_write));
        if let Err(why) = reaper_setup(mode, uid, gid, root, jail, view, go_read, report) {
            // Before the worker exists: tell the relay, which tries the next mode or reports.
            let mut message = vec![FAILED];
            message.extend_from_slice(why.as_bytes());
            let _ = status.write_all(&message);
            // SAFETY: _exit ends this process at once.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: this process is single-threaded; the child runs on with a copy of it.
        let worker = unsafe { libc::fork() };
        if worker < 0 {
            let _ = status.write_all(format!("{}fork of the worker: {}", FAILED as char, errno_text()).as_bytes());
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        if worker > 0 {
            reap(worker, status)
        }
        drop(status);
        worker_setup(report)
    } else {
        let child = pid as libc::pid_t;
        drop(go_read);
        drop(status_write);
        if mode == Mode::UserNamespace
            && let Err(why) = write_id_maps(child, uid, gid, root)
        {
            // SAFETY: our own child; kill and waitpid take plain integers.
            unsafe {
                libc::kill(child, libc::SIGKILL);
                libc::waitpid(child, std::ptr::null_mut(), 0);
            }
            return Err(why);
        }
        if go_write.write_all(&[1]).is_err() {
            // SAFETY: as above.
            unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
            return Err("the jail's init process ended before it started".into());
        }
        let mut first = [0u8; 1];
        let ready = status_read.read_exact(&mut first).is_ok() && first[0] == READY;
        if !ready {
            let mut why = String::new();
            let _ = status_read.read_to_string(&mut why);
            // SAFETY: as above.
            unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
            return Err(if why.is_empty() { format!("{mode:?}: the jail's init process ended without a word") } else { why });
        }
        relay(child, status_read, go_write)
    }
}

/// The relay: wait for the reaper, then end as the worker ended.
fn relay(reaper: libc::pid_t, mut status: std::io::PipeReader, keep_alive: std::io::PipeWriter) -> ! {
    // The worker holds the protocol socket; this process must not keep it open (the host
    // reads the worker's end of the connection as its death).
    // SAFETY: closing our own descriptor 0; nothing here uses it again.
    unsafe { libc::close(0) };
    let mut raw = [0u8; 4];
    let reported = status.read_exact(&mut raw).is_ok();
    let mut reaper_status = 0;
    loop {
        // SAFETY: waiting for our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(reaper, &mut reaper_status, 0) };
        if r == reaper || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    drop(keep_alive);
    end_as(if reported { i32::from_le_bytes(raw) } else { reaper_status })
}

/// Ends this process as a process with wait status `status` ended: the same exit code, or
/// the same signal (default action, raised on itself).
fn end_as(status: i32) -> ! {
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        // SAFETY: restoring the default action and unblocking the signal, then raising it;
        // no memory is passed. Core dumps are off (RLIMIT_CORE 0).
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), signal);
            libc::_exit(128 + signal)
        }
    }
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 70 };
    // SAFETY: _exit ends the process.
    unsafe { libc::_exit(code) }
}

/// The jail's init process, before the worker exists: wait for the relay, build the view,
/// drop privileges. Reports what it put in force.
#[allow(clippy::too_many_arguments)]
fn reaper_setup(mode: Mode, uid: u32, gid: u32, root: bool, jail: &JailSpec, view: &View, mut go: std::io::PipeReader, report: &mut Vec<Mechanism>) -> Result<(), String> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) }, || "prctl(PR_SET_PDEATHSIG)".into())?;
    let mut byte = [0u8; 1];
    go.read_exact(&mut byte).map_err(|e| format!("the relay did not start the jail: {e}"))?;
    // The relay keeps its end open for its whole life: a hang-up now means it died before
    // the death signal was armed.
    let mut poll = libc::pollfd { fd: go.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    if unsafe { libc::poll(&mut poll, 1, 0) } > 0 && poll.revents & libc::POLLHUP != 0 {
        // SAFETY: _exit ends this process.
        unsafe { libc::_exit(0) };
    }
    drop(go);

    // Sources are opened while this process still has the host's ids (a model under
    // /root is reachable), then bound through /proc/self/fd after the switch.
    let sources = open_sources(&view.binds)?;
    set_ids(uid, gid, root)?;
    let view = build_view(&jail.root_dir, view, &sources)?;
    drop(sources);
    let name = HOSTNAME.as_bytes();
    // SAFETY: the pointer and length describe `name`.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }, || "sethostname".into())?;
    drop_capabilities()?;

    report.push(match mode {
        Mode::UserNamespace => Mechanism::active(
            "user namespace",
            format!("own user namespace mapping only uid {uid} and gid {gid}: capabilities held there reach nothing outside"),
        ),
        Mode::RootSetuid => Mechanism::active("setuid", format!("the host is root: dropped to uid {uid}, gid {gid} with setresuid/setresgid")),
    });
    report.push(Mechanism::active("mount namespace", view));
    report.push(Mechanism::active("ipc namespace", "own System V IPC and POSIX message queues"));
    report.push(Mechanism::active("uts namespace", format!("own hostname `{HOSTNAME}`")));
    report.push(Mechanism::active("network namespace", "own empty network namespace: no interface is up"));
    report.extend(identity_report(uid, gid));
    Ok(())
}

/// The worker, just forked by the reaper.
fn worker_setup(report: &mut Vec<Mechanism>) -> Result<(), String> {
    // SAFETY: prctl with integer arguments. The worker's own /proc files must stay its own
    // (the CUDA driver writes its threads' names there): the id change made it
    // non-dumpable, which gives them to root. Core dumps stay off (RLIMIT_CORE 0).
    unsafe {
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0), || "prctl(PR_SET_PDEATHSIG)".into())?;
        check(libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0), || "prctl(PR_SET_DUMPABLE)".into())?;
    }
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    report.push(Mechanism::active(
        "pid namespace",
        format!("own PID namespace: the worker is pid {pid} there, its reaper pid 1; no process outside can be seen or signalled"),
    ));
    Ok(())
}

/// The reaper once the worker runs: tell the relay, keep only the status pipe, reap every
/// child, and when the worker ends report its wait status and end (the kernel then ends
/// whatever is left in the namespace).
fn reap(worker: libc::pid_t, mut status: std::fs::File) -> ! {
    let _ = status.write_all(&[READY]);
    // The protocol socket and the output pipes belong to the worker: their hang-up is how
    // the host sees it end.
    // SAFETY: closing our own descriptors.
    unsafe {
        for fd in 0..3 {
            libc::close(fd);
        }
    }
    close_other_descriptors(&[status.as_raw_fd()]);
    loop {
        let mut wstatus = 0;
        // SAFETY: reaping any child of ours with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut wstatus, 0) };
        if pid == worker {
            let _ = status.write_all(&wstatus.to_le_bytes());
            // SAFETY: _exit ends the reaper.
            unsafe { libc::_exit(0) };
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
    }
}

/// Closes every descriptor from 3 up except those in `keep`.
pub(super) fn close_other_descriptors(keep: &[i32]) {
    let mut keep: Vec<u32> = keep.iter().filter(|&&fd| fd >= 3).map(|&fd| fd as u32).collect();
    keep.sort_unstable();
    let mut from = 3u32;
    for fd in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if fd > from {
            // SAFETY: close_range takes integers; closing descriptors we own.
            unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32) };
        }
        from = fd.saturating_add(1);
    }
}

fn flag_names(flags: libc::c_int) -> String {
    let names = [
        (libc::CLONE_NEWUSER, "NEWUSER"),
        (libc::CLONE_NEWPID, "NEWPID"),
        (libc::CLONE_NEWNS, "NEWNS"),
        (libc::CLONE_NEWIPC, "NEWIPC"),
        (libc::CLONE_NEWUTS, "NEWUTS"),
        (libc::CLONE_NEWNET, "NEWNET"),
    ];
    names.iter().filter(|(f, _)| flags & f != 0).map(|(_, n)| format!("CLONE_{n}")).collect::<Vec<_>>().join("|")
}

/// The relay writes the reaper's maps: only the worker's ids exist in its user namespace.
/// A root host may map any id (and leaves `setgroups` allowed, so the supplementary groups
/// can be cleared); any other host maps its own ids and must deny `setgroups` first.
fn write_id_maps(child: libc::pid_t, uid: u32, gid: u32, root: bool) -> Result<(), String> {
    let write = |file: &str, text: &str| std::fs::write(format!("/proc/{child}/{file}"), text).map_err(|e| format!("writing /proc/{child}/{file} ({}): {e}", text.trim()));
    if !root {
        write("setgroups", "deny")?;
    }
    write("uid_map", &format!("{uid} {uid} 1\n"))?;
    write("gid_map", &format!("{gid} {gid} 1\n"))
}

/// The view of the spec's paths: each bound at its canonical path (those under `/proc` left
/// out: a fresh procfs holds them; device nodes bound as devices), parents first, with the
/// symbolic links that lead there from the path as given.
fn view_plan(spec: &SandboxSpec) -> View {
    let mut binds: Vec<Bind> = Vec::new();
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut add = |path: &PathBuf, kind: Kind| {
        if path.starts_with("/proc") || !path.is_absolute() || std::fs::symlink_metadata(path).is_err() {
            return;
        }
        // Follow the chain of links from the path as named (at most 16, as the kernel).
        let mut at = path.clone();
        for _ in 0..16 {
            let Ok(target) = std::fs::read_link(&at) else { break };
            let next = if target.is_absolute() { target.clone() } else { at.parent().map(|p| p.canonicalize().unwrap_or_else(|_| p.to_path_buf()).join(&target)).unwrap_or(target.clone()) };
            if !links.iter().any(|(l, _)| *l == at) {
                links.push((at.clone(), target));
            }
            at = next;
        }
        let Ok(path) = path.canonicalize() else { return };
        let kind = if path.starts_with("/dev") { Kind::Device } else { kind };
        binds.retain(|b| b.path != path);
        binds.push(Bind { path, kind });
    };
    for p in &spec.read_only {
        add(p, Kind::ReadOnly);
    }
    for p in &spec.devices {
        add(p, Kind::Device);
    }
    for p in &spec.read_write {
        add(p, Kind::ReadWrite);
    }
    binds.sort_by(|a, b| a.path.components().count().cmp(&b.path.components().count()).then(a.path.cmp(&b.path)));
    // A path inside another of the same kind is already in the view.
    let mut kept: Vec<Bind> = Vec::new();
    for b in binds {
        if !kept.iter().any(|k| k.kind == b.kind && b.path.starts_with(&k.path)) {
            kept.push(b);
        }
    }
    View { binds: kept, links }
}

/// An open source of the view and whether it is a directory (both known before the ids
/// change, after which its path may be out of reach).
struct Source {
    fd: OwnedFd,
    is_dir: bool,
}

fn open_sources(binds: &[Bind]) -> Result<Vec<Source>, String> {
    binds
        .iter()
        .map(|b| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
                .open(&b.path)
                .map_err(|e| format!("cannot open {} for the worker's view: {e}", b.path.display()))?;
            let is_dir = file.metadata().map(|m| m.is_dir()).map_err(|e| format!("cannot stat {}: {e}", b.path.display()))?;
            Ok(Source { fd: OwnedFd::from(file), is_dir })
        })
        .collect()
}

use std::os::unix::fs::OpenOptionsExt;

/// `mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// Sets mount flags on `path` and (with `recursive`) the mounts beneath it.
fn set_mount_attrs(path: &Path, set: u64, clear: u64, recursive: bool) -> Result<(), String> {
    let c = c_path(path)?;
    let attr = MountAttr { attr_set: set, attr_clr: clear, propagation: 0, userns_fd: 0 };
    let flags = if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: `c` is a NUL-terminated path and `attr` a valid mount_attr of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_mount_setattr, libc::AT_FDCWD, c.as_ptr(), flags, &attr as *const MountAttr, std::mem::size_of::<MountAttr>()) };
    if rc == 0 {
        return Ok(());
    }
    if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
        return Err(format!("mount_setattr({}): {}", path.display(), errno_text()));
    }
    // Kernels before 5.12: remount the top mount, keeping the flags it has (a user namespace
    // may not clear a locked one).
    // SAFETY: `stat` is a valid, writable statvfs.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid path, `stat` writable.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut stat) }, || format!("statvfs({})", path.display()))?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT;
    for (st, ms) in [(libc::ST_NOSUID, libc::MS_NOSUID), (libc::ST_NODEV, libc::MS_NODEV), (libc::ST_NOEXEC, libc::MS_NOEXEC), (libc::ST_RDONLY, libc::MS_RDONLY)] {
        if stat.f_flag & st != 0 {
            flags |= ms;
        }
    }
    if set & MOUNT_ATTR_RDONLY != 0 {
        flags |= libc::MS_RDONLY;
    }
    if set & MOUNT_ATTR_NOSUID != 0 {
        flags |= libc::MS_NOSUID;
    }
    if set & MOUNT_ATTR_NODEV != 0 {
        flags |= libc::MS_NODEV;
    }
    // SAFETY: valid NUL-terminated target; no source, type or data.
    check(unsafe { libc::mount(std::ptr::null(), c.as_ptr(), std::ptr::null(), flags, std::ptr::null()) }, || format!("remount {}", path.display()))
}

fn mount(source: Option<&str>, target: &Path, fstype: Option<&str>, flags: libc::c_ulong, data: Option<&str>) -> Result<(), String> {
    let cs = source.map(CString::new).transpose().map_err(|e| e.to_string())?;
    let ct = c_path(target)?;
    let cf = fstype.map(CString::new).transpose().map_err(|e| e.to_string())?;
    let cd = data.map(CString::new).transpose().map_err(|e| e.to_string())?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mount(ptr(&cs), ct.as_ptr(), ptr(&cf), flags, ptr(&cd).cast()) };
    check(rc, || format!("mount {} on {} ({})", source.unwrap_or("-"), target.display(), fstype.unwrap_or("bind")))
}

/// Builds the view on a tmpfs at `root` and enters it with pivot_root. Returns what it
/// holds, in words.
fn build_view(root: &Path, view: &View, sources: &[Source]) -> Result<String, String> {
    let binds = &view.binds;
    // Nothing done here may reach the host's mount namespace.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    mount(Some("tmpfs"), root, Some("tmpfs"), libc::MS_NOSUID | libc::MS_NODEV, Some("mode=0755,size=1m"))?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    for (bind, source) in binds.iter().zip(sources) {
        let target = inside(&bind.path);
        if std::fs::symlink_metadata(&target).is_err() {
            let is_dir = source.is_dir;
            let parent = target.parent().unwrap_or(root);
            std::fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
            let made = if is_dir { std::fs::create_dir(&target) } else { std::fs::File::create(&target).map(drop) };
            made.map_err(|e| format!("cannot make the mount point {}: {e}", target.display()))?;
        }
        let from = format!("/proc/self/fd/{}", source.fd.as_raw_fd());
        mount(Some(&from), &target, None, libc::MS_BIND | libc::MS_REC, None).map_err(|e| format!("{e} (binding {})", bind.path.display()))?;
    }
    for kind in [Kind::ReadOnly, Kind::Device, Kind::ReadWrite] {
        for bind in binds.iter().filter(|b| b.kind == kind) {
            let (set, clear) = match kind {
                Kind::ReadOnly => (MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0),
                Kind::Device => (MOUNT_ATTR_NOSUID, 0),
                Kind::ReadWrite => (MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, MOUNT_ATTR_RDONLY),
            };
            set_mount_attrs(&inside(&bind.path), set, clear, kind == Kind::ReadOnly)?;
        }
    }
    // The links that lead to the binds, where no bind already holds them.
    for (link, target) in &view.links {
        let at = inside(link);
        if std::fs::symlink_metadata(&at).is_ok() {
            continue;
        }
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
        }
        std::os::unix::fs::symlink(target, &at).map_err(|e| format!("symlink {} -> {}: {e}", link.display(), target.display()))?;
    }
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev).map_err(|e| format!("mkdir {}: {e}", dev.display()))?;
    for (link, to) in [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")] {
        if std::fs::symlink_metadata(dev.join(link)).is_err() {
            std::os::unix::fs::symlink(to, dev.join(link)).map_err(|e| format!("symlink /dev/{link}: {e}"))?;
        }
    }
    let proc = root.join("proc");
    std::fs::create_dir_all(&proc).map_err(|e| format!("mkdir {}: {e}", proc.display()))?;
    mount(Some("proc"), &proc, Some("proc"), libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, None)
        .map_err(|e| format!("a fresh /proc for the PID namespace: {e}"))?;
    set_mount_attrs(root, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, false)?;

    let croot = c_path(root)?;
    // SAFETY: valid NUL-terminated paths; pivot_root(".", ".") stacks the old root on the
    // new one, and the detach below removes it from this namespace.
    unsafe {
        check(libc::chdir(croot.as_ptr()), || format!("chdir {}", root.display()))?;
        check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int, || "pivot_root".into())?;
        check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), || "detaching the old root".into())?;
        check(libc::chdir(c"/".as_ptr()), || "chdir /".into())?;
    }
    let show = |kind: Kind| binds.iter().filter(|b| b.kind == kind).map(|b| b.path.display().to_string()).collect::<Vec<_>>().join(", ");
    let links = view.links.iter().map(|(l, t)| format!("{} -> {}", l.display(), t.display())).collect::<Vec<_>>().join(", ");
    Ok(format!(
        "pivot_root into a read-only tmpfs holding only: read-only {}; read-write {}; devices {}; links {}; a fresh /proc of its PID namespace",
        show(Kind::ReadOnly),
        show(Kind::ReadWrite),
        show(Kind::Device),
        if links.is_empty() { "none".to_string() } else { links }
    ))
}

/// `__user_cap_header_struct` / `__user_cap_data_struct` of capget(2), version 3.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn capset(data: [CapData; 2]) -> Result<(), String> {
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    // SAFETY: a valid version-3 header and two data structs, as capset(2) requires.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) } as libc::c_int, || "capset".into())
}

fn capget() -> Result<[CapData; 2], String> {
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: a valid version-3 header and room for two data structs.
    check(unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut CapHeader, data.as_mut_ptr()) } as libc::c_int, || "capget".into())?;
    Ok(data)
}

/// Switches to `uid`/`gid` (clearing the supplementary groups where allowed) and keeps the
/// permitted capabilities effective for the mounts that follow; [`drop_capabilities`] ends
/// them.
fn set_ids(uid: u32, gid: u32, clear_groups: bool) -> Result<(), String> {
    // SAFETY: prctl, setgroups, setresgid and setresuid take integers (setgroups an empty
    // list, which needs no pointer).
    unsafe {
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0), || "prctl(PR_SET_KEEPCAPS)".into())?;
        if clear_groups {
            check(libc::setgroups(0, std::ptr::null()), || "setgroups([])".into())?;
        }
        check(libc::setresgid(gid, gid, gid), || format!("setresgid({gid})"))?;
        check(libc::setresuid(uid, uid, uid), || format!("setresuid({uid})"))?;
    }
    let mut caps = capget()?;
    for c in &mut caps {
        c.effective = c.permitted;
    }
    capset(caps)
}

/// Empties every capability set (bounding, ambient, inheritable, permitted, effective) and
/// sets `no_new_privs`.
fn drop_capabilities() -> Result<(), String> {
    let last: libc::c_ulong = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|t| t.trim().parse().ok()).unwrap_or(63);
    for cap in 0..=last {
        // SAFETY: prctl with integers. Fails (EPERM) without CAP_SETPCAP, e.g. for a host
        // that is not root and has no user namespace: the check below reports it.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    // SAFETY: prctl with integers.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0) };
    capset([CapData::default(); 2])?;
    // SAFETY: prctl with integers.
    unsafe {
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0), || "prctl(PR_SET_KEEPCAPS, 0)".into())?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), || "prctl(PR_SET_NO_NEW_PRIVS)".into())?;
    }
    Ok(())
}

/// The ids and capability sets as the kernel reports them in /proc/self/status.
fn identity_report(uid: u32, gid: u32) -> Vec<Mechanism> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string())).unwrap_or_default();
    let ids_of = |name: &str| field(name).split_whitespace().filter_map(|v| v.parse::<u32>().ok()).collect::<Vec<_>>();
    let (uids, gids) = (ids_of("Uid:"), ids_of("Gid:"));
    let groups = field("Groups:");
    let ids_ok = uids.len() == 4 && uids.iter().all(|&u| u == uid && u != 0) && gids.len() == 4 && gids.iter().all(|&g| g == gid && g != 0);
    let ids = format!("uid {uid}, gid {gid} (real, effective, saved and filesystem){}", if groups.is_empty() { String::new() } else { format!("; supplementary groups {groups}") });
    let sets: Vec<(&str, String)> = ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"].iter().map(|n| (*n, field(n))).collect();
    let caps_ok = sets.iter().all(|(_, v)| !v.is_empty() && v.chars().all(|c| c == '0'));
    let caps = sets.iter().map(|(n, v)| format!("{} {v}", n.trim_end_matches(':'))).collect::<Vec<_>>().join(", ");
    vec![
        if ids_ok { Mechanism::active("unprivileged uid", ids) } else { Mechanism::missing("unprivileged uid", format!("expected {ids}; the kernel reports Uid {uids:?}, Gid {gids:?}")) },
        if caps_ok {
            Mechanism::active("capabilities", format!("every set empty: {caps}; no_new_privs"))
        } else {
            Mechanism::missing("capabilities", format!("not every set could be emptied: {caps}"))
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(read_only: Vec<PathBuf>, read_write: Vec<PathBuf>) -> SandboxSpec {
        SandboxSpec {
            level: inference_pio_core::config::SecurityLevel::High,
            parent_pid: 0,
            read_only,
            read_write,
            devices: Vec::new(),
            cgroup_procs: Vec::new(),
            file_size_bytes: 0,
            open_files: 0,
            jail: None,
            seccomp: None,
        }
    }

    #[test]
    fn the_view_binds_canonical_paths_and_keeps_the_links_that_lead_there() {
        // /usr/local/cuda -> /etc/alternatives/cuda -> /usr/local/cuda-13.0, in small.
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().canonicalize().expect("canonical");
        let real = base.join("cuda-13.0");
        std::fs::create_dir_all(real.join("include")).expect("mkdir");
        std::fs::create_dir(base.join("alternatives")).expect("mkdir");
        std::os::unix::fs::symlink(&real, base.join("alternatives/cuda")).expect("link");
        std::os::unix::fs::symlink("alternatives/cuda", base.join("cuda")).expect("relative link");
        let scratch = base.join("scratch");
        std::fs::create_dir(&scratch).expect("mkdir");
        let view = view_plan(&spec(vec![base.join("cuda"), real.join("include"), PathBuf::from("/proc/self"), base.join("missing")], vec![scratch.clone()]));
        let binds: Vec<(&Path, Kind)> = view.binds.iter().map(|b| (b.path.as_path(), b.kind)).collect();
        // The include directory is inside the bound installation; /proc and missing paths are left out.
        assert_eq!(binds, vec![(real.as_path(), Kind::ReadOnly), (scratch.as_path(), Kind::ReadWrite)]);
        assert_eq!(
            view.links,
            vec![(base.join("cuda"), PathBuf::from("alternatives/cuda")), (base.join("alternatives/cuda"), real.clone())]
        );
    }
}
