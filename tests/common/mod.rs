//! A small harness for integration tests in real network namespaces, on
//! top of the testnet's plumbing (`meshpeer_testnet::sys`: creating,
//! entering and deleting namespaces, veth pairs, killing what lives in a
//! namespace, commands in a namespace with a time limit). What is here is
//! what a test wants on top: panics with a description instead of errors,
//! and the daemons' side of the story when a test fails.
//!
//! * [`Netns`]: a network namespace (a stale one of the name is removed
//!   first), deleted on drop after killing what still runs in it; programs
//!   run in it through [`cmd_in`] (entered with `setns`, as the testnet's
//!   daemons are).
//! * [`Switch`]: a namespace holding a Linux bridge; [`Switch::attach`] plugs
//!   a node namespace into it with a veth pair and gives it an underlay
//!   address; [`lan`]: the `mpt` switch with `n` nodes on it.
//! * [`Node`]: one `meshpeer` daemon spawned inside a namespace with its own
//!   state dir, its stdout/stderr in a log file; killed on drop (SIGTERM, then
//!   SIGKILL). When the test is panicking, every node prints its `status`,
//!   `wg show` and log while it is dropped, so a failed assertion or a
//!   [`wait_until`] timeout always comes with the daemons' side of the story.
//! * [`wait_until`] / [`wait_for`]: poll a condition every 200 ms until a
//!   deadline, then panic with a description (and the last observation);
//!   [`wait_connected`] for a node's connected members.
//! * [`TempDir`]: a scratch directory, removed on drop unless the test failed.
//! * [`serial`]: held while a test uses the fixed `mpt*` names (a mutex, and
//!   a flock against concurrent test runs on the same machine);
//!   [`serial_prefix`] for another prefix.
//! * [`scenario`]: the three-node scenario, shared by tests/mesh.rs (this
//!   machine) and tests/vm_kernel.rs (a VM with kernel WireGuard);
//!   [`sites`]: two sites routed through their gateways, shared by
//!   tests/sites.rs and tests/vm_kernel.rs.
//! * [`Process`]: another program (e.g. Prometheus) run inside a namespace,
//!   stopped on drop; [`in_netns`] runs a closure on a thread inside a
//!   namespace (to connect to its loopback); [`http_get`] a tiny client for
//!   such checks.
//!
//! Every name this harness creates starts with `mpt`, or with another
//! prefix of [`PREFIXES`] that the test chose (`rt`: tests/sites.rs). The
//! daemons get `MESHPEER_HOSTS_FILE=none` (a test that wants names passes
//! `--hosts-file` of its own: never the machine's /etc/hosts). Environment:
//! * `CI=true`: never skip (a non-root run fails instead of skipping; the
//!   rule is `meshpeer::testing`'s, [`can_run`] applies it).
//! * `MESHPEER_BIN`: the meshpeer binary to run (default: the one cargo built).
//! * `MESHPEER_TEST_TIMEOUT_SCALE`: multiply every deadline (e.g. 4 in a VM
//!   without KVM).
//! * `MESHPEER_EXPECT_BACKEND`: "kernel" or "userspace", asserted by the scenario.
//! * `RUST_LOG`: passed to the daemons (default `info,meshpeer=debug`; logs
//!   are written with NO_COLOR=1).
#![allow(dead_code)]

pub mod scenario;
pub mod sites;

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

pub use meshpeer_testnet::sys;
pub use serde_json::Value;

/// The prefixes of the names (namespaces, interfaces) tests create.
pub const PREFIXES: [&str; 2] = ["mpt", "rt"];

/// The prefix `name` starts with (panics if none of [`PREFIXES`]).
pub fn prefix_of(name: &str) -> &'static str {
    PREFIXES
        .iter()
        .find(|p| name.starts_with(*p))
        .copied()
        .unwrap_or_else(|| panic!("test names must start with one of {PREFIXES:?}: {name}"))
}

/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------

// The skip rule (root, programs; a failure under CI) lives in one place,
// `meshpeer::testing`, shared with the unit tests and testnet/tests.
#[allow(unused_imports)]
pub use meshpeer::testing::{find_in_path, is_ci, require_root, skip};

/// Skips (returns false) or, under CI, panics, when `prog` is not on PATH.
pub fn require_program(test: &str, prog: &str) -> bool {
    meshpeer::testing::may_run(
        test,
        find_in_path(prog).is_some(),
        &format!("`{prog}` not found on PATH (.ci/run installs what the tests need)"),
    )
}

/// Root and each of `progs`: [`require_root`], then [`require_program`].
pub fn can_run(test: &str, progs: &[&str]) -> bool {
    require_root(test) && progs.iter().all(|p| require_program(test, p))
}

/// The meshpeer binary: `$MESHPEER_BIN`, or the one cargo built for this test.
pub fn meshpeer_bin() -> PathBuf {
    match std::env::var_os("MESHPEER_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_meshpeer")),
    }
}

/// `MESHPEER_TEST_TIMEOUT_SCALE` (default 1).
pub fn timeout_scale() -> f64 {
    std::env::var("MESHPEER_TEST_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f > 0.0)
        .unwrap_or(1.0)
}

/// `secs` seconds, multiplied by [`timeout_scale`].
pub fn secs(secs: u64) -> Duration {
    Duration::from_secs_f64(secs as f64 * timeout_scale())
}

/// Held while a test uses the fixed `mpt*` names: serializes the tests of
/// one binary (a mutex) and of concurrent test runs on one machine (an
/// exclusive flock on /run/lock/meshpeer-mpt-tests.lock).
pub struct Serial {
    _file: Option<File>,
    _guard: MutexGuard<'static, ()>,
}

pub fn serial() -> Serial {
    serial_prefix("mpt")
}

/// [`serial`] for the names of `prefix` (a lock file of its own, so tests
/// with other names run beside the `mpt` ones).
pub fn serial_prefix(prefix: &str) -> Serial {
    use std::os::unix::io::AsRawFd;
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = PathBuf::from(format!("/run/lock/meshpeer-{prefix}-tests.lock"));
    let path = path.as_path();
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ok();
    if let Some(f) = &file {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            eprintln!("waiting for another test run holding {}", path.display());
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        }
    }
    Serial {
        _file: file,
        _guard: guard,
    }
}

/// Prints a progress line with the time since `start` (shown with --nocapture
/// or when the test fails).
pub fn progress(start: Instant, msg: impl std::fmt::Display) {
    eprintln!("[{:7.2}s] {msg}", start.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------

/// Polls `cond` every [`POLL`] until it holds; panics after `timeout` with
/// `what` in the message. (Node logs are printed by the nodes' drop guards
/// while the panic unwinds.)
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || {
        if cond() {
            Ok(())
        } else {
            Err("condition false".to_string())
        }
    })
}

/// Polls `f` every [`POLL`] until it returns `Ok`, and returns that value;
/// panics after `timeout` with `what` and the last `Err` description.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut tries = 0u32;
    loop {
        tries += 1;
        let last = match f() {
            Ok(v) => return v,
            Err(e) => e,
        };
        let now = Instant::now();
        if now >= deadline {
            panic!(
                "timed out after {:.1}s ({tries} tries) waiting until {what}\n  last observation: {last}",
                start.elapsed().as_secs_f64()
            );
        }
        thread::sleep(POLL.min(deadline - now));
    }
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

/// Runs `cmd` (stdin null, stdout and stderr captured) and kills it if it is
/// not done within `timeout`.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    sys::run_timeout(cmd, timeout).map_err(|e| format!("{e:#}"))
}

/// Like [`run_timeout`] (30 s), but a failure (spawn error, timeout or
/// non-zero exit) is an `Err` carrying the command and its stderr.
pub fn run_ok(cmd: &mut Command) -> Result<Output, String> {
    let desc = describe(cmd);
    let out = run_timeout(cmd, secs(30))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{desc}: {}\n  stdout: {}\n  stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs a command that must succeed (setup steps); panics otherwise.
pub fn must(cmd: &mut Command) -> Output {
    run_ok(cmd).unwrap_or_else(|e| panic!("{e}"))
}

pub use sys::describe;

// ---------------------------------------------------------------------------
// Scratch directory
// ---------------------------------------------------------------------------

/// A fresh directory under the system temp dir; removed on drop, except when
/// the test is failing (then its path is printed, for the logs in it).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "mpt-{tag}-{}-{}-{:x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            meshpeer::clock::unix_ms()
        ));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "(test failed: keeping {} for inspection)",
                self.path.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------
// Network namespaces and the switch
// ---------------------------------------------------------------------------

/// A network namespace with its loopback up; deleted on drop, after killing
/// any process still inside it.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        prefix_of(name);
        let names = [name.to_string()];
        // A namespace of that name left over by a killed run: remove it.
        if sys::netns_path(name).exists() {
            eprintln!("removing stale network namespace {name}");
            kill_netns_pids(name);
            let _ = sys::del_namespaces(&names);
        }
        sys::add_namespaces(&names).unwrap_or_else(|e| panic!("{e:#}"));
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        cmd_in(&self.name, program)
    }

    /// `ip -n NS ARGS...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> Output {
        must(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `ip -n NS ARGS...`'s standard output (must succeed).
    pub fn ip_out(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.ip(args).stdout).into_owned()
    }

    /// One ping (1 s timeout) from inside the namespace to `addr`.
    pub fn ping(&self, addr: &str) -> bool {
        ping_in(&self.name, addr)
    }

    /// Gives `dev` address `cidr` and brings it up.
    pub fn addr_up(&self, dev: &str, cidr: &str) {
        self.ip(&["addr", "add", cidr, "dev", dev]);
        self.ip(&["link", "set", dev, "up"]);
    }

    /// A sysctl of the namespace, e.g. `net/ipv4/ip_forward` (read inside it).
    pub fn sysctl(&self, path: &str) -> String {
        sys::in_netns(&self.name, || sys::read_sysctl(path))
            .unwrap_or_else(|e| panic!("{}: {e:#}", self.name))
    }
}

/// A veth pair `a_dev` (in `a`) <-> `b_dev` (in `b`), both ends created
/// directly inside their namespaces (they vanish with them).
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) {
    sys::ip_batch(None, &sys::veth_cmd(a_dev, a.name(), b_dev, b.name()))
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// A command that runs `program` inside namespace `ns` (and dies with the
/// test thread that spawns it).
pub fn cmd_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    sys::command_in(ns, program, &[] as &[&str]).unwrap_or_else(|e| panic!("{e:#}"))
}

/// One ping (1 s timeout) from inside namespace `ns` to `addr`.
pub fn ping_in(ns: &str, addr: &str) -> bool {
    run_timeout(
        cmd_in(ns, "ping").args(["-c1", "-W1", "-n", "-q", addr]),
        secs(10),
    )
    .map(|o| o.status.success())
    .unwrap_or(false)
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_netns_pids(&self.name);
        if let Err(e) = sys::del_namespaces(std::slice::from_ref(&self.name)) {
            eprintln!("{e:#}");
        }
    }
}

/// SIGKILLs every process in namespace `name` (all of them were started by
/// the test that created it).
fn kill_netns_pids(name: &str) {
    let killed = sys::kill_in_namespaces(&[name.to_string()]);
    if killed > 0 {
        eprintln!("killed {killed} leftover processes in namespace {name}");
    }
}

/// The "switch": a namespace holding one Linux bridge that node namespaces
/// are plugged into.
pub struct Switch {
    ns: Netns,
    bridge: String,
    ports: AtomicUsize,
}

impl Switch {
    /// Creates namespace `ns_name` with bridge `<prefix>-br0` in it (the
    /// prefix of `ns_name`, e.g. `mpt`).
    pub fn new(ns_name: &str) -> Switch {
        let ns = Netns::new(ns_name);
        let bridge = format!("{}-br0", prefix_of(ns_name));
        ns.ip(&["link", "add", &bridge, "type", "bridge"]);
        ns.ip(&["link", "set", &bridge, "up"]);
        Switch {
            ns,
            bridge,
            ports: AtomicUsize::new(0),
        }
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Plugs `node` in: a veth pair `<prefix>-eth0` (in `node`, with
    /// address `cidr`, e.g. "10.99.0.1/24") <-> `<prefix>-pN` (on the
    /// bridge). Both ends are created directly inside their namespaces and
    /// vanish with them.
    pub fn attach(&self, node: &Netns, cidr: &str) -> String {
        let p = prefix_of(self.ns.name());
        let port = format!("{p}-p{}", self.ports.fetch_add(1, Ordering::Relaxed) + 1);
        let dev = format!("{p}-eth0");
        veth(node, &dev, &self.ns, &port);
        self.ns.ip(&["link", "set", &port, "master", &self.bridge]);
        self.ns.ip(&["link", "set", &port, "up"]);
        node.addr_up(&dev, cidr);
        dev
    }
}

/// The LAN of tests/mesh.rs, hostile.rs and ops.rs: switch `mpt-br`, `n`
/// namespaces `mpt-n<i>` on it (10.99.0.<i>/24), and in each a node `n<i>`
/// (interface `mpt<i>`, files under `work`), not started. Bind the three
/// in this order (`let (switch, netns, nodes) = ...`): they drop in
/// reverse, daemons first, then their namespaces, then the switch.
pub fn lan(n: usize, work: &Path) -> (Switch, Vec<Netns>, Vec<Node>) {
    let switch = Switch::new("mpt-br");
    let netns: Vec<Netns> = (1..=n).map(|i| Netns::new(&format!("mpt-n{i}"))).collect();
    for (i, ns) in netns.iter().enumerate() {
        switch.attach(ns, &format!("10.99.0.{}/24", i + 1));
    }
    let nodes = (1..=n)
        .map(|i| Node::new(&format!("n{i}"), &netns[i - 1], &format!("mpt{i}"), work))
        .collect();
    (switch, netns, nodes)
}

// ---------------------------------------------------------------------------
// meshpeer nodes
// ---------------------------------------------------------------------------

/// One meshpeer daemon in a namespace: its own state dir and log file; the
/// process is stopped on drop. All methods take `&self`, so nodes can be
/// used from inside polling closures.
pub struct Node {
    pub name: String,
    pub netns: String,
    pub interface: String,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    proc: Mutex<Proc>,
}

#[derive(Default)]
struct Proc {
    child: Option<Child>,
    exited: Option<ExitStatus>,
}

impl Node {
    /// A node called `name` that will run in `netns` with WireGuard interface
    /// `interface`; its files go under `workdir/name/`.
    pub fn new(name: &str, netns: &Netns, interface: &str, workdir: &Path) -> Node {
        prefix_of(interface);
        let dir = workdir.join(name);
        let state_dir = dir.join("state");
        fs::create_dir_all(&state_dir)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", state_dir.display()));
        let log = dir.join("meshpeer.log");
        File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        // A userspace UAPI socket left by a killed daemon of an earlier run.
        remove_stale_uapi_socket(interface);
        Node {
            name: name.to_string(),
            netns: netns.name().to_string(),
            interface: interface.to_string(),
            state_dir,
            log,
            proc: Mutex::new(Proc::default()),
        }
    }

    fn proc(&self) -> MutexGuard<'_, Proc> {
        self.proc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A command that runs `program` inside the node's namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        cmd_in(&self.netns, program)
    }

    /// `meshpeer ARGS` inside the node's namespace.
    fn meshpeer(&self, args: &[&str]) -> Command {
        let mut c = self.cmd(meshpeer_bin());
        c.args(args);
        self.env(&mut c);
        c
    }

    /// `meshpeer ARGS` in the test's own namespace (control-socket commands).
    fn meshpeer_local(&self, args: &[&str]) -> Command {
        let mut c = Command::new(meshpeer_bin());
        c.args(args);
        self.env(&mut c);
        c
    }

    /// The daemon's environment: ours, less the meshpeer settings that would
    /// change what the test expects (the flags it passes, the default ports,
    /// the advertised address, a config file, tags, metrics, the log level). MESHPEER_BACKEND is passed on, to let a run
    /// force a backend.
    fn env(&self, c: &mut Command) {
        for var in [
            "MESHPEER_TOKEN",
            "MESHPEER_STATE_DIR",
            "MESHPEER_INTERFACE",
            "MESHPEER_WG_PORT",
            "MESHPEER_GOSSIP_PORT",
            "MESHPEER_ADVERTISE_ADDR",
            "MESHPEER_NO_RELAY",
            "MESHPEER_CONFIG",
            "MESHPEER_NAME",
            "MESHPEER_TAGS",
            "MESHPEER_WITH_TAG",
            "MESHPEER_METRICS_ADDR",
            "MESHPEER_LOG_LEVEL",
            "MESHPEER_ON_STOP",
            "MESHPEER_ADVERTISE_ROUTES",
            "MESHPEER_EPHEMERAL",
        ] {
            c.env_remove(var);
        }
        // Never the machine's /etc/hosts.
        c.env("MESHPEER_HOSTS_FILE", "none");
        if std::env::var_os("RUST_LOG").is_none() {
            c.env("RUST_LOG", "info,meshpeer=debug");
        }
        // Plain log files, without ANSI colours.
        c.env("NO_COLOR", "1");
    }

    fn common_args(&self) -> Vec<String> {
        vec![
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--interface".into(),
            self.interface.clone(),
            "--name".into(),
            self.name.clone(),
        ]
    }

    fn log_file(&self) -> File {
        OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()))
    }

    /// `meshpeer init --network NETWORK ...`; returns the join token (its
    /// whole stdout, which must be one non-empty line). Its stderr goes to
    /// the node's log.
    pub fn init(&self, network: &str) -> String {
        let mut args = vec!["init".to_string(), "--network".into(), network.into()];
        args.extend(self.common_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = self.meshpeer(&args);
        let out = run_timeout(&mut cmd, secs(30)).unwrap_or_else(|e| panic!("{}: {e}", self.name));
        let _ = std::io::Write::write_all(&mut self.log_file(), &out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{}: `{}` failed ({})\n  stdout: {stdout}\n  stderr: {}",
            self.name,
            describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let token = stdout.trim();
        assert!(
            !token.is_empty() && !token.contains('\n'),
            "{}: init must print exactly the join token on stdout, printed {stdout:?}",
            self.name
        );
        token.to_string()
    }

    /// Starts `meshpeer up` (the node that ran `init`).
    pub fn spawn_up(&self) {
        self.spawn_up_with(&[]);
    }

    /// Starts `meshpeer up` with more arguments.
    pub fn spawn_up_with(&self, extra: &[&str]) {
        let mut args = vec!["up".to_string()];
        args.extend(self.common_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(args);
    }

    /// Starts `meshpeer join SEED --token TOKEN`.
    pub fn spawn_join(&self, seed: &str, token: &str) {
        self.spawn_join_with(seed, token, &[]);
    }

    /// Starts `meshpeer join SEED --token TOKEN` with more arguments.
    pub fn spawn_join_with(&self, seed: &str, token: &str, extra: &[&str]) {
        let mut args = vec![
            "join".to_string(),
            seed.into(),
            "--token".into(),
            token.into(),
        ];
        args.extend(self.common_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(args);
    }

    /// `meshpeer ARGS --state-dir DIR` against this node's daemon (from the
    /// test's namespace, through the control socket); `Err` unless it
    /// exits 0.
    pub fn cli(&self, args: &[&str]) -> Result<Output, String> {
        let dir = self.state_dir.display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--state-dir", &dir]);
        run_ok(&mut self.meshpeer_local(&all)).map_err(|e| format!("{}: {e}", self.name))
    }

    /// Like [`Node::cli`], for a command that must fail: its stderr.
    pub fn cli_fails(&self, args: &[&str]) -> String {
        let dir = self.state_dir.display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--state-dir", &dir]);
        let out = run_timeout(&mut self.meshpeer_local(&all), secs(30))
            .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        assert!(
            !out.status.success(),
            "{}: meshpeer {args:?} should have failed; stdout: {}",
            self.name,
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// A `meshpeer ARGS --state-dir DIR` command (stdout piped, for
    /// long-running ones like `status --watch`), spawned; killed on drop.
    pub fn cli_spawn(&self, args: &[&str]) -> Process {
        let dir = self.state_dir.display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--state-dir", &dir]);
        let mut cmd = self.meshpeer_local(&all);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Process::spawn(&format!("{} meshpeer {}", self.name, args.join(" ")), cmd)
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("{}: not started", self.name));
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(pid as i32, sig) };
    }

    fn spawn(&self, args: Vec<String>) {
        let mut p = self.proc();
        assert!(p.child.is_none(), "{}: already started", self.name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = self.meshpeer(&args);
        let log = self.log_file();
        let log2 = log.try_clone().expect("dup log fd");
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot spawn {}: {e}", self.name, describe(&cmd)));
        p.child = Some(child);
        p.exited = None;
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc().child.as_ref().map(Child::id)
    }

    /// `Ok` while the daemon runs; `Err` once it has exited (with how).
    pub fn check_running(&self) -> Result<(), String> {
        let mut p = self.proc();
        if let Some(s) = p.exited {
            return Err(format!("{} has exited ({s})", self.name));
        }
        let Some(child) = p.child.as_mut() else {
            return Err(format!("{} was never started", self.name));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(s)) => {
                p.exited = Some(s);
                Err(format!("{} has exited ({s})", self.name))
            }
            Err(e) => Err(format!("{}: wait: {e}", self.name)),
        }
    }

    /// Panics at once (instead of at some deadline) if the daemon has died.
    pub fn assert_running(&self) {
        if let Err(e) = self.check_running() {
            panic!("{e} unexpectedly");
        }
    }

    /// Waits up to `timeout` for the daemon to exit; returns its exit status.
    pub fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        wait_for(timeout, &format!("{} exits", self.name), || {
            match self.check_running() {
                Ok(()) => Err("still running".into()),
                Err(_) => Ok(()),
            }
        });
        self.proc().exited.expect("exited")
    }

    /// `meshpeer status --json`, parsed.
    pub fn status(&self) -> Result<Value, String> {
        let dir = self.state_dir.display().to_string();
        let out = run_ok(&mut self.meshpeer_local(&["status", "--state-dir", &dir, "--json"]))
            .map_err(|e| format!("{}: {e}", self.name))?;
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).map_err(|e| {
            format!(
                "{}: status --json is not one JSON object ({e}): {text}",
                self.name
            )
        })
    }

    /// `meshpeer leave` (must succeed). The daemon is reaped while `leave`
    /// runs, so a `leave` that waits for the daemon's pid to vanish is not
    /// fooled by a zombie.
    pub fn leave(&self) {
        let dir = self.state_dir.display().to_string();
        let mut cmd = self.meshpeer_local(&["leave", "--state-dir", &dir]);
        thread::scope(|scope| {
            let leave = scope.spawn(move || run_ok(&mut cmd));
            while !leave.is_finished() {
                let _ = self.check_running();
                thread::sleep(Duration::from_millis(20));
            }
            match leave.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{}: {e}", self.name),
                Err(_) => panic!("{}: leave thread panicked", self.name),
            }
        });
    }

    /// The public keys of the peers on the node's WireGuard device
    /// (`wg show IF peers`, which reads the kernel device or the userspace
    /// UAPI socket alike).
    pub fn wg_peers(&self) -> Result<Vec<String>, String> {
        let out = run_ok(self.cmd("wg").args(["show", &self.interface, "peers"]))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// One ping (1 s timeout) from this node's namespace to `addr`.
    pub fn ping(&self, addr: &str) -> bool {
        ping_in(&self.netns, addr)
    }

    /// The last `lines` lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let skip = all.len().saturating_sub(lines);
        let mut s = String::new();
        if skip > 0 {
            s.push_str(&format!(
                "... ({skip} earlier lines in {})\n",
                self.log.display()
            ));
        }
        for l in &all[skip..] {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// Prints status, `wg show` and the log (used when the test fails).
    pub fn dump(&self) {
        let running = self.check_running();
        let state = match &running {
            Ok(()) => "running".to_string(),
            Err(e) => e.clone(),
        };
        eprintln!(
            "\n======== node {} (netns {}, interface {}): {state} ========",
            self.name, self.netns, self.interface
        );
        if running.is_ok() {
            let dir = self.state_dir.display().to_string();
            let mut cmd = self.meshpeer_local(&["status", "--state-dir", &dir, "--json"]);
            match run_timeout(&mut cmd, Duration::from_secs(5)) {
                Ok(o) => eprintln!(
                    "---- status --json ({}):\n{}{}",
                    o.status,
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("---- status --json: {e}"),
            }
        }
        let mut cmd = self.cmd("wg");
        cmd.args(["show", &self.interface]);
        match run_timeout(&mut cmd, Duration::from_secs(5)) {
            Ok(o) => eprintln!(
                "---- wg show {}:\n{}{}",
                self.interface,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("---- wg show: {e}"),
        }
        eprintln!("---- log {}:\n{}", self.log.display(), self.log_tail(400));
    }

    /// SIGTERM, up to 10 s (scaled) to exit, then SIGKILL. Idempotent.
    pub fn stop(&self) {
        let mut guard = self.proc();
        let p = &mut *guard;
        if let (Some(child), None) = (p.child.as_mut(), p.exited) {
            if let Ok(None) = child.try_wait() {
                // SAFETY: plain syscall on our own child.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + secs(10);
                loop {
                    match child.try_wait() {
                        Ok(Some(s)) => {
                            p.exited = Some(s);
                            break;
                        }
                        Ok(None) if Instant::now() < deadline => {
                            thread::sleep(Duration::from_millis(20))
                        }
                        _ => {
                            eprintln!("{}: still running after SIGTERM, killing it", self.name);
                            let _ = child.kill();
                            p.exited = child.wait().ok();
                            break;
                        }
                    }
                }
            }
        }
        remove_stale_uapi_socket(&self.interface);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let started = self.proc().child.is_some();
        if started && thread::panicking() {
            self.dump();
        }
        self.stop();
    }
}

/// Removes `/var/run/wireguard/IF.sock` (userspace backend) if nothing
/// listens on it any more.
fn remove_stale_uapi_socket(interface: &str) {
    let sock = Path::new("/var/run/wireguard").join(format!("{interface}.sock"));
    if sock.exists() && std::os::unix::net::UnixStream::connect(&sock).is_err() {
        let _ = fs::remove_file(&sock);
    }
}

// ---------------------------------------------------------------------------
// status --json helpers
// ---------------------------------------------------------------------------

/// Waits until `node` sees `others` members connected; returns that status.
pub fn wait_connected(node: &Node, others: usize, timeout: Duration) -> Value {
    wait_for(
        timeout,
        &format!("{} sees {others} others connected", node.name),
        || {
            node.assert_running();
            let s = node.status()?;
            let connected = members(&s)
                .iter()
                .filter(|m| m["state"] == "connected")
                .count();
            if connected == others {
                Ok(s)
            } else {
                Err(format!("members: [{}]", members_summary(&s)))
            }
        },
    )
}

/// An address without a "/prefix" suffix.
pub fn strip_prefix_len(s: &str) -> String {
    s.split('/').next().unwrap_or(s).to_string()
}

/// The node's own entry: `"self"`, or the member whose state is "self".
pub fn status_self(status: &Value) -> Option<&Value> {
    match status.get("self") {
        Some(v) if v.is_object() => Some(v),
        _ => members(status).iter().find(|m| m["state"] == "self"),
    }
}

/// The node's overlay IP (without prefix length), if the status has one.
pub fn status_overlay_ip(status: &Value) -> Option<String> {
    status_self(status)?
        .get("overlay_ip")?
        .as_str()
        .map(strip_prefix_len)
}

pub fn members(status: &Value) -> &[Value] {
    status
        .get("members")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

pub fn backend(status: &Value) -> Option<&str> {
    status.get("backend").and_then(Value::as_str)
}

/// A compact one-line summary of the members (for failure messages).
pub fn members_summary(status: &Value) -> String {
    members(status)
        .iter()
        .map(|m| {
            format!(
                "{}={}({})",
                m["name"].as_str().unwrap_or("?"),
                m["overlay_ip"].as_str().unwrap_or("?"),
                m["state"].as_str().unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------
// Other programs, namespaces from the inside, HTTP
// ---------------------------------------------------------------------------

/// A program the test started (e.g. Prometheus, or a long-running meshpeer
/// client): SIGTERM on drop, SIGKILL if it lingers; it also dies with the
/// test thread.
pub struct Process {
    pub name: String,
    child: Option<Child>,
}

impl Process {
    /// Spawns `cmd` (its stdio as the caller set it).
    pub fn spawn(name: &str, mut cmd: Command) -> Process {
        sys::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot spawn {}: {e}", describe(&cmd)));
        Process {
            name: name.to_string(),
            child: Some(child),
        }
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("process")
    }

    /// Panics if it has exited.
    pub fn assert_running(&mut self) {
        let name = self.name.clone();
        if let Ok(Some(s)) = self.child().try_wait() {
            panic!("{name} exited unexpectedly ({s})");
        }
    }

    /// Sends `sig` and waits up to 10 s (scaled) for the exit; SIGKILL after.
    pub fn stop_with(&mut self, sig: i32) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    eprintln!("{}: still running, killing it", self.name);
                    let _ = child.kill();
                    return child.wait().ok();
                }
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop_with(libc::SIGTERM);
    }
}

/// Runs `f` on a thread that has entered network namespace `name` (so it
/// can reach the namespace's loopback), and returns its result.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    sys::in_netns(name, || Ok(f())).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `GET path` over HTTP/1.0 (the server closes the connection, no chunked
/// encoding): (status code, body). Connects from the calling thread's
/// namespace.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String), String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}{path}: no HTTP header in {text:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}{path}: bad status line in {head:?}"))?;
    Ok((code, body.to_string()))
}

/// Percent-encodes a URL query value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
