//! Run names, the run registry, host sysctls, and cleanup.
//!
//! Every run gets a prefix `tn<4 hex>-` (`TESTNET_PREFIX=xy` makes it
//! `xy<4 hex>-`: two lower-case letters of one's own, to keep runs apart
//! from other people's on a shared machine; `cleanup` then looks after
//! `tn` and `xy` runs). Everything it creates is named with
//! it: namespaces (`/run/netns/tnXXXX-*`), WireGuard/TUN interface names
//! (and so the userspace UAPI sockets `/var/run/wireguard/tnXXXX-*.sock`), and
//! the work directory `$TMPDIR/meshpeer-testnet-tnXXXX`. Links (veths,
//! bridges) only ever exist inside those namespaces, so deleting the
//! namespaces deletes them. A run registers itself in
//! `/run/meshpeer-testnet/tnXXXX.pid`; `testnet cleanup` and every new
//! `testnet run` remove the leftovers of runs whose owner is gone.
//!
//! Cleanup = SIGKILL every process living in one of the run's namespaces
//! (found through /proc/*/ns/net), delete the namespaces, remove sockets,
//! the work directory and the registry entry, and put the host sysctls back
//! when no other run is alive.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;

use crate::sys;

pub const REGISTRY: &str = "/run/meshpeer-testnet";

/// Host-wide sysctls the testnet raises while it runs: the neighbour (ARP)
/// table is shared by all namespaces and holds 1024 entries by default.
const HOST_SYSCTLS: &[(&str, u64)] = &[
    ("net.ipv4.neigh.default.gc_thresh1", 8192),
    ("net.ipv4.neigh.default.gc_thresh2", 32768),
    ("net.ipv4.neigh.default.gc_thresh3", 65536),
];

/// Set when a signal asked us to stop: long loops check it.
pub static STOPPING: AtomicBool = AtomicBool::new(false);

pub fn stopping() -> bool {
    STOPPING.load(Ordering::Relaxed)
}

/// The first two letters of run prefixes: `TESTNET_PREFIX` when it is two
/// lower-case letters, else `tn`.
pub fn prefix_base() -> String {
    match std::env::var("TESTNET_PREFIX") {
        Ok(p) if p.len() == 2 && p.bytes().all(|b| b.is_ascii_lowercase()) => p,
        _ => "tn".to_string(),
    }
}

pub fn new_prefix() -> String {
    let base = prefix_base();
    loop {
        let p = format!("{base}{:04x}-", rand::random::<u16>());
        let taken = std::fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(&p))
            })
            .unwrap_or(false)
            || registry_file(&p).exists();
        if !taken {
            return p;
        }
    }
}

pub fn is_prefix(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 7
        && (s.starts_with("tn") || s.starts_with(&prefix_base()))
        && b[6] == b'-'
        && s[2..6].chars().all(|c| c.is_ascii_hexdigit())
}

pub fn work_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("meshpeer-testnet-{}", prefix.trim_end_matches('-')))
}

fn registry_file(prefix: &str) -> PathBuf {
    PathBuf::from(REGISTRY).join(format!("{}.pid", prefix.trim_end_matches('-')))
}

/// Records that this process owns `prefix`.
pub fn register(prefix: &str) -> Result<()> {
    std::fs::create_dir_all(REGISTRY)?;
    std::fs::write(
        registry_file(prefix),
        format!(
            "{}\n{}\n",
            std::process::id(),
            proc_start(std::process::id()).unwrap_or_default()
        ),
    )?;
    Ok(())
}

fn proc_start(pid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    rest.split_whitespace().nth(19).map(|x| x.to_string())
}

/// Running, not a zombie (a `kill -9`ed testnet stays a zombie until reaped).
fn proc_alive(pid: u32) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(i) = s.rfind(')') else { return false };
    !matches!(
        s[i + 1..].trim_start().chars().next(),
        Some('Z' | 'X') | None
    )
}

/// Prefixes registered by a process that is still alive.
fn live_runs() -> HashSet<String> {
    let mut live = HashSet::new();
    if let Ok(d) = std::fs::read_dir(REGISTRY) {
        for e in d.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(p) = name.strip_suffix(".pid") else {
                continue;
            };
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let mut l = text.lines();
            let pid: u32 = l.next().and_then(|x| x.trim().parse().ok()).unwrap_or(0);
            let start = l.next().unwrap_or("").trim().to_string();
            if pid != 0 && proc_alive(pid) && proc_start(pid).map(|s| s == start).unwrap_or(false) {
                live.insert(format!("{p}-"));
            }
        }
    }
    live
}

/// Every prefix that has something left on this machine.
fn leftover_prefixes() -> HashSet<String> {
    let mut set = HashSet::new();
    let mut add = |name: &str| {
        if name.len() >= 7 && is_prefix(&name[..7]) {
            set.insert(name[..7].to_string());
        }
    };
    for dir in ["/run/netns", "/var/run/wireguard"] {
        if let Ok(d) = std::fs::read_dir(dir) {
            for e in d.flatten() {
                add(&e.file_name().to_string_lossy());
            }
        }
    }
    if let Ok(d) = std::fs::read_dir(REGISTRY) {
        for e in d.flatten() {
            add(&e.file_name().to_string_lossy());
        }
    }
    if let Ok(d) = std::fs::read_dir(std::env::temp_dir()) {
        for e in d.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if let Some(rest) = n.strip_prefix("meshpeer-testnet-") {
                add(&format!("{rest}-"));
            }
        }
    }
    set
}

/// Raises the host's neighbour-table limits, remembering the old values
/// (only the first concurrent run records them).
pub fn raise_host_sysctls() -> Result<()> {
    std::fs::create_dir_all(REGISTRY)?;
    let saved = PathBuf::from(REGISTRY).join("host-sysctls.orig");
    if !saved.exists() {
        let mut text = String::new();
        for (k, _) in HOST_SYSCTLS {
            text.push_str(&format!("{k}={}\n", sys::read_sysctl(k)?));
        }
        std::fs::write(&saved, text)?;
    }
    for (k, v) in HOST_SYSCTLS {
        let cur: u64 = sys::read_sysctl(k)?.parse().unwrap_or(0);
        if cur < *v {
            sys::write_sysctl(k, &v.to_string())?;
        }
    }
    Ok(())
}

/// Puts the host sysctls back when no run is alive any more.
fn restore_host_sysctls_if_idle(except: &str) {
    let live = live_runs();
    if live.iter().any(|p| p != except) {
        return;
    }
    let saved = PathBuf::from(REGISTRY).join("host-sysctls.orig");
    if let Ok(text) = std::fs::read_to_string(&saved) {
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=') {
                let _ = sys::write_sysctl(k, v);
            }
        }
        let _ = std::fs::remove_file(&saved);
    }
}

pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Removes everything of run `prefix`. Idempotent; never fails.
pub fn cleanup_prefix(prefix: &str) -> CleanupStats {
    let mut st = CleanupStats::default();
    let names = namespaces_with_prefix(prefix);
    st.processes = sys::kill_in_namespaces(&names);
    let _ = sys::del_namespaces(&names);
    st.namespaces = names.len();
    if let Ok(d) = std::fs::read_dir("/var/run/wireguard") {
        for e in d.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                let _ = std::fs::remove_file(e.path());
                st.files += 1;
            }
        }
    }
    let wd = work_dir(prefix);
    if wd.exists() {
        let _ = std::fs::remove_dir_all(&wd);
        st.files += 1;
    }
    let _ = std::fs::remove_file(registry_file(prefix));
    restore_host_sysctls_if_idle(prefix);
    st
}

/// What is left of run `prefix` (after its cleanup): namespaces with the
/// prefix, processes whose command line names its work directory (every
/// daemon's `--state-dir` is in it) or that live in one of its namespaces,
/// UAPI sockets with the prefix, the work directory and the registry entry.
pub fn leftovers(prefix: &str, work: &std::path::Path) -> serde_json::Value {
    let names = namespaces_with_prefix(prefix);
    let work_s = work.display().to_string();
    let mut procs: Vec<u32> = sys::pids_in_namespaces(&names);
    let me = std::process::id();
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == me || procs.contains(&pid) {
                continue;
            }
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&work_s) {
                procs.push(pid);
            }
        }
    }
    let sockets = std::fs::read_dir("/var/run/wireguard")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .count()
        })
        .unwrap_or(0);
    let work_left = usize::from(work.exists());
    let registry = usize::from(registry_file(prefix).exists());
    serde_json::json!({
        "namespaces": names.len(),
        "processes": procs.len(),
        "process_ids": procs,
        "uapi_sockets": sockets,
        "work_dir": work_left,
        "registry_entry": registry,
        "total": names.len() + procs.len() + sockets + work_left + registry,
        "note": "read after the run's cleanup: namespaces named with the run's prefix, processes living in them or whose command line names the run's work directory, /var/run/wireguard sockets with the prefix, the work directory, the registry entry",
    })
}

#[derive(Default, Debug, Clone, Copy)]
pub struct CleanupStats {
    pub namespaces: usize,
    pub processes: usize,
    pub files: usize,
}

/// Cleans up every run whose owner is gone (or, with `all`, every run).
pub fn cleanup_stale(all: bool) -> Vec<(String, CleanupStats)> {
    let live = live_runs();
    let mut out = vec![];
    let mut prefixes: Vec<String> = leftover_prefixes().into_iter().collect();
    prefixes.sort();
    for p in prefixes {
        if !all && live.contains(&p) {
            continue;
        }
        out.push((p.clone(), cleanup_prefix(&p)));
    }
    if all || live.is_empty() {
        restore_host_sysctls_if_idle("");
    }
    out
}

/// Cleans up `prefix` when dropped (normal end, error, or panic).
pub struct RunGuard {
    pub prefix: String,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        cleanup_prefix(&self.prefix);
    }
}

/// On SIGINT/SIGTERM/SIGHUP: ask the run to stop (it stops its daemons,
/// tears the topology down and writes a partial report); on a second signal,
/// or if that takes more than 20 s, clean up `prefix` at once and exit 130.
pub fn install_signal_cleanup(prefix: &str) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let prefix = prefix.to_string();
    let hard = move |why: &str| {
        eprintln!("\ntestnet: {why}: cleaning up {prefix}* now ...");
        let st = cleanup_prefix(&prefix);
        // A namespace created while we cleaned: once more.
        sys::sleep_ms(100);
        let st2 = cleanup_prefix(&prefix);
        eprintln!(
            "testnet: removed {} namespaces, killed {} processes",
            st.namespaces + st2.namespaces,
            st.processes + st2.processes
        );
        std::process::exit(130);
    };
    std::thread::spawn(move || {
        let mut it = signals.forever();
        if let Some(sig) = it.next() {
            STOPPING.store(true, Ordering::SeqCst);
            eprintln!("\ntestnet: signal {sig}: stopping the run (again to abort at once) ...");
            let hard2 = hard.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_secs(20));
                hard2("still running 20 s after the signal");
            });
            if it.next().is_some() {
                hard("second signal");
            }
        }
    });
    Ok(())
}
