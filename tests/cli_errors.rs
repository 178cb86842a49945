//! Bad input at the command line: each gets one clear line on stderr, a
//! non-zero exit, and leaves nothing half-written. No root or network needed
//! (the unreachable seed is a closed port on loopback).

use std::path::PathBuf;
use std::process::{Command, Output};

fn meshpeer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshpeer"))
        .args(args)
        .env_remove("MESHPEER_TOKEN")
        .env_remove("MESHPEER_STATE_DIR")
        .env("RUST_LOG", "error")
        .output()
        .expect("run meshpeer")
}

fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("mp-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
}

#[test]
fn init_prints_only_a_token_and_refuses_twice() {
    let dir = scratch("init");
    let d = dir.to_str().unwrap();
    let out = meshpeer(&[
        "init",
        "--network",
        "10.77.0.0/16",
        "--state-dir",
        d,
        "--name",
        "a",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1);
    assert!(stdout.starts_with("mp2."));
    for f in [
        "node.key",
        "wireguard.key",
        "network.key",
        "membership.json",
        "state.json",
    ] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join(f)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    fails_with(
        &meshpeer(&["init", "--network", "10.77.0.0/16", "--state-dir", d]),
        "already holds a node",
    );
    // invite works where the network key is.
    let inv = meshpeer(&["invite", "--state-dir", d]);
    assert!(inv.status.success());
    assert!(String::from_utf8_lossy(&inv.stdout).starts_with("mp2."));
    let inv = meshpeer(&[
        "invite",
        "--state-dir",
        d,
        "--expires-in",
        "7d",
        "--allow-route",
        "192.168.10.0/24",
    ]);
    assert!(
        inv.status.success(),
        "{}",
        String::from_utf8_lossy(&inv.stderr)
    );
    fails_with(
        &meshpeer(&["invite", "--state-dir", d, "--expires-in", "soon"]),
        "not a duration",
    );
    fails_with(
        &meshpeer(&["invite", "--state-dir", d, "--allow-route", "everything"]),
        "not a CIDR",
    );
    // Tokens issued here are listed, with their expiry.
    let list = meshpeer(&["tokens", "--state-dir", d]);
    assert!(list.status.success());
    let list = String::from_utf8_lossy(&list.stdout);
    assert_eq!(
        list.lines()
            .filter(|l| l.ends_with("valid") || l.contains("valid (routes"))
            .count(),
        3,
        "{list}"
    );
    // Bad names.
    fails_with(
        &meshpeer(&[
            "init",
            "--network",
            "10.77.0.0/16",
            "--state-dir",
            "/nonexistent-x",
            "--name",
            "has space",
        ]),
        "host name label",
    );
    // status without a daemon says so.
    fails_with(
        &meshpeer(&["status", "--state-dir", d]),
        "no meshpeer daemon is running",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_networks_are_refused() {
    let d = scratch("net");
    let d = d.to_str().unwrap();
    fails_with(
        &meshpeer(&["init", "--network", "10.77.0.0", "--state-dir", d]),
        "not an IPv4 CIDR",
    );
    fails_with(
        &meshpeer(&["init", "--network", "10.77.0.0/31", "--state-dir", d]),
        "no room",
    );
    fails_with(
        &meshpeer(&["init", "--network", "fd00::/64", "--state-dir", d]),
        "not an IPv4 CIDR",
    );
}

#[test]
fn bad_tokens_and_seeds_are_refused_without_leaving_state() {
    let dir = scratch("join");
    let d = dir.to_str().unwrap();
    fails_with(
        &meshpeer(&["join", "127.0.0.1", "--token", "hello", "--state-dir", d]),
        "not a meshpeer token",
    );
    fails_with(
        &meshpeer(&["join", "127.0.0.1", "--token", "mp2.AAAA", "--state-dir", d]),
        "token is corrupt",
    );
    fails_with(
        &meshpeer(&["join", "127.0.0.1", "--state-dir", d]),
        "a join token is needed",
    );
    fails_with(
        &meshpeer(&[
            "join",
            "127.0.0.1",
            "--token-file",
            "/nonexistent/token",
            "--state-dir",
            d,
        ]),
        "cannot read --token-file",
    );
    // A real token, a malformed seed.
    let founder = scratch("founder");
    let f = founder.to_str().unwrap();
    let out = meshpeer(&["init", "--network", "10.77.0.0/16", "--state-dir", f]);
    let token = String::from_utf8(out.stdout).unwrap();
    let token = token.trim();
    fails_with(
        &meshpeer(&[
            "join",
            "127.0.0.1:notaport",
            "--token",
            token,
            "--state-dir",
            d,
        ]),
        "bad port",
    );
    fails_with(
        &meshpeer(&["join", "", "--token", token, "--state-dir", d]),
        "is empty",
    );
    // An unreachable seed: a clear error, and no half-made node left behind.
    let out = meshpeer(&[
        "join",
        "127.0.0.1:9",
        "--token",
        token,
        "--state-dir",
        d,
        "--gossip-port",
        "0",
        "--join-timeout-secs",
        "3",
    ]);
    fails_with(&out, "nothing answered at 127.0.0.1:9");
    assert!(!dir.exists(), "a failed join left {d} behind");
    // An expired token: refused before anything is written, saying so.
    let secret = {
        use base64::Engine;
        let text = std::fs::read_to_string(founder.join("network.key")).unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .unwrap();
        ed25519_dalek::SigningKey::from_bytes(&raw.try_into().unwrap())
    };
    let now = meshpeer::clock::unix_secs();
    let expired = meshpeer::admission::issue_token(
        &secret,
        "10.77.0.0/16".parse().unwrap(),
        now - 10,
        vec![],
    )
    .to_text();
    let tf = founder.join("expired.token");
    std::fs::write(&tf, &expired).unwrap();
    let out = meshpeer(&[
        "join",
        "127.0.0.1:9",
        "--token-file",
        tf.to_str().unwrap(),
        "--state-dir",
        d,
    ]);
    fails_with(&out, "the token expired at");
    assert!(!dir.exists(), "a refused join left {d} behind");
    // up on a missing state dir.
    fails_with(&meshpeer(&["up", "--state-dir", d]), "does not exist");
    std::fs::remove_dir_all(&founder).unwrap();
}

/// Node ids are base64url and may start with `-`: `revoke` and `ping` take
/// them as the member, not as a flag (CI's hostile test drew such a key and
/// `revoke` failed with "unexpected argument '-7'").
#[test]
fn node_ids_starting_with_a_dash_are_members_not_flags() {
    let dir = scratch("dash");
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.to_str().unwrap();
    let id = "-7iPAgLzZii183Be81nNTgls9n8mhnkqWUFtJP18kLM";
    for args in [
        vec!["revoke", id, "--state-dir", d],
        vec!["ping", id, "--state-dir", d],
    ] {
        let out = meshpeer(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(!err.contains("unexpected argument"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
