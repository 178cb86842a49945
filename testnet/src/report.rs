//! The report: `report.json` (everything), `summary.txt` (for people) and
//! `reachability.svg` (reachable pairs over time, with live nodes on a
//! second scale and the scenario's events marked).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

use crate::runner::EngineResult;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub testnet_version: String,
    pub scenario: crate::scenario::Scenario,
    pub command: String,
    pub started_unix: u64,
    pub machine: Value,
    pub topology: Value,
    pub floor: Option<Value>,
    /// The coturn STUN server, when the topology has one.
    pub stun_server: Option<Value>,
    pub runs: Vec<EngineResult>,
    /// What the run left on the machine after its cleanup: namespaces with
    /// its prefix, processes started from its work directory, UAPI sockets,
    /// the work directory, the registry entry (all must be 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leftovers: Option<Value>,
    pub ok: bool,
}

fn f(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.2}"),
        None => "n/a".into(),
    }
}

pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    let t = &r.topology;
    let _ = writeln!(
        s,
        "meshpeer testnet: scenario {} — {}",
        r.scenario.name, r.scenario.description
    );
    let _ = writeln!(s, "command: {}", r.command);
    let _ = writeln!(
        s,
        "topology: {} with {} node slots ({} public, {} nat, {} cgnat, {} symmetric; {} home routers, {} symmetric NATs, {} CGNATs, {} ISPs; {} namespaces, {} veth pairs)",
        t["kind"].as_str().unwrap_or(""),
        t["slots"],
        t["counts"]["public"],
        t["counts"]["nat"],
        t["counts"]["cgnat"],
        t["counts"]["symmetric"],
        t["counts"]["home_routers"],
        t["counts"]["symmetric_routers"],
        t["counts"]["cgnat_routers"],
        t["counts"]["isp_routers"],
        t["counts"]["namespaces"],
        t["counts"]["veth_pairs"],
    );
    let _ = writeln!(
        s,
        "          built in {} s, destroyed in {} s",
        f(&t["build_secs"]),
        f(&t["destroy_secs"])
    );
    if let Some(fl) = &r.floor {
        let _ = writeln!(
            s,
            "pinger floor (underlay, no overlay): {} of {} pairs to public nodes replied, all after {} s, at {} echo/s, testnet CPU {} s (pinger thread {} s, {} us per echo)",
            fl["pairs_replied"], fl["pairs"], f(&fl["all_pairs_secs"]), f(&fl["pps"]), f(&fl["testnet_cpu_secs"]),
            f(&fl["pinger_cpu_secs"]), f(&fl["pinger_cpu_us_per_echo"])
        );
        let cal = &fl["calibration"];
        if cal.is_object() {
            let _ = writeln!(
                s,
                "pinger at its cap (underlay, {} s): {} echo/s (cap {}), pinger thread {} % of a core, {} us per echo",
                f(&cal["secs"]), f(&cal["pps"]), f(&cal["rate_cap_pps"]), f(&cal["pinger_cpu_percent"]), f(&cal["pinger_cpu_us_per_echo"])
            );
        }
        if let Some(idle) = fl.get("idle") {
            let u = &idle["underlay_bytes_per_sec_per_node"];
            let _ = writeln!(
                s,
                "underlay floor at rest (no engine, pinger paused, {} s, {} nodes): eth0 in+out per node mean {} median {} max {}",
                f(&idle["secs"]), idle["nodes"], bps(&u["mean"]), bps(&u["p50"]), bps(&u["max"])
            );
        }
    }
    for run in &r.runs {
        let _ = writeln!(
            s,
            "\n== {} {}",
            run.engine,
            if run.ok { "OK" } else { "FAILED" }
        );
        if let Some(b) = &run.backend {
            let _ = writeln!(s, "backend: {b}");
        }
        if let Some(c) = &run.convergence {
            let _ = writeln!(
                s,
                "convergence: {} nodes, {}/{} ordered pairs replied; first reply p50 {} s, p99 {} s, max {} s; all pairs {} s; every node lists every other {} s (deadline {} s){}",
                c["nodes"], c["pairs_replied"], c["pairs"], f(&c["first_reply_p50_secs"]), f(&c["first_reply_p99_secs"]),
                f(&c["first_reply_max_secs"]), f(&c["all_pairs_secs"]), f(&c["membership_secs"]), f(&c["deadline_secs"]),
                if c["converged"].as_bool() == Some(true) { "" } else { " -- NOT CONVERGED by the deadline" }
            );
            let _ = writeln!(
                s,
                "  ordered pairs answered: 50 % at {} s, 99 % at {} s, 100 % at {} s from the scenario start (all {} nodes started at {} s)",
                f(&c["timing"]["p50_secs"]), f(&c["timing"]["p99_secs"]), f(&c["timing"]["all_secs"]), c["nodes"], f(&c["all_started_secs"])
            );
            let _ = writeln!(s, "  {}", resolution_line(&c["resolution"]));
            let ak = &c["resolution"]["address_known_after_start_secs"];
            if ak.is_object() {
                let _ = writeln!(
                    s,
                    "  overlay address known to the testnet after the node's start: median {} s, max {} s (the daemon's join, plus the poller's address lane: a thread of its own asking every node without a known address, one after the other, every 20 ms; full status sweeps took {} s on average, {} s at most)",
                    f(&ak["p50"]),
                    f(&ak["max"]),
                    f(&run.false_down["sweep_mean_secs"]),
                    f(&run.false_down["sweep_max_secs"]),
                );
            }
            come_up_lines(&mut s, &c["come_up"]);
        }
        if !run.pair_classes.is_empty() {
            let _ = writeln!(s, "pairs by kind (at the first convergence check):");
            for c in &run.pair_classes {
                let pairs = c["pairs"].as_u64().unwrap_or(0);
                let reached = c["reached"].as_u64().unwrap_or(0);
                let _ = writeln!(
                    s,
                    "  {:>9} <-> {:<9} {:>6}/{:<6} reached ({:.0}%)",
                    c["a"].as_str().unwrap_or(""),
                    c["b"].as_str().unwrap_or(""),
                    reached,
                    pairs,
                    if pairs > 0 {
                        100.0 * reached as f64 / pairs as f64
                    } else {
                        0.0
                    }
                );
            }
        }
        if let Some(m) = &run.pair_matrix {
            let _ = writeln!(
                s,
                "pair-type matrix (ordered pairs; path = the sender's `meshpeer status`; first reply from the later node's start):"
            );
            let _ = writeln!(
                s,
                "  {:<42} {:>5} {:>9} {:>6} {:>7} {:>5} {:>8} {:>9} {:>9} {:>8}",
                "pair type",
                "pairs",
                "reachable",
                "direct",
                "relayed",
                "other",
                "expected",
                "ttfr p50",
                "ttfr max",
                "mismatch"
            );
            for row in m["rows"].as_array().into_iter().flatten() {
                let u = |k: &str| {
                    row[k]
                        .as_u64()
                        .map(|x| x.to_string())
                        .unwrap_or_else(|| "n/a".into())
                };
                let _ = writeln!(
                    s,
                    "  {:<42} {:>5} {:>9} {:>6} {:>7} {:>5} {:>8} {:>9} {:>9} {:>8}",
                    row["type"].as_str().unwrap_or(""),
                    u("pairs"),
                    u("reached"),
                    u("direct"),
                    u("relayed"),
                    u("other"),
                    row["expected"].as_str().unwrap_or(""),
                    f(&row["first_reply_p50_secs"]),
                    f(&row["first_reply_max_secs"]),
                    u("mismatched"),
                );
            }
            let flagged = m["flagged"].as_array().cloned().unwrap_or_default();
            for fl in flagged.iter().take(30) {
                let st = &fl["status"];
                let _ = writeln!(
                    s,
                    "  FLAG {} {}: expected {}, status says {}{}{}",
                    fl["pair"].as_str().unwrap_or(""),
                    fl["type"].as_str().unwrap_or(""),
                    fl["expected"].as_str().unwrap_or(""),
                    fl["path"].as_str().unwrap_or(""),
                    st["relay"]
                        .as_str()
                        .map(|r| format!(" via {r}"))
                        .unwrap_or_default(),
                    st["why_not_direct"]
                        .as_str()
                        .map(|w| format!(" ({w})"))
                        .unwrap_or_default(),
                );
            }
            if flagged.len() > 30 {
                let _ = writeln!(
                    s,
                    "  ... {} more flagged pairs in report.json",
                    flagged.len() - 30
                );
            }
            for u in m["unreached"].as_array().into_iter().flatten().take(20) {
                let _ = writeln!(
                    s,
                    "  UNREACHED {} {}: sender's status says {}, receiver's says {}",
                    u["pair"].as_str().unwrap_or(""),
                    u["type"].as_str().unwrap_or(""),
                    u["sender_sees"].as_str().unwrap_or(""),
                    u["receiver_sees"].as_str().unwrap_or("")
                );
            }
        }
        for rc in &run.recoveries {
            let _ = writeln!(
                s,
                "recovery after {} (t={} s): {}/{} affected ordered pairs replied again ({} within 30 s); p50 {} s, max {} s{}",
                rc["event"].as_str().unwrap_or(""),
                f(&rc["t"]),
                rc["recovered"],
                rc["affected_pairs"],
                rc["recovered_within_30s"],
                f(&rc["p50_secs"]),
                f(&rc["max_secs"]),
                if rc["not_recovered"].as_array().map(|a| a.is_empty()).unwrap_or(true) {
                    String::new()
                } else {
                    format!(" (max of the recovered: {} s)", f(&rc["max_of_recovered_secs"]))
                }
            );
            if rc["directions"].is_object() {
                let d = &rc["directions"];
                let _ = writeln!(
                    s,
                    "  new node -> others: {}/{} pairs, 99 % at {} s, all at {} s; others -> new node: {}/{} pairs, 99 % at {} s, all at {} s",
                    d["new_to_old"]["replied"], d["new_to_old"]["pairs"], f(&d["new_to_old"]["p99_secs"]), f(&d["new_to_old"]["all_secs"]),
                    d["old_to_new"]["replied"], d["old_to_new"]["pairs"], f(&d["old_to_new"]["p99_secs"]), f(&d["old_to_new"]["all_secs"]),
                );
            }
            let res = &rc["resolution"];
            let _ = writeln!(
                s,
                "  resolution (measured): every affected pair probed after {} s{}; first probe {} s (max) after both addresses were known; first-reply uncertainty p50 {} s max {} s ({} pairs answered their first probe)",
                f(&res["every_pair_probed_after_secs"]),
                rc["new_nodes_address_known_secs"]["max"]
                    .as_f64()
                    .map(|t| format!(" (the new node's overlay address known to the testnet after {t:.2} s)"))
                    .unwrap_or_default(),
                f(&res["first_probe_delay_secs"]["max"]),
                f(&res["first_reply_uncertainty_secs"]["p50"]),
                f(&res["first_reply_uncertainty_secs"]["max"]),
                res["answered_at_first_probe"]
            );
            let slow: Vec<String> = rc["slowest"]
                .as_array()
                .into_iter()
                .flatten()
                .take(5)
                .map(|x| {
                    format!(
                        "{} {} {} s",
                        x["pair"].as_str().unwrap_or(""),
                        x["type"].as_str().unwrap_or(""),
                        f(&x["secs"])
                    )
                })
                .collect();
            if !slow.is_empty() {
                let _ = writeln!(s, "  slowest: {}", slow.join("; "));
            }
            for m in rc["not_recovered"]
                .as_array()
                .into_iter()
                .flatten()
                .take(10)
            {
                let _ = writeln!(
                    s,
                    "  NOT RECOVERED {} {}: sender sees {} (endpoint {}), receiver sees {} (endpoint {})",
                    m["pair"].as_str().unwrap_or(""),
                    m["type"].as_str().unwrap_or(""),
                    m["path_i_sees"].as_str().unwrap_or(""),
                    m["status_i_sees"]["endpoint"],
                    m["path_j_sees"].as_str().unwrap_or(""),
                    m["status_j_sees"]["endpoint"],
                );
            }
        }
        for st in &run.steps {
            match st.action.as_str() {
                "check_nat" => {
                    let r = &st.result;
                    let rows = r["nodes"].as_array().cloned().unwrap_or_default();
                    let good = rows.iter().filter(|v| v["ok"] == true).count();
                    let _ = writeln!(
                        s,
                        "step {} check_nat: {good}/{} nodes show the expected NAT kind and public address; STUN server counters {}",
                        st.index,
                        rows.len(),
                        r["stun_server_counters"]
                    );
                    for v in rows.iter().filter(|v| v["ok"] != true) {
                        let _ = writeln!(
                            s,
                            "  n{} ({}): nat {} mapped {}; want {} at {}",
                            v["node"],
                            v["kind"].as_str().unwrap_or(""),
                            v["nat"],
                            v["mapped_endpoints"],
                            v["want_nat"],
                            v["want_public_ip"]
                        );
                    }
                }
                "stun_client" => {
                    for c in st.result["clients"].as_array().into_iter().flatten() {
                        let _ = writeln!(
                            s,
                            "step {} stun_client: `stun {} -v` from n{} printed mapped address {} (NAT public address {}): {}",
                            st.index,
                            c["server"].as_str().unwrap_or(""),
                            c["client"],
                            c["mapped"].as_str().unwrap_or("none"),
                            c["want_ip"].as_str().unwrap_or(""),
                            if c["ok"] == true { "OK" } else { "WRONG" }
                        );
                    }
                }
                "change_public_address" => {
                    for c in st.result["routers"].as_array().into_iter().flatten() {
                        let _ = writeln!(
                            s,
                            "step {} change_public_address: {} {} -> {} (nodes behind it: {})",
                            st.index,
                            c["router"].as_str().unwrap_or(""),
                            c["old"].as_str().unwrap_or(""),
                            c["new"].as_str().unwrap_or(""),
                            st.result["nodes_behind"]
                        );
                    }
                }
                _ => {}
            }
        }
        for e in &run.failure_detection {
            if e.get("restarted_before_detection").is_some() {
                let _ = writeln!(
                    s,
                    "failure detection: {} n{} -> restarted before the check",
                    e["kind"].as_str().unwrap_or(""),
                    e["node"]
                );
                continue;
            }
            let _ = writeln!(
                s,
                "failure detection: {} n{} -> seen down/gone by {}/{} nodes, all after {} s (the status sweeps' resolution: all between {} and {} s; median observer {} s); WireGuard peer removed on {}/{}, everywhere after {} s",
                e["kind"].as_str().unwrap_or(""), e["node"], e["seen_down_by"], e["observers"], f(&e["all_see_down_secs"]),
                f(&e["all_see_down_after_secs"]), f(&e["all_see_down_secs"]), f(&e["seen_down_p50_secs"]),
                e["peer_removed_by"], e["observers"], f(&e["peer_removed_everywhere_secs"])
            );
        }
        for st in &run.steps {
            if st.action == "wait_converged" && st.index > 0 {
                let r = &st.result;
                let _ = writeln!(
                    s,
                    "step {} wait_converged: {}/{} pairs replied since t={} s; all pairs after {} s, membership after {} s{}",
                    st.index, r["pairs_replied"], r["pairs"], f(&r["since"]), f(&r["all_pairs_secs"]), f(&r["membership_secs"]),
                    if r["converged"].as_bool() == Some(true) { "" } else { " (NOT converged by the deadline)" }
                );
                let _ = writeln!(
                    s,
                    "  ordered pairs answered since the mark: 50 % at {} s, 99 % at {} s, 100 % at {} s",
                    f(&r["timing"]["p50_secs"]), f(&r["timing"]["p99_secs"]), f(&r["timing"]["all_secs"])
                );
                let _ = writeln!(s, "  {}", resolution_line(&r["resolution"]));
            }
        }
        if let Some(st) = &run.steady {
            steady_lines(&mut s, st);
        }
        let fd = &run.false_down;
        if fd.get("verdicts").is_some() {
            let _ = writeln!(
                s,
                "false \"down\" verdicts (a live member shown down or missing by another live member, no kill/leave since the last convergence): {} ({} down, {} missing; {} observer/subject pairs, {} subjects) over {} s of quiet time, {} status sweeps (one every {} s or slower)",
                fd["verdicts"], fd["down"], fd["missing"], fd["observer_subject_pairs"], fd["subjects"], f(&fd["quiet_secs"]), fd["sweeps"], f(&fd["poll_interval_secs"])
            );
            for v in fd["first"].as_array().into_iter().flatten().take(5) {
                let _ = writeln!(
                    s,
                    "  at {} s: n{} shows n{} {}{}",
                    f(&v["t"]),
                    v["observer"],
                    v["subject"],
                    v["verdict"].as_str().unwrap_or(""),
                    v["until"]
                        .as_f64()
                        .map(|u| format!(" (up again at {u:.2} s)"))
                        .unwrap_or_else(|| " (until the end of the quiet period)".into())
                );
            }
        }
        soak_lines(&mut s, run);
        let o = &run.overhead;
        let _ = writeln!(
            s,
            "per node over the run: CPU s mean {} max {}; peak RSS MiB mean {} max {}",
            f(&o["cpu_secs_per_node"]["mean"]),
            f(&o["cpu_secs_per_node"]["max"]),
            f(&o["peak_rss_mib_per_node"]["mean"]),
            f(&o["peak_rss_mib_per_node"]["max"])
        );
        if !o["handshakes"].is_null() {
            let _ = writeln!(
                s,
                "WireGuard: {} of {} listed peers had a handshake at the end ({} per node)",
                o["handshakes"]["peers_with_handshake"],
                o["handshakes"]["peers_listed"],
                f(&o["handshakes"]["per_node_mean"])
            );
        }
        if run.paths.get("direct").is_some() {
            let _ = writeln!(
                s,
                "paths at the end: {} ordered pairs: {} direct, {} relayed, {} neither",
                run.paths["ordered_pairs"],
                run.paths["direct"],
                run.paths["relayed"],
                run.paths["none"]
            );
        }
        let p = &run.pinger;
        let _ = writeln!(
            s,
            "pinger: {} sent, {} replies, cap {} echo/s, reach window {} s, testnet CPU {} s",
            p["sent"],
            p["received"],
            f(&p["rate_cap_pps"]),
            f(&p["reach_window_secs"]),
            f(&p["testnet_cpu_secs"])
        );
        for c in run.crashes.iter().take(5) {
            let _ = writeln!(
                s,
                "EXITED: n{} at {} s: {}",
                c["node"],
                f(&c["t"]),
                c["exit"].as_str().unwrap_or("")
            );
        }
        if run.crashes.len() > 5 {
            let _ = writeln!(
                s,
                "EXITED: ... {} daemons in all exited on their own (see report.json: crashes)",
                run.crashes.len()
            );
        }
        for e in &run.errors {
            let _ = writeln!(s, "ERROR: {e}");
        }
    }
    at_rest_table(&mut s, r);
    if let Some(l) = &r.leftovers {
        let _ = writeln!(
            s,
            "after cleanup: {} namespaces, {} processes, {} UAPI sockets, {} work dirs, {} registry entries of this run left",
            l["namespaces"], l["processes"], l["uapi_sockets"], l["work_dir"], l["registry_entry"]
        );
    }
    let _ = writeln!(s, "\nresult: {}", if r.ok { "OK" } else { "FAILED" });
    s
}

/// The soak's lines: faults performed, then the end checks.
fn soak_lines(s: &mut String, run: &EngineResult) {
    for st in &run.steps {
        let r = &st.result;
        match st.action.as_str() {
            "soak" => {
                let c = &r["counts"];
                let _ = writeln!(
                    s,
                    "soak: {} s, a fault every {} s (seed {}), live nodes kept within {}..{} (mean {}, {} at the end): kill {}, leave {}, restart {}, join {}, seed loss {} (seed restarts {}), partitions {}, no fault possible {}; last fault at {} s; daemons that exited on their own: {}",
                    f(&r["secs"]), f(&r["every_secs"]), r["seed"], r["min_live"], r["max_live"], f(&r["live_nodes"]["mean"]), r["live_at_end"],
                    c["kill"], c["leave"], c["restart"], c["join"], c["seed_loss"], c["seed_restart"], c["partition"], c["none"],
                    f(&r["last_fault_t"]), r["crashes"].as_array().map(Vec::len).unwrap_or(0)
                );
            }
            "soak_check" => {
                let p = &r["problems"];
                let m = &r["memory"];
                let d = &r["descriptors"];
                let _ = writeln!(
                    s,
                    "soak check ({}): {} live nodes; lost members {}, lingering {}, not forgotten {}, duplicates {}, mismatches {}, conflicts {}, stale WireGuard peers {}, unknown {}, no status {} (held after {} s)",
                    if r["ok"] == true { "OK" } else { "FAILED" },
                    r["figures"]["live"], p["lost"], p["lingering"], p["not_forgotten"], p["duplicate"], p["mismatch"], p["conflict"], p["stale_peer"], p["unknown"], p["no_status"],
                    f(&r["membership_held_after_secs"])
                );
                let _ = writeln!(
                    s,
                    "  RSS MiB per node: start mean {} max {} ({} long-lived nodes); end mean {} max {}; peak (VmHWM) mean {} max {}; bound: end <= {}x start, all <= {} MiB",
                    f(&m["rss_mib_start"]["mean"]), f(&m["rss_mib_start"]["max"]), m["long_lived_nodes"],
                    f(&m["rss_mib_end"]["mean"]), f(&m["rss_mib_end"]["max"]),
                    f(&m["rss_mib_peak_hwm"]["mean"]), f(&m["rss_mib_peak_hwm"]["max"]),
                    r["bounds"]["rss_factor"], r["bounds"]["rss_max_mib"]
                );
                let _ = writeln!(
                    s,
                    "  open descriptors per node: start mean {} max {}; end mean {} max {}; growth (long-lived) mean {} max {} (bound +{}); sockets start mean {} end mean {}",
                    f(&d["fds_start"]["mean"]), f(&d["fds_start"]["max"]), f(&d["fds_end"]["mean"]), f(&d["fds_end"]["max"]),
                    f(&d["fd_growth_long_lived"]["mean"]), f(&d["fd_growth_long_lived"]["max"]), r["bounds"]["fd_growth"],
                    f(&d["sockets_start"]["mean"]), f(&d["sockets_end"]["mean"])
                );
            }
            _ => {}
        }
    }
}

/// Bytes per second from a JSON number (1 KB = 1000 B).
fn bps(v: &Value) -> String {
    v.as_f64()
        .map(crate::runner::fmt_bps)
        .unwrap_or_else(|| "n/a".into())
}

/// One line on the pinger's measured resolution during a wait.
fn resolution_line(r: &Value) -> String {
    let g = &r["unanswered_probe_interval_secs"];
    let probes = if g.is_null() {
        "no pair needed a second probe".to_string()
    } else {
        format!(
            "unanswered pairs re-probed every {} s (median), {} s (p99), {} s (max)",
            f(&g["p50"]),
            f(&g["p99"]),
            f(&g["max"])
        )
    };
    let tail = &r["slowest_1pct"];
    let at_first = tail["answered_at_first_probe"].as_u64().unwrap_or(0);
    format!(
        "resolution (measured): {probes}; first replies exact to within {} s (median); slowest 1 % ({} pairs) within {} s{}; first probe {} s (median) / {} s (max) after both addresses were known; every pair probed once by {} s; pinger {} echo/s, {} % CPU over this wait (cap {} echo/s)",
        f(&r["first_reply_uncertainty_secs"]["p50"]),
        tail["pairs"],
        f(&tail["max_uncertainty_secs"]),
        if at_first > 0 {
            format!(" ({at_first} answered their first probe)")
        } else {
            String::new()
        },
        f(&r["first_probe_delay_secs"]["p50"]),
        f(&r["first_probe_delay_secs"]["max"]),
        f(&r["every_pair_probed_after_secs"]),
        f(&r["pinger_pps"]),
        f(&r["pinger_cpu_percent"]),
        f(&r["rate_cap_pps"]),
    )
}

/// The come-up window of one engine (the first convergence), by node kind.
fn come_up_lines(s: &mut String, w: &Value) {
    if !w.is_object() {
        return;
    }
    let _ = writeln!(
        s,
        "  come-up ({} s to convergence, pinger running at {} echo/s): per node CPU % mean {} max {}; underlay eth0 in+out mean {}, {} datagrams/s",
        f(&w["secs"]),
        f(&w["pinger_pps"]),
        f(&w["cpu_percent_per_node"]["mean"]),
        f(&w["cpu_percent_per_node"]["max"]),
        bps(&w["underlay_bytes_per_sec_per_node"]["mean"]),
        f(&w["underlay_packets_per_sec_per_node"]["mean"]),
    );
    let Some(kinds) = w["by_kind"].as_object() else {
        return;
    };
    let _ = writeln!(
        s,
        "    {:<10} {:>5} {:>7} {:>12} {:>12}",
        "kind", "nodes", "CPU %", "under mean", "datagrams/s"
    );
    for g in crate::runner::GROUPS {
        let Some(v) = kinds.get(g) else { continue };
        let _ = writeln!(
            s,
            "    {:<10} {:>5} {:>7} {:>12} {:>12}",
            g,
            v["nodes"],
            f(&v["cpu_percent"]["mean"]),
            bps(&v["underlay_bytes_per_sec"]["mean"]),
            f(&v["underlay_packets_per_sec"]["mean"]),
        );
    }
}

/// The `measure_steady` lines of one engine.
fn steady_lines(s: &mut String, st: &Value) {
    let u = &st["underlay_bytes_per_sec_per_node"];
    let _ = writeln!(
        s,
        "steady state ({} s, {} nodes, pinger {}): underlay eth0 in+out per node mean {} median {} max {} ({} datagrams/s); gossip per node mean {} max {}; CPU % per node mean {} max {}; RSS MiB per node mean {} max {}; loop wake-ups/s per node mean {} max {}",
        f(&st["secs"]),
        st["nodes"],
        st["pinger"].as_str().unwrap_or(if st["with_pings"] == true { "running" } else { "paused" }),
        bps(&u["mean"]),
        bps(&u["p50"]),
        bps(&u["max"]),
        f(&st["underlay_packets_per_sec_per_node"]["mean"]),
        bps(&st["gossip_bytes_per_sec_per_node"]["mean"]),
        bps(&st["gossip_bytes_per_sec_per_node"]["max"]),
        f(&st["cpu_percent_per_node"]["mean"]),
        f(&st["cpu_percent_per_node"]["max"]),
        f(&st["rss_mib_per_node"]["mean"]),
        f(&st["rss_mib_per_node"]["max"]),
        f(&st["loop_wakeups_per_sec_per_node"]["mean"]),
        f(&st["loop_wakeups_per_sec_per_node"]["max"]),
    );
    if let Some(kinds) = st["by_kind"].as_object() {
        let _ = writeln!(
            s,
            "  {:<10} {:>5} {:>12} {:>12} {:>12} {:>12} {:>7} {:>8}",
            "kind",
            "nodes",
            "under mean",
            "under p50",
            "under max",
            "gossip mean",
            "CPU %",
            "RSS MiB"
        );
        for g in crate::runner::GROUPS {
            let Some(v) = kinds.get(g) else { continue };
            let _ = writeln!(
                s,
                "  {:<10} {:>5} {:>12} {:>12} {:>12} {:>12} {:>7} {:>8}",
                g,
                v["nodes"],
                bps(&v["underlay_bytes_per_sec"]["mean"]),
                bps(&v["underlay_bytes_per_sec"]["p50"]),
                bps(&v["underlay_bytes_per_sec"]["max"]),
                bps(&v["gossip_bytes_per_sec"]["mean"]),
                f(&v["cpu_percent"]["mean"]),
                f(&v["rss_mib"]["mean"]),
            );
        }
    }
    if let Some(hot) = st["hottest"].as_array() {
        let parts: Vec<String> = hot
            .iter()
            .map(|h| {
                let seed = if h["seed"].as_bool() == Some(true) {
                    ", seed"
                } else {
                    ""
                };
                format!(
                    "n{} ({}{seed}) {} % {}",
                    h["node"],
                    h["kind"].as_str().unwrap_or("?"),
                    f(&h["cpu_percent"]),
                    bps(&h["underlay_bytes_per_sec"])
                )
            })
            .collect();
        let _ = writeln!(s, "  hottest (CPU): {}", parts.join("; "));
    }
}

/// The engines at rest side by side (the last measure_steady of each) with
/// the floor.
fn at_rest_table(s: &mut String, r: &Report) {
    let steady: Vec<(&str, &Value)> = r
        .runs
        .iter()
        .filter_map(|run| run.steady.as_ref().map(|st| (run.engine.as_str(), st)))
        .collect();
    if steady.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nat rest, per node (measure_steady; underlay = eth0 bytes in+out, L2 frames; 1 KB = 1000 bytes; pinger {}):",
        if steady.iter().all(|(_, st)| st["with_pings"] != true) {
            "paused"
        } else {
            "RUNNING in some windows (its echoes are included there)"
        }
    );
    let _ = writeln!(
        s,
        "  {:<22} {:>5} {:>7} {:>11} {:>11} {:>11} {:>12} {:>7} {:>8}",
        "",
        "nodes",
        "secs",
        "under mean",
        "under p50",
        "under max",
        "gossip mean",
        "CPU %",
        "RSS MiB"
    );
    if let Some(idle) = r.floor.as_ref().and_then(|f| f.get("idle")) {
        let u = &idle["underlay_bytes_per_sec_per_node"];
        let _ = writeln!(
            s,
            "  {:<22} {:>5} {:>7} {:>11} {:>11} {:>11} {:>12} {:>7} {:>8}",
            "floor (no engine)",
            idle["nodes"],
            f(&idle["secs"]),
            bps(&u["mean"]),
            bps(&u["p50"]),
            bps(&u["max"]),
            "",
            "",
            ""
        );
    }
    for (engine, st) in steady {
        let u = &st["underlay_bytes_per_sec_per_node"];
        let _ = writeln!(
            s,
            "  {:<22} {:>5} {:>7} {:>11} {:>11} {:>11} {:>12} {:>7} {:>8}",
            engine,
            st["nodes"],
            f(&st["secs"]),
            bps(&u["mean"]),
            bps(&u["p50"]),
            bps(&u["max"]),
            bps(&st["gossip_bytes_per_sec_per_node"]["mean"]),
            f(&st["cpu_percent_per_node"]["mean"]),
            f(&st["rss_mib_per_node"]["mean"]),
        );
    }
}

const COLORS: [&str; 3] = ["#1f77b4", "#d62728", "#2ca02c"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) for about `n` ticks.
fn nice_step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(1e-9);
    let p = 10f64.powf(raw.log10().floor());
    let m = raw / p;
    p * if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    }
}

/// Reachable ordered pairs over time for each engine (solid), the pairs
/// expected among live nodes (dashed), live nodes (grey, right scale), and
/// the scenario's events (vertical lines, labelled).
pub fn svg(r: &Report) -> String {
    let (w, h) = (980.0, 560.0);
    let (ml, mr, mt, mb) = (70.0, 60.0, 40.0, 120.0);
    let pw = w - ml - mr;
    let ph = h - mt - mb;
    let tmax_raw = r
        .runs
        .iter()
        .flat_map(|x| x.timeline.iter().map(|s| s.t))
        .fold(1.0_f64, f64::max);
    let tstep = nice_step(tmax_raw, 10.0);
    let tmax = (tmax_raw / tstep).ceil() * tstep;
    let pmax_raw = r
        .runs
        .iter()
        .flat_map(|x| x.timeline.iter().map(|s| s.expected.max(s.reachable)))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let pstep = nice_step(pmax_raw * 1.05, 6.0).max(1.0);
    let pmax = ((pmax_raw * 1.05) / pstep).ceil() * pstep;
    let nmax_raw = r
        .runs
        .iter()
        .flat_map(|x| x.timeline.iter().map(|s| s.live))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    // the node scale uses the same number of grid lines as the pair scale
    let grid = (pmax / pstep).round().max(1.0);
    let nstep = (nice_step(nmax_raw * 1.05, grid).max(1.0) * grid).max(nmax_raw * 1.05) / grid;
    let nstep = nstep.ceil();
    let nmax = nstep * grid;
    let x = |t: f64| ml + t / tmax * pw;
    let y = |p: f64| mt + ph - p / pmax * ph;
    let yn = |n: f64| mt + ph - n / nmax * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}: reachable ordered pairs over the overlay ({} topology)</text>"#,
        w / 2.0,
        esc(&r.scenario.name),
        esc(r.topology["kind"].as_str().unwrap_or(""))
    );
    for k in 0..=(grid as usize) {
        let p = pstep * k as f64;
        let yy = y(p);
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e6e6e6"/>"##,
            ml + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            ml - 6.0,
            yy + 4.0,
            p
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" fill="#777">{}</text>"##,
            ml + pw + 6.0,
            yy + 4.0,
            nstep * k as f64
        );
    }
    let mut t = 0.0;
    while t <= tmax + 1e-9 {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x(t),
            mt + ph + 16.0,
            t
        );
        let _ = writeln!(
            s,
            r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"##,
            x(t),
            mt + ph,
            x(t),
            mt + ph + 4.0
        );
        t += tstep;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since scenario start</text>"#,
        ml + pw / 2.0,
        mt + ph + 34.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle">ordered pairs</text>"#,
        mt + ph / 2.0
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate({:.1},{:.1}) rotate(90)" text-anchor="middle" fill="#777">live nodes</text>"##,
        w - 14.0,
        mt + ph / 2.0
    );
    // Gaps in the first run's time line (the pinger paused), shaded.
    if let Some(run) = r.runs.first() {
        for w in run.timeline.windows(2) {
            if w[1].t - w[0].t > 2.0 {
                let (a, b) = (x(w[0].t), x(w[1].t));
                let _ = writeln!(
                    s,
                    r##"<rect x="{a:.1}" y="{mt}" width="{:.1}" height="{ph}" fill="#f2f2f2"/>"##,
                    b - a
                );
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#888" text-anchor="middle">pinger paused</text>"##,
                    (a + b) / 2.0,
                    mt + ph - 8.0
                );
            }
        }
    }
    // Event markers of the first run; labels merged when they are close.
    if let Some(run) = r.runs.first() {
        let mut groups: Vec<(f64, Vec<String>)> = vec![];
        for m in &run.markers {
            let l = &m.label;
            if l.starts_with("wait_converged")
                || l.starts_with("steady")
                || l.starts_with("detected")
                || l.starts_with("seed")
            {
                continue;
            }
            match groups.last_mut() {
                Some((t0, ls)) if x(m.t) - x(*t0) < 14.0 => ls.push(l.clone()),
                _ => groups.push((m.t, vec![l.clone()])),
            }
        }
        for (t, labels) in groups {
            let xx = x(t);
            let mut text = labels.join("; ");
            if text.chars().count() > 60 {
                text = text.chars().take(57).collect::<String>() + "...";
            }
            let _ = writeln!(
                s,
                r##"<line x1="{xx:.1}" y1="{mt}" x2="{xx:.1}" y2="{:.1}" stroke="#999" stroke-dasharray="3,3"/>"##,
                mt + ph
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#555" transform="rotate(90 {:.1} {:.1})">{}</text>"##,
                xx + 3.0,
                mt + 6.0,
                xx + 3.0,
                mt + 6.0,
                esc(&text)
            );
        }
    }
    for (k, run) in r.runs.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        // Segments without gaps; a gap (the pinger paused) is shaded.
        let mut segs: Vec<&[crate::pinger::Sample]> = vec![];
        let mut start = 0;
        for i in 1..=run.timeline.len() {
            if i == run.timeline.len() || run.timeline[i].t - run.timeline[i - 1].t > 2.0 {
                if i > start {
                    segs.push(&run.timeline[start..i]);
                }
                start = i;
            }
        }
        for seg in segs {
            let pts =
                |g: &dyn Fn(&crate::pinger::Sample) -> f64, yf: &dyn Fn(f64) -> f64| -> String {
                    seg.iter()
                        .map(|p| format!("{:.1},{:.1}", x(p.t), yf(g(p))))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
            if k == 0 {
                let _ = writeln!(
                    s,
                    r##"<polyline fill="none" stroke="#888" stroke-width="1.5" opacity="0.8" points="{}"/>"##,
                    pts(&|p| p.live as f64, &yn)
                );
            }
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{c}" stroke-width="1.2" stroke-dasharray="6,4" opacity="0.7" points="{}"/>"#,
                pts(&|p| p.expected as f64, &y)
            );
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
                pts(&|p| p.reachable as f64, &y)
            );
        }
    }
    // Legend, below the axis.
    let mut lx = ml;
    let ly = mt + ph + 62.0;
    let mut item = |s: &mut String, stroke: &str, dash: &str, label: String| {
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{stroke}" stroke-width="2" {dash}/>"#,
            lx + 24.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 30.0,
            ly + 4.0,
            esc(&label)
        );
        lx += 40.0 + 7.0 * label.len() as f64;
    };
    for (k, run) in r.runs.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        item(&mut s, c, "", format!("{}: reachable pairs", run.engine));
        item(
            &mut s,
            c,
            r#"stroke-dasharray="6,4""#,
            format!("{}: pairs among live nodes", run.engine),
        );
    }
    item(&mut s, "#888", "", "live nodes (right scale)".into());
    let _ = writeln!(
        s,
        r##"<text x="{ml}" y="{:.1}" font-size="10" fill="#555">A pair counts as reachable while its last echo reply is at most the reach window old (see report.json: pinger.reach_window_secs).</text>"##,
        ly + 26.0
    );
    s.push_str("</svg>\n");
    s
}

pub fn write(r: &Report, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(out.join("summary.txt"), summary(r))?;
    std::fs::write(out.join("reachability.svg"), svg(r))?;
    Ok(())
}

/// One (engine, N) point of `plot-idle`.
#[derive(Debug, Clone)]
pub struct IdlePoint {
    pub engine: String,
    pub nodes: u64,
    pub topology: String,
    pub secs: f64,
    pub mean: f64,
    pub p50: f64,
    pub max: f64,
    pub gossip: Option<f64>,
    pub cpu: Option<f64>,
    pub rss: Option<f64>,
    pub source: String,
}

/// The idle points of one report.json: each engine's last `measure_steady`
/// and the floor's idle window.
pub fn idle_points(v: &Value, source: &str) -> Vec<IdlePoint> {
    let topo = v["topology"]["kind"].as_str().unwrap_or("?").to_string();
    let point = |engine: &str, st: &Value| -> Option<IdlePoint> {
        let u = &st["underlay_bytes_per_sec_per_node"];
        Some(IdlePoint {
            engine: engine.to_string(),
            nodes: st["nodes"].as_u64()?,
            topology: topo.clone(),
            secs: st["secs"].as_f64().unwrap_or(0.0),
            mean: u["mean"].as_f64()?,
            p50: u["p50"].as_f64()?,
            max: u["max"].as_f64()?,
            gossip: st["gossip_bytes_per_sec_per_node"]["mean"].as_f64(),
            cpu: st["cpu_percent_per_node"]["mean"].as_f64(),
            rss: st["rss_mib_per_node"]["mean"].as_f64(),
            source: source.to_string(),
        })
    };
    let mut out = vec![];
    if let Some(idle) = v["floor"].get("idle") {
        out.extend(point("floor (no engine)", idle));
    }
    for run in v["runs"].as_array().into_iter().flatten() {
        if let Some(st) = run.get("steady").filter(|s| !s.is_null()) {
            out.extend(point(run["engine"].as_str().unwrap_or("?"), st));
        }
    }
    out
}

/// The text table of `plot-idle`.
pub fn idle_table(points: &[IdlePoint]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "idle underlay traffic per node (eth0 bytes in+out per second, L2 frames; 1 KB = 1000 bytes; pinger paused)"
    );
    let _ = writeln!(
        s,
        "{:<18} {:>5} {:<9} {:>7} {:>11} {:>11} {:>11} {:>12} {:>7} {:>8}  report",
        "engine",
        "nodes",
        "topology",
        "secs",
        "mean",
        "median",
        "max",
        "gossip mean",
        "CPU %",
        "RSS MiB"
    );
    let o = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "n/a".into());
    for p in points {
        let _ = writeln!(
            s,
            "{:<18} {:>5} {:<9} {:>7.0} {:>11} {:>11} {:>11} {:>12} {:>7} {:>8}  {}",
            p.engine,
            p.nodes,
            p.topology,
            p.secs,
            crate::runner::fmt_bps(p.mean),
            crate::runner::fmt_bps(p.p50),
            crate::runner::fmt_bps(p.max),
            p.gossip
                .map(crate::runner::fmt_bps)
                .unwrap_or_else(|| "n/a".into()),
            o(p.cpu),
            o(p.rss),
            p.source
        );
    }
    s
}

/// Idle underlay bytes per node (y) against nodes (x), one line per engine
/// (the mean; a hollow mark at the busiest node), same style as the
/// reachability plot.
pub fn idle_svg(points: &[IdlePoint], scale: &str) -> String {
    let (w, h) = (860.0, 540.0);
    let (ml, mr, mt, mb) = (90.0, 30.0, 40.0, 110.0);
    let pw = w - ml - mr;
    let ph = h - mt - mb;
    let nmax_raw = points.iter().map(|p| p.nodes).max().unwrap_or(1).max(1) as f64;
    let nstep = nice_step(nmax_raw, 8.0);
    let nmax = (nmax_raw / nstep).ceil() * nstep;
    let ys: Vec<f64> = points.iter().flat_map(|p| [p.mean, p.max]).collect();
    let ymax_raw = ys.iter().cloned().fold(1.0_f64, f64::max);
    let pos_min = ys
        .iter()
        .cloned()
        .filter(|y| *y >= 1.0)
        .fold(f64::INFINITY, f64::min);
    let log = match scale {
        "log" => true,
        "linear" => false,
        _ => pos_min.is_finite() && ymax_raw / pos_min > 30.0,
    };
    // log: whole decades, values under 1 B/s drawn at 1 B/s
    let (lo, hi) = if log {
        (
            10f64.powf(pos_min.min(ymax_raw).max(1.0).log10().floor()),
            10f64.powf(ymax_raw.log10().ceil().max(1.0)),
        )
    } else {
        let st = nice_step(ymax_raw * 1.05, 6.0);
        (0.0, ((ymax_raw * 1.05) / st).ceil() * st)
    };
    let x = |n: f64| ml + n / nmax * pw;
    let y = |v: f64| {
        if log {
            let v = v.max(lo);
            mt + ph - (v.log10() - lo.log10()) / (hi.log10() - lo.log10()) * ph
        } else {
            mt + ph - v / hi * ph
        }
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">idle underlay traffic per node (eth0 in+out) against mesh size</text>"#,
        w / 2.0
    );
    // y grid
    let mut ticks = vec![];
    if log {
        let mut v = lo;
        while v <= hi * 1.0001 {
            ticks.push(v);
            v *= 10.0;
        }
    } else {
        let st = nice_step(hi, 6.0);
        let mut v = 0.0;
        while v <= hi + 1e-9 {
            ticks.push(v);
            v += st;
        }
    }
    for v in ticks {
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e6e6e6"/>"##,
            ml + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            ml - 6.0,
            yy + 4.0,
            esc(&tick_bps(v))
        );
    }
    let mut n = 0.0;
    while n <= nmax + 1e-9 {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x(n),
            mt + ph + 16.0,
            n
        );
        let _ = writeln!(
            s,
            r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"##,
            x(n),
            mt + ph,
            x(n),
            mt + ph + 4.0
        );
        n += nstep;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">nodes</text>"#,
        ml + pw / 2.0,
        mt + ph + 34.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">bytes/s per node{}</text>"#,
        mt + ph / 2.0,
        if log { " (log scale)" } else { "" }
    );
    let mut engines: Vec<String> = vec![];
    for p in points {
        if !engines.contains(&p.engine) {
            engines.push(p.engine.clone());
        }
    }
    // Engines in the colours of the reachability plot; the floor grey.
    let mut lx = ml;
    let ly = mt + ph + 62.0;
    let mut k = 0;
    for e in &engines {
        let c = if e.starts_with("floor") {
            "#888"
        } else {
            k += 1;
            COLORS[(k - 1) % COLORS.len()]
        };
        let mut pts: Vec<&IdlePoint> = points.iter().filter(|p| &p.engine == e).collect();
        pts.sort_by_key(|p| p.nodes);
        let line: Vec<String> = pts
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.nodes as f64), y(p.mean)))
            .collect();
        let dash = if e.starts_with("floor") {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2"{dash} points="{}"/>"#,
            line.join(" ")
        );
        for p in pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{c}"/>"#,
                x(p.nodes as f64),
                y(p.mean)
            );
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="none" stroke="{c}"/>"#,
                x(p.nodes as f64),
                y(p.max)
            );
        }
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="2"{dash}/>"#,
            lx + 24.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 30.0,
            ly + 4.0,
            esc(e)
        );
        lx += 50.0 + 7.0 * e.len() as f64;
    }
    let _ = writeln!(
        s,
        r##"<text x="{ml}" y="{:.1}" font-size="10" fill="#555">Dots: the mean over nodes; circles: the busiest node. Bytes counted by the kernel on each node's eth0 (L2 frames, in + out)</text>"##,
        h - 26.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{ml}" y="{:.1}" font-size="10" fill="#555">over the last measure_steady window of each run, the pinger paused; 1 KB = 1000 bytes.{}</text>"##,
        h - 12.0,
        if log {
            " Values below the lowest decade are drawn on it."
        } else {
            ""
        }
    );
    s.push_str("</svg>\n");
    s
}

/// An axis label: "500 B/s", "2 KB/s", "2.5 KB/s" (1 KB = 1000 B).
fn tick_bps(v: f64) -> String {
    let (x, unit) = if v >= 1000.0 {
        (v / 1000.0, "KB/s")
    } else {
        (v, "B/s")
    };
    let t = format!("{x:.1}");
    format!("{} {unit}", t.trim_end_matches(".0"))
}

/// `testnet plot-idle`: reads the reports, writes the SVG and the table.
pub fn cmd_plot_idle(
    reports: &[std::path::PathBuf],
    out: Option<std::path::PathBuf>,
    scale: &str,
) -> Result<i32> {
    let mut points = vec![];
    for p in reports {
        let file = if p.is_dir() {
            p.join("report.json")
        } else {
            p.clone()
        };
        let text = std::fs::read_to_string(&file)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("parsing {}: {e}", file.display()))?;
        let got = idle_points(&v, &file.display().to_string());
        if got.is_empty() {
            eprintln!(
                "plot-idle: {} has no measure_steady window with underlay figures; skipped",
                file.display()
            );
        }
        points.extend(got);
    }
    if points.is_empty() {
        anyhow::bail!("no idle figures in the given reports");
    }
    points.sort_by(|a, b| a.engine.cmp(&b.engine).then(a.nodes.cmp(&b.nodes)));
    let out = out.unwrap_or_else(|| std::path::PathBuf::from("target/testnet/idle-per-node.svg"));
    if let Some(d) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    let table = idle_table(&points);
    std::fs::write(&out, idle_svg(&points, scale))?;
    let txt = out.with_extension("txt");
    std::fs::write(&txt, &table)?;
    print!("{table}");
    println!("plot:  {}\ntable: {}", out.display(), txt.display());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn idle_points_plot_and_table() {
        let st = |mean: f64| {
            json!({"nodes": 10, "secs": 30.0,
                   "underlay_bytes_per_sec_per_node": {"mean": mean, "p50": mean, "max": mean * 1.2},
                   "gossip_bytes_per_sec_per_node": null, "cpu_percent_per_node": {"mean": 1.0},
                   "rss_mib_per_node": {"mean": 12.0}})
        };
        let report = json!({
            "topology": {"kind": "flat"},
            "floor": {"idle": st(50.0)},
            "runs": [{"engine": "meshpeer", "steady": st(60_000.0)},
                     {"engine": "nebula", "steady": st(600.0)},
                     {"engine": "x", "steady": null}],
        });
        let pts = idle_points(&report, "r.json");
        assert_eq!(pts.len(), 3);
        assert_eq!(pts[0].engine, "floor (no engine)");
        let table = idle_table(&pts);
        assert!(
            table.contains("60.0 KB/s") && table.contains("600 B/s"),
            "{table}"
        );
        let svg = idle_svg(&pts, "auto");
        assert!(svg.starts_with("<svg") && svg.contains("log scale"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(!idle_svg(&pts, "linear").contains("log scale"));
    }
}
