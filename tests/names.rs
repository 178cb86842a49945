//! Members' names in a hosts file (`--hosts-file`, here files in a scratch
//! directory, never the machine's /etc/hosts): two members in network
//! namespaces each keep a block of the live members' names; the file's own
//! lines stay as they were; when one member leaves, its name goes from the
//! other's file and its own block is removed; a member that stops (and
//! stays a member) keeps its block.
//!
//! Needs root; skipped (passing, with a message) when not root, unless
//! CI=true. Names: namespaces `rt-n*`, interfaces `rt5`, `rt6`.

mod common;

use std::fs;
use std::time::Instant;

use common::*;

fn block(text: &str) -> Vec<String> {
    let mut inside = false;
    let mut out = Vec::new();
    for l in text.lines() {
        if l.starts_with("# BEGIN meshpeer") {
            inside = true;
        } else if l.starts_with("# END meshpeer") {
            inside = false;
        } else if inside && !l.starts_with('#') {
            out.push(l.to_string());
        }
    }
    out
}

#[test]
fn members_names_in_a_hosts_file() {
    let test = "members_names_in_a_hosts_file";
    if !can_run(test, &["ip"]) {
        return;
    }
    let _serial = serial_prefix("rt");
    let t0 = Instant::now();
    let work = TempDir::new("names");
    let switch = Switch::new("rt-nbr");
    let netns: Vec<Netns> = (1..=2).map(|i| Netns::new(&format!("rt-n{i}"))).collect();
    for (i, ns) in netns.iter().enumerate() {
        switch.attach(ns, &format!("10.97.0.{}/24", i + 1));
    }
    let alpha = Node::new("alpha", &netns[0], "rt5", work.path());
    let beta = Node::new("beta", &netns[1], "rt6", work.path());
    // The files' own lines; alpha's has no final newline, beta's is CRLF.
    let own_a = "127.0.0.1\tlocalhost\n192.0.2.9 db01 # by hand";
    let own_b = "127.0.0.1 localhost\r\n";
    let fa = work.path().join("hosts-alpha");
    let fb = work.path().join("hosts-beta");
    fs::write(&fa, own_a).unwrap();
    fs::write(&fb, own_b).unwrap();

    let token = alpha.init("10.77.0.0/16");
    alpha.spawn_up_with(&["--hosts-file", fa.to_str().unwrap()]);
    wait_for(secs(30), "alpha answers `status`", || {
        alpha.assert_running();
        alpha.status().map(|_| ())
    });
    beta.spawn_join_with("10.97.0.1", &token, &["--hosts-file", fb.to_str().unwrap()]);
    let mut ips = Vec::new();
    for n in [&alpha, &beta] {
        let s = wait_for(secs(30), &format!("{} sees the other", n.name), || {
            n.assert_running();
            let s = n.status()?;
            if members(&s).len() == 2 {
                Ok(s)
            } else {
                Err(members_summary(&s))
            }
        });
        ips.push(status_overlay_ip(&s).unwrap());
    }
    let want = vec![format!("{}\talpha", ips[0]), format!("{}\tbeta", ips[1])];
    for (n, f) in [(&alpha, &fa), (&beta, &fb)] {
        wait_for(
            secs(15),
            &format!("{}'s hosts file lists both", n.name),
            || {
                let text = fs::read_to_string(f).map_err(|e| e.to_string())?;
                if block(&text) == want {
                    Ok(())
                } else {
                    Err(text)
                }
            },
        );
    }
    let text_a = fs::read_to_string(&fa).unwrap();
    assert!(
        text_a.starts_with(&format!("{own_a}\n# BEGIN meshpeer rt5\n")),
        "{text_a}"
    );
    let text_b = fs::read_to_string(&fb).unwrap();
    assert!(
        text_b.starts_with("127.0.0.1 localhost\r\n# BEGIN meshpeer rt6\r\n"),
        "{text_b:?}"
    );
    progress(t0, "both files list alpha and beta");

    // beta leaves: its name goes from alpha's file, its own block goes.
    beta.leave();
    beta.wait_exit(secs(15));
    wait_for(secs(15), "alpha's file drops beta", || {
        let text = fs::read_to_string(&fa).map_err(|e| e.to_string())?;
        if block(&text) == want[..1] {
            Ok(())
        } else {
            Err(text)
        }
    });
    assert_eq!(
        fs::read_to_string(&fb).unwrap(),
        own_b,
        "beta's block removed on leave"
    );
    progress(
        t0,
        "beta left: gone from alpha's file, its own block removed",
    );

    // alpha stops and stays a member: its block stays.
    alpha.stop();
    let text = fs::read_to_string(&fa).unwrap();
    assert_eq!(block(&text), want[..1], "{text}");
    progress(t0, "alpha stopped (stays a member): its block kept; done");
}
