//! The three-node mesh scenario (tests/common/scenario.rs, which tests/mesh.rs
//! runs on this machine) and the site-to-site scenario (tests/common/sites.rs,
//! which tests/sites.rs runs) once more, inside a VM whose kernel has
//! WireGuard, so that meshpeer's kernel backend is what is tested (the CI
//! host's kernel has no WireGuard, so there meshpeer uses its userspace one):
//! peers, allowed IPs with subnets, and kernel routes through a kernel
//! WireGuard interface.
//!
//! `mesh_in_vm_with_kernel_wireguard` runs tests/vm/run-mesh-in-vm.sh, which
//! boots the machine's Debian kernel under QEMU with virtme-ng (`vng`,
//! software emulation, no KVM) and runs *this* test binary in it, filtered to
//! the ignored tests `three_nodes_in_vm_guest` and `sites_in_vm_guest` (the
//! scenarios, requiring the kernel backend). Running our own executable guarantees that the VM tests
//! exactly the code this `cargo test` built. The VM's output is streamed to
//! stderr, prefixed with "[vm] ".
//!
//! Skipped with a printed reason when vng, QEMU or a kernel image with the
//! wireguard module are missing, unless CI=true: then it must run.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const MARKER_PASS: &str = "MPT-VM-RESULT: PASS";
const GUEST_TEST: &str = "three_nodes_in_vm_guest";
const GUEST_SITES: &str = "sites_in_vm_guest";

/// The scenario with kernel WireGuard. Ignored in normal runs: it needs a
/// kernel with WireGuard, and `mesh_in_vm_with_kernel_wireguard` runs it in
/// the VM.
#[test]
#[ignore = "needs kernel WireGuard: mesh_in_vm_with_kernel_wireguard runs it inside a VM"]
fn three_nodes_in_vm_guest() {
    common::scenario::three_nodes_form_a_full_mesh_and_one_leaves(GUEST_TEST, Some("kernel"));
}

/// Two sites routed through their gateways with kernel WireGuard. Ignored in
/// normal runs, like [`three_nodes_in_vm_guest`].
#[test]
#[ignore = "needs kernel WireGuard: mesh_in_vm_with_kernel_wireguard runs it inside a VM"]
fn sites_in_vm_guest() {
    common::sites::two_sites_route_through_their_gateways(GUEST_SITES, Some("kernel"));
}

/// The running run-mesh-in-vm.sh. Dropped before it has exited (the test
/// panicked): SIGTERM, which makes the script stop the VM, then SIGKILL.
struct Script(std::process::Child);

impl Drop for Script {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            eprintln!("[vm] stopping run-mesh-in-vm.sh");
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(60);
            while let Ok(None) = self.0.try_wait() {
                if Instant::now() >= deadline {
                    let _ = self.0.kill();
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.wait();
        }
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm/run-mesh-in-vm.sh")
}

#[test]
fn mesh_in_vm_with_kernel_wireguard() {
    const TEST: &str = "mesh_in_vm_with_kernel_wireguard";
    let script = script();

    // Prerequisites (vng, QEMU, a kernel image with wireguard, tools).
    let check = Command::new("bash")
        .arg(&script)
        .arg("--check")
        .stdin(Stdio::null())
        .output()
        .expect("run run-mesh-in-vm.sh --check");
    let check_text = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    if !meshpeer::testing::may_run(
        TEST,
        check.status.success(),
        &format!("cannot run the VM:\n{check_text}"),
    ) {
        return;
    }

    let me = std::env::current_exe().expect("current_exe");
    let meshpeer = PathBuf::from(env!("CARGO_BIN_EXE_meshpeer"));
    let mut err = std::io::stderr();
    let _ = writeln!(
        err,
        "[vm] {check_text}[vm] test binary {}, meshpeer {}",
        me.display(),
        meshpeer.display()
    );

    let start = Instant::now();
    let child = Command::new("bash")
        .arg(&script)
        .arg(&me)
        .arg(&meshpeer)
        .args(["--ignored", "--exact", GUEST_TEST, GUEST_SITES])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run-mesh-in-vm.sh");
    let mut child = Script(child);

    // Stream both pipes, line by line, to the real stderr (past the test
    // harness's capture: a VM run takes minutes and its progress should show
    // in CI logs), and keep the lines for the checks.
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    for pipe in [
        Box::new(child.0.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.0.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        readers.push(thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(std::io::stderr(), "[vm] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);

    // The script has its own timeout (MESHPEER_VM_TIMEOUT, 1500 s); this is
    // a backstop in case it hangs anyway.
    let deadline = start + Duration::from_secs(1800);
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("wait run-mesh-in-vm.sh") {
            break s;
        }
        if Instant::now() >= deadline {
            // Script's drop stops it (and with it the VM).
            panic!("{TEST}: run-mesh-in-vm.sh still running after 30 min");
        }
        thread::sleep(Duration::from_millis(200));
    };
    for r in readers {
        let _ = r.join();
    }
    let lines: Vec<String> = rx.into_iter().collect();
    let took = start.elapsed().as_secs_f64();
    let passed_marker = lines.iter().any(|l| l.trim_end() == MARKER_PASS);
    // The guest's libtest must have run exactly our two tests and passed them.
    let ran_both = lines
        .iter()
        .any(|l| l.starts_with("test result: ok. 2 passed; 0 failed"));
    assert!(
        status.success() && passed_marker && ran_both,
        "{TEST}: the scenarios in the VM failed after {took:.0}s (script {status}, \
         PASS marker seen: {passed_marker}, guest ran 2 tests and passed: {ran_both}); \
         its output is above, prefixed with [vm]"
    );
    let _ = writeln!(
        err,
        "[vm] the mesh and site-to-site scenarios passed in the VM with kernel WireGuard ({took:.0}s)"
    );
}
