//! The testnet's own checks, run with `cargo test`:
//! * `probe_nat`: every emulated NAT kind maps, filters, expires and
//!   flushes as documented (`testnet probe-nat`).
//! * `smoke_flat`: 12 meshpeer nodes on the flat internet, one kill, one
//!   leave; fails when the mesh does not converge (or detect the failures)
//!   within the deadlines in `scenarios/smoke-flat.toml`.
//!
//! Both need root (network namespaces) and nftables, conntrack and iproute2.
//! Not root: skipped with a message, unless CI=true (then they fail).
//! `MESHPEER_BIN` picks the daemon (default: target/debug/meshpeer beside
//! this test's binary, which `cargo test` in the workspace builds).
//! `smoke_nat` runs `smoke-nat.toml` the same way, and `smoke_mixed`
//! `smoke-mixed.toml` (every NAT kind: home NAT, CGNAT, symmetric).

use std::path::{Path, PathBuf};
use std::process::Command;

fn is_ci() -> bool {
    std::env::var("CI")
        .map(|v| {
            !matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "" | "0" | "false" | "no"
            )
        })
        .unwrap_or(false)
}

/// False (skip) when the test cannot run here; panics instead under CI.
fn can_run(test: &str) -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if is_ci() {
            panic!("{test}: needs root, and CI=true forbids skipping");
        }
        eprintln!("SKIPPED {test}: needs root (network namespaces)");
        return false;
    }
    for prog in ["ip", "nft", "conntrack"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
            .unwrap_or(false);
        if !found {
            if is_ci() {
                panic!(
                    "{test}: `{prog}` not installed (apt-get install iproute2 nftables conntrack)"
                );
            }
            eprintln!("SKIPPED {test}: `{prog}` not installed (apt-get install iproute2 nftables conntrack)");
            return false;
        }
    }
    true
}

fn testnet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_testnet"))
}

fn meshpeer_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MESHPEER_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    // target/<profile>/deps/testnet-<hash> -> target/<profile>/meshpeer
    let p = exe.parent()?.parent()?.join("meshpeer");
    p.is_file().then_some(p)
}

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(name)
}

#[test]
fn probe_nat() {
    if !can_run("probe_nat") {
        return;
    }
    let out = testnet()
        .args(["probe-nat", "--json"])
        .output()
        .expect("run testnet probe-nat");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("probe-nat --json output");
    let kinds: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["public", "nat", "cgnat", "symmetric"]);
    for r in v.as_array().unwrap() {
        assert!(
            r["ok"].as_bool().unwrap(),
            "{}: {}",
            r["kind"],
            r["failures"]
        );
    }
    let by = |k: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|r| r["kind"] == k)
            .unwrap()
            .clone()
    };
    assert_eq!(by("nat")["endpoint_independent_mapping"], true);
    assert_eq!(by("cgnat")["endpoint_independent_mapping"], true);
    assert_eq!(by("symmetric")["endpoint_independent_mapping"], false);
    for k in ["nat", "cgnat", "symmetric"] {
        assert_eq!(by(k)["unsolicited_inbound_dropped"], true, "{k}");
        assert_eq!(by(k)["hairpin"], false, "{k}");
        assert_eq!(by(k)["mapping_expires"], true, "{k}");
        assert_eq!(by(k)["flush_forgets_mapping"], true, "{k}");
    }
    assert!(out.status.success());
}

fn smoke(test: &str, file: &str) {
    if !can_run(test) {
        return;
    }
    let Some(bin) = meshpeer_bin() else {
        if is_ci() {
            panic!("{test}: no meshpeer binary (build it with `cargo build --bin meshpeer` or set MESHPEER_BIN)");
        }
        eprintln!(
            "SKIPPED {test}: no meshpeer binary (cargo build --bin meshpeer, or set MESHPEER_BIN)"
        );
        return;
    };
    let out_dir =
        std::env::temp_dir().join(format!("meshpeer-testnet-{test}-{}", std::process::id()));
    let out = testnet()
        .args(["run", "--scenario"])
        .arg(scenario(file))
        .arg("--meshpeer-bin")
        .arg(&bin)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("run testnet");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("report.json")).expect("report.json written"),
    )
    .unwrap();
    assert!(out_dir.join("reachability.svg").is_file());
    let run = &report["runs"][0];
    assert_eq!(run["engine"], "meshpeer");
    assert!(
        out.status.success() && report["ok"] == true,
        "{test}: the mesh did not converge within the deadlines: {}",
        run["errors"]
    );
    assert_eq!(run["convergence"]["converged"], true);
    let _ = std::fs::remove_dir_all(&out_dir);
}

#[test]
fn smoke_flat() {
    smoke("smoke_flat", "smoke-flat.toml");
}

#[test]
fn smoke_nat() {
    smoke("smoke_nat", "smoke-nat.toml");
}

#[test]
fn smoke_mixed() {
    smoke("smoke_mixed", "smoke-mixed.toml");
}
