//! The operations commands at the command line, without a daemon: version,
//! completions, man pages, `config check`, the precedence of flag,
//! environment and config file, and clear errors for bad values. No root or
//! network needed.

use std::path::PathBuf;
use std::process::{Command, Output};

fn meshpeer(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meshpeer"));
    c.args(args);
    for v in [
        "MESHPEER_CONFIG",
        "MESHPEER_STATE_DIR",
        "MESHPEER_TAGS",
        "MESHPEER_WITH_TAG",
        "MESHPEER_METRICS_ADDR",
        "MESHPEER_LOG_LEVEL",
        "MESHPEER_ON_STOP",
        "MESHPEER_ADVERTISE_ROUTES",
        "MESHPEER_HOSTS_FILE",
    ] {
        c.env_remove(v);
    }
    c.env("RUST_LOG", "error");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run meshpeer")
}

fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("mp-cliops-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails_with(out: &Output, needle: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected failure; stderr: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

#[test]
fn version_completions_and_man_pages() {
    let v = ok(&meshpeer(&["--version"], &[]));
    assert!(
        v.starts_with("meshpeer ")
            && v.contains("wire protocol v2")
            && v.contains("ALPN meshpeer/2"),
        "{v}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let c = ok(&meshpeer(&["completions", shell], &[]));
        assert!(
            c.contains("netcheck") && c.contains("with-tag"),
            "{shell}: {c}"
        );
    }
    fails_with(&meshpeer(&["completions", "tcsh"], &[]), "invalid value");
    let man = ok(&meshpeer(&["man"], &[]));
    assert!(man.contains(".TH meshpeer 1"), "{man}");
    let dir = scratch("man");
    ok(&meshpeer(&["man", "--dir", dir.to_str().unwrap()], &[]));
    for page in [
        "meshpeer.1",
        "meshpeer-export.1",
        "meshpeer-status.1",
        "meshpeer-ping.1",
    ] {
        assert!(dir.join(page).is_file(), "{page} not written");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_check_points_at_the_line_and_column() {
    let dir = scratch("check");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "interface = \"mp1\"\ntags = [\"gpu\"]\nmetrics_addr = \"127.0.0.1:9477\"\n",
    )
    .unwrap();
    let out = ok(&meshpeer(&["config", "check", good.to_str().unwrap()], &[]));
    assert!(out.contains("ok (3 keys set)"), "{out}");
    // The shipped example parses.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/meshpeer.toml");
    ok(&meshpeer(&["config", "check", example], &[]));

    let cases: [(&str, &str, &str); 7] = [
        (
            "interface = \"mp0\"\ninterfce = \"x\"\n",
            ":2:1: unknown key `interfce` (did you mean `interface`?)",
            "2 | interfce = \"x\"",
        ),
        (
            "wg_port = 70000\n",
            ":1:11: wg_port: 70000 is not a UDP port",
            "  |           ^",
        ),
        (
            "no_relay = \"yes\"\n",
            ":1:12: no_relay: wrong type",
            "1 | no_relay",
        ),
        (
            "# x\nadvertise_addr = \"10.0.0.300\"\n",
            ":2:18: advertise_addr: \"10.0.0.300\" is not an IP address",
            "2 | advertise",
        ),
        (
            "tags = [\"ok\", \"Not-OK\"]\n",
            ":1:15: tags: \"Not-OK\" is not a tag",
            "^",
        ),
        (
            "metrics_addr = \"localhost\"\n",
            ":1:16: metrics_addr: \"localhost\" is not an address and port",
            "^",
        ),
        (
            "advertise_routes = [\"10.1.0.0/16\", \"10.2.0.1/16\"]\n",
            ":1:36: advertise_routes: \"10.2.0.1/16\" has host bits set: did you mean 10.2.0.0/16?",
            "^",
        ),
    ];
    for (i, (text, at, snippet)) in cases.iter().enumerate() {
        let f = dir.join(format!("bad{i}.toml"));
        std::fs::write(&f, text).unwrap();
        let err = fails_with(
            &meshpeer(&["config", "check", f.to_str().unwrap()], &[]),
            at,
        );
        assert!(err.contains(&format!("{}{at}", f.display())), "{err}");
        assert!(err.contains(snippet), "{err}");
        // The daemon refuses it the same way, before doing anything.
        fails_with(&meshpeer(&["up", "--config", f.to_str().unwrap()], &[]), at);
    }
    fails_with(
        &meshpeer(
            &[
                "config",
                "check",
                dir.join("missing.toml").to_str().unwrap(),
            ],
            &[],
        ),
        "cannot read config file",
    );
    fails_with(&meshpeer(&["config", "check"], &[]), "which file?");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn flag_beats_environment_beats_file() {
    let dir = scratch("layers");
    let f = dir.join("c.toml");
    std::fs::write(&f, "state_dir = \"/nonexistent/from-file\"\n").unwrap();
    let c = f.to_str().unwrap();
    // The file's state_dir is used (the error names it)...
    fails_with(
        &meshpeer(&["status", "--config", c], &[]),
        "/nonexistent/from-file",
    );
    fails_with(
        &meshpeer(&["status"], &[("MESHPEER_CONFIG", c)]),
        "/nonexistent/from-file",
    );
    // ... the environment beats it ...
    fails_with(
        &meshpeer(
            &["status", "--config", c],
            &[("MESHPEER_STATE_DIR", "/nonexistent/from-env")],
        ),
        "/nonexistent/from-env",
    );
    // ... and the flag beats both.
    fails_with(
        &meshpeer(
            &[
                "status",
                "--config",
                c,
                "--state-dir",
                "/nonexistent/from-flag",
            ],
            &[("MESHPEER_STATE_DIR", "/nonexistent/from-env")],
        ),
        "/nonexistent/from-flag",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_values_and_no_daemon_are_clear_errors() {
    let d = scratch("bad");
    let sd = d.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["up", "--metrics-addr", "1.2.3.4"],
            "is not an address and port",
        ),
        (vec!["up", "--tag", "GPU"], "is not a tag"),
        (
            vec!["up", "--on-stop", "quit"],
            "neither `stay` nor `leave`",
        ),
        (
            vec!["up", "--log-level", "info,meshpeer=loudest"],
            "is not a log level",
        ),
        (vec!["up", "--interface", "a/b"], "is not an interface name"),
        (vec!["up", "--no-relay=perhaps"], "invalid value"),
        (
            vec!["up", "--advertise-route", "192.168.10.7/24"],
            "has host bits set: did you mean 192.168.10.0/24?",
        ),
        (
            vec!["join", "seed", "--advertise-route", "192.168.10.0"],
            "give a prefix length",
        ),
        (
            vec!["up", "--advertise-route", "fd00::/64"],
            "routes are IPv4 only",
        ),
        (
            vec!["up", "--advertise-route", "0.0.0.0/0"],
            "is a default route",
        ),
        (
            vec!["up", "--advertise-route", "lan/24"],
            "is not an IPv4 subnet",
        ),
        (vec!["up", "--hosts-file", ""], "an empty path"),
        (vec!["status", "--with-tag", "Bad"], "is not a tag"),
        (vec!["export", "csv"], "invalid value 'csv'"),
        (vec!["export", "mpi-hostfile", "--slots", "0"], "--slots"),
        (vec!["ping", "n2", "--count", "0"], "--count"),
    ] {
        fails_with(&meshpeer(&args, &[]), needle);
    }
    fails_with(
        &meshpeer(&["up"], &[("MESHPEER_METRICS_ADDR", "nowhere")]),
        "is not an address and port",
    );
    fails_with(
        &meshpeer(
            &["up"],
            &[("MESHPEER_ADVERTISE_ROUTES", "192.168.1.0/24,224.0.0.0/8")],
        ),
        "multicast 224.0.0.0/4, which is never routed",
    );
    for cmd in [
        vec!["export", "hosts"],
        vec!["ping", "n2"],
        vec!["netcheck"],
        vec!["status", "--watch"],
    ] {
        let mut args = cmd.clone();
        args.extend(["--state-dir", sd]);
        fails_with(&meshpeer(&args, &[]), "no meshpeer daemon is running");
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// A `join` that cannot reach its seed logs (the ports line at info) and
/// fails within a second: enough to see the log's form and level.
#[test]
fn logs_are_plain_off_a_terminal_and_the_level_is_chosen() {
    let founder = scratch("founder");
    let f = founder.to_str().unwrap();
    let out = meshpeer(
        &["init", "--network", "10.77.0.0/16", "--state-dir", f],
        &[],
    );
    let token = founder.join("token");
    std::fs::write(&token, ok(&out)).unwrap();
    let joiner = scratch("joiner");
    let _ = std::fs::remove_dir_all(&joiner);
    let join = |extra: &[&str], env: &[(&str, &str)]| -> String {
        let mut args = vec![
            "join",
            "127.0.0.1:9",
            "--token-file",
            token.to_str().unwrap(),
            "--state-dir",
            joiner.to_str().unwrap(),
            "--gossip-port",
            "0",
            "--join-timeout-secs",
            "1",
        ];
        args.extend_from_slice(extra);
        let mut env = env.to_vec();
        env.push(("NO_COLOR", ""));
        fails_with(&meshpeer(&args, &env), "nothing answered at 127.0.0.1:9")
    };
    let info_line = "ports this node uses";
    // stderr is a pipe here: no ANSI colour codes, even at debug.
    let err = join(&["--log-level", "debug"], &[]);
    assert!(err.contains(info_line), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "colour codes in a piped log: {err:?}"
    );
    // --log-level beats RUST_LOG; RUST_LOG beats the file; the file beats the default.
    let err = join(&["--log-level", "warn"], &[("RUST_LOG", "info")]);
    assert!(!err.contains(info_line), "{err}");
    let err = join(&["--log-level", "info"], &[("RUST_LOG", "warn")]);
    assert!(err.contains(info_line), "{err}");
    let conf = founder.join("c.toml");
    std::fs::write(&conf, "log_level = \"warn\"\n").unwrap();
    let c = conf.to_str().unwrap();
    let err = join(&["--config", c], &[("RUST_LOG", "info")]);
    assert!(err.contains(info_line), "{err}");
    let err = join(&["--config", c], &[("RUST_LOG", "")]);
    assert!(!err.contains(info_line), "{err}");
    let err = join(&["--config", c], &[("MESHPEER_LOG_LEVEL", "info")]);
    assert!(err.contains(info_line), "{err}");
    // The firewall notice is printed whatever the level.
    assert!(err.contains("firewall:"), "{err}");
    assert!(!joiner.exists(), "a failed join left its state behind");
    std::fs::remove_dir_all(&founder).unwrap();
}
