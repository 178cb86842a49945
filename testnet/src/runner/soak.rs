//! The churn soak (`action = "soak"`) and its end checks
//! (`action = "soak_check"`).
//!
//! The soak runs for `secs`; every `every_secs` it draws one fault with its
//! own seeded RNG (so the sequence of choices is the same for the same seed
//! and scenario): `kill -9` of a random live node, a graceful `meshpeer
//! leave` of one, a restart (`meshpeer up`, same state) of a killed or left
//! node, the join of a brand-new node, or a seed loss (node 0, which the
//! initial nodes joined through, is killed and restarted `seed_down_secs`
//! later). A fault that would take the live population below `min_live` (or
//! above `max_live`) is not drawn. At fixed times (`partitions`, fractions
//! of `secs`) the internet is cut in two for `partition_secs`, then healed;
//! faults go on meanwhile (no seed loss during a partition). Whatever is
//! pending at the end (a heal, the seed's restart) is done then, so the last
//! fault is the step's end.
//!
//! Joiners are pointed at a random live public member whose status answers,
//! on their side of a partition: what an operator does when the seed is
//! gone (any member can admit a joiner).
//!
//! Every action is logged with its time. Each tick samples every live
//! daemon's RSS (`VmRSS`) and open descriptors (`/proc/PID/fd`, sockets
//! apart); the first sample (the soak's start, right after the first
//! convergence) is the baseline the end checks compare with.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::Result;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::Ctx;
use crate::cleanup::stopping;
use crate::nodes::{control_status, uapi_peers, Life};
use crate::runner::stats;
use crate::scenario::{SoakCheckSpec, SoakSpec};
use crate::topology::Kind;

/// One daemon's memory and descriptors at one moment.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub pid: u32,
    pub rss_kib: u64,
    pub fds: usize,
    pub sockets: usize,
}

/// Reads /proc/PID/status (VmRSS) and /proc/PID/fd.
pub fn sample_proc(pid: u32) -> Option<ProcSample> {
    let rss_kib = crate::sys::proc_rss_kib(pid)?;
    let mut fds = 0;
    let mut sockets = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        fds += 1;
        if std::fs::read_link(e.path())
            .map(|l| l.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false)
        {
            sockets += 1;
        }
    }
    Some(ProcSample {
        pid,
        rss_kib,
        fds,
        sockets,
    })
}

/// What the soak leaves for its end checks.
#[derive(Default)]
pub struct SoakState {
    /// Per node live at the soak's start: its sample then.
    pub baseline: BTreeMap<usize, ProcSample>,
    /// Per node (all generations): the highest sampled RSS and descriptors.
    pub peak_rss_kib: BTreeMap<usize, u64>,
    pub peak_fds: BTreeMap<usize, usize>,
    /// Nodes stopped (and not running now): when, and how.
    pub stopped: BTreeMap<usize, (f64, &'static str)>,
    /// Daemons that exited on their own during the soak.
    pub crashes: usize,
    pub t_end: f64,
}

/// The fault kinds, in the order of `SoakWeights`.
const FAULTS: [&str; 5] = ["kill", "leave", "restart", "join", "seed_loss"];

impl Ctx<'_> {
    fn soak_sample(&mut self) -> Value {
        let live = self.nodes.live();
        let mut rss = vec![];
        let mut fds = vec![];
        let st = self.soak.get_or_insert_with(Default::default);
        for &i in &live {
            let Some(pid) = self.nodes.pid(i) else {
                continue;
            };
            let Some(s) = sample_proc(pid) else { continue };
            let p = st.peak_rss_kib.entry(i).or_default();
            *p = (*p).max(s.rss_kib);
            let f = st.peak_fds.entry(i).or_default();
            *f = (*f).max(s.fds);
            rss.push(s.rss_kib as f64 / 1024.0);
            fds.push(s.fds as f64);
        }
        let m = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let mx = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
        json!({"t": self.now(), "live": live.len(),
               "rss_mib_mean": m(&rss), "rss_mib_max": mx(&rss),
               "fds_mean": m(&fds), "fds_max": mx(&fds)})
    }

    /// A live public member to join through (its status answers), on the
    /// joiner's side of a partition; None: the default rule.
    fn join_target(
        &mut self,
        joiner: usize,
        partitioned: bool,
        rng: &mut impl Rng,
    ) -> Option<usize> {
        let half = self.plan.half_of(joiner);
        let mut c: Vec<usize> = self
            .nodes
            .live()
            .into_iter()
            .filter(|&j| self.plan.nodes[j].kind == Kind::Public)
            .filter(|&j| !partitioned || self.plan.half_of(j) == half)
            .collect();
        c.shuffle(rng);
        c.into_iter().find(|&j| {
            control_status(&self.nodes.state_dir(j))
                .and_then(|v| v.pointer("/self/overlay_ip").cloned())
                .is_some()
        })
    }

    fn soak_log(&mut self, log: &mut Vec<Value>, action: &str, node: Option<usize>, extra: Value) {
        let t = self.now();
        let live = self.nodes.live().len();
        let what = match node {
            Some(i) => format!("{action} n{i} ({})", self.plan.nodes[i].kind.as_str()),
            None => action.to_string(),
        };
        let via = extra
            .get("via")
            .and_then(Value::as_u64)
            .map(|v| format!(" via n{v}"))
            .unwrap_or_default();
        // Partitions and the seed go on the plot; the rest only on stdout
        // and in the report (a marker every few seconds would hide the plot).
        if node.is_none() || node == Some(0) {
            self.marker(format!("soak: {what}{via}, {live} live"));
        } else {
            println!("  [{t:7.2}s] soak: {what}{via}, {live} live");
        }
        let mut e = json!({"t": t, "action": action, "node": node, "live_after": live});
        if let (Value::Object(m), Value::Object(x)) = (&mut e, extra) {
            m.extend(x);
        }
        log.push(e);
    }

    pub(super) fn run_soak(&mut self, k: &SoakSpec) -> Result<(bool, Value)> {
        let t0 = self.now();
        let end = t0 + k.secs;
        let seed = k.seed.unwrap_or(self.sc.topology.seed);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let max_live = k.max_live.unwrap_or(self.sc.topology.nodes);
        let crashes0 = self.crashes.len();
        // Baseline: every live daemon now (right after the first convergence).
        let mut st = self.soak.take().unwrap_or_default();
        for i in self.nodes.live() {
            if let Some(s) = self.nodes.pid(i).and_then(sample_proc) {
                st.baseline.insert(i, s);
            }
        }
        for i in 0..self.nodes.len() {
            if self.nodes.started_once[i] && self.nodes.life[i] != Life::Running {
                st.stopped.entry(i).or_insert((t0, "before the soak"));
            }
        }
        self.soak = Some(st);
        let mut samples = vec![self.soak_sample()];
        let mut log: Vec<Value> = vec![];
        let mut counts: BTreeMap<&str, usize> = FAULTS.iter().map(|f| (*f, 0)).collect();
        counts.insert("partition", 0);
        counts.insert("seed_restart", 0);
        counts.insert("none", 0);
        let mut parts: Vec<f64> = k.partitions.iter().map(|f| t0 + f * k.secs).collect();
        parts.sort_by(f64::total_cmp);
        parts.reverse(); // pop from the end
        let mut heal_at: Option<f64> = None;
        let mut seed_back_at: Option<f64> = None;
        let mut last_seed_restart = f64::NEG_INFINITY;
        let mut joins = 0usize;
        let mut next_tick = t0 + k.every_secs;
        let mut last_fault = t0;
        while !stopping() {
            let now = self.now();
            if now >= end {
                break;
            }
            if heal_at.is_some_and(|h| now >= h) {
                self.plan.heal()?;
                heal_at = None;
                self.soak_log(&mut log, "heal", None, json!({}));
                last_fault = self.now();
            }
            if heal_at.is_none() && parts.last().is_some_and(|p| now >= *p) {
                parts.pop();
                self.plan.partition()?;
                heal_at = Some(self.now() + k.partition_secs);
                *counts.get_mut("partition").unwrap() += 1;
                self.soak_log(
                    &mut log,
                    "partition",
                    None,
                    json!({"secs": k.partition_secs}),
                );
                last_fault = self.now();
            }
            if seed_back_at.is_some_and(|s| now >= s) {
                seed_back_at = None;
                self.start_node(0)?;
                self.soak.as_mut().unwrap().stopped.remove(&0);
                last_seed_restart = self.now();
                *counts.get_mut("seed_restart").unwrap() += 1;
                self.soak_log(&mut log, "seed_restart", Some(0), json!({}));
                last_fault = self.now();
            }
            if now >= next_tick {
                next_tick += k.every_secs;
                let live = self.nodes.live();
                let nonseed: Vec<usize> = live.iter().copied().filter(|i| *i != 0).collect();
                let dead: Vec<usize> = (1..self.nodes.len())
                    .filter(|i| matches!(self.nodes.life[*i], Life::Killed | Life::Left))
                    .collect();
                let can_shrink = live.len() > k.min_live && !nonseed.is_empty();
                let can_grow = live.len() < max_live;
                let partitioned = heal_at.is_some();
                let w = &k.weights;
                let seed_ok = can_shrink
                    && self.nodes.life[0] == Life::Running
                    && seed_back_at.is_none()
                    && !partitioned
                    && now - last_seed_restart >= k.seed_loss_gap_secs;
                let allowed = [
                    (can_shrink, w.kill),
                    (can_shrink, w.leave),
                    (can_grow && !dead.is_empty(), w.restart),
                    (
                        can_grow && joins < k.max_joins && self.next_slot < self.nodes.len(),
                        w.join,
                    ),
                    (seed_ok, w.seed_loss),
                ];
                let forced_seed =
                    seed_ok && counts["seed_loss"] == 0 && now >= t0 + k.seed_loss_by * k.secs;
                let total: f64 = allowed.iter().filter(|a| a.0).map(|a| a.1).sum();
                let pick = if forced_seed {
                    Some(4)
                } else if total > 0.0 {
                    let mut x = rng.gen::<f64>() * total;
                    let mut chosen = None;
                    for (n, (ok, wt)) in allowed.iter().enumerate() {
                        if !*ok || *wt <= 0.0 {
                            continue;
                        }
                        chosen = Some(n);
                        if x < *wt {
                            break;
                        }
                        x -= wt;
                    }
                    chosen
                } else {
                    None
                };
                match pick {
                    Some(n @ (0 | 1)) => {
                        let i = *nonseed.choose(&mut rng).unwrap();
                        let how = FAULTS[n];
                        self.stop_node(i, how)?;
                        let t = self.now();
                        self.soak.as_mut().unwrap().stopped.insert(i, (t, how));
                        self.soak_log(&mut log, how, Some(i), json!({}));
                    }
                    Some(2) => {
                        let i = *dead.choose(&mut rng).unwrap();
                        let was = self.soak.as_mut().unwrap().stopped.remove(&i);
                        self.start_node(i)?;
                        let t = self.now();
                        let extra =
                            json!({"was": was.map(|w| w.1), "down_secs": was.map(|w| t - w.0)});
                        self.soak_log(&mut log, "restart", Some(i), extra);
                    }
                    Some(3) => {
                        let i = self.next_slot;
                        self.next_slot += 1;
                        joins += 1;
                        let via = self.join_target(i, partitioned, &mut rng);
                        self.start_node_via(i, via)?;
                        self.soak_log(&mut log, "join", Some(i), json!({"via": via}));
                    }
                    Some(4) => {
                        self.stop_node(0, "kill")?;
                        let t = self.now();
                        self.soak.as_mut().unwrap().stopped.insert(0, (t, "kill"));
                        seed_back_at = Some(t + k.seed_down_secs);
                        self.soak_log(
                            &mut log,
                            "seed_loss",
                            Some(0),
                            json!({"back_in_secs": k.seed_down_secs}),
                        );
                    }
                    _ => {}
                }
                let name = pick.map(|n| FAULTS[n]).unwrap_or("none");
                *counts.get_mut(name).unwrap() += 1;
                if pick.is_some() {
                    last_fault = self.now();
                }
                samples.push(self.soak_sample());
            }
            let mut next = next_tick.min(end);
            for t in [heal_at, seed_back_at, parts.last().copied()]
                .into_iter()
                .flatten()
            {
                next = next.min(t);
            }
            let d = next - self.now();
            if d > 0.0 {
                self.wait(d, |_| false);
            }
        }
        // The end: heal and bring the seed back, so the mesh can be whole.
        if heal_at.is_some() {
            self.plan.heal()?;
            self.soak_log(&mut log, "heal", None, json!({"at_end": true}));
            last_fault = self.now();
        }
        if seed_back_at.is_some() {
            self.start_node(0)?;
            self.soak.as_mut().unwrap().stopped.remove(&0);
            *counts.get_mut("seed_restart").unwrap() += 1;
            self.soak_log(&mut log, "seed_restart", Some(0), json!({"at_end": true}));
            last_fault = self.now();
        }
        samples.push(self.soak_sample());
        let crashes: Vec<Value> = self.crashes[crashes0..].to_vec();
        let t_end = self.now();
        let st = self.soak.as_mut().unwrap();
        st.crashes = crashes.len();
        st.t_end = t_end;
        let live = self.nodes.live();
        let ok = crashes.is_empty();
        if !ok {
            self.errors.push(format!(
                "soak: {} daemons exited on their own: {}",
                crashes.len(),
                crashes
                    .iter()
                    .map(|c| format!("n{} at {:.1}s", c["node"], c["t"].as_f64().unwrap_or(0.0)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let lives: Vec<f64> = samples.iter().filter_map(|s| s["live"].as_f64()).collect();
        Ok((
            ok,
            json!({
                "secs": k.secs, "every_secs": k.every_secs, "seed": seed,
                "min_live": k.min_live, "max_live": max_live,
                "t_start": t0, "t_end": self.now(), "last_fault_t": last_fault,
                "counts": counts,
                "joins": joins,
                "live_at_end": live.len(),
                "live_nodes": stats(&lives),
                "crashes": crashes,
                "actions": log,
                "samples": samples,
                "note": "actions: every fault with its time (seconds from the scenario start) and the live nodes after it; samples: every tick, the live daemons' RSS (VmRSS) and open descriptors (/proc/PID/fd)",
            }),
        ))
    }

    /// The checks, over the current status of every live node: problems by
    /// category (empty: all hold).
    fn soak_views(&self, spec: &SoakCheckSpec) -> (BTreeMap<&'static str, Vec<String>>, Value) {
        let mut bad: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        for c in [
            "lost",
            "lingering",
            "not_forgotten",
            "duplicate",
            "mismatch",
            "unknown",
            "conflict",
            "stale_peer",
            "no_status",
        ] {
            bad.insert(c, vec![]);
        }
        let live = self.nodes.live();
        let now = self.now();
        let st = self.soak.as_ref();
        let stopped_at = |i: usize| st.and_then(|s| s.stopped.get(&i).copied());
        let down_grace = self.sc.nodes.down_grace_secs.unwrap_or(60) as f64;
        let mut views: HashMap<usize, Value> = HashMap::new();
        for &i in &live {
            match control_status(&self.nodes.state_dir(i)) {
                Some(v) => {
                    views.insert(i, v);
                }
                None => bad.get_mut("no_status").unwrap().push(format!("n{i}")),
            }
        }
        // Each live node's own record: unique names, addresses, keys.
        let own = |i: usize, k: &str| -> String {
            views
                .get(&i)
                .and_then(|v| v["self"][k].as_str())
                .unwrap_or("")
                .to_string()
        };
        for k in ["name", "overlay_ip", "public_key", "node_id"] {
            let mut seen: HashMap<String, usize> = HashMap::new();
            for &i in &live {
                let x = own(i, k);
                if x.is_empty() {
                    continue;
                }
                if let Some(j) = seen.insert(x.clone(), i) {
                    bad.get_mut("duplicate")
                        .unwrap()
                        .push(format!("n{j} and n{i} both have {k} {x}"));
                }
            }
        }
        for &i in &live {
            if own(i, "name") != format!("n{i}") {
                bad.get_mut("mismatch")
                    .unwrap()
                    .push(format!("n{i} calls itself {:?}", own(i, "name")));
            }
        }
        let by_name: HashMap<String, usize> = (0..self.nodes.len())
            .map(|i| (format!("n{i}"), i))
            .collect();
        let mut listed_total = 0usize;
        let mut peers_total = 0usize;
        for &o in &live {
            let Some(v) = views.get(&o) else { continue };
            let members = v["members"].as_array().cloned().unwrap_or_default();
            listed_total += members.len();
            // Within one view: no name, address, key or id twice.
            for k in ["name", "overlay_ip", "public_key", "node_id"] {
                let mut seen = BTreeSet::new();
                for m in &members {
                    let x = m[k].as_str().unwrap_or("").to_string();
                    if !seen.insert(x.clone()) {
                        bad.get_mut("duplicate")
                            .unwrap()
                            .push(format!("n{o} lists {k} {x} twice"));
                    }
                }
            }
            let mut listed: HashMap<String, &Value> = HashMap::new();
            for m in &members {
                let name = m["name"].as_str().unwrap_or("").to_string();
                if let Some(c) = m["conflict"].as_str() {
                    bad.get_mut("conflict")
                        .unwrap()
                        .push(format!("n{o} shows {name} in conflict: {c}"));
                }
                listed.insert(name, m);
            }
            for &x in &live {
                if x == o {
                    continue;
                }
                let name = format!("n{x}");
                match listed.get(&name) {
                    None => bad
                        .get_mut("lost")
                        .unwrap()
                        .push(format!("n{o} does not list {name}")),
                    Some(m) => {
                        let s = m["state"].as_str().unwrap_or("");
                        if s != "connected" && s != "idle" {
                            bad.get_mut("lost")
                                .unwrap()
                                .push(format!("n{o} shows {name} {s}"));
                        }
                        for k in ["overlay_ip", "public_key", "node_id"] {
                            let want = own(x, k);
                            let got = m[k].as_str().unwrap_or("");
                            if !want.is_empty() && got != want {
                                bad.get_mut("mismatch").unwrap().push(format!(
                                    "n{o} has {name}'s {k} as {got}, {name} has {want}"
                                ));
                            }
                        }
                    }
                }
            }
            let mut wanted_keys: BTreeSet<String> = BTreeSet::new();
            for (name, m) in &listed {
                if *name == format!("n{o}") {
                    continue;
                }
                let Some(&d) = by_name.get(name) else {
                    bad.get_mut("unknown")
                        .unwrap()
                        .push(format!("n{o} lists an unknown member {name:?}"));
                    continue;
                };
                if live.contains(&d) {
                    continue;
                }
                let s = m["state"].as_str().unwrap_or("");
                let (t, how) = stopped_at(d).unwrap_or((0.0, "never started"));
                let forget = if how == "leave" {
                    spec.forget_left_secs
                } else {
                    spec.forget_down_secs
                };
                if now - t > forget + spec.forget_slack_secs {
                    bad.get_mut("not_forgotten").unwrap().push(format!(
                        "n{o} still lists {name} ({how} {:.0}s ago) as {s}",
                        now - t
                    ));
                } else if s != "down" || how == "leave" {
                    bad.get_mut("lingering").unwrap().push(format!(
                        "n{o} shows {name} ({how} {:.0}s ago) as {s}",
                        now - t
                    ));
                }
                if now - t <= down_grace + spec.forget_slack_secs {
                    if let Some(k) = m["public_key"].as_str() {
                        wanted_keys.insert(k.to_string());
                    }
                }
            }
            // WireGuard peers: only members this node lists, and no peer
            // for a node stopped longer ago than the down grace (+ slack).
            for x in &live {
                if let Some(m) = listed.get(&format!("n{x}")) {
                    if let Some(k) = m["public_key"].as_str() {
                        wanted_keys.insert(k.to_string());
                    }
                }
            }
            if let Some(peers) = uapi_peers(&self.nodes.ifname(o)) {
                peers_total += peers.len();
                for p in peers {
                    if !wanted_keys.contains(&p) {
                        let who = members
                            .iter()
                            .find(|m| m["public_key"].as_str() == Some(p.as_str()))
                            .and_then(|m| m["name"].as_str())
                            .unwrap_or("an unlisted key");
                        bad.get_mut("stale_peer").unwrap().push(format!(
                            "n{o} has a WireGuard peer for {who} ({}…)",
                            &p[..8.min(p.len())]
                        ));
                    }
                }
            }
        }
        let figures = json!({"live": live.len(), "views": views.len(), "members_listed": listed_total, "wireguard_peers": peers_total});
        (bad, figures)
    }

    pub(super) fn run_soak_check(
        &mut self,
        idx: usize,
        spec: &SoakCheckSpec,
    ) -> Result<(bool, Value)> {
        let t0 = self.now();
        let mut held_at: Option<f64> = None;
        let mut tries = 0usize;
        let (bad, figures) = loop {
            tries += 1;
            let v = self.soak_views(spec);
            if v.0.values().all(Vec::is_empty) {
                held_at = Some(self.now());
                break v;
            }
            if self.now() - t0 >= spec.deadline_secs || stopping() {
                break v;
            }
            self.wait(2.0, |_| false);
        };
        // Memory and descriptors, once.
        let live = self.nodes.live();
        let st = self.soak.take().unwrap_or_default();
        let mut rows = vec![];
        let mut mem_bad = vec![];
        let mut fd_bad = vec![];
        let (mut rss0, mut rss1, mut peak, mut hwm, mut fd0, mut fd1, mut sk0, mut sk1, mut fdmax) = (
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
        );
        for &i in &live {
            let Some(now) = self.nodes.pid(i).and_then(sample_proc) else {
                mem_bad.push(format!("n{i}: cannot read /proc"));
                continue;
            };
            let base = st.baseline.get(&i).filter(|b| b.pid == now.pid).copied();
            let hwm_mib = self.nodes.peak_rss_kib(i) as f64 / 1024.0;
            let rss_mib = now.rss_kib as f64 / 1024.0;
            let sampled_peak = st
                .peak_rss_kib
                .get(&i)
                .copied()
                .unwrap_or(0)
                .max(now.rss_kib) as f64
                / 1024.0;
            rss1.push(rss_mib);
            hwm.push(hwm_mib);
            peak.push(sampled_peak);
            fd1.push(now.fds as f64);
            sk1.push(now.sockets as f64);
            fdmax.push(st.peak_fds.get(&i).copied().unwrap_or(0).max(now.fds) as f64);
            if rss_mib > spec.rss_max_mib || hwm_mib > spec.rss_max_mib {
                mem_bad.push(format!(
                    "n{i}: RSS {rss_mib:.1} MiB, peak {hwm_mib:.1} MiB (bound {} MiB)",
                    spec.rss_max_mib
                ));
            }
            if let Some(b) = base {
                let b_mib = b.rss_kib as f64 / 1024.0;
                rss0.push(b_mib);
                fd0.push(b.fds as f64);
                sk0.push(b.sockets as f64);
                if rss_mib > spec.rss_factor * b_mib {
                    mem_bad.push(format!(
                        "n{i}: RSS {b_mib:.1} -> {rss_mib:.1} MiB (more than {}x)",
                        spec.rss_factor
                    ));
                }
                // A relay holds two UDP sockets per allocation it serves
                // (proto/PROTOCOL.md §7): those are its work, not a leak.
                let allocations = control_status(&self.nodes.state_dir(i))
                    .and_then(|v| v["relay_allocations"].as_u64())
                    .unwrap_or(0) as usize;
                if now.fds > b.fds + spec.fd_growth + 2 * allocations {
                    fd_bad.push(format!(
                        "n{i}: {} -> {} open descriptors (sockets {} -> {}; {allocations} relay allocations)",
                        b.fds, now.fds, b.sockets, now.sockets
                    ));
                }
            }
            rows.push(json!({
                "node": i, "kind": self.plan.nodes[i].kind, "pid": now.pid, "long_lived": base.is_some(),
                "rss_mib_start": base.map(|b| b.rss_kib as f64 / 1024.0), "rss_mib_peak_sampled": sampled_peak,
                "rss_mib_peak_hwm": hwm_mib, "rss_mib_end": rss_mib,
                "fds_start": base.map(|b| b.fds), "fds_end": now.fds, "fds_peak_sampled": st.peak_fds.get(&i),
                "sockets_start": base.map(|b| b.sockets), "sockets_end": now.sockets,
            }));
        }
        let long_lived = rss0.len();
        let growth: Vec<f64> = rows
            .iter()
            .filter_map(|r| Some(r["fds_end"].as_f64()? - r["fds_start"].as_f64()?))
            .collect();
        let mut problems: Vec<String> = vec![];
        for (k, v) in &bad {
            if !v.is_empty() {
                problems.push(format!(
                    "{k}: {} (e.g. {})",
                    v.len(),
                    v.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
                ));
            }
        }
        if !mem_bad.is_empty() {
            problems.push(format!("memory: {}", mem_bad.join("; ")));
        }
        if !fd_bad.is_empty() {
            problems.push(format!("descriptors: {}", fd_bad.join("; ")));
        }
        if st.crashes > 0 {
            problems.push(format!(
                "{} daemons exited on their own during the soak",
                st.crashes
            ));
        }
        let ok = problems.is_empty();
        let dup = bad["duplicate"].len();
        self.marker(format!(
            "soak_check: {} live; lost {}, lingering {}, not forgotten {}, duplicates {dup}, mismatches {}, stale peers {}; RSS MiB start/end mean {:.1}/{:.1} max {:.1}/{:.1} (peak {:.1}); fds start/end mean {:.1}/{:.1}, growth max {:.0}: {}",
            live.len(),
            bad["lost"].len(),
            bad["lingering"].len(),
            bad["not_forgotten"].len(),
            bad["mismatch"].len(),
            bad["stale_peer"].len(),
            mean(&rss0), mean(&rss1), max(&rss0), max(&rss1), max(&hwm),
            mean(&fd0), mean(&fd1), max(&growth),
            if ok { "OK" } else { "FAILED" }
        ));
        if !ok {
            let m = format!("step {idx} soak_check: {}", problems.join(" | "));
            println!("  {m}");
            if spec.required {
                self.errors.push(m);
            }
        }
        let bounds = json!({
            "rss_factor": spec.rss_factor, "rss_max_mib": spec.rss_max_mib, "fd_growth": spec.fd_growth,
            "forget_down_secs": spec.forget_down_secs, "forget_left_secs": spec.forget_left_secs, "forget_slack_secs": spec.forget_slack_secs,
        });
        let counts: BTreeMap<&str, usize> = bad.iter().map(|(k, v)| (*k, v.len())).collect();
        let examples: BTreeMap<&str, Vec<String>> = bad
            .iter()
            .map(|(k, v)| (*k, v.iter().take(20).cloned().collect()))
            .collect();
        Ok((
            ok || !spec.required,
            json!({
                "ok": ok,
                "membership_held_after_secs": held_at.map(|t| t - t0),
                "tries": tries,
                "figures": figures,
                "problems": counts,
                "examples": examples,
                "duplicates": dup,
                "memory": {
                    "long_lived_nodes": long_lived,
                    "rss_mib_start": stats(&rss0), "rss_mib_end": stats(&rss1),
                    "rss_mib_peak_sampled": stats(&peak), "rss_mib_peak_hwm": stats(&hwm),
                    "violations": mem_bad,
                },
                "descriptors": {
                    "fds_start": stats(&fd0), "fds_end": stats(&fd1), "fds_peak_sampled": stats(&fdmax),
                    "fd_growth_long_lived": stats(&growth),
                    "sockets_start": stats(&sk0), "sockets_end": stats(&sk1),
                    "violations": fd_bad,
                },
                "crashes_during_soak": st.crashes,
                "bounds": bounds,
                "per_node": rows,
                "note": "lost: a live node not listed (or not connected/idle) by another live node; lingering: a stopped node listed as anything but down (a node that left must not be listed); not_forgotten: a stopped node still listed longer than meshpeer's forget time + slack after it stopped; duplicate: two live nodes with one name, overlay address, WireGuard key or node id, or one view listing one twice; mismatch: a view disagreeing with the member's own record; stale_peer: a WireGuard peer for a node that is not listed, or stopped longer ago than the down grace + slack; long-lived nodes: the same process at the soak's start and now (their RSS and descriptors are compared with the start)",
            }),
        ))
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn max(v: &[f64]) -> f64 {
    v.iter().cloned().fold(0.0, f64::max)
}
