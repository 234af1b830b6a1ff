//! A control group per worker process (security levels `high` and `maximum`): `pids.max`
//! always, `memory.max` for `limits.memory_gb`, `cpu.max` for `limits.cpu_percent`.
//!
//! cgroup v2 is used where the host's own cgroup delegates the controller; otherwise the
//! controller's cgroup v1 hierarchy, when it is mounted and writable (as root). A controller
//! available in neither is reported as a missing mechanism, never faked. The host creates the
//! group and writes the limits; the worker moves itself in before it runs any plugin code;
//! the host kills whatever is left in the group and removes it when the worker is gone. In v2
//! a group with processes cannot hand controllers to child groups, so a host that is alone
//! in a delegated group moves itself into the leaf `inference-pio-host` first.
//!
//! Reference: the kernel's cgroup-v2.rst and cgroup-v1 (memory.txt, pids.txt, sched-bwc.rst).

use crate::sandbox::Mechanism;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Processes and threads a worker may have at once.
pub const PIDS_MAX: u64 = 256;

/// What a worker's group is to enforce.
#[derive(Clone, Debug, Default)]
pub struct Wanted {
    pub memory_bytes: Option<u64>,
    /// CPU time per period as a multiple of one core.
    pub cpu_cores: Option<f64>,
}

/// One controller's group.
#[derive(Debug)]
struct Group {
    controller: &'static str,
    dir: PathBuf,
    v2: bool,
}

/// The groups made for one worker; removed on drop.
#[derive(Debug, Default)]
pub struct WorkerCgroup {
    groups: Vec<Group>,
    pub mechanisms: Vec<Mechanism>,
}

struct Mount {
    point: PathBuf,
    v2: bool,
    options: Vec<String>,
}

fn mounts() -> Vec<Mount> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let options = right.nth(1).unwrap_or("").split(',').map(String::from).collect();
            match fstype {
                "cgroup2" => Some(Mount { point: PathBuf::from(point), v2: true, options }),
                "cgroup" => Some(Mount { point: PathBuf::from(point), v2: false, options }),
                _ => None,
            }
        })
        .collect()
}

/// `/proc/self/cgroup`: (controllers, path) per hierarchy; v2 has empty controllers.
fn own_cgroups() -> Vec<(Vec<String>, String)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else { return Vec::new() };
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            let controllers = controllers.split(',').filter(|c| !c.is_empty()).map(String::from).collect();
            Some((controllers, path.to_string()))
        })
        .collect()
}

fn join(mount: &Path, path: &str) -> PathBuf {
    mount.join(path.trim_start_matches('/'))
}

/// (v2 file, v1 file, value): one limit as each cgroup version spells it.
type Setting = (&'static str, &'static str, String);

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

fn write_failed(path: &Path, value: &str, e: std::io::Error) -> String {
    format!("cannot write {value:?} to {}: {e}", path.display())
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| write_failed(path, value, e))
}

/// Where the host's worker groups are made in the v2 hierarchy: the group the host started
/// in, found once (the host may move itself into a leaf below it, see [`v2_group`]).
fn v2_base() -> Result<PathBuf, String> {
    static BASE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BASE.get_or_init(|| {
        let mount = mounts().into_iter().find(|m| m.v2).ok_or("no cgroup2 filesystem is mounted")?;
        let own = own_cgroups()
            .into_iter()
            .find(|(c, _)| c.is_empty())
            .map(|(_, p)| p)
            .ok_or("this process has no cgroup v2 membership")?;
        Ok(join(&mount.point, &own))
    })
    .clone()
}

/// The leaf the host moves itself into when it is alone in a delegated group.
pub const HOST_LEAF: &str = "inference-pio-host";

/// Enables `controller` for the children of `base`. A group with processes of its own cannot
/// (cgroup v2's no-internal-processes rule, EBUSY). When the host is the only process there
/// (a delegated scope started for it, e.g. `systemd-run --scope -p Delegate=yes`), it moves
/// itself into the leaf [`HOST_LEAF`] and enables the controller; otherwise the group is not
/// the host's to rearrange and the reason is returned.
fn enable_for_children(base: &Path, controller: &str) -> Result<(), String> {
    let control = base.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&control).unwrap_or_default();
    if enabled.split_whitespace().any(|c| c == controller) {
        return Ok(());
    }
    let value = format!("+{controller}");
    let first = match std::fs::write(&control, &value) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => write_failed(&control, &value, e),
        Err(e) => return Err(write_failed(&control, &value, e)),
    };
    let procs = std::fs::read_to_string(base.join("cgroup.procs")).unwrap_or_default();
    let members: Vec<&str> = procs.lines().map(str::trim).filter(|p| !p.is_empty()).collect();
    let me = std::process::id().to_string();
    if members.is_empty() {
        return Err(first);
    }
    if members != [me.as_str()] {
        return Err(format!(
            "cgroup v2 at {} delegates `{controller}` but has {} process(es) besides the host, so it cannot enable it for child groups \
             (cgroup v2's no-internal-processes rule); start the host in an empty delegated group, e.g. `systemd-run --scope -p Delegate=yes inference-pio ...` \
             ({first})",
            base.display(),
            members.iter().filter(|p| **p != me).count()
        ));
    }
    let leaf = base.join(HOST_LEAF);
    if !leaf.is_dir() {
        std::fs::create_dir(&leaf).map_err(|e| format!("cannot create {}: {e}", leaf.display()))?;
    }
    write(&leaf.join("cgroup.procs"), &me)?;
    write(&control, &value)
}

/// The v2 group directory for a controller, creating it (and enabling the controller for
/// children of the host's group) when the host's group delegates it.
fn v2_group(controller: &str, name: &str) -> Result<PathBuf, String> {
    let base = v2_base()?;
    let available = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
    if !available.split_whitespace().any(|c| c == controller) {
        return Err(format!("cgroup v2 at {} does not delegate the `{controller}` controller (cgroup.controllers: `{}`)", base.display(), available.trim()));
    }
    enable_for_children(&base, controller)?;
    let dir = base.join(name);
    if !dir.is_dir() {
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    Ok(dir)
}

fn v1_group(controller: &str, name: &str) -> Result<PathBuf, String> {
    let mount = mounts()
        .into_iter()
        .find(|m| !m.v2 && m.options.iter().any(|o| o == controller))
        .ok_or_else(|| format!("no cgroup v1 hierarchy with the `{controller}` controller is mounted"))?;
    let own = own_cgroups()
        .into_iter()
        .find(|(c, _)| c.iter().any(|c| c == controller))
        .map(|(_, p)| p)
        .unwrap_or_else(|| "/".into());
    let dir = join(&mount.point, &own).join(name);
    std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

impl WorkerCgroup {
    /// Creates the groups; every controller that cannot be had is a missing mechanism.
    pub fn create(wanted: &Wanted) -> Self {
        let name = format!("inference-pio-worker-{}-{}", std::process::id(), SEQUENCE.fetch_add(1, Ordering::SeqCst));
        let mut this = WorkerCgroup::default();
        let mut plan: Vec<(&'static str, &'static str, Vec<Setting>)> =
            vec![("pids", "cgroup pids.max", vec![("pids.max", "pids.max", PIDS_MAX.to_string())])];
        if let Some(bytes) = wanted.memory_bytes {
            plan.push((
                "memory",
                "cgroup memory.max",
                vec![("memory.max", "memory.limit_in_bytes", bytes.to_string()), ("memory.swap.max", "memory.swappiness", "0".into())],
            ));
        }
        if let Some(cores) = wanted.cpu_cores {
            let period = 100_000u64;
            let quota = ((cores * period as f64).round() as u64).max(1000);
            plan.push((
                "cpu",
                "cgroup cpu.max",
                vec![("cpu.max", "cpu.cfs_period_us", format!("{quota} {period}")), ("", "cpu.cfs_quota_us", quota.to_string())],
            ));
        }
        for (controller, mechanism, files) in plan {
            let attempt = || -> Result<(Group, String), String> {
                let (dir, v2, v2_error) = match v2_group(controller, &name) {
                    Ok(dir) => (dir, true, String::new()),
                    Err(v2_error) => match v1_group(controller, &name) {
                        Ok(dir) => (dir, false, v2_error),
                        Err(v1_error) => return Err(format!("{v2_error}; {v1_error}")),
                    },
                };
                let group = Group { controller, dir, v2 };
                let mut shown = Vec::new();
                for (v2_file, v1_file, value) in &files {
                    let file = if v2 { *v2_file } else { *v1_file };
                    if file.is_empty() {
                        continue;
                    }
                    let value = if !v2 && *v1_file == "cpu.cfs_period_us" { "100000".to_string() } else { value.clone() };
                    let path = group.dir.join(file);
                    // Swap settings are best effort (no swap accounting is common).
                    if file.contains("swap") {
                        let _ = std::fs::write(&path, &value);
                        continue;
                    }
                    write(&path, &value)?;
                    shown.push(format!("{file} = {value}"));
                }
                let version = if v2 { "cgroup v2".to_string() } else { format!("cgroup v1 (v2: {v2_error})") };
                let detail = format!("{} in {} [{version}]", shown.join(", "), group.dir.display());
                Ok((group, detail))
            };
            match attempt() {
                Ok((group, detail)) => {
                    this.groups.push(group);
                    this.mechanisms.push(Mechanism::active(mechanism, detail));
                }
                Err(reason) => this.mechanisms.push(Mechanism::missing(mechanism, reason)),
            }
        }
        this
    }

    /// The `cgroup.procs` files the worker joins.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.groups.iter().map(|g| g.dir.join("cgroup.procs")).collect()
    }

    /// Whether the kernel's OOM killer has killed a process of the memory group.
    pub fn oom_kills(&self) -> u64 {
        let Some(group) = self.groups.iter().find(|g| g.controller == "memory") else { return 0 };
        let file = if group.v2 { "memory.events" } else { "memory.oom_control" };
        std::fs::read_to_string(group.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok()))
            .unwrap_or(0)
    }

    /// Times the cpu group was throttled (`nr_throttled`).
    pub fn cpu_throttled(&self) -> Option<u64> {
        let group = self.groups.iter().find(|g| g.controller == "cpu")?;
        std::fs::read_to_string(group.dir.join("cpu.stat"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("nr_throttled ").and_then(|n| n.trim().parse().ok()))
    }

    /// Kills every process left in the groups (children the worker left behind).
    pub fn kill_all(&self) {
        for group in &self.groups {
            let procs = std::fs::read_to_string(group.dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill takes a pid and a signal; the pid is a member of our own group.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for WorkerCgroup {
    fn drop(&mut self) {
        self.kill_all();
        for group in &self.groups {
            // The group empties once its killed processes are reaped; retry briefly.
            for _ in 0..50 {
                if std::fs::remove_dir(&group.dir).is_ok() || !group.dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}
