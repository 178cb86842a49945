//! Replays the committed fuzz corpora (`fuzz/seeds/<target>/` and
//! `fuzz/regressions/<target>/`) through the fuzz targets' bodies
//! (`fuzz/harness.rs`), so a decoder that starts to panic on an input the
//! fuzzer once found shows up in a plain `cargo test`. Long fuzzing is
//! `cargo fuzz` (see FUZZING.md); this needs neither it nor nightly.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn corpus_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    ["seeds", "regressions"]
        .iter()
        .map(|d| root.join(d))
        .collect()
}

#[test]
fn committed_corpora_replay_without_panics() {
    let mut total = 0;
    for dir in corpus_dirs() {
        let Ok(targets) = std::fs::read_dir(&dir) else {
            continue;
        };
        for t in targets.flatten() {
            let name = t.file_name().to_string_lossy().into_owned();
            let Some((_, run)) = harness::TARGETS.iter().find(|(n, _)| *n == name) else {
                panic!("{}: no fuzz target named {name}", dir.display());
            };
            let mut files: Vec<PathBuf> = std::fs::read_dir(t.path())
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            files.sort();
            for f in files {
                let data = std::fs::read(&f).unwrap();
                let r = std::panic::catch_unwind(|| run(&data));
                assert!(r.is_ok(), "fuzz input {} panics", f.display());
                total += 1;
            }
        }
    }
    assert!(total > 0, "no corpus files found");
}

#[test]
fn every_target_has_seeds() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    for (name, _) in harness::TARGETS {
        let n = std::fs::read_dir(seeds.join(name)).map_or(0, |d| d.count());
        assert!(
            n > 0,
            "fuzz/seeds/{name} is empty (run the write_seeds test)"
        );
    }
}

/// Regenerates `fuzz/seeds/` with meshpeer's own encoders:
/// `cargo test --test fuzz_corpus -- --ignored write_seeds`.
#[test]
#[ignore]
fn write_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let _ = std::fs::remove_dir_all(&root);
    for (target, name, bytes) in harness::seeds() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// The seeds as generated now run clean (also when `fuzz/seeds` is stale).
#[test]
fn generated_seeds_run_clean() {
    for (target, name, bytes) in harness::seeds() {
        let (_, run) = harness::TARGETS.iter().find(|(n, _)| *n == target).unwrap();
        let r = std::panic::catch_unwind(|| run(&bytes));
        assert!(r.is_ok(), "seed {target}/{name} panics");
    }
}

/// The seeds get past the signatures: a valid record, token, credential,
/// revocation list and liveness values, so mutations start from inputs
/// that reach the checks behind them.
#[test]
fn seeds_are_valid_objects() {
    use meshpeer::{admission, liveness, observe, proto, record};
    let k = harness::keys();
    let seeds = harness::seeds();
    let seed = |t: &str, n: &str| -> Vec<u8> {
        seeds
            .iter()
            .find(|(tt, nn, _)| *tt == t && nn == n)
            .map(|(_, _, b)| b[1..].to_vec())
            .unwrap_or_else(|| panic!("no seed {t}/{n}"))
    };
    let text = |t: &str, n: &str| String::from_utf8(seed(t, n)).unwrap();
    let trust = record::Trust {
        network_key: &k.net_pk,
        now_unix: harness::NOW,
        revoked: &k.none,
    };
    for n in ["raw", "raw-member-stamped"] {
        record::verify_record(&text("record", n), &trust, Some(&k.node_pk)).unwrap();
    }
    admission::Token::parse(&text("token", "text")).unwrap();
    let c: admission::Credential = proto::decode("c", &seed("credential", "raw-member")).unwrap();
    k.trust.check_credential(&c, &k.node_pk).unwrap();
    admission::verify_revocations(&text("credential", "revocations"), &k.net_pk).unwrap();
    liveness::verify_alive(&text("liveness", "alive"), &k.net_pk, &k.node_pk).unwrap();
    liveness::verify_suspicions(&text("liveness", "suspicions"), &k.net_pk, &k.node_pk).unwrap();
    observe::verify_observations(&text("liveness", "observations"), &k.net_pk, &k.node_pk).unwrap();
    let cert = rustls::pki_types::CertificateDer::from(seed("credential", "certificate"));
    meshpeer::gossip::tls::check_certificate(&cert, &k.trust).unwrap();
    for n in ["status", "leave", "revoke", "ping", "netcheck"] {
        serde_json::from_str::<meshpeer::control::Request>(&text("control", n)).unwrap();
    }
    for n in [
        "reply-left",
        "reply-error",
        "reply-status",
        "reply-pong",
        "reply-netcheck",
    ] {
        serde_json::from_str::<meshpeer::control::Reply>(&text("control", n)).unwrap();
    }
    let every_key = seeds
        .iter()
        .find(|(t, n, _)| *t == "config" && n == "every-key")
        .map(|(_, _, b)| String::from_utf8(b.clone()).unwrap())
        .unwrap();
    meshpeer::config::parse(std::path::Path::new("c"), &every_key).unwrap();
}
