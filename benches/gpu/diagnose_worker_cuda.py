#!/usr/bin/env python3
"""Finds which part of the worker sandbox makes cuInit fail (CUDA_ERROR_OPERATING_SYSTEM, 304).

Mirrors `apply`, `landlock_rules`, `system_read_only_paths` and `nvidia_devices` of
inference-pio-host/src/sandbox.rs (and the worker's environment from worker.rs: its own
scratch directory as TMPDIR and CUDA_CACHE_PATH): die with the parent (PR_SET_PDEATHSIG),
rlimits (core 0, 1024 open files, 8 GiB file size, SIGXFSZ ignored), its own network
namespace (CLONE_NEWNET, else CLONE_NEWUSER|CLONE_NEWNET), a landlock allowlist built with
raw syscalls the way the `landlock` crate builds it (handled rights of the kernel's ABI, at
most ABI 5; rules on non-directories masked to file rights; no_new_privs set right before
landlock_restrict_self), and PR_SET_NO_NEW_PRIVS. Seccomp (level `maximum`), the cgroup the
host moves the worker into, and the plugin and model paths of the read-only list are left out.

For each variant the parent (which never touches CUDA) forks a child that applies a subset of
the sandbox to itself, then loads libcuda.so.1 through ctypes and calls cuInit(0),
cuDeviceGetCount, cuDeviceGet, cuDevicePrimaryCtxRetain, cuCtxSetCurrent and a 1 MiB
cuMemAlloc, then tries to open a list of paths the driver may need (probes). The child sends
its report back over a pipe; the parent prints one line per variant and writes a JSON summary.
If strace is on PATH, the full sandbox (variant `all`) is also run in a fresh python process
under `strace -f -e trace=%file,ioctl,mmap`, and the calls that failed between applying the
sandbox and the probes are collected into the JSON (the full log is kept next to it).

Usage: python3 diagnose_worker_cuda.py [OUT_JSON]   (default ./diagnose_worker_cuda.json)
Stdlib only; x86_64 Linux (landlock syscall numbers 444-446).
"""
import ctypes
import errno
import json
import os
import platform
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback

CHILD_TIMEOUT_S = 60
STRACE_TIMEOUT_S = 180
MAX_STRACE_LINES = 200
RESULT_PREFIX = "DIAG_RESULT "
MARK_SANDBOX = "/diagnose-worker-cuda-marker-sandbox-begins"
MARK_CUDA = "/diagnose-worker-cuda-marker-cuda-begins"
MARK_PROBES = "/diagnose-worker-cuda-marker-probes-begin"

# sandbox.rs / worker.rs constants
OPEN_FILES = 1024
FILE_SIZE_BYTES = 8 << 30

# prctl(2), unshare(2)
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

# landlock(7), x86_64
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
FS = {
    "EXECUTE": 1 << 0, "WRITE_FILE": 1 << 1, "READ_FILE": 1 << 2, "READ_DIR": 1 << 3,
    "REMOVE_DIR": 1 << 4, "REMOVE_FILE": 1 << 5, "MAKE_CHAR": 1 << 6, "MAKE_DIR": 1 << 7,
    "MAKE_REG": 1 << 8, "MAKE_SOCK": 1 << 9, "MAKE_FIFO": 1 << 10, "MAKE_BLOCK": 1 << 11,
    "MAKE_SYM": 1 << 12, "REFER": 1 << 13, "TRUNCATE": 1 << 14, "IOCTL_DEV": 1 << 15,
}
ACCESS_FILE = FS["EXECUTE"] | FS["WRITE_FILE"] | FS["READ_FILE"] | FS["TRUNCATE"] | FS["IOCTL_DEV"]
ACCESS_READ = FS["EXECUTE"] | FS["READ_FILE"] | FS["READ_DIR"]          # AccessFs::from_read
ACCESS_DEVICE = FS["READ_FILE"] | FS["WRITE_FILE"] | FS["IOCTL_DEV"]    # landlock_rules' device_access
ACCESS_ALL = (1 << 16) - 1                                               # masked by the ABI below

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.unshare.argtypes = [ctypes.c_int]


class RulesetAttr(ctypes.Structure):
    # Only handled_access_fs: the kernel zero-fills the fields a shorter struct leaves out.
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def errno_name(code):
    return errno.errorcode.get(code, str(code))


def rights_text(mask):
    return "|".join(name for name, bit in FS.items() if mask & bit) or "0"


# ---------------------------------------------------------------- paths (sandbox.rs)

def system_read_only_paths():
    """`system_read_only_paths()`: the fixed list plus /usr/local/cuda*, missing ones skipped."""
    paths = [
        "/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d",
        "/sys/devices/system/cpu", "/sys/fs/cgroup", "/proc/self", "/proc/cpuinfo", "/proc/meminfo",
        "/dev/null", "/dev/zero", "/dev/urandom", "/opt/cuda", "/usr/local/cuda",
        "/proc/driver/nvidia", "/sys/bus/pci", "/sys/devices",
    ]
    try:
        paths += [os.path.join("/usr/local", n) for n in os.listdir("/usr/local") if n.startswith("cuda")]
    except OSError:
        pass
    return [p for p in paths if os.path.exists(p)]


def nvidia_devices():
    """`nvidia_devices()`: /dev/nvidia* (nodes and the nvidia-caps directory), sorted."""
    try:
        return sorted(os.path.join("/dev", n) for n in os.listdir("/dev") if n.startswith("nvidia"))
    except OSError:
        return []


# ---------------------------------------------------------------- variants

def landlock_config(base="system", ro=(), rw=(), dev=(), ioctl_dev=True):
    """base: 'system' (system_read_only_paths) or a list of read-only paths. ro / rw / dev: extra
    read-only, read-write (all rights) and device-right paths. ioctl_dev=False caps the handled
    rights at ABI 4 (no IOCTL_DEV)."""
    return {"base": base, "ro": list(ro), "rw": list(rw), "dev": list(dev), "ioctl_dev": ioctl_dev}


def variant(name, what, pdeathsig_rlimits=False, netns=None, landlock=None, nnp=False):
    return {"name": name, "what": what, "pdeathsig_rlimits": pdeathsig_rlimits, "netns": netns,
            "landlock": landlock, "nnp": nnp}


FULL = dict(pdeathsig_rlimits=True, netns="auto", nnp=True)
VARIANTS = [
    variant("none", "no sandbox (baseline)"),
    variant("pdeathsig+rlimits", "PR_SET_PDEATHSIG, SIGXFSZ ignored, rlimits", pdeathsig_rlimits=True),
    variant("netns", "unshare(CLONE_NEWNET), else CLONE_NEWUSER|CLONE_NEWNET", netns="auto"),
    variant("landlock", "landlock, sandbox.rs list (includes no_new_privs, as the crate does)",
            landlock=landlock_config()),
    variant("landlock+shm", "landlock + /dev/shm rw", landlock=landlock_config(rw=["/dev/shm"])),
    variant("landlock+proc", "landlock + /proc ro", landlock=landlock_config(ro=["/proc"])),
    variant("landlock+sys", "landlock + /sys ro", landlock=landlock_config(ro=["/sys"])),
    variant("landlock+wide", "landlock + /proc,/sys,/run ro + /dev/shm,/tmp rw + /dev read+device rights",
            landlock=landlock_config(ro=["/proc", "/sys", "/run"], rw=["/dev/shm", "/tmp"], dev=["/dev"])),
    variant("landlock-root-ro", "landlock: / ro, scratch rw, /dev/nvidia* device rights",
            landlock=landlock_config(base=["/"])),
    variant("all", "as sandbox.rs: pdeathsig, rlimits, netns, landlock, no_new_privs",
            landlock=landlock_config(), **FULL),
    variant("all-no-ioctl-dev", "as `all`, ruleset does not handle IOCTL_DEV (ABI 4 mask)",
            landlock=landlock_config(ioctl_dev=False), **FULL),
    variant("all+proc+sys+shm", "as `all` + /proc ro + /sys ro + /dev/shm rw",
            landlock=landlock_config(ro=["/proc", "/sys"], rw=["/dev/shm"]), **FULL),
    # Not in sandbox.rs's ladder: each of the two side effects above on its own.
    variant("userns+netns", "extra: unshare(CLONE_NEWUSER|CLONE_NEWNET) forced", netns="userns"),
    variant("no_new_privs", "extra: PR_SET_NO_NEW_PRIVS only", nnp=True),
    # The fix: the driver names its threads through /proc/self/task/TID/comm.
    variant("all+task-rw", "as `all` + /proc/self/task writable (thread names)",
            landlock=landlock_config(rw=["/proc/self/task"]), **FULL),
]
STRACE_VARIANT = "all"


# ---------------------------------------------------------------- mechanisms

class Setup:
    """Collects one record per step: {step, ok, errno, detail}."""

    def __init__(self):
        self.steps = []

    def record(self, step, ok, detail="", code=None):
        entry = {"step": step, "ok": ok, "detail": detail}
        if code is not None:
            entry["errno"] = errno_name(code)
            entry["detail"] = (detail + ": " if detail else "") + os.strerror(code)
        self.steps.append(entry)
        return ok

    @property
    def ok(self):
        return all(s["ok"] for s in self.steps)


def prctl(option, arg):
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        return ctypes.get_errno()
    return 0


def apply_pdeathsig_rlimits(setup, expected_parent):
    code = prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    setup.record("prctl(PR_SET_PDEATHSIG, SIGKILL)", code == 0, code=code or None)
    parent = os.getppid()
    if expected_parent is not None:
        setup.record("parent check", parent == expected_parent, f"parent {parent}, expected {expected_parent}")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    for resource_id, value, what in [(resource.RLIMIT_CORE, 0, "RLIMIT_CORE"),
                                     (resource.RLIMIT_NOFILE, OPEN_FILES, "RLIMIT_NOFILE"),
                                     (resource.RLIMIT_FSIZE, FILE_SIZE_BYTES, "RLIMIT_FSIZE")]:
        try:
            _, hard = resource.getrlimit(resource_id)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(resource_id, (value, value))
            setup.record(f"setrlimit({what})", True, str(value))
        except OSError as e:
            setup.record(f"setrlimit({what})", False, str(value), code=e.errno)


def apply_netns(setup, mode):
    if mode == "auto":
        if libc.unshare(CLONE_NEWNET) == 0:
            return setup.record("unshare(CLONE_NEWNET)", True, "own network namespace")
        first = ctypes.get_errno()
        setup.record("unshare(CLONE_NEWNET)", True, f"failed with {errno_name(first)}; falling back to CLONE_NEWUSER")
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return setup.record("unshare(CLONE_NEWUSER|CLONE_NEWNET)", True, f"uid now {os.getuid()}")
    # sandbox.rs reports the network namespace missing (not an error) when both fail.
    return setup.record("unshare(CLONE_NEWUSER|CLONE_NEWNET)", False, "network namespace missing",
                        code=ctypes.get_errno())


def landlock_abi():
    """The kernel's landlock ABI version, or (None, errno name) when landlock is unavailable."""
    abi = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                       ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if abi < 0:
        return None, errno_name(ctypes.get_errno())
    return int(abi), None


def handled_mask(abi, ioctl_dev=True):
    """AccessFs::from_all(ABI::V5) downgraded to the kernel's ABI, as the crate does (best effort)."""
    mask = (1 << 13) - 1                  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        mask |= FS["REFER"]
    if abi >= 3:
        mask |= FS["TRUNCATE"]
    if abi >= 5 and ioctl_dev:
        mask |= FS["IOCTL_DEV"]
    return mask


def apply_landlock(setup, config, scratch, report):
    abi, why = landlock_abi()
    report["abi"] = abi
    if abi is None:
        report["enforced"], report["unavailable"] = False, why
        return setup.record("landlock", True, f"not available in this kernel ({why}): not enforced")
    handled = handled_mask(abi, config["ioctl_dev"])
    report["handled"] = rights_text(handled)
    base = system_read_only_paths() if config["base"] == "system" else config["base"]
    groups = [(base + config["ro"], ACCESS_READ), ([scratch] + config["rw"], ACCESS_ALL),
              (nvidia_devices(), ACCESS_DEVICE),
              (config["dev"], ACCESS_DEVICE | FS["READ_DIR"])]

    attr = RulesetAttr(handled)
    ruleset = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                           ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        report["enforced"] = False
        return setup.record("landlock_create_ruleset", False, f"handled {rights_text(handled)}",
                            code=ctypes.get_errno())
    setup.record("landlock_create_ruleset", True, f"ABI {abi}, handled {rights_text(handled)}")
    rules, failed = [], []
    for paths, access in groups:
        for path in paths:
            if not os.path.exists(path):
                continue
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError as e:
                failed.append({"path": path, "open": errno_name(e.errno)})
                continue
            try:
                allowed = access & handled
                if not stat.S_ISDIR(os.fstat(fd).st_mode):   # as path_beneath_rules: file rights only
                    allowed &= ACCESS_FILE
                rule = PathBeneathAttr(allowed, fd)
                rc = libc.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                                  ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                                  ctypes.c_uint32(0))
                entry = {"path": path, "access": rights_text(allowed)}
                if rc != 0:
                    entry["errno"] = errno_name(ctypes.get_errno())
                    failed.append(entry)
                rules.append(entry)
            finally:
                os.close(fd)
    report["rules"] = rules
    setup.record("landlock_add_rule", not failed,
                 f"{len(rules)} rules" + (f"; failed: {failed}" if failed else ""))
    # The crate sets no_new_privs inside restrict_self(), before the syscall.
    code = prctl(PR_SET_NO_NEW_PRIVS, 1)
    setup.record("prctl(PR_SET_NO_NEW_PRIVS) [landlock crate]", code == 0, code=code or None)
    rc = libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0))
    code = ctypes.get_errno() if rc != 0 else None
    os.close(ruleset)
    report["enforced"] = rc == 0
    return setup.record("landlock_restrict_self", rc == 0, code=code)


def apply_variant(v, scratch, expected_parent):
    """Applies the variant's mechanisms in sandbox.rs's order; returns (setup steps, landlock report)."""
    setup, landlock = Setup(), {}
    if v["pdeathsig_rlimits"]:
        apply_pdeathsig_rlimits(setup, expected_parent)
    if v["netns"]:
        apply_netns(setup, v["netns"])
    if v["landlock"]:
        apply_landlock(setup, v["landlock"], scratch, landlock)
    if v["nnp"]:
        code = prctl(PR_SET_NO_NEW_PRIVS, 1)
        setup.record("prctl(PR_SET_NO_NEW_PRIVS)", code == 0, code=code or None)
    return setup, landlock


# ---------------------------------------------------------------- CUDA

def run_cuda():
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return {"loadable": False, "error": f"libcuda not loadable: {e}", "calls": []}
    out = {"loadable": True, "calls": [], "libraries": mapped_nvidia_libraries()}

    def name_of(rc):
        text = ctypes.c_char_p()
        if cuda.cuGetErrorName(rc, ctypes.byref(text)) == 0 and text.value:
            return text.value.decode()
        return "?"

    def call(label, fn, *args):
        rc = fn(*args)
        entry = {"call": label, "rc": rc, "name": name_of(rc)}
        msg = ctypes.c_char_p()
        if rc != 0 and cuda.cuGetErrorString(rc, ctypes.byref(msg)) == 0 and msg.value:
            entry["text"] = msg.value.decode()
        out["calls"].append(entry)
        return rc == 0

    def sym(*names):
        for n in names:
            if hasattr(cuda, n):
                return getattr(cuda, n)
        raise AttributeError(names[0])

    version, count, device = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    ctx, ptr = ctypes.c_void_p(), ctypes.c_uint64()
    call("cuDriverGetVersion", cuda.cuDriverGetVersion, ctypes.byref(version))
    out["driver_version"] = version.value
    if not call("cuInit(0)", cuda.cuInit, ctypes.c_uint(0)):
        return out
    if not call("cuDeviceGetCount", cuda.cuDeviceGetCount, ctypes.byref(count)):
        return out
    out["device_count"] = count.value
    if count.value < 1 or not call("cuDeviceGet(0)", cuda.cuDeviceGet, ctypes.byref(device), 0):
        return out
    if not call("cuDevicePrimaryCtxRetain", sym("cuDevicePrimaryCtxRetain"), ctypes.byref(ctx), device):
        return out
    if call("cuCtxSetCurrent", cuda.cuCtxSetCurrent, ctx):
        if call("cuMemAlloc(1 MiB)", sym("cuMemAlloc_v2", "cuMemAlloc"), ctypes.byref(ptr), ctypes.c_size_t(1 << 20)):
            call("cuMemFree", sym("cuMemFree_v2", "cuMemFree"), ptr)
    call("cuDevicePrimaryCtxRelease", sym("cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxRelease"), device)
    return out


def mapped_nvidia_libraries():
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line and ("cuda" in line or "nvidia" in line)}
        return sorted(paths)
    except OSError as e:
        return [f"/proc/self/maps: {errno_name(e.errno)}"]


# Paths the driver may need that the sandbox.rs list does not (or may not) cover.
PROBES = [
    ("/proc/devices", "r"), ("/proc/modules", "r"), ("/proc/driver/nvidia/params", "r"),
    ("/proc/driver/nvidia/version", "r"), ("/proc/driver/nvidia/capabilities", "dir"),
    ("/proc/self/maps", "r"), ("/proc/self/status", "r"), ("/proc/self/mountinfo", "r"),
    ("/proc/self/fd", "dir"), ("/proc/thread-self/comm", "r"), ("/proc/stat", "r"),
    ("/proc/filesystems", "r"), ("/proc/mounts", "r"), ("/proc/sys/vm/overcommit_memory", "r"),
    ("/proc/sys/vm/max_map_count", "r"), ("/proc/sys/kernel/numa_balancing", "r"),
    ("/sys/module/nvidia/version", "r"), ("/sys/module/nvidia_uvm", "dir"),
    ("/sys/devices/system/node", "dir"), ("/sys/devices/system/memory/block_size_bytes", "r"),
    ("/sys/kernel/mm/transparent_hugepage/enabled", "r"), ("/sys/kernel/mm/hugepages", "dir"),
    ("/sys/fs/cgroup/cgroup.controllers", "r"), ("/dev/shm", "create"), ("/tmp", "create"),
    ("/dev/char", "dir"), ("/dev/nvidia-caps", "dir"), ("/run/nvidia-persistenced", "dir"),
    ("/etc/nsswitch.conf", "r"), ("/etc/passwd", "r"),
] + [(d, "rw") for d in nvidia_devices() if not os.path.isdir(d)]


def run_probes():
    results = {}
    for path, mode in PROBES:
        if mode == "create":
            target = os.path.join(path, f"diagnose-probe-{os.getpid()}")
            flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC
        else:
            target = path
            flags = {"r": os.O_RDONLY, "rw": os.O_RDWR, "dir": os.O_RDONLY | os.O_DIRECTORY}[mode] | os.O_CLOEXEC
        try:
            fd = os.open(target, flags, 0o600)
            os.close(fd)
            if mode == "create":
                os.unlink(target)
            results[f"{path} ({mode})"] = "ok"
        except OSError as e:
            results[f"{path} ({mode})"] = errno_name(e.errno)
    return results


# ---------------------------------------------------------------- one child

def mark(path):
    """A stat of a path that does not exist: a marker in the strace log."""
    try:
        os.stat(path)
    except OSError:
        pass


def child_body(v, scratch, expected_parent, emit):
    """Runs in the child: sandbox, CUDA, probes. Calls emit(report) once the sandbox is set up
    (so a hang in CUDA still leaves the setup report) and once at the end; never raises."""
    report = {"name": v["name"], "what": v["what"], "pid": os.getpid()}
    try:
        os.environ["TMPDIR"] = scratch                                      # as worker.rs
        os.environ["CUDA_CACHE_PATH"] = os.path.join(scratch, "cuda-cache")
        mark(MARK_SANDBOX)
        setup, landlock = apply_variant(v, scratch, expected_parent)
        report["setup"] = setup.steps
        report["setup_ok"] = setup.ok
        if v["landlock"]:
            report["landlock"] = landlock
        emit(report)
        mark(MARK_CUDA)
        report["cuda"] = run_cuda()
        mark(MARK_PROBES)
        report["probes"] = run_probes()
    except Exception:
        report["exception"] = traceback.format_exc()
    emit(report)


def last_report(lines, prefix=""):
    """The last complete JSON report among lines (the final one, or the one sent after setup)."""
    for line in reversed(lines):
        if line.startswith(prefix):
            try:
                return json.loads(line[len(prefix):])
            except ValueError:
                continue
    return None


def run_forked(v):
    """Forks a child for variant v; returns its report (or why there is none)."""
    scratch = tempfile.mkdtemp(prefix="inference-pio-diag-scratch-")
    parent = os.getpid()
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)

        def emit(report):
            data = (json.dumps(report) + "\n").encode()
            while data:
                data = data[os.write(write_end, data):]
        try:
            child_body(v, scratch, parent, emit)
        finally:
            os._exit(0)
    os.close(write_end)
    chunks, deadline, timed_out = [], time.monotonic() + CHILD_TIMEOUT_S, False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            break
        ready, _, _ = select.select([read_end], [], [], left)
        if ready:
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    shutil.rmtree(scratch, ignore_errors=True)
    report = last_report(b"".join(chunks).decode(errors="replace").splitlines()) or {"name": v["name"], "what": v["what"]}
    if timed_out:
        report["timeout"] = f"killed after {CHILD_TIMEOUT_S} s"
    if os.WIFSIGNALED(status):
        report["killed_by_signal"] = signal.Signals(os.WTERMSIG(status)).name
    elif os.WEXITSTATUS(status) != 0:
        report["exit_status"] = os.WEXITSTATUS(status)
    return report


# ---------------------------------------------------------------- strace run

def run_under_strace(strace, out_json):
    v = next(x for x in VARIANTS if x["name"] == STRACE_VARIANT)
    log = os.path.splitext(out_json)[0] + ".strace.txt"
    scratch = tempfile.mkdtemp(prefix="inference-pio-diag-scratch-")
    # mmap too: a refused mapping of /dev/nvidia* or /dev/nvidia-uvm is another way to get 304.
    cmd = [strace, "-f", "-e", "trace=" + os.environ.get("STRACE_TRACE", "%file,ioctl,mmap"), "-o", log,
           sys.executable, os.path.abspath(__file__), "--child", v["name"], scratch]
    result = {"variant": v["name"], "command": " ".join(cmd), "log": log}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=STRACE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()     # the traced child has PR_SET_PDEATHSIG and dies with strace
        stdout, stderr = proc.communicate()
        result["timeout"] = f"killed after {STRACE_TIMEOUT_S} s"
    shutil.rmtree(scratch, ignore_errors=True)
    result["exit_status"] = proc.returncode
    report = last_report(stdout.splitlines(), RESULT_PREFIX)
    if report:
        result["report"] = report
    else:
        result["stdout_tail"], result["stderr_tail"] = stdout[-2000:], stderr[-2000:]
    denied, enoent, other = [], [], []
    try:
        with open(log, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        lines = []
        result["log_error"] = str(e)
    # Only the CUDA part: after the sandbox is applied, before the probes (which fail on purpose).
    start = next((i for i, line in enumerate(lines) if MARK_CUDA in line), 0)
    end = next((i for i, line in enumerate(lines) if MARK_PROBES in line), len(lines))
    loader_search = 0
    for line in lines[start:end]:
        if " = -1 E" not in line:
            continue
        if "EACCES" in line or "EPERM" in line:
            denied.append(line)
        elif "ENOENT" in line:
            if any(s in line for s in ("/glibc-hwcaps/", "/tls/", '/tls"', "/x86_64/", '/x86_64"')):
                loader_search += 1      # the dynamic loader trying its search directories
            else:
                enoent.append(line)
        else:
            other.append(line)
    result["window"] = f"log lines {start + 1}..{end} (sandbox applied, CUDA calls, before the probes)"
    result["denied"] = denied[:MAX_STRACE_LINES]
    result["enoent"] = enoent[:MAX_STRACE_LINES]
    result["other_errors"] = other[:MAX_STRACE_LINES]
    result["counts"] = {"denied": len(denied), "enoent": len(enoent), "other_errors": len(other),
                        "enoent_loader_search_not_listed": loader_search}
    return result


# ---------------------------------------------------------------- reporting

def read_text(path, limit=400):
    try:
        with open(path, errors="replace") as f:
            return f.read(limit).strip()
    except OSError as e:
        return f"({errno_name(e.errno)})"


def host_info():
    abi, why = landlock_abi()
    status = {}
    for line in read_text("/proc/self/status", 10000).splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "CapEff", "CapBnd", "NoNewPrivs", "Seccomp"):
            status[key] = value.strip()
    return {
        "kernel": platform.release(), "machine": platform.machine(), "python": sys.executable,
        "landlock_abi": abi if abi is not None else f"unavailable ({why})",
        "lsm": read_text("/sys/kernel/security/lsm"), "status": status,
        "cgroup": read_text("/proc/self/cgroup"), "nvidia_driver": read_text("/proc/driver/nvidia/version"),
        "nvidia_devices": nvidia_devices(), "system_read_only_paths": system_read_only_paths(),
        "strace": shutil.which("strace"),
    }


def summary_line(r):
    cuda = r.get("cuda")
    if cuda is None:
        result = r.get("exception", "").strip().splitlines()[-1:] or ["no report"]
        result = "no CUDA result: " + result[0]
    elif not cuda["loadable"]:
        result = cuda["error"]
    else:
        result = ", ".join(f"{c['call'].split('(')[0]}={c['rc']}" + ("" if c["rc"] == 0 else f" {c['name']}")
                           for c in cuda["calls"])
    failed = [f"{s['step']}: {s.get('errno', '')} {s['detail']}".strip() for s in r.get("setup", []) if not s["ok"]]
    if "setup" not in r:
        setup = "no setup report"
    else:
        setup = "setup ok" if not failed else "SETUP FAILED [" + "; ".join(failed) + "]"
    ll = r.get("landlock")
    if ll is not None:
        if ll.get("abi") is None:
            setup += f", landlock unavailable ({ll.get('unavailable', '?')})"
        else:
            setup += f", landlock ABI {ll['abi']} " + ("enforced" if ll.get("enforced") else "NOT enforced")
    for key in ("timeout", "killed_by_signal", "exit_status"):
        if key in r:
            setup += f", {key} {r[key]}"
    return f"{r['name']:<18} {setup} | {result}"


def probe_differences(reports):
    """Probes that succeed in the baseline but fail in a variant."""
    base = next((r.get("probes", {}) for r in reports if r["name"] == "none"), {})
    for r in reports:
        if r["name"] != "none" and "probes" in r:
            r["probes_failing_vs_baseline"] = {k: v for k, v in r["probes"].items()
                                              if v != "ok" and base.get(k) == "ok"}


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        v = next(x for x in VARIANTS if x["name"] == sys.argv[2])
        child_body(v, sys.argv[3], None, lambda r: print(RESULT_PREFIX + json.dumps(r), flush=True))
        return
    out_json = sys.argv[1] if len(sys.argv) > 1 else "diagnose_worker_cuda.json"
    summary = {"host": host_info(), "variants": []}
    print(f"kernel {summary['host']['kernel']}, landlock ABI {summary['host']['landlock_abi']}, "
          f"nvidia devices: {', '.join(summary['host']['nvidia_devices']) or 'none'}")
    for i, v in enumerate(VARIANTS, 1):
        report = run_forked(v)
        summary["variants"].append(report)
        print(f"{i:>2} {summary_line(report)}", flush=True)
    probe_differences(summary["variants"])
    for r in summary["variants"]:
        if r.get("probes_failing_vs_baseline"):
            print(f"   probes failing in {r['name']} but not in none: "
                  + ", ".join(f"{k}={v}" for k, v in r["probes_failing_vs_baseline"].items()))
    strace = summary["host"]["strace"]
    if strace:
        s = run_under_strace(strace, out_json)
        summary["strace"] = s
        rep = s.get("report")
        print(f"strace ({s['variant']}): " + (summary_line(rep) if rep else f"no report (exit {s['exit_status']})"))
        print(f"   CUDA part under the sandbox: {s['counts']['denied']} EACCES/EPERM, {s['counts']['enoent']} ENOENT, "
              f"{s['counts']['other_errors']} other failed calls; log {s['log']}")
        for line in s["denied"][:20]:
            print("   " + line)
    else:
        summary["strace"] = "strace not on PATH"
    summary["summary"] = {r["name"]: summary_line(r) for r in summary["variants"]}
    with open(out_json, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
