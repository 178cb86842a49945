//! Low-level helpers: network namespaces (create, enter, kill what lives
//! in them, delete), veth pairs, running commands (in a namespace, with a
//! time limit), sysctls, /proc readers, and a small parallel map. Shared by
//! the testnet and the meshpeer crate's integration tests (tests/common).
//!
//! Everything here is synchronous. Namespaces are entered with `setns(2)` on a
//! short-lived thread (`in_netns`), so the calling thread never changes
//! namespace; a process is started inside a namespace by a `pre_exec` that
//! enters it (`command_in`), without the cost of `ip netns exec`.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Where `ip netns add` puts its namespace handles.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

pub fn open_netns(name: &str) -> Result<File> {
    File::open(netns_path(name)).with_context(|| format!("open network namespace {name}"))
}

/// Runs `f` on a fresh thread that has entered network namespace `ns` (so
/// it can reach the namespace's loopback, or create sockets there). A panic
/// in `f` goes on in the caller.
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
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// `ip netns add` for each of `names` (one `ip -batch`).
pub fn add_namespaces(names: &[String]) -> Result<()> {
    let b: String = names.iter().map(|n| format!("netns add {n}\n")).collect();
    ip_batch(None, &b)
}

/// `ip netns del` for each of `names`, trying every one even when some
/// fail; kill what lives in them first ([`kill_in_namespaces`]).
pub fn del_namespaces(names: &[String]) -> Result<()> {
    let b: String = names.iter().map(|n| format!("netns del {n}\n")).collect();
    ip_batch_force(&b)
}

/// The `ip -batch` line for a veth pair whose ends are created directly in
/// their namespaces (`a` in `a_ns`, `b` in `b_ns`), so they vanish with them.
pub fn veth_cmd(a: &str, a_ns: &str, b: &str, b_ns: &str) -> String {
    format!("link add {a} netns {a_ns} type veth peer name {b} netns {b_ns}\n")
}

/// (device, inode) of a namespace handle.
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// PIDs of the processes living in one of the given namespaces (from
/// /proc/*/ns/net), not counting this one.
pub fn pids_in_namespaces(names: &[String]) -> Vec<u32> {
    let ids: HashSet<(u64, u64)> = names.iter().filter_map(|n| ns_id(&netns_path(n))).collect();
    if ids.is_empty() {
        return vec![];
    }
    let me = std::process::id();
    let mut pids = vec![];
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            if let Some(id) = ns_id(&e.path().join("ns/net")) {
                if ids.contains(&id) {
                    pids.push(pid);
                }
            }
        }
    }
    pids
}

/// SIGKILLs every process living in one of `names` (all of them were
/// started by whoever created the namespaces), twice if need be: a dying
/// daemon may have spawned a helper. Returns how many were killed.
pub fn kill_in_namespaces(names: &[String]) -> usize {
    let mut killed = 0;
    for _ in 0..2 {
        let pids = pids_in_namespaces(names);
        for pid in &pids {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        killed += pids.len();
        if pids.is_empty() {
            break;
        }
        sleep_ms(50);
    }
    killed
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

/// `ip -force -batch -`: runs every line even when some fail (for cleanup);
/// an error says what failed.
pub fn ip_batch_force(cmds: &str) -> Result<()> {
    if cmds.trim().is_empty() {
        return Ok(());
    }
    let mut c = Command::new("ip");
    c.args(["-force", "-batch", "-"]);
    run_input(&mut c, cmds).map(|_| ())
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

// Where a program is, and whether we are root: `meshpeer::testing`, the
// one copy (the tests' skip rule uses them too).
pub use meshpeer::testing::{find_in_path as which, is_root};

pub fn clk_tck() -> f64 {
    // SAFETY: no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU seconds (user+system) of a live process, from `/proc/<pid>/stat`.
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    stat_cpu_secs(&format!("/proc/{pid}/stat"))
}

/// utime + stime of a `stat` file (a process's or a thread's), in seconds.
fn stat_cpu_secs(path: &str) -> Option<f64> {
    let s = std::fs::read_to_string(path).ok()?;
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

/// Runs `cmd` (stdin null, stdout and stderr captured; they are read while
/// it runs, so a large output cannot block it) and kills it if it is not
/// done within `limit`: then an error.
pub fn run_timeout(cmd: &mut Command, limit: Duration) -> Result<Output> {
    match run_limited(cmd, limit)? {
        (Some(status), stdout, stderr) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        (None, ..) => bail!(
            "{}: still running after {:.1}s, killed",
            describe(cmd),
            limit.as_secs_f64()
        ),
    }
}

/// [`run_timeout`], but a command killed at the deadline gives `None` for
/// its exit status, and what it printed until then.
pub fn run_limited(
    cmd: &mut Command,
    limit: Duration,
) -> Result<(Option<std::process::ExitStatus>, Vec<u8>, Vec<u8>)> {
    let desc = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {desc}"))?;
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let t_out = reader(Box::new(child.stdout.take().unwrap()));
    let t_err = reader(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => bail!("{desc}: wait: {e}"),
        }
    };
    // The pipes may be held open by grandchildren after a kill: wait for
    // the readers only briefly then.
    let patience = Instant::now() + Duration::from_secs(1);
    while status.is_none()
        && !(t_out.is_finished() && t_err.is_finished())
        && Instant::now() < patience
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let take = |t: std::thread::JoinHandle<Vec<u8>>| {
        if status.is_some() || t.is_finished() {
            t.join().unwrap_or_default()
        } else {
            Vec::new()
        }
    };
    Ok((status, take(t_out), take(t_err)))
}

/// A command as one would type it (for messages).
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `prog args` inside namespace `ns` with a time limit and returns
/// (exit code, stdout + stderr) whatever the exit status; `None` when it
/// was killed at the deadline. The child dies with us (PR_SET_PDEATHSIG).
pub fn output_in(
    ns: &str,
    prog: &str,
    args: &[String],
    limit: std::time::Duration,
) -> Result<(Option<i32>, String)> {
    let (status, stdout, stderr) = run_limited(&mut command_in(ns, prog, args)?, limit)?;
    let mut text = String::from_utf8_lossy(&stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&stderr));
    Ok((status.and_then(|s| s.code()), text))
}

/// A `Command` that runs `prog` inside network namespace `ns`, in its own
/// process group, and dies with the thread that spawns it
/// ([`die_with_parent`]).
pub fn command_in<S: AsRef<OsStr>>(
    ns: &str,
    prog: impl AsRef<OsStr>,
    args: &[S],
) -> Result<Command> {
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
            Ok(())
        });
    }
    die_with_parent(&mut c);
    Ok(c)
}

/// Makes the child get SIGKILL when the thread that spawned it dies
/// (PR_SET_PDEATHSIG), so that not even an aborted run leaves it behind.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
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
    stat_cpu_secs(&format!("/proc/self/task/{tid}/stat"))
}

/// One reading of an interface's byte counters inside a namespace.
#[derive(Debug, Clone, Copy)]
pub struct IfBytes {
    /// Seconds on the caller's clock (`t0.elapsed()`) when it was read.
    pub t: f64,
    pub rx: u64,
    pub tx: u64,
    /// Packets (datagrams, on the underlay) received and sent.
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// One interface's counters in `/proc/net/dev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetDev {
    pub rx: u64,
    pub rx_packets: u64,
    pub tx: u64,
    pub tx_packets: u64,
}

/// Parses `/proc/net/dev` text: the counters of `ifname`.
pub fn parse_net_dev(text: &str, ifname: &str) -> Option<NetDev> {
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
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets ...
        return Some(NetDev {
            rx: *f.first()?,
            rx_packets: *f.get(1)?,
            tx: *f.get(8)?,
            tx_packets: *f.get(9)?,
        });
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
                let d = parse_net_dev(&text?, &ifname)?;
                Some(IfBytes {
                    t,
                    rx: d.rx,
                    tx: d.tx,
                    rx_packets: d.rx_packets,
                    tx_packets: d.tx_packets,
                })
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
        let d = super::parse_net_dev(t, "eth0").unwrap();
        assert_eq!(
            (d.rx, d.rx_packets, d.tx, d.tx_packets),
            (12345, 10, 6789, 9)
        );
        let lo = super::parse_net_dev(t, "lo").unwrap();
        assert_eq!((lo.rx, lo.tx), (0, 0));
        assert_eq!(super::parse_net_dev(t, "wan"), None);
    }
}
