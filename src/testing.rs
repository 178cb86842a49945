//! The rule every test that needs something from the machine follows (root,
//! a program, a kernel image): without it the test is **skipped** (it
//! passes, after printing `SKIPPED <test>: <why>` to stderr, past the test
//! harness's capture), except under `CI` (set to anything but "", "0",
//! "false", "no"), where a missing requirement is a failure. `.ci/run`
//! collects the `SKIPPED` lines into its summary. Shared by the unit tests,
//! tests/ and testnet/tests; not part of the daemon.

use std::path::PathBuf;

/// True when running under CI (`CI` set to anything but "", "0", "false",
/// "no").
pub fn is_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "false" | "no"
        ),
        Err(_) => false,
    }
}

/// Prints "SKIPPED why" straight to stderr.
pub fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {why}");
}

/// `true` if the test may go on. Otherwise skips (printing `test: why`) and
/// returns `false`, or, under CI, panics with the same words.
pub fn may_run(test: &str, ok: bool, why: &str) -> bool {
    if ok {
        return true;
    }
    if is_ci() {
        panic!("{test}: {why}, and CI=true forbids skipping");
    }
    skip(&format!("{test}: {why}"));
    false
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Root is needed (network namespaces, TUN devices).
pub fn require_root(test: &str) -> bool {
    may_run(
        test,
        is_root(),
        "needs root (network namespaces, TUN devices); run as root",
    )
}

/// `prog` must be on PATH; `package` names the Debian package that has it.
pub fn require_program(test: &str, prog: &str, package: &str) -> bool {
    may_run(
        test,
        find_in_path(prog).is_some(),
        &format!("`{prog}` not found on PATH (apt-get install {package})"),
    )
}

/// Where `prog` is on PATH.
pub fn find_in_path(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(prog))
            .find(|f| f.is_file())
    })
}
