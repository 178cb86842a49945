//! `testnet`: runs many real meshpeer daemons in network namespaces behind
//! emulated home NATs, carrier-grade NATs and symmetric NATs, drives
//! scenarios (kills, leaves, restarts, partitions, NAT flushes, churn) and
//! measures convergence, failure detection and overhead with real packets.
//!
//! The command line; the work is done by the library (src/lib.rs).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

use meshpeer_testnet::nodes::EngineKind;
use meshpeer_testnet::topology::{Kind, Mix, Plan};
use meshpeer_testnet::{cleanup, pinger, probe, report, runner, scenario, sys, topology};

#[derive(Parser)]
#[command(
    name = "testnet",
    about = "meshpeer at scale: real namespaces, real NATs, real packets"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scenario and write report.json, summary.txt and reachability.svg.
    Run(Box<RunArgs>),
    /// Check each emulated NAT kind's mapping and filtering with real UDP packets.
    ProbeNat {
        /// Only this kind (public, nat, cgnat, symmetric); default all.
        #[arg(long)]
        kind: Option<String>,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove every leftover (namespaces, processes, sockets, files) of
    /// testnet runs whose process is gone; `--all` also of live runs.
    Cleanup {
        #[arg(long)]
        all: bool,
    },
    /// Plot idle underlay bytes per node against the number of nodes, one
    /// line per engine, from several report.json files (SVG + a text table).
    PlotIdle {
        /// report.json files (or their directories).
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// The SVG to write (default target/testnet/idle-per-node.svg); the
        /// table goes next to it (.txt).
        #[arg(long)]
        out: Option<PathBuf>,
        /// y scale: auto (log when the values span more than 30x), linear, log.
        #[arg(long, default_value = "auto", value_parser = ["auto", "linear", "log"])]
        scale: String,
    },
    /// Build a topology, measure the underlay with the pinger, destroy it,
    /// and print the timings (no overlay daemons).
    Topo {
        #[arg(long, default_value_t = 20)]
        nodes: usize,
        #[arg(long, default_value = "mixed")]
        topology: String,
        #[arg(long)]
        mix: Option<String>,
        #[arg(long, default_value_t = pinger::DEFAULT_RATE)]
        ping_rate: f64,
        /// Keep the topology until Ctrl-C (to look around with `ip netns`).
        #[arg(long)]
        hold: bool,
    },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Scenario file (TOML), e.g. testnet/scenarios/demo.toml.
    #[arg(long)]
    scenario: PathBuf,
    /// Override the number of initial nodes.
    #[arg(long)]
    nodes: Option<usize>,
    /// Override the topology: flat, nat, cgnat, symmetric, mixed.
    #[arg(long)]
    topology: Option<String>,
    /// Override the mix, e.g. public=20,nat=50,cgnat=20,symmetric=10.
    #[arg(long)]
    mix: Option<String>,
    /// Override the random seed (topology layout, random node choices).
    #[arg(long)]
    seed: Option<u64>,
    /// Report directory (default target/testnet/<scenario>-<run prefix>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also run the same scenario with another overlay on the same topology.
    #[arg(long, value_parser = ["nebula"])]
    compare: Option<String>,
    /// The overlay to run first (`nebula` alone: the testnet's own capacity
    /// with a lighter overlay).
    #[arg(long, value_parser = ["meshpeer", "nebula"], default_value = "meshpeer")]
    engine: String,
    /// The meshpeer binary (default: $MESHPEER_BIN, else `meshpeer` next to this binary).
    #[arg(long)]
    meshpeer_bin: Option<PathBuf>,
    /// Cap on echo requests per second for the pinger (all pairs together;
    /// default 10000).
    #[arg(long)]
    ping_rate: Option<f64>,
    /// Override how nodes start: all (at once) or staggered.
    #[arg(long)]
    start: Option<String>,
    /// Override the time between two staggered starts.
    #[arg(long)]
    stagger_ms: Option<u64>,
    /// Override meshpeer's --join-timeout-secs (joiners give up after it).
    #[arg(long)]
    join_timeout_secs: Option<u64>,
    /// Skip the underlay floor measurement.
    #[arg(long)]
    no_floor: bool,
    /// Override the length of every `measure_steady` (idle) window, e.g. 60
    /// for a quick try of idle-100.toml; the floor's idle window follows.
    #[arg(long)]
    idle_secs: Option<f64>,
    /// Copy the daemons' logs into the report directory (always done when the run fails).
    #[arg(long)]
    keep_logs: bool,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => cmd_run(*a),
        Cmd::ProbeNat { kind, json } => cmd_probe(kind, json),
        Cmd::Cleanup { all } => cmd_cleanup(all),
        Cmd::PlotIdle {
            reports,
            out,
            scale,
        } => report::cmd_plot_idle(&reports, out, &scale),
        Cmd::Topo {
            nodes,
            topology,
            mix,
            ping_rate,
            hold,
        } => cmd_topo(nodes, &topology, mix, ping_rate, hold),
    };
    match r {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("testnet: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn preflight(progs: &[&str]) -> Result<()> {
    if !sys::is_root() {
        bail!("the testnet needs root (network namespaces, nftables); run it with sudo");
    }
    for p in progs {
        if sys::which(p).is_none() {
            bail!("`{p}` not found; install the packages named in testnet/README.md (apt-get install iproute2 nftables conntrack)");
        }
    }
    Ok(())
}

fn cmd_cleanup(all: bool) -> Result<i32> {
    if !sys::is_root() {
        bail!("cleanup needs root");
    }
    let done = cleanup::cleanup_stale(all);
    if done.is_empty() {
        println!("nothing to clean up");
    }
    for (p, st) in done {
        println!(
            "{p}*: removed {} namespaces, killed {} processes, removed {} files/dirs",
            st.namespaces, st.processes, st.files
        );
    }
    Ok(0)
}

fn cmd_probe(kind: Option<String>, as_json: bool) -> Result<i32> {
    preflight(&["ip", "nft", "conntrack"])?;
    cleanup::cleanup_stale(false);
    let kinds: Vec<Kind> = match kind.as_deref() {
        None => Kind::ALL.to_vec(),
        Some(k) => vec![*Kind::ALL
            .iter()
            .find(|x| x.as_str() == k)
            .with_context(|| format!("unknown kind {k}"))?],
    };
    // One run at a time would take ~4 x 7 s (the expiry check waits); each
    // probe has its own prefix, so they run side by side.
    let results: Vec<Result<probe::ProbeResult>> = std::thread::scope(|s| {
        let hs: Vec<_> = kinds
            .iter()
            .map(|k| s.spawn(move || probe::probe(*k)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("probe panicked")))
            })
            .collect()
    });
    let mut ok = true;
    let mut out = vec![];
    for r in results {
        let r = r?;
        ok &= r.ok;
        out.push(r);
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{:<10} {:<22} {:<4} {:<9} {:<9} {:<8} {:<7} {:<7} {:<6} result",
            "kind",
            "mapped (A, A', B)",
            "EIM",
            "port kept",
            "filtered",
            "hairpin",
            "expires",
            "flushed",
            "secs"
        );
        for r in &out {
            let ports: Vec<String> = r
                .mapped
                .iter()
                .map(|m| m.rsplit(':').next().unwrap_or("").to_string())
                .collect();
            println!(
                "{:<10} {:<22} {:<4} {:<9} {:<9} {:<8} {:<7} {:<7} {:<6.1} {}",
                r.kind,
                format!("{}:{}", r.public_ip_of_nat, ports.join("/")),
                yn(r.endpoint_independent_mapping),
                yn(r.port_preserved),
                yn(r.unsolicited_inbound_dropped),
                yn(r.hairpin),
                yn(r.mapping_expires),
                yn(r.flush_forgets_mapping),
                r.secs,
                if r.ok {
                    "OK".to_string()
                } else {
                    format!("FAIL: {}", r.failures.join("; "))
                }
            );
        }
    }
    Ok(if ok { 0 } else { 1 })
}

fn yn(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Pings from every node to every public node's underlay address: what the
/// checker itself costs and how fast it confirms pairs without any overlay.
/// With `idle_secs`, then also reads every node's eth0 byte counters over an
/// idle window of that length (no engine running, the pinger paused): the
/// harness' own noise under the engines' idle figures.
fn measure_floor(
    plan: &Plan,
    pinger: &pinger::Pinger,
    nodes: usize,
    idle_secs: Option<f64>,
) -> serde_json::Value {
    pinger.reset();
    let ping_cpu0 = pinger.cpu_secs();
    for i in 0..nodes {
        pinger.node_started(i, Some(plan.nodes[i].underlay));
        if plan.nodes[i].kind != Kind::Public {
            pinger.set_target(i, false);
        }
    }
    let cpu0 = sys::self_cpu_secs();
    let publics: Vec<usize> = (0..nodes)
        .filter(|i| plan.nodes[*i].kind == Kind::Public)
        .collect();
    let total = nodes * publics.len() - publics.len();
    let count = |s: &pinger::State| -> usize {
        let mut d = 0;
        for i in 0..nodes {
            for &j in &publics {
                if i != j && s.pair(i, j).first_reply >= 0.0 {
                    d += 1;
                }
            }
        }
        d
    };
    let ok = pinger::wait_for(pinger, Duration::from_secs(30), |s| count(s) >= total);
    let (done, t, sent) = pinger.with(|s| (count(s), s.now(), s.sent));
    // exact: the latest first reply
    let last_first = pinger.with(|s| {
        let mut m: f64 = 0.0;
        for i in 0..nodes {
            for &j in &publics {
                if i != j {
                    m = m.max(s.pair(i, j).first_reply);
                }
            }
        }
        m
    });
    let cpu = sys::self_cpu_secs() - cpu0;
    if std::env::var_os("TESTNET_DEBUG").is_some() {
        pinger.with(|s| {
            for i in 0..nodes {
                for &j in &publics {
                    if i != j && s.pair(i, j).first_reply > 0.5 {
                        eprintln!(
                            "slow floor pair n{i}({:?}) -> n{j}: first reply {:.3}",
                            plan.nodes[i].kind,
                            s.pair(i, j).first_reply
                        );
                    }
                }
            }
        });
    }
    let ping_cpu = pinger.cpu_secs() - ping_cpu0;
    // The pinger at its cap: every pair due all the time for a while (good
    // pairs re-probed without delay), to measure what the checker costs.
    let calibration = {
        let (keep, share) = pinger.with(|s| (s.keep, s.good_share));
        {
            let mut s = pinger.state.lock().unwrap();
            s.keep = 0.0;
            s.good_share = 1.0;
        }
        let (c0, s0, t0) = (
            pinger.cpu_secs(),
            pinger.with(|s| s.sent),
            std::time::Instant::now(),
        );
        let secs = 2.0;
        while t0.elapsed().as_secs_f64() < secs && !cleanup::stopping() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let dt = t0.elapsed().as_secs_f64();
        let (c1, s1) = (pinger.cpu_secs(), pinger.with(|s| s.sent));
        {
            let mut s = pinger.state.lock().unwrap();
            s.keep = keep;
            s.good_share = share;
        }
        let pps = (s1 - s0) as f64 / dt;
        json!({"secs": dt, "pps": pps, "pinger_cpu_percent": (c1 - c0) / dt * 100.0,
               "pinger_cpu_us_per_echo": if s1 > s0 { Some((c1 - c0) / (s1 - s0) as f64 * 1e6) } else { None },
               "rate_cap_pps": pinger.with(|s| s.rate),
               "note": "the pinger thread's CPU while it pings the underlay at its rate cap (every pair due all the time)"})
    };
    let drain = pinger.pause_and_drain();
    for i in 0..nodes {
        pinger.node_stopped(i);
    }
    let mut v = json!({"pairs": total, "pairs_replied": done, "all_pairs_secs": if ok { Some(last_first) } else { None },
        "pps": sent as f64 / t.max(1e-3), "testnet_cpu_secs": cpu, "sent": sent,
        "pinger_cpu_secs": ping_cpu, "pinger_cpu_us_per_echo": if sent > 0 { Some(ping_cpu / sent as f64 * 1e6) } else { None },
        "pinger_drain_secs": drain, "calibration": calibration});
    if let Some(secs) = idle_secs {
        v["idle"] = measure_idle_floor(plan, pinger, nodes, secs);
    }
    v
}

/// Underlay bytes on every node's eth0 over `secs` with no engine running
/// and the pinger paused.
fn measure_idle_floor(
    plan: &Plan,
    pinger: &pinger::Pinger,
    nodes: usize,
    secs: f64,
) -> serde_json::Value {
    let t0 = pinger.with(|s| s.t0);
    let ns: Vec<String> = (0..nodes).map(|i| plan.nodes[i].ns.clone()).collect();
    let sent_a = pinger.with(|s| s.sent);
    let a = sys::if_bytes_in(&ns, "eth0", t0);
    let end = std::time::Instant::now() + Duration::from_secs_f64(secs.max(0.0));
    while std::time::Instant::now() < end && !cleanup::stopping() {
        std::thread::sleep((end - std::time::Instant::now()).min(Duration::from_millis(100)));
    }
    let b = sys::if_bytes_in(&ns, "eth0", t0);
    let sent_b = pinger.with(|s| s.sent);
    let rows: Vec<runner::NodeRow> = (0..nodes)
        .filter_map(|i| {
            let (x, y) = (a[i]?, b[i]?);
            let w = (y.t - x.t).max(1e-3);
            let (rx, tx) = (y.rx.saturating_sub(x.rx), y.tx.saturating_sub(x.tx));
            let packets = y.rx_packets.saturating_sub(x.rx_packets)
                + y.tx_packets.saturating_sub(x.tx_packets);
            Some(runner::NodeRow {
                node: i,
                cpu_percent: None,
                gossip: None,
                wakeups: None,
                under: Some((rx + tx) as f64 / w),
                rx: Some(rx as f64 / w),
                tx: Some(tx as f64 / w),
                packets: Some(packets as f64 / w),
                rss_mib: None,
            })
        })
        .collect();
    let window = rows
        .first()
        .and_then(|r| Some(b[r.node]?.t - a[r.node]?.t))
        .unwrap_or(0.0);
    let mut v = runner::node_table(plan, &rows);
    v["secs"] = json!(window);
    v["pinger"] = json!("paused");
    v["pinger_sent_in_window"] = json!(sent_b - sent_a);
    v["note"] = json!("the bare underlay (topology built, no engine running, pinger paused): bytes in+out of each node's eth0 per second; what the harness and the kernel send on their own (ARP, ...)");
    v
}

fn cmd_topo(nodes: usize, kind: &str, mix: Option<String>, rate: f64, hold: bool) -> Result<i32> {
    preflight(&["ip", "nft"])?;
    cleanup::cleanup_stale(false);
    let prefix = cleanup::new_prefix();
    cleanup::register(&prefix)?;
    cleanup::install_signal_cleanup(&prefix)?;
    let _guard = cleanup::RunGuard {
        prefix: prefix.clone(),
    };
    cleanup::raise_host_sysctls()?;
    let opts = topology::TopoOptions {
        kind: kind.into(),
        mix: Mix::parse(
            mix.as_deref()
                .unwrap_or("public=20,nat=50,cgnat=20,symmetric=10"),
        )?,
        slots: nodes,
        nodes_per_home: 3,
        homes_per_cgnat: 4,
        hosts_per_isp: 128,
        udp_timeout_secs: None,
        udp_stream_timeout_secs: None,
        seed: 1,
        home_size_exact: false,
        home_sizes: Default::default(),
        stun_server: false,
        sites: vec![],
    };
    let plan = Plan::new(&prefix, &opts)?;
    let build = plan.build()?;
    println!(
        "built {} ({} namespaces, {} veth pairs) in {build:.2}s",
        prefix, plan.counts.namespaces, plan.counts.veth_pairs
    );
    println!("{}", serde_json::to_string(&plan.counts)?);
    let ns: Vec<String> = plan.nodes.iter().map(|n| n.ns.clone()).collect();
    let pinger = pinger::Pinger::start(&ns, rate)?;
    let floor = measure_floor(&plan, &pinger, nodes, None);
    println!("underlay floor: {floor}");
    drop(pinger);
    if hold {
        println!("holding; Ctrl-C to destroy. Try: ip netns | grep {prefix}");
        while !cleanup::stopping() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let d = plan.destroy();
    println!("destroyed in {d:.2}s");
    Ok(0)
}

fn default_meshpeer_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHPEER_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("meshpeer")))
        .unwrap_or_else(|| PathBuf::from("meshpeer"))
}

fn cmd_run(a: RunArgs) -> Result<i32> {
    let mut sc = scenario::Scenario::load(&a.scenario)?;
    if let Some(n) = a.nodes {
        sc.topology.nodes = n;
    }
    if let Some(t) = &a.topology {
        sc.topology.kind = t.clone();
    }
    if let Some(m) = &a.mix {
        sc.topology.mix = Some(m.clone());
        if a.topology.is_none() {
            sc.topology.kind = "mixed".into();
        }
    }
    if let Some(s) = a.seed {
        sc.topology.seed = s;
    }
    if let Some(r) = a.ping_rate {
        sc.measure.ping_rate = r;
    }
    if let Some(v) = a.idle_secs {
        sc.set_idle_secs(v);
    }
    if let Some(v) = &a.start {
        sc.nodes.start = v.clone();
    }
    if let Some(v) = a.stagger_ms {
        sc.nodes.stagger_ms = v;
    }
    if let Some(v) = a.join_timeout_secs {
        sc.nodes
            .join_args
            .extend(["--join-timeout-secs".to_string(), v.to_string()]);
    }
    sc.validate()?;
    let mut progs = vec!["ip", "nft"];
    if sc
        .steps
        .iter()
        .any(|s| matches!(s, scenario::Step::FlushNat))
    {
        progs.push("conntrack");
    }
    if sc.steps.iter().any(|s| {
        matches!(
            s,
            scenario::Step::FlushNat | scenario::Step::ChangePublicAddress { .. }
        )
    }) && !progs.contains(&"conntrack")
    {
        progs.push("conntrack");
    }
    if sc.topology.stun_server.is_some() {
        progs.push("turnserver");
    }
    if sc
        .steps
        .iter()
        .any(|s| matches!(s, scenario::Step::StunClient { .. }))
    {
        progs.push("stun");
    }
    preflight(&progs)?;
    let bin = a.meshpeer_bin.clone().unwrap_or_else(default_meshpeer_bin);
    if !bin.is_file() {
        bail!("meshpeer binary {} not found: build it with `cargo build --bin meshpeer` or pass --meshpeer-bin", bin.display());
    }
    let compare = a.compare.as_deref() == Some("nebula") || a.engine == "nebula";
    if compare {
        for p in ["nebula", "nebula-cert"] {
            if sys::which(p).is_none() {
                bail!("--compare nebula needs `{p}`: apt-get install nebula");
            }
        }
    }
    let stale = cleanup::cleanup_stale(false);
    if !stale.is_empty() {
        println!("removed leftovers of {} crashed run(s)", stale.len());
    }
    let prefix = cleanup::new_prefix();
    cleanup::register(&prefix)?;
    cleanup::install_signal_cleanup(&prefix)?;
    let guard = cleanup::RunGuard {
        prefix: prefix.clone(),
    };
    cleanup::raise_host_sysctls()?;
    let work = cleanup::work_dir(&prefix);
    std::fs::create_dir_all(&work)?;
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from("target/testnet").join(format!(
            "{}-{}",
            sc.name,
            prefix.trim_end_matches('-')
        ))
    });
    let command: String = std::env::args().collect::<Vec<_>>().join(" ");
    let started_unix = meshpeer::clock::unix_secs();

    let topts = sc.topo_options()?;
    let plan = Plan::new(&prefix, &topts)?;
    println!(
        "testnet {prefix}: scenario {} — {} nodes ({} slots), topology {} ({} public, {} nat, {} cgnat, {} symmetric)",
        sc.name, sc.topology.nodes, topts.slots, sc.topology.kind, plan.counts.public, plan.counts.nat, plan.counts.cgnat, plan.counts.symmetric
    );
    let build_secs = plan.build()?;
    println!(
        "topology: {} namespaces, {} veth pairs, built in {build_secs:.2}s",
        plan.counts.namespaces, plan.counts.veth_pairs
    );
    let stun_server = match &plan.stun {
        Some((stun_ns, addr)) => {
            let v = start_coturn(stun_ns, *addr, &work)?;
            println!("STUN server (coturn, STUN only) at {addr}:3478 in {stun_ns}");
            sc.nodes
                .extra_args
                .extend(["--stun-server".to_string(), format!("{addr}:3478")]);
            Some(v)
        }
        None => None,
    };
    let ns: Vec<String> = plan.nodes.iter().map(|n| n.ns.clone()).collect();
    let pinger = pinger::Pinger::start(&ns, sc.measure.ping_rate)?;
    let floor = if sc.measure.floor && !a.no_floor {
        let idle = sc.measure.floor_idle_secs.or_else(|| sc.idle_secs());
        if let Some(s) = idle {
            println!("floor: pinging the underlay, then {s:.0} s idle (no engine) for the underlay byte floor");
        }
        let f = measure_floor(&plan, &pinger, sc.topology.nodes, idle);
        let mut brief = f.clone();
        if let Some(o) = brief.as_object_mut() {
            if let Some(idle) = o.get_mut("idle").and_then(|v| v.as_object_mut()) {
                idle.remove("per_node");
            }
        }
        println!("pinger floor on the underlay: {brief}");
        Some(f)
    } else {
        None
    };
    let mut runs = vec![];
    let mut engines = vec![];
    if a.engine == "meshpeer" {
        engines.push(EngineKind::Meshpeer);
    }
    if compare {
        engines.push(EngineKind::Nebula);
    }
    for (k, e) in engines.iter().enumerate() {
        if k > 0 {
            let _ = plan.heal();
            let _ = plan.flush_nat();
        }
        let r = runner::run_engine(*e, &sc, &plan, &pinger, &work, &bin, sc.topology.nodes)?;
        runs.push(r);
        if cleanup::stopping() {
            break;
        }
    }
    drop(pinger);
    let stun_server = stun_server.map(|mut v| {
        if let Some((stun_ns, _)) = &plan.stun {
            v["counters"] = runner::stun_counters(stun_ns);
        }
        v
    });
    let destroy_secs = plan.destroy();
    let ok = runs.iter().all(|r| r.ok);
    if !ok || a.keep_logs {
        for e in &engines {
            let from = work.join(e.as_str()).join("logs");
            let to = out.join(format!("logs-{}", e.as_str()));
            copy_dir(&from, &to);
        }
    }
    drop(guard);
    // What the run left behind after its cleanup (must be nothing).
    let leftovers = cleanup::leftovers(&prefix, &work);
    let soak_checked = sc
        .steps
        .iter()
        .any(|s| matches!(s, scenario::Step::SoakCheck(_)));
    if leftovers["total"] != 0 {
        println!("LEFTOVERS after cleanup: {leftovers}");
    }
    let ok = ok && !(soak_checked && leftovers["total"] != 0);
    let rep = report::Report {
        testnet_version: env!("CARGO_PKG_VERSION").into(),
        scenario: sc.clone(),
        command,
        started_unix,
        machine: machine(),
        topology: json!({
            "kind": sc.topology.kind, "slots": topts.slots, "mix": topts.mix_for_kind()?.to_string(),
            "counts": plan.counts, "build_secs": build_secs, "destroy_secs": destroy_secs,
            "nodes": plan.nodes.iter().map(|n| json!({"index": n.index, "kind": n.kind, "underlay": n.underlay, "public_ip": n.public_ip, "routers": n.routers, "isp": n.isp})).collect::<Vec<_>>(),
        }),
        floor,
        stun_server,
        runs,
        leftovers: Some(leftovers),
        ok,
    };
    report::write(&rep, &out)?;
    if cleanup::stopping() {
        println!("\ninterrupted: partial report in {}", out.display());
        return Ok(130);
    }
    println!();
    print!("{}", report::summary(&rep));
    if let Some(t) = rep.runs.first().and_then(|r| r.status_table.as_ref()) {
        println!("\n`meshpeer status` of one node at the end of the run:\n{t}");
    }
    println!("report:  {}", out.join("report.json").display());
    println!("summary: {}", out.join("summary.txt").display());
    println!("plot:    {}", out.join("reachability.svg").display());
    Ok(if ok { 0 } else { 1 })
}

/// Starts Debian's coturn (`turnserver`) STUN-only, without auth, in the
/// STUN host's namespace, with nftables counters for STUN requests in and
/// answers out, and waits (up to 10 s) until it listens on UDP 3478.
fn start_coturn(ns: &str, addr: std::net::Ipv4Addr, work: &Path) -> Result<serde_json::Value> {
    sys::nft_in(
        ns,
        "table ip tnstun {\n chain inp { type filter hook input priority 0; policy accept; udp dport 3478 counter; }\n chain out { type filter hook output priority 0; policy accept; udp sport 3478 counter; }\n}\n",
    )?;
    let log = work.join("coturn.log");
    let args: Vec<String> = [
        "--stun-only",
        "--no-auth",
        "--listening-ip",
        &addr.to_string(),
        "--listening-port",
        "3478",
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "--no-stdout-log",
        "--simple-log",
        "--log-file",
        &log.display().to_string(),
        "--pidfile",
        &work.join("coturn.pid").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = std::fs::File::create(work.join("coturn.out"))?;
    let mut c = sys::command_in(ns, "turnserver", &args)?;
    c.stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = c.spawn().context("starting turnserver (coturn)")?;
    let pid = child.id();
    // The child is killed with the topology (every process in its
    // namespaces); forget the handle.
    std::mem::forget(child);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let ss = sys::run_in(ns, "ss", &["-Hlun"]).unwrap_or_default();
        if ss.contains(&format!("{addr}:3478")) {
            break;
        }
        if std::time::Instant::now() >= end {
            bail!(
                "turnserver did not listen on {addr}:3478 within 10 s: {}",
                std::fs::read_to_string(work.join("coturn.out")).unwrap_or_default()
            );
        }
        sys::sleep_ms(100);
    }
    let version =
        sys::run(std::process::Command::new("dpkg-query").args(["-W", "-f=${Version}", "coturn"]))
            .unwrap_or_default();
    Ok(
        json!({"software": "coturn", "version": version.trim(), "addr": format!("{addr}:3478"), "namespace": ns, "pid": pid}),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    if let Ok(d) = std::fs::read_dir(from) {
        let _ = std::fs::create_dir_all(to);
        for e in d.flatten() {
            let _ = std::fs::copy(e.path(), to.join(e.file_name()));
        }
    }
}

fn machine() -> serde_json::Value {
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.to_string()));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem": mem,
        "kernel": kernel.trim(),
    })
}
