//! The operations side against a live mesh: three meshpeer daemons in
//! network namespaces (as tests/mesh.rs), then what operators run around
//! them: exports, `status --with-tag` / `--watch`, `ping`, `netcheck`, the
//! firewall notice, a SIGHUP reload, `on_stop = "leave"`; and, in a second
//! test, a real Prometheus scraping every node and answering every query of
//! the Grafana dashboard (contrib/grafana/meshpeer.json).
//!
//! Needs root; skipped (passing, with a message) when not root, unless
//! CI=true. The Prometheus test also needs `prometheus` (Debian package
//! `prometheus`): skipped without it, a failure under CI=true.
//!
//! Topology: bridge namespace `mpt-br`, nodes `mpt-n1..3` at 10.99.0.1-3/24
//! (WireGuard interfaces `mpt1..3`), Prometheus in `mpt-prom` at
//! 10.99.0.10/24 listening on its own loopback.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::Instant;

use common::*;

const NETWORK: &str = "10.77.0.0/16";

/// Three nodes, all connected. Fields drop in order: daemons first, then
/// their namespaces, the switch, the scratch directory.
struct Mesh {
    nodes: Vec<Node>,
    _netns: Vec<Netns>,
    switch: Switch,
    work: TempDir,
    /// Overlay addresses, by node index.
    ips: Vec<String>,
}

impl Mesh {
    /// n1 runs `init` and `up`, n2 and n3 `join` through it; `extra[i]` are
    /// more arguments for node i. Returns once every node sees the two
    /// others connected.
    fn start(t0: Instant, tag: &str, extra: [Vec<String>; 3]) -> Mesh {
        let work = TempDir::new(tag);
        let (switch, netns, nodes) = lan(3, work.path());
        let args = |i: usize| -> Vec<&str> { extra[i].iter().map(String::as_str).collect() };
        let token = nodes[0].init(NETWORK);
        nodes[0].spawn_up_with(&args(0));
        wait_for(secs(30), "n1 answers `status`", || {
            nodes[0].assert_running();
            nodes[0].status().map(|_| ())
        });
        for (i, n) in nodes.iter().enumerate().skip(1) {
            n.spawn_join_with("10.99.0.1", &token, &args(i));
        }
        let mut ips = Vec::new();
        for n in &nodes {
            let s = wait_connected(n, 2, secs(60));
            ips.push(status_overlay_ip(&s).expect("overlay ip"));
        }
        progress(t0, format!("mesh up: {ips:?}"));
        Mesh {
            nodes,
            _netns: netns,
            switch,
            work,
            ips,
        }
    }
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn stdout(o: std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The lines that are not comments.
fn body(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn exports_ping_netcheck_reload_and_leave_on_a_live_mesh() {
    let test = "exports_ping_netcheck_reload_and_leave_on_a_live_mesh";
    if !can_run(test, &["ip", "wg"]) {
        return;
    }
    let _serial = serial();
    let t0 = Instant::now();
    let conf = TempDir::new("ops-conf");
    let n3_conf = conf.path().join("n3.toml");
    std::fs::write(
        &n3_conf,
        "tags = [\"compute\"]\nmetrics_addr = \"10.99.0.3:9477\"\non_stop = \"leave\"\n",
    )
    .unwrap();
    let mesh = Mesh::start(
        t0,
        "ops",
        [
            // n1 on the well-known port, so that n2 can use it as an
            // outside STUN server.
            owned(&["--wg-port", "51820", "--tag", "login"]),
            owned(&["--tag", "compute,gpu", "--stun-server", "10.99.0.1:51820"]),
            owned(&["--config", n3_conf.to_str().unwrap()]),
        ],
    );
    let [n1, n2, n3] = [&mesh.nodes[0], &mesh.nodes[1], &mesh.nodes[2]];
    let ip = |i: usize| mesh.ips[i].clone();

    // Tags travel in the records: n1 sees every node's.
    wait_for(secs(20), "n1 sees every node's tags", || {
        let s = n1.status()?;
        let tags: BTreeMap<String, String> = members(&s)
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or("?").to_string(),
                    m["tags"].to_string(),
                )
            })
            .collect();
        let want = [
            ("n1", r#"["login"]"#),
            ("n2", r#"["compute","gpu"]"#),
            ("n3", r#"["compute"]"#),
        ];
        if want
            .iter()
            .all(|(n, t)| tags.get(*n).map(String::as_str) == Some(*t))
        {
            Ok(())
        } else {
            Err(format!("{tags:?}"))
        }
    });
    progress(t0, "tags seen");

    // Exports, from n1's daemon.
    let hosts = stdout(n1.cli(&["export", "hosts"]).unwrap());
    assert_eq!(
        body(&hosts),
        [
            format!("{}\tn1", ip(0)),
            format!("{}\tn2", ip(1)),
            format!("{}\tn3", ip(2))
        ],
        "{hosts}"
    );
    let ansible = stdout(n1.cli(&["export", "ansible"]).unwrap());
    for part in [
        format!(
            "[all]\nn1 ansible_host={}\nn2 ansible_host={}\nn3 ansible_host={}\n",
            ip(0),
            ip(1),
            ip(2)
        ),
        "\n[compute]\nn2\nn3\n".to_string(),
        "\n[gpu]\nn2\n".to_string(),
        "\n[login]\nn1\n".to_string(),
    ] {
        assert!(
            ansible.contains(&part),
            "ansible lacks {part:?}:\n{ansible}"
        );
    }
    let mpi = stdout(
        n1.cli(&[
            "export",
            "mpi-hostfile",
            "--with-tag",
            "compute",
            "--slots",
            "4",
        ])
        .unwrap(),
    );
    assert_eq!(
        body(&mpi),
        [format!("{} slots=4", ip(1)), format!("{} slots=4", ip(2))],
        "{mpi}"
    );
    let slurm = stdout(n1.cli(&["export", "slurm"]).unwrap());
    assert!(
        slurm.contains(&format!(
            "NodeName=n2 NodeAddr={} Features=compute,gpu\n",
            ip(1)
        )),
        "{slurm}"
    );
    let ssh = stdout(
        n1.cli(&["export", "ssh-config", "--with-tag", "gpu"])
            .unwrap(),
    );
    assert_eq!(
        body(&ssh),
        ["Host n2".to_string(), format!("    HostName {}", ip(1))]
    );
    let out = mesh.work.path().join("hosts.export");
    n1.cli(&["export", "hosts", "-o", out.to_str().unwrap()])
        .unwrap();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), hosts);
    progress(
        t0,
        "exports: hosts, ansible, mpi-hostfile, slurm, ssh-config, -o",
    );

    // status --with-tag and the table.
    let gpu: Value = serde_json::from_str(&stdout(
        n1.cli(&["status", "--json", "--with-tag", "gpu"]).unwrap(),
    ))
    .unwrap();
    let names: Vec<&str> = members(&gpu)
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, ["n2"]);
    let table = stdout(n1.cli(&["status"]).unwrap());
    let n2_line = table.lines().find(|l| l.contains(" n2 ")).unwrap_or("");
    assert!(
        n2_line.contains("connected")
            && n2_line.contains("direct")
            && n2_line.ends_with("compute,gpu"),
        "{table}"
    );
    assert!(
        table.contains("2 members besides this node: 2 connected"),
        "{table}"
    );
    progress(t0, format!("n1's `meshpeer status`:\n{table}"));

    // ping: the path and a round trip, by name and by address.
    let pongs = stdout(n1.cli(&["ping", "n2", "-c", "2", "--json"]).unwrap());
    let pongs: Vec<Value> = pongs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(pongs.len(), 2);
    for p in &pongs {
        assert!(p["rtt_us"].as_u64().is_some_and(|us| us > 0), "{p}");
        assert_eq!(p["path"], "direct", "{p}");
        assert_eq!(p["name"], "n2", "{p}");
    }
    let text = stdout(n1.cli(&["ping", &ip(2), "-c", "1"]).unwrap());
    assert!(
        text.starts_with(&format!(
            "pong from n3 ({}) via direct at 10.99.0.3:",
            ip(2)
        )),
        "{text}"
    );
    let err = n1.cli_fails(&["ping", "nosuch", "-c", "1"]);
    assert!(err.contains("no member \"nosuch\""), "{err}");
    let err = n1.cli_fails(&["ping", "n1", "-c", "1"]);
    assert!(err.contains("n1 is this node"), "{err}");
    progress(t0, format!("ping:\n{text}"));

    // netcheck: n2 asked n1's WireGuard port as an outside STUN server.
    wait_for(secs(30), "n2's netcheck lists n1's STUN answer", || {
        let out = n2.cli(&["netcheck", "--json"])?;
        let r: Value = serde_json::from_str(&stdout(out)).map_err(|e| e.to_string())?;
        let answered = r["answers"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["server"] == "10.99.0.1:51820" && x["member"] == "n1")
        });
        if answered && r["nat"].is_string() && r["wg_port"].is_u64() {
            Ok(())
        } else {
            Err(r.to_string())
        }
    });
    let text = stdout(n2.cli(&["netcheck"]).unwrap());
    assert!(text.starts_with("NAT: "), "{text}");
    assert!(
        text.contains("10.99.0.1:51820") && text.contains("n1"),
        "{text}"
    );
    progress(t0, format!("netcheck:\n{text}"));

    // The firewall notice at start names the ports.
    let log = n1.log_tail(10_000);
    assert!(
        log.contains("firewall:")
            && log.contains("51820/udp (WireGuard)")
            && log.contains("51821/udp (gossip)"),
        "n1's log has no firewall notice"
    );

    // n3's metrics endpoint (from its config file) answers.
    let m = in_netns("mpt-n1", || {
        http_get("10.99.0.3:9477".parse().unwrap(), "/metrics")
    })
    .unwrap();
    assert_eq!(m.0, 200);
    assert!(
        m.1.contains("meshpeer_members{state=\"connected\"} 2"),
        "{}",
        m.1
    );

    // SIGHUP: new tags (spread at once), a new metrics address, and a key
    // that needs a restart. n1 watches: `status --watch --json` (not a
    // terminal) prints one line per change.
    let mut watch = n1.cli_spawn(&["status", "--watch", "--json"]);
    let (tx, rx) = mpsc::channel::<String>();
    let out = watch.child().stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(secs(10))
        .expect("status --watch prints at once");
    assert!(first.starts_with('{'), "{first}");
    std::fs::write(
        &n3_conf,
        "tags = [\"compute\", \"storage\"]\nmetrics_addr = \"10.99.0.3:9478\"\non_stop = \"leave\"\ndown_grace_secs = 30\n",
    )
    .unwrap();
    n3.signal(libc::SIGHUP);
    let start = Instant::now();
    let mut lines = 1;
    loop {
        let line = rx
            .recv_timeout(secs(20).saturating_sub(start.elapsed()))
            .expect("a new status line once n3's tags changed");
        lines += 1;
        let s: Value = serde_json::from_str(&line).unwrap();
        let n3_tags = members(&s)
            .iter()
            .find(|m| m["name"] == "n3")
            .map(|m| m["tags"].to_string());
        if n3_tags.as_deref() == Some(r#"["compute","storage"]"#) {
            break;
        }
    }
    let waited = start.elapsed().as_secs() + 1;
    assert!(
        lines <= 1 + waited as usize,
        "--watch printed {lines} lines in {waited} s although little changed"
    );
    watch.assert_running();
    let status = watch.stop_with(libc::SIGINT).expect("exit status");
    assert!(
        status.success(),
        "status --watch ends 0 on Ctrl-C: {status}"
    );
    wait_until(secs(10), "n3 logs the reload", || {
        let log = n3.log_tail(10_000);
        log.contains("configuration reloaded") && log.contains("down_grace_secs")
    });
    let ansible = stdout(n1.cli(&["export", "ansible"]).unwrap());
    assert!(ansible.contains("\n[storage]\nn3\n"), "{ansible}");
    let m = wait_for(secs(10), "n3 serves metrics on the new port", || {
        in_netns("mpt-n1", || {
            http_get("10.99.0.3:9478".parse().unwrap(), "/metrics")
        })
    });
    assert_eq!(m.0, 200);
    assert!(
        in_netns("mpt-n1", || http_get(
            "10.99.0.3:9477".parse().unwrap(),
            "/metrics"
        ))
        .is_err(),
        "the old metrics port still answers"
    );
    progress(t0, "SIGHUP: tags, metrics address; status --watch saw it");

    // on_stop = "leave": SIGTERM makes n3 leave, so n1 drops it at once
    // (a node that stays would be listed as down for the grace period).
    let n3_key = status_self(&n3.status().unwrap()).unwrap()["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    n3.stop();
    wait_for(secs(10), "n1 drops n3 (it left on SIGTERM)", || {
        let s = n1.status()?;
        let peers = n1.wg_peers()?;
        if members(&s).iter().any(|m| m["name"] == "n3") || peers.contains(&n3_key) {
            Err(format!(
                "members [{}], peers {peers:?}",
                members_summary(&s)
            ))
        } else {
            Ok(())
        }
    });
    assert!(n3.log_tail(10_000).contains("leaving the mesh"));
    progress(t0, "n3 left on SIGTERM");

    // An ephemeral node in n3's place, twice with the same reusable token
    // and name: it is marked ephemeral, leaves on SIGTERM (no --on-stop),
    // deletes its identity, and its next start is a new identity that gets
    // the name back at once.
    let token = stdout(n1.cli(&["invite", "--expires-in", "10m"]).expect("invite"));
    let token = token.trim();
    let mut keys = Vec::new();
    for round in 0..2 {
        let eph = Node::new("eph", &mesh._netns[2], "mpt3", mesh.work.path());
        eph.spawn_join_with("10.99.0.1", token, &["--ephemeral"]);
        let key = wait_for(secs(30), "n1 sees the ephemeral node connected", || {
            eph.assert_running();
            let s = n1.status()?;
            match members(&s).iter().find(|m| m["name"] == "eph") {
                Some(m) if m["state"] == "connected" && m["ephemeral"] == true => {
                    Ok(m["public_key"].as_str().unwrap_or_default().to_string())
                }
                _ => Err(format!("members [{}]", members_summary(&s))),
            }
        });
        eph.stop();
        wait_for(secs(10), "n1 drops the ephemeral node at once", || {
            let s = n1.status()?;
            let peers = n1.wg_peers()?;
            if members(&s).iter().any(|m| m["name"] == "eph") || peers.contains(&key) {
                Err(format!(
                    "members [{}], peers {peers:?}",
                    members_summary(&s)
                ))
            } else {
                Ok(())
            }
        });
        assert!(
            !eph.state_dir.join("node.key").exists(),
            "round {round}: the ephemeral node kept its key"
        );
        assert!(eph.log_tail(10_000).contains("identity deleted"));
        keys.push(key);
    }
    assert_ne!(
        keys[0], keys[1],
        "an ephemeral node rejoins as a new identity"
    );
    progress(
        t0,
        "ephemeral node: joined, left on SIGTERM, forgot itself, rejoined anew; done",
    );
    drop(mesh);
    drop(conf);
}

#[test]
fn prometheus_scrapes_the_mesh_and_answers_every_dashboard_panel() {
    let test = "prometheus_scrapes_the_mesh_and_answers_every_dashboard_panel";
    if !can_run(test, &["ip", "wg", "prometheus"]) {
        return;
    }
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/contrib/grafana/meshpeer.json"
        ))
        .expect("read contrib/grafana/meshpeer.json"),
    )
    .expect("the dashboard is JSON");
    let _serial = serial();
    let t0 = Instant::now();
    let metrics = |i: usize| owned(&["--metrics-addr", &format!("10.99.0.{i}:9477")]);
    let mesh = Mesh::start(t0, "prom", [metrics(1), metrics(2), metrics(3)]);

    // Prometheus in a namespace of its own on the switch, on its loopback.
    let prom_ns = Netns::new("mpt-prom");
    mesh.switch.attach(&prom_ns, "10.99.0.10/24");
    let dir = mesh.work.path().join("prometheus");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
         scrape_configs:\n  - job_name: meshpeer\n    static_configs:\n      - targets: ['10.99.0.1:9477', '10.99.0.2:9477', '10.99.0.3:9477']\n",
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let mut cmd = prom_ns.cmd("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:9090")
        .arg("--log.level=warn")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let mut prom = Process::spawn("prometheus", cmd);
    let api: std::net::SocketAddr = "127.0.0.1:9090".parse().unwrap();
    let get = move |path: String| in_netns("mpt-prom", move || http_get(api, &path));
    wait_for(secs(30), "Prometheus is ready", || {
        prom.assert_running();
        match get("/-/ready".into())? {
            (200, _) => Ok(()),
            (c, b) => Err(format!("{c}: {b}")),
        }
    });
    progress(t0, "Prometheus ready");

    // One instant query: the result vector (Err while empty or failing).
    let query = |q: &str| -> Result<Vec<Value>, String> {
        let (code, body) = get(format!("/api/v1/query?query={}", url_encode(q)))?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if code != 200 || v["status"] != "success" {
            return Err(format!("{q}: HTTP {code}: {body}"));
        }
        match v["data"]["result"].as_array() {
            Some(r) if !r.is_empty() => Ok(r.clone()),
            _ => Err(format!("{q}: no data: {body}")),
        }
    };
    wait_for(secs(30), "Prometheus scrapes all three nodes", || {
        let up = query("up{job=\"meshpeer\"} == 1")?;
        if up.len() == 3 {
            Ok(())
        } else {
            Err(format!("{} targets up", up.len()))
        }
    });
    // Each node sees the two others connected.
    wait_for(
        secs(30),
        "meshpeer_members{state=\"connected\"} is 2 on each node",
        || {
            let r = query("meshpeer_members{state=\"connected\"} == 2")?;
            if r.len() == 3 {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        },
    );
    progress(t0, "all three nodes scraped");

    // Every panel's every query returns data (Grafana's variables as a
    // dashboard with "All" selected would expand them).
    let mut n = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let q = expr
                .replace("$__rate_interval", "15s")
                .replace("$instance", ".*");
            wait_for(secs(30), &format!("panel {title:?}: {q}"), || query(&q));
            n += 1;
        }
    }
    assert!(n >= 10, "only {n} queries in the dashboard");
    progress(t0, format!("all {n} dashboard queries return data"));
    drop(prom);
    drop(prom_ns);
    drop(mesh);
}
