//! Low-level helpers: running commands, entering network namespaces,
//! sysctls, and a small parallel map.
//!
//! Everything here is synchronous. Namespaces are entered with `setns(2)` on a
//! short-lived thread (`in_netns`), so the calling thread never changes
//! namespace; a process spawned from that thread starts inside the namespace
//! without the cost of `ip netns exec`.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// Where `ip netns add` puts its namespace handles.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

pub fn open_netns(name: &str) -> Result<File> {
    File::open(netns_path(name)).with_context(|| format!("open network namespace {name}"))
}

/// Runs `f` on a fresh thread that has entered network namespace `ns`.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let fd = open_netns(ns)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on this thread only; fd is a valid netns handle.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(anyhow!(
                    "setns into {ns}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            f()
        })
        .join()
        .map_err(|_| anyhow!("thread in {ns} panicked"))?
    })
}

/// Enters `fd`'s network namespace on the current thread (used by a thread
/// that visits many namespaces and comes back to `home`).
pub fn setns_fd(fd: &File) -> Result<()> {
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The current thread's network namespace, to come back to.
pub fn current_netns() -> Result<File> {
    File::open("/proc/thread-self/ns/net").context("open /proc/thread-self/ns/net")
}

/// Writes sysctls (`net.ipv4.ip_forward` style keys) in namespace `ns`.
pub fn sysctls_in(ns: &str, kv: &[(String, String)]) -> Result<()> {
    if kv.is_empty() {
        return Ok(());
    }
    in_netns(ns, || {
        for (k, v) in kv {
            write_sysctl(k, v).with_context(|| format!("in {ns}"))?;
        }
        Ok(())
    })
}

pub fn sysctl_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    std::fs::write(sysctl_path(key), value).with_context(|| format!("sysctl {key}={value}"))
}

pub fn read_sysctl(key: &str) -> Result<String> {
    Ok(std::fs::read_to_string(sysctl_path(key))
        .with_context(|| format!("read sysctl {key}"))?
        .trim()
        .to_string())
}

/// Runs a command with `input` on stdin; fails with its stderr when it fails.
pub fn run_input(cmd: &mut Command, input: &str) -> Result<String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {desc}"))?;
    {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first: String = input.lines().take(3).collect::<Vec<_>>().join(" | ");
        bail!(
            "{desc} failed ({}): {}\n  input began: {first}",
            out.status,
            err.trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(cmd: &mut Command) -> Result<String> {
    run_input(cmd, "")
}

/// `ip [-n ns] -batch -` with `cmds` (one ip command per line).
pub fn ip_batch(ns: Option<&str>, cmds: &str) -> Result<()> {
    if cmds.trim().is_empty() {
        return Ok(());
    }
    let mut c = Command::new("ip");
    if let Some(ns) = ns {
        c.args(["-n", ns]);
    }
    c.args(["-batch", "-"]);
    run_input(&mut c, cmds).map(|_| ())
}

/// `ip -force -batch -`: runs every line even when some fail (for cleanup).
pub fn ip_batch_force(cmds: &str) {
    if cmds.trim().is_empty() {
        return;
    }
    let mut c = Command::new("ip");
    c.args(["-force", "-batch", "-"]);
    let _ = run_input(&mut c, cmds);
}

/// Applies an nftables ruleset inside namespace `ns`.
pub fn nft_in(ns: &str, ruleset: &str) -> Result<()> {
    let rs = ruleset.to_string();
    in_netns(ns, move || {
        run_input(Command::new("nft").args(["-f", "-"]), &rs).map(|_| ())
    })
}

/// Runs a program inside namespace `ns` and returns its stdout.
pub fn run_in(ns: &str, prog: &str, args: &[&str]) -> Result<String> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    in_netns(ns, move || run(Command::new(prog).args(&args)))
}

/// Maps `f` over `items` on `threads` threads; returns the first error.
pub fn par_for<T: Sync>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<()> + Sync,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let err: std::sync::Mutex<Option<anyhow::Error>> = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                if err.lock().unwrap().is_some() {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items.len() {
                    return;
                }
                if let Err(e) = f(&items[i]) {
                    let mut g = err.lock().unwrap();
                    if g.is_none() {
                        *g = Some(e);
                    }
                }
            });
        }
    });
    match err.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn clk_tck() -> f64 {
    // SAFETY: no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU seconds (user+system) of a live process, from /proc/<pid>/stat.
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // fields after ")": state(0) ... utime is field 14 overall => index 11 here
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / clk_tck())
}

/// Peak resident set size (VmHWM) in KiB.
pub fn proc_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// CPU seconds used by this process so far (all threads).
pub fn self_cpu_secs() -> f64 {
    proc_cpu_secs(std::process::id()).unwrap_or(0.0)
}

pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Raises the calling thread's priority (nice -10), so the measuring side
/// keeps its pace when the daemons saturate the CPU. Best effort.
pub fn boost_this_thread() {
    // SAFETY: gettid and setpriority on our own thread.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, -10);
    }
}

/// Runs `prog args` inside namespace `ns` with a time limit and returns
/// (exit code, stdout + stderr) whatever the exit status. The child dies
/// with us (PR_SET_PDEATHSIG) and is killed at the deadline.
pub fn output_in(
    ns: &str,
    prog: &str,
    args: &[String],
    limit: std::time::Duration,
) -> Result<(Option<i32>, String)> {
    let mut c = command_in(ns, prog, args)?;
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().with_context(|| format!("cannot run {prog}"))?;
    let end = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if std::time::Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        sleep_ms(50);
    };
    let mut text = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut o, &mut text);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut text);
    }
    Ok((status.and_then(|s| s.code()), text))
}

/// A `Command` that runs `prog` inside network namespace `ns`, in its own
/// process group, killed when the testnet dies.
pub fn command_in(ns: &str, prog: &str, args: &[String]) -> Result<Command> {
    use std::os::unix::process::CommandExt;
    let fd = open_netns(ns)?;
    let mut c = Command::new(prog);
    c.args(args);
    let raw = fd.as_raw_fd();
    // SAFETY: only async-signal-safe syscalls between fork and exec; `fd`
    // stays open until spawn returns (it is moved into the closure).
    unsafe {
        c.pre_exec(move || {
            let _keep = &fd;
            if libc::setns(raw, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::setpgid(0, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    Ok(c)
}

/// Current resident set size (VmRSS) in KiB.
pub fn proc_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The calling thread's kernel id (for `thread_cpu_secs`).
pub fn gettid() -> i32 {
    // SAFETY: no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// CPU seconds of one thread of this process: from `schedstat` (ns), else
/// from `stat` (clock ticks).
pub fn thread_cpu_secs(tid: i32) -> Option<f64> {
    if let Some(ns) = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
    {
        return Some(ns as f64 / 1e9);
    }
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / clk_tck())
}

/// One reading of an interface's byte counters inside a namespace.
#[derive(Debug, Clone, Copy)]
pub struct IfBytes {
    /// Seconds on the caller's clock (`t0.elapsed()`) when it was read.
    pub t: f64,
    pub rx: u64,
    pub tx: u64,
}

/// Parses `/proc/net/dev` text: (rx bytes, tx bytes) of `ifname`.
pub fn parse_net_dev(text: &str, ifname: &str) -> Option<(u64, u64)> {
    for l in text.lines() {
        let Some((name, rest)) = l.split_once(':') else {
            continue;
        };
        if name.trim() != ifname {
            continue;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes ...
        return Some((*f.first()?, *f.get(8)?));
    }
    None
}

/// Reads `ifname`'s rx/tx byte counters in every namespace of `namespaces`
/// (one thread that `setns`es into each in turn and reads
/// `/proc/thread-self/net/dev`, which shows the thread's own namespace;
/// `/proc/net` and `/sys/class/net` would show the process's). A namespace
/// that cannot be read gives `None`.
pub fn if_bytes_in(
    namespaces: &[String],
    ifname: &str,
    t0: std::time::Instant,
) -> Vec<Option<IfBytes>> {
    let names = namespaces.to_vec();
    let ifname = ifname.to_string();
    std::thread::spawn(move || {
        let Ok(home) = current_netns() else {
            return vec![None; names.len()];
        };
        let out = names
            .iter()
            .map(|ns| {
                let f = open_netns(ns).ok()?;
                setns_fd(&f).ok()?;
                let text = std::fs::read_to_string("/proc/thread-self/net/dev").ok();
                let t = t0.elapsed().as_secs_f64();
                let _ = setns_fd(&home);
                let (rx, tx) = parse_net_dev(&text?, &ifname)?;
                Some(IfBytes { t, rx, tx })
            })
            .collect();
        let _ = setns_fd(&home);
        out
    })
    .join()
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn net_dev_parses() {
        let t = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n  eth0:   12345      10    0    0    0     0          0         0     6789       9    0    0    0     0       0          0\n";
        assert_eq!(super::parse_net_dev(t, "eth0"), Some((12345, 6789)));
        assert_eq!(super::parse_net_dev(t, "lo"), Some((0, 0)));
        assert_eq!(super::parse_net_dev(t, "wan"), None);
    }
}
