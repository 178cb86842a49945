//! The scenario engine: runs a scenario's steps against one overlay
//! implementation (meshpeer or nebula) on a built topology, with the pinger
//! and (for meshpeer) the status poller watching, and gathers the results.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use serde_json::{json, Value};

use crate::cleanup::stopping;
use crate::nodes::{control_status, DaemonOpts, EngineKind, Life, Nodes};
use crate::pinger::{Pinger, Sample};
use crate::poller::{Poller, Target};
use crate::scenario::{Scenario, Select, Step};
use crate::sys;
use crate::topology::{Kind, Plan};

mod soak;

#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub index: usize,
    pub action: String,
    pub t_start: f64,
    pub t_end: f64,
    pub ok: bool,
    pub result: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct Marker {
    pub t: f64,
    pub label: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineResult {
    pub engine: String,
    pub ok: bool,
    pub errors: Vec<String>,
    pub backend: Option<String>,
    pub steps: Vec<StepLog>,
    /// The first wait_converged: per-pair time to first reply from scenario start.
    pub convergence: Option<Value>,
    pub pair_classes: Vec<Value>,
    /// Per pair type: reachable, direct, relayed, expected path, time to
    /// first reply; pairs whose path differs from the expected one. From the
    /// last `expect_paths` step, else from the end of the run.
    pub pair_matrix: Option<Value>,
    /// After `change_public_address` / `flush_nat`: how long the affected
    /// pairs took to reply again (measured by the next `wait_converged`).
    pub recoveries: Vec<Value>,
    pub failure_detection: Vec<Value>,
    /// Every wait_converged: time to 50/99/100 % of ordered pairs and the
    /// pinger's measured resolution.
    pub convergences: Vec<Value>,
    /// False "down" verdicts during quiet periods (meshpeer).
    pub false_down: Value,
    pub steady: Option<Value>,
    pub overhead: Value,
    pub paths: Value,
    pub pinger: Value,
    pub crashes: Vec<Value>,
    pub markers: Vec<Marker>,
    pub timeline: Vec<Sample>,
    pub status_table: Option<String>,
    pub duration_secs: f64,
}

pub struct Ctx<'a> {
    pub sc: &'a Scenario,
    pub plan: &'a Plan,
    pub pinger: &'a Pinger,
    pub nodes: Nodes,
    pub poller: Option<Poller>,
    rng: rand::rngs::StdRng,
    /// Next never-started slot for joiners.
    next_slot: usize,
    mark: f64,
    markers: Vec<Marker>,
    errors: Vec<String>,
    events_checked: usize,
    first_convergence: Option<Value>,
    pair_classes: Vec<Value>,
    failures: Vec<Value>,
    steady: Option<Value>,
    crashes: Vec<Value>,
    pair_matrix: Option<Value>,
    recoveries: Vec<Value>,
    /// Set by a step that took the "since" mark itself (just before its
    /// change), so the runner does not take it again after the step.
    self_marked: bool,
    /// A change whose affected pairs the next `wait_converged` times.
    pending_recovery: Option<PendingRecovery>,
    /// Renumberings so far per ISP (fresh address slots).
    renumbered: BTreeMap<usize, usize>,
    /// Current public address of routers that were renumbered.
    public_now: BTreeMap<String, std::net::Ipv4Addr>,
    /// Every wait_converged: timing (50/99/100 %) and measured resolution.
    convergences: Vec<Value>,
    /// When the last initial node was started.
    all_started: Option<f64>,
    /// False "down" verdicts printed so far.
    false_printed: usize,
    /// What a `soak` step leaves for its `soak_check`.
    soak: Option<soak::SoakState>,
}

struct PendingRecovery {
    event: String,
    t: f64,
    pairs: Vec<(usize, usize)>,
    /// For a join: the new nodes (the figure is split by direction).
    new_nodes: Vec<usize>,
}

impl<'a> Ctx<'a> {
    fn now(&self) -> f64 {
        self.pinger.now()
    }

    fn marker(&mut self, label: String) {
        let t = self.now();
        println!("  [{t:7.2}s] {label}");
        self.markers.push(Marker { t, label });
    }

    /// Housekeeping every 100 ms: reap crashed daemons, learn overlay addresses.
    fn sync(&mut self) {
        if let Some(p) = &self.poller {
            let shown = self.false_printed;
            let new: Vec<crate::poller::FalseDown> = p.with(|s| {
                s.false_downs
                    .iter()
                    .skip(shown)
                    .take(10usize.saturating_sub(shown))
                    .cloned()
                    .collect()
            });
            let total = p.with(|s| s.false_downs.len());
            for f in &new {
                println!(
                    "  [{:7.2}s] FALSE {}: n{} shows n{} {} (no kill/leave since the last convergence)",
                    f.t, f.verdict.to_uppercase(), f.observer, f.subject, f.verdict
                );
            }
            self.false_printed = total.max(shown);
        }
        for (i, msg) in self.nodes.reap() {
            let t = self.now();
            self.pinger.node_stopped(i);
            if let Some(p) = &self.poller {
                p.set_target(i, None);
            }
            println!("  [{t:7.2}s] n{i} EXITED on its own: {msg}");
            self.crashes.push(json!({"node": i, "t": t, "exit": msg}));
        }
        if let Some(p) = &self.poller {
            let addrs: Vec<(usize, std::net::Ipv4Addr)> = p.with(|s| {
                s.obs
                    .iter()
                    .enumerate()
                    .filter_map(|(i, o)| o.as_ref().and_then(|o| o.overlay_ip).map(|a| (i, a)))
                    .collect()
            });
            let missing: Vec<usize> = self.pinger.with(|s| {
                (0..s.nodes.len())
                    .filter(|i| s.nodes[*i].active && s.nodes[*i].addr.is_none())
                    .collect()
            });
            for (i, a) in addrs {
                if missing.contains(&i) {
                    self.pinger.set_addr(i, a);
                }
            }
        }
    }

    /// Polls `cond` until it holds or `secs` pass; returns whether it held.
    fn wait(&mut self, secs: f64, mut cond: impl FnMut(&mut Ctx) -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs_f64(secs.max(0.0));
        loop {
            self.sync();
            if cond(self) {
                return true;
            }
            if Instant::now() >= end || stopping() {
                return false;
            }
            sys::sleep_ms(100);
        }
    }

    fn start_node(&mut self, i: usize) -> Result<()> {
        self.start_node_via(i, None)
    }

    /// Starts node i; a joiner joins through `via`, or by default through
    /// node 0, or (once it is gone) the first live public node.
    fn start_node_via(&mut self, i: usize, via: Option<usize>) -> Result<()> {
        let network = self.sc.nodes.network.clone();
        let seed = via.unwrap_or_else(|| {
            std::iter::once(0)
                .chain(0..self.nodes.len())
                .find(|j| {
                    self.nodes.life[*j] == Life::Running && self.plan.nodes[*j].kind == Kind::Public
                })
                .unwrap_or(0)
        });
        self.nodes.start(i, &network, seed)?;
        let fixed = self.nodes.fixed_overlay(i);
        self.pinger.node_started(i, fixed);
        if let Some(p) = &self.poller {
            p.set_target(
                i,
                Some(Target {
                    state_dir: self.nodes.state_dir(i),
                    ifname: self.nodes.ifname(i),
                }),
            );
        }
        Ok(())
    }

    fn stop_node(&mut self, i: usize, how: &str) -> Result<()> {
        let t = self.now();
        if let Some(p) = &self.poller {
            p.add_event(how, i, t);
        }
        match how {
            "kill" => self.nodes.kill(i),
            _ => self.nodes.leave(i)?,
        }
        self.pinger.node_stopped(i);
        if let Some(p) = &self.poller {
            p.set_target(i, None);
        }
        Ok(())
    }

    /// Sites: a token allowing its LAN and `--advertise-route LAN` for each
    /// gateway, `--advertise-route LAN` (with the plain token) for each
    /// intruder. Before the other nodes start.
    fn prepare_sites(&mut self) -> Result<()> {
        if self.nodes.engine != EngineKind::Meshpeer {
            return Ok(());
        }
        for (si, (site, spec)) in self.plan.sites.iter().zip(&self.sc.sites).enumerate() {
            let token = self.nodes.work.join(format!("token-site{si}"));
            self.nodes.invite(&site.lan, &token)?;
            self.nodes.node_token[site.gateway] = Some(token);
            self.nodes.node_args[site.gateway]
                .extend(["--advertise-route".to_string(), site.lan.clone()]);
            for &x in &spec.intruders {
                self.nodes.node_args[x].extend(["--advertise-route".to_string(), site.lan.clone()]);
            }
            self.marker(format!(
                "site {si}: n{} is the gateway of {} ({} LAN host{}), intruders {:?}",
                site.gateway,
                site.lan,
                site.hosts.len(),
                if site.hosts.len() == 1 { "" } else { "s" },
                spec.intruders
            ));
        }
        Ok(())
    }

    /// One round of site checks: the problems found (empty: all as
    /// expected) and what was checked.
    fn site_problems(&self) -> (Vec<String>, usize, usize) {
        let mut bad = vec![];
        let live = self.nodes.live();
        let mut routes_checked = 0;
        let mut pings = 0;
        for &i in &live {
            let Some(st) = crate::nodes::control_status(&self.nodes.state_dir(i)) else {
                bad.push(format!("n{i}: no status"));
                continue;
            };
            let members = st["members"].as_array().cloned().unwrap_or_default();
            let route = |owner: usize, lan: &str| -> Option<(String, String)> {
                let m = members.iter().find(|m| m["name"] == format!("n{owner}"))?;
                let r = m["routes"].as_array()?.iter().find(|r| r["route"] == lan)?;
                Some((
                    r["state"].as_str().unwrap_or("").to_string(),
                    r["reason"].as_str().unwrap_or("").to_string(),
                ))
            };
            for (site, spec) in self.plan.sites.iter().zip(&self.sc.sites) {
                let g = site.gateway;
                if !live.contains(&g) {
                    continue;
                }
                let same_lan = self.plan.nodes[i].home() == Some(site.router.as_str());
                let want = if i == g {
                    "advertised"
                } else if same_lan {
                    "refused"
                } else {
                    "installed"
                };
                routes_checked += 1;
                match route(g, &site.lan) {
                    Some((st, _)) if st == want => {}
                    other => bad.push(format!(
                        "n{i} shows n{g}'s {} as {other:?}, want {want}",
                        site.lan
                    )),
                }
                for &x in spec.intruders.iter().filter(|x| live.contains(x)) {
                    routes_checked += 1;
                    match route(x, &site.lan) {
                        Some((st, why)) if st == "refused" && why.contains("not allowed") => {}
                        other => bad.push(format!(
                            "n{i} shows intruder n{x}'s {} as {other:?}, want refused",
                            site.lan
                        )),
                    }
                }
            }
        }
        let ping = |ns: &str, addr: &std::net::Ipv4Addr| -> bool {
            sys::output_in(
                ns,
                "ping",
                &[
                    "-c1".into(),
                    "-W1".into(),
                    "-n".into(),
                    "-q".into(),
                    addr.to_string(),
                ],
                Duration::from_secs(5),
            )
            .map(|(code, _)| code == Some(0))
            .unwrap_or(false)
        };
        // LAN host to LAN host, every ordered pair of sites (first hosts).
        for a in &self.plan.sites {
            for b in self.plan.sites.iter().filter(|b| b.lan != a.lan) {
                if let (Some((ans, _)), Some((_, bip))) = (a.hosts.first(), b.hosts.first()) {
                    pings += 1;
                    if !ping(ans, bip) {
                        bad.push(format!(
                            "{ans} ({}) does not reach {bip} ({})",
                            a.lan, b.lan
                        ));
                    }
                }
            }
        }
        // Every live member outside the sites' LANs to every site's hosts.
        for &i in &live {
            let n = &self.plan.nodes[i];
            if self
                .plan
                .sites
                .iter()
                .any(|s| n.home() == Some(s.router.as_str()))
            {
                continue;
            }
            for s in self.plan.sites.iter().filter(|s| live.contains(&s.gateway)) {
                for (_, hip) in &s.hosts {
                    pings += 1;
                    if !ping(&n.ns, hip) {
                        bad.push(format!("n{i} does not reach {hip} ({})", s.lan));
                    }
                }
            }
        }
        (bad, routes_checked, pings)
    }

    /// Waits for the seed to answer (meshpeer) so joiners find it.
    fn wait_seed(&mut self) -> Result<()> {
        if self.nodes.engine == EngineKind::Nebula {
            sys::sleep_ms(300);
            return Ok(());
        }
        let sd = self.nodes.state_dir(0);
        let ok = self.wait(30.0, |c| {
            c.nodes.life[0] == Life::Running
                && control_status(&sd)
                    .and_then(|v| {
                        v.pointer("/self/overlay_ip")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    })
                    .is_some()
        });
        if !ok {
            bail!(
                "the seed (n0) did not answer `status` within 30 s; log tail: {}",
                crate::nodes::tail_lines(&self.nodes.log_path(0), 5)
            );
        }
        Ok(())
    }

    fn select(&mut self, sel: &Select, pool: &[usize]) -> Vec<usize> {
        let mut chosen: Vec<usize> = sel
            .nodes
            .iter()
            .copied()
            .filter(|i| pool.contains(i))
            .collect();
        if sel.seed && pool.contains(&0) && !chosen.contains(&0) {
            chosen.push(0);
        }
        let want = match (sel.count, chosen.is_empty() && !sel.seed) {
            (Some(c), _) => c,
            (None, true) => 1,
            (None, false) => 0,
        };
        let mut eligible: Vec<usize> = pool
            .iter()
            .copied()
            .filter(|i| *i != 0 && !chosen.contains(i))
            .filter(|i| {
                sel.kind
                    .map(|k| self.plan.nodes[*i].kind == k)
                    .unwrap_or(true)
            })
            .collect();
        eligible.shuffle(&mut self.rng);
        chosen.extend(eligible.into_iter().take(want));
        chosen
    }

    fn class_table(&self) -> Vec<Value> {
        let mut m: BTreeMap<(Kind, Kind), (usize, usize)> = BTreeMap::new();
        let missing = self.pinger.with(|s| s.missing_since_mark());
        let live = self.pinger.with(|s| s.live());
        for &i in &live {
            for &j in &live {
                if i != j {
                    let (a, b) = (self.plan.nodes[i].kind, self.plan.nodes[j].kind);
                    let key = if a <= b { (a, b) } else { (b, a) };
                    m.entry(key).or_default().1 += 1;
                }
            }
        }
        for (i, j) in missing {
            let (a, b) = (self.plan.nodes[i].kind, self.plan.nodes[j].kind);
            let key = if a <= b { (a, b) } else { (b, a) };
            m.entry(key).or_default().0 += 1;
        }
        m.into_iter()
            .map(|((a, b), (miss, total))| json!({"a": a.as_str(), "b": b.as_str(), "pairs": total, "reached": total - miss}))
            .collect()
    }

    /// Node i's public address now (its own, or its outermost router's,
    /// after any renumbering).
    fn public_ip_now(&self, i: usize) -> std::net::Ipv4Addr {
        let n = &self.plan.nodes[i];
        n.outer_router()
            .and_then(|r| self.public_now.get(r).copied())
            .unwrap_or(n.public_ip)
    }

    /// Takes the "since" mark now (before a change), so replies to echo
    /// requests sent before the change do not count as recovered.
    fn mark_now(&mut self) -> f64 {
        self.mark = self.pinger.set_mark();
        if let Some(p) = &self.poller {
            p.mark_membership(self.mark);
        }
        self.self_marked = true;
        self.mark
    }

    fn matrix_now(&self) -> Value {
        let live = self.nodes.live();
        let ping = self.pinger.state.lock().unwrap();
        match &self.poller {
            Some(p) => {
                let poll = p.state.lock().unwrap();
                crate::pairs::matrix(&self.plan.nodes, &live, &ping, Some(&poll))
            }
            None => crate::pairs::matrix(&self.plan.nodes, &live, &ping, None),
        }
    }

    /// The recovery figure of a pending change, at the end of a wait_converged.
    fn recovery(&self, rec: &PendingRecovery) -> Value {
        let live = self.nodes.live();
        let mut times: Vec<(f64, usize, usize)> = vec![];
        let mut missing: Vec<Value> = vec![];
        for &(i, j) in &rec.pairs {
            if !live.contains(&i) || !live.contains(&j) {
                continue;
            }
            let t = self.pinger.with(|s| s.pair(i, j).first_since_mark);
            if t >= 0.0 {
                times.push((t - rec.t, i, j));
            } else {
                let (a, b) = (&self.plan.nodes[i], &self.plan.nodes[j]);
                let (pij, dij, pji, dji) = match &self.poller {
                    Some(p) => p.with(|s| {
                        let (x, dx) = crate::pairs::observed(s, i, j);
                        let (y, dy) = crate::pairs::observed(s, j, i);
                        (x, dx, y, dy)
                    }),
                    None => ("n/a".into(), Value::Null, "n/a".into(), Value::Null),
                };
                missing.push(json!({
                    "pair": format!("n{i}->n{j}"),
                    "type": crate::pairs::pair_type(a, b),
                    "path_i_sees": pij, "status_i_sees": dij,
                    "path_j_sees": pji, "status_j_sees": dji,
                }));
            }
        }
        times.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        let secs: Vec<f64> = times.iter().map(|t| t.0).collect();
        let q = |p: f64| -> Option<f64> {
            if secs.is_empty() {
                None
            } else {
                Some(secs[((secs.len() as f64 - 1.0) * p).round() as usize])
            }
        };
        let slowest: Vec<Value> = times
            .iter()
            .rev()
            .take(10)
            .map(|(t, i, j)| {
                json!({"pair": format!("n{i}->n{j}"), "secs": t,
                       "type": crate::pairs::pair_type(&self.plan.nodes[*i], &self.plan.nodes[*j])})
            })
            .collect();
        let all: Vec<Value> = times
            .iter()
            .map(|(t, i, j)| {
                json!({"pair": format!("n{i}->n{j}"), "secs": t,
                       "type": crate::pairs::pair_type(&self.plan.nodes[*i], &self.plan.nodes[*j])})
            })
            .collect();
        let total = secs.len() + missing.len();
        json!({
            "event": rec.event,
            "t": rec.t,
            "affected_pairs": total,
            "recovered": secs.len(),
            "recovered_within_30s": secs.iter().filter(|t| **t <= 30.0).count(),
            "p50_secs": q(0.5),
            "max_secs": if missing.is_empty() { q(1.0) } else { None },
            "max_of_recovered_secs": q(1.0),
            "slowest": slowest,
            "pairs": all,
            "not_recovered": missing,
            "p99_secs": share(&secs, total, 0.99),
            "all_secs": share(&secs, total, 1.0),
            "resolution": self.pair_resolution(&rec.pairs, rec.t),
            "new_nodes_address_known_secs": if rec.new_nodes.is_empty() { Value::Null } else {
                let v: Vec<f64> = self.pinger.with(|s| rec.new_nodes.iter().map(|&i| &s.nodes[i])
                    .filter(|n| n.addr_at >= 0.0).map(|n| n.addr_at - rec.t).collect());
                stats(&v)
            },
            "directions": if rec.new_nodes.is_empty() { Value::Null } else {
                let dir = |from_new: bool| -> Value {
                    let ps: Vec<(usize, usize)> = rec.pairs.iter().copied()
                        .filter(|(i, j)| live.contains(i) && live.contains(j))
                        .filter(|(i, j)| if from_new { rec.new_nodes.contains(i) } else { rec.new_nodes.contains(j) && !rec.new_nodes.contains(i) })
                        .collect();
                    let mut t: Vec<f64> = ps.iter().filter_map(|&(i, j)| {
                        let f = self.pinger.with(|s| s.pair(i, j).first_since_mark);
                        (f >= 0.0).then_some(f - rec.t)
                    }).collect();
                    t.sort_by(f64::total_cmp);
                    json!({"pairs": ps.len(), "replied": t.len(), "p50_secs": share(&t, ps.len(), 0.5),
                           "p99_secs": share(&t, ps.len(), 0.99), "all_secs": share(&t, ps.len(), 1.0)})
                };
                json!({"new_to_old": dir(true), "old_to_new": dir(false)})
            },
            "note": if rec.new_nodes.is_empty() {
                "seconds from the change to the first echo reply (to a request sent after the change) per affected ordered pair"
            } else {
                "seconds from the join step (just before the first new node started) to the first echo reply per ordered pair with a new node, both directions"
            },
        })
    }

    /// Measured resolution of the first replies since `from` of `pairs`:
    /// the probe interval before each pair's first reply (its uncertainty),
    /// and by when the pinger had probed every pair once.
    fn pair_resolution(&self, pairs: &[(usize, usize)], from: f64) -> Value {
        let live = self.nodes.live();
        self.pinger.with(|s| {
            let mut gaps = vec![];
            let mut delays = vec![];
            let (mut at_first, mut unprobed) = (0, 0);
            let mut first_probe: f64 = 0.0;
            for &(i, j) in pairs {
                if !live.contains(&i) || !live.contains(&j) {
                    continue;
                }
                let p = s.pair(i, j);
                if p.first_sent_since_mark < 0.0 {
                    unprobed += 1;
                } else {
                    first_probe = first_probe.max(p.first_sent_since_mark - from);
                    // from "both addresses known (and the mark)" to the first probe
                    let ready = s.nodes[i].addr_at.max(s.nodes[j].addr_at).max(from);
                    delays.push(p.first_sent_since_mark - ready);
                }
                if p.first_since_mark >= 0.0 {
                    if p.first_gap >= 0.0 {
                        gaps.push(p.first_gap);
                    } else {
                        at_first += 1;
                    }
                }
            }
            json!({
                "first_reply_uncertainty_secs": stats(&gaps),
                "first_probe_delay_secs": stats(&delays),
                "answered_at_first_probe": at_first,
                "every_pair_probed_after_secs": if unprobed == 0 { Some(first_probe) } else { None },
                "pairs_never_probed": unprobed,
            })
        })
    }

    /// Time to 50 %, 99 % and 100 % of the ordered pairs of live nodes:
    /// from the scenario start by each pair's first reply ever (`from` None:
    /// the first convergence), else by its first reply since the mark `from`.
    fn timing(&self, from: Option<f64>) -> Value {
        let (mut times, total) = self.pinger.with(|s| {
            let live = s.live();
            let mut v = vec![];
            let mut total = 0;
            for &i in &live {
                for &j in &live {
                    if i == j {
                        continue;
                    }
                    total += 1;
                    let p = s.pair(i, j);
                    let t = if from.is_none() {
                        p.first_reply
                    } else {
                        p.first_since_mark
                    };
                    if t >= 0.0 {
                        v.push(t - from.unwrap_or(0.0));
                    }
                }
            }
            (v, total)
        });
        times.sort_by(f64::total_cmp);
        json!({
            "from": if from.is_none() { "scenario start (the seed's start)" } else { "the last disruptive step (the mark)" },
            "pairs": total,
            "replied": times.len(),
            "p50_secs": share(&times, total, 0.5),
            "p99_secs": share(&times, total, 0.99),
            "all_secs": share(&times, total, 1.0),
        })
    }

    /// What the pinger achieved during a wait_converged that began at
    /// `t_step0` (pinger clock) for the period since the mark `mark`.
    fn resolution(&self, mark: f64, cpu0: f64, sent0: u64, t_step0: f64) -> Value {
        let cpu = self.pinger.cpu_secs() - cpu0;
        let live = self.nodes.live();
        let pairs: Vec<(usize, usize)> = live
            .iter()
            .flat_map(|&i| live.iter().map(move |&j| (i, j)))
            .filter(|(i, j)| i != j)
            .collect();
        let mut r = self.pair_resolution(&pairs, mark);
        // The slowest 1 % of pairs decide the 99 % and 100 % figures: how
        // exact were their first replies?
        // A pair answered at its first probe is exact to within the time
        // from both addresses being known (and the mark) to that probe.
        let tail = self.pinger.with(|s| {
            let mut f: Vec<(f64, f64, bool)> = pairs
                .iter()
                .filter(|&&(i, j)| s.pair(i, j).first_since_mark >= 0.0)
                .map(|&(i, j)| {
                    let p = s.pair(i, j);
                    if p.first_gap >= 0.0 {
                        (p.first_since_mark, p.first_gap, false)
                    } else {
                        let ready = s.nodes[i].addr_at.max(s.nodes[j].addr_at).max(mark);
                        (
                            p.first_since_mark,
                            (p.first_sent_since_mark - ready).max(0.0),
                            true,
                        )
                    }
                })
                .collect();
            f.sort_by(|a, b| a.0.total_cmp(&b.0));
            let k = ((pairs.len() as f64) * 0.99).ceil().max(1.0) as usize - 1;
            let t = f.get(k.min(f.len())..).unwrap_or(&[]);
            let max = t.iter().map(|x| x.1).reduce(f64::max);
            json!({"pairs": t.len(), "max_uncertainty_secs": max,
                   "answered_at_first_probe": t.iter().filter(|x| x.2).count()})
        });
        let addr_known: Vec<f64> = self.pinger.with(|s| {
            live.iter()
                .map(|&i| &s.nodes[i])
                .filter(|n| n.addr_at >= 0.0 && n.started_at >= 0.0)
                .map(|n| n.addr_at - n.started_at)
                .collect()
        });
        // Nebula's addresses are fixed (known at start): only meshpeer's are learned.
        if self.nodes.engine == EngineKind::Meshpeer {
            r["address_known_after_start_secs"] = stats(&addr_known);
        }
        let (gaps, now, sent, rate, retry, keep_eff, by_class, counts) = self.pinger.with(|s| {
            (
                s.gaps.to_json(),
                s.now(),
                s.sent,
                s.rate,
                s.retry,
                s.keep_effective(),
                s.sent_by_class,
                s.class_counts(),
            )
        });
        let dt = (now - t_step0).max(1e-3);
        r["unanswered_probe_interval_secs"] = gaps;
        r["slowest_1pct"] = tail;
        r["window_secs"] = json!(dt);
        r["pinger_pps"] = json!((sent - sent0) as f64 / dt);
        r["pinger_cpu_percent"] = json!(cpu / dt * 100.0);
        r["rate_cap_pps"] = json!(rate);
        r["retry_secs"] = json!(retry);
        r["keep_secs_effective"] = json!(keep_eff);
        r["sent_by_class_total"] =
            json!({"unanswered": by_class[0], "stale": by_class[1], "good": by_class[2]});
        r["pairs_by_class_now"] =
            json!({"unanswered": counts[0], "stale": counts[1], "good": counts[2]});
        r["note"] = json!("unanswered_probe_interval_secs: measured intervals between two probes of a pair that had not answered (yet), since the mark; first_reply_uncertainty_secs: per pair, the interval before the probe that got its first reply (the first reply time is exact to within it; answered_at_first_probe: pairs whose first probe since the mark was answered, whose uncertainty is first_probe_delay_secs plus the wait for the addresses); first_probe_delay_secs: per pair, from the moment both overlay addresses were known to the testnet (and the mark) to its first probe; address_known_after_start_secs: per live node, from its (last) start to the moment the testnet knew its overlay address (the daemon's join time plus the poller's address lane: a thread of its own that asks every node without a known address, every 20 ms); pinger_pps and pinger_cpu_percent: the pinger thread over this wait");
        r
    }

    /// One node's counters at one moment (for a measuring window); with
    /// `status`, meshpeer's own counters too (a control request per node).
    fn snap_node(&self, i: usize, status: bool) -> NodeSnap {
        let t = self.now();
        let status = if status && self.nodes.engine == EngineKind::Meshpeer {
            control_status(&self.nodes.state_dir(i))
        } else {
            None
        };
        let count = |k: &str| {
            status
                .as_ref()
                .map(|v| v.get(k).and_then(Value::as_u64).unwrap_or(0))
        };
        NodeSnap {
            t,
            pid: self.nodes.pid(i),
            cpu: self.nodes.cpu_secs(i),
            gossip: count("gossip_bytes_sent")
                .zip(count("gossip_bytes_received"))
                .map(|(s, r)| s + r),
            wakeups: count("loop_wakeups"),
        }
    }

    /// Measures the live nodes over `secs`: underlay bytes on each node's
    /// `eth0` (read inside its namespace), CPU, RSS and (meshpeer) gossip
    /// bytes from `status`, read directly at both ends of the window.
    fn measure_window(
        &mut self,
        live0: &[usize],
        secs: f64,
        with_pings: bool,
        drain: Option<f64>,
    ) -> Value {
        let start = self.window_start(live0, true);
        let tb_want = start.ta + secs;
        self.wait(tb_want - self.now(), |_| false);
        self.window_end(start, with_pings, drain)
    }

    /// The counters at the start of a measuring window ([`Self::window_end`]
    /// turns them into per-node rates); `status`: see [`Self::snap_node`].
    fn window_start(&self, live0: &[usize], status: bool) -> WindowStart {
        let t0 = self.pinger.with(|s| s.t0);
        let ns: Vec<String> = live0
            .iter()
            .map(|&i| self.plan.nodes[i].ns.clone())
            .collect();
        let sent_a = self.pinger.with(|s| s.sent);
        let self_a = sys::self_cpu_secs();
        let ping_cpu_a = self.pinger.cpu_secs();
        let ta = self.now();
        let ua = sys::if_bytes_in(&ns, "eth0", t0);
        let a: Vec<NodeSnap> = live0.iter().map(|&i| self.snap_node(i, status)).collect();
        WindowStart {
            status,
            live0: live0.to_vec(),
            ns,
            sent_a,
            self_a,
            ping_cpu_a,
            ta,
            ua,
            a,
        }
    }

    /// Per-node rates from `start` to now (see [`Self::measure_window`]).
    fn window_end(&self, start: WindowStart, with_pings: bool, drain: Option<f64>) -> Value {
        let WindowStart {
            status,
            live0,
            ns,
            sent_a,
            self_a,
            ping_cpu_a,
            ta,
            ua,
            a,
        } = start;
        let live0 = &live0[..];
        let t0 = self.pinger.with(|s| s.t0);
        let ub = sys::if_bytes_in(&ns, "eth0", t0);
        let b: Vec<NodeSnap> = live0.iter().map(|&i| self.snap_node(i, status)).collect();
        let dt = self.now() - ta;
        let sent_b = self.pinger.with(|s| s.sent);
        let mut rows: Vec<NodeRow> = vec![];
        for (k, &i) in live0.iter().enumerate() {
            let (sa, sb) = (&a[k], &b[k]);
            // Only nodes that ran the whole window as one process.
            if self.nodes.life[i] != Life::Running || sa.pid.is_none() || sa.pid != sb.pid {
                continue;
            }
            let w = (sb.t - sa.t).max(1e-3);
            let (under, rx, tx, packets) = match (ua[k], ub[k]) {
                (Some(x), Some(y)) => {
                    let uw = (y.t - x.t).max(1e-3);
                    let (rx, tx) = (y.rx.saturating_sub(x.rx), y.tx.saturating_sub(x.tx));
                    let p = y.rx_packets.saturating_sub(x.rx_packets)
                        + y.tx_packets.saturating_sub(x.tx_packets);
                    (
                        Some((rx + tx) as f64 / uw),
                        Some(rx as f64 / uw),
                        Some(tx as f64 / uw),
                        Some(p as f64 / uw),
                    )
                }
                _ => (None, None, None, None),
            };
            rows.push(NodeRow {
                node: i,
                cpu_percent: Some((sb.cpu - sa.cpu) / w * 100.0),
                gossip: match (sa.gossip, sb.gossip) {
                    (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / w),
                    _ => None,
                },
                wakeups: match (sa.wakeups, sb.wakeups) {
                    (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / w),
                    _ => None,
                },
                under,
                rx,
                tx,
                packets,
                rss_mib: sb
                    .pid
                    .and_then(sys::proc_rss_kib)
                    .map(|k| k as f64 / 1024.0),
            });
        }
        let mut r = node_table(self.plan, &rows);
        let hottest: Vec<Value> = {
            let mut v: Vec<&NodeRow> = rows.iter().collect();
            v.sort_by(|x, y| {
                y.cpu_percent
                    .unwrap_or(0.0)
                    .total_cmp(&x.cpu_percent.unwrap_or(0.0))
            });
            v.iter()
                .take(5)
                .map(|n| json!({"node": n.node, "kind": self.plan.nodes[n.node].kind, "seed": n.node == 0, "cpu_percent": n.cpu_percent, "gossip_bytes_per_sec": n.gossip, "loop_wakeups_per_sec": n.wakeups, "underlay_bytes_per_sec": n.under}))
                .collect()
        };
        r["secs"] = json!(dt);
        r["with_pings"] = json!(with_pings);
        r["pinger"] = json!(if with_pings { "running" } else { "paused" });
        r["pinger_drain_secs"] = json!(drain);
        r["pinger_sent_in_window"] = json!(sent_b - sent_a);
        r["pinger_pps"] = json!((sent_b - sent_a) as f64 / dt);
        r["pinger_cpu_percent"] = json!((self.pinger.cpu_secs() - ping_cpu_a) / dt * 100.0);
        r["testnet_cpu_percent"] = json!((sys::self_cpu_secs() - self_a) / dt * 100.0);
        r["hottest"] = json!(hottest);
        r["note"] = json!(if with_pings {
            "underlay = bytes in+out of each node's eth0 (L2 frames, read in its namespace), per second; the pinger was running, so its echoes are included"
        } else {
            "underlay = bytes in+out of each node's eth0 (L2 frames, read in its namespace), per second; the pinger was paused, so this is the engine's own traffic (plus the harness noise measured by the floor)"
        });
        r
    }

    fn run_step(&mut self, idx: usize, step: &Step) -> Result<(bool, Value)> {
        let t_start = self.now();
        Ok(match step {
            Step::Sleep { secs } => {
                let s = *secs;
                self.wait(s, |_| false);
                (true, json!({}))
            }
            Step::WaitConverged { deadline_secs, required, membership, fresh } => {
                if *fresh {
                    self.mark = self.pinger.set_mark();
                    if let Some(p) = &self.poller {
                        p.mark_membership(self.mark);
                    }
                }
                let mark = self.mark;
                // The first convergence (the come-up) is also a measuring
                // window: CPU, underlay bytes and datagrams per node kind
                // from here to convergence, pinger included (no control
                // requests: a request to each of hundreds of starting
                // daemons would load them and wait on them).
                let come_up = self
                    .first_convergence
                    .is_none()
                    .then(|| self.window_start(&self.nodes.live(), false));
                let ping_cpu0 = self.pinger.cpu_secs();
                let (sent0, t_step0) = self.pinger.with(|s| (s.sent, s.now()));
                let check_members = *membership && self.poller.is_some();
                // The deadline counts from the disruption, not from this step.
                let deadline = *deadline_secs;
                let remaining = deadline - (self.now() - mark);
                let mut last_print = Instant::now();
                let ok = self.wait(remaining, |c| {
                    let (done, total, _) = c.pinger.with(|s| s.replied_since_mark());
                    let members_ok = !check_members || c.poller.as_ref().unwrap().with(|s| s.member_ok.is_some());
                    if last_print.elapsed() >= Duration::from_secs(10) {
                        last_print = Instant::now();
                        let (sent, recv) = c.pinger.with(|s| (s.sent, s.received));
                        println!(
                            "  [{:7.2}s] ... {done}/{total} pairs replied, membership {}, pinger {sent} sent / {recv} replies",
                            c.now(),
                            if !check_members { "n/a" } else if members_ok { "complete" } else { "incomplete" }
                        );
                    }
                    done == total && total > 0 && members_ok
                });
                let (done, total, latest) = self.pinger.with(|s| s.replied_since_mark());
                let pairs_done_at = if done == total && total > 0 { Some(latest.max(mark)) } else { None };
                let member_at = self.poller.as_ref().and_then(|p| p.with(|s| s.member_ok));
                let classes = self.class_table();
                let missing: Vec<String> = self
                    .pinger
                    .with(|s| s.missing_since_mark())
                    .iter()
                    .take(20)
                    .map(|(i, j)| format!("n{i}({})->n{j}({})", self.plan.nodes[*i].kind.as_str(), self.plan.nodes[*j].kind.as_str()))
                    .collect();
                let first = self.first_convergence.is_none();
                // The first convergence counts from the scenario start (each
                // pair's first reply ever), later ones from the mark.
                let timing = self.timing(if first { None } else { Some(mark) });
                let resolution = self.resolution(mark, ping_cpu0, sent0, t_step0);
                let mut r = json!({
                    "since": mark,
                    "deadline_secs": deadline,
                    "pairs": total,
                    "pairs_replied": done,
                    "all_pairs_secs": pairs_done_at.map(|t| t - mark),
                    "membership_secs": member_at.map(|t| t - mark),
                    "converged": ok,
                    "timing": timing,
                    "resolution": resolution,
                    "classes": classes,
                    "missing_sample": missing,
                });
                self.convergences.push(json!({
                    "step": idx,
                    "first": first,
                    "since": mark,
                    "timing": r["timing"].clone(),
                    "resolution": r["resolution"].clone(),
                    "membership_secs": member_at.map(|t| t - mark),
                    "converged": ok,
                }));
                // Every member listed every other as up: a quiet period (for
                // false "down" verdicts) can start.
                if ok && check_members {
                    if let Some(p) = &self.poller {
                        p.begin_quiet(&self.nodes.live());
                    }
                }
                if self.first_convergence.is_none() {
                    let mut firsts: Vec<f64> = self.pinger.with(|s| {
                        let live = s.live();
                        let mut v = vec![];
                        for &i in &live {
                            for &j in &live {
                                if i != j && s.pair(i, j).first_reply >= 0.0 {
                                    v.push(s.pair(i, j).first_reply);
                                }
                            }
                        }
                        v
                    });
                    firsts.sort_by(|a, b| a.partial_cmp(b).unwrap());
                    let q = |p: f64| -> Option<f64> {
                        if firsts.is_empty() {
                            None
                        } else {
                            Some(firsts[((firsts.len() as f64 - 1.0) * p).round() as usize])
                        }
                    };
                    let conv = json!({
                        "nodes": self.pinger.with(|s| s.live().len()),
                        "pairs": total,
                        "pairs_replied": done,
                        "first_reply_p50_secs": q(0.5),
                        "first_reply_p99_secs": q(0.99),
                        "first_reply_max_secs": q(1.0),
                        "all_pairs_secs": if done == total && total > 0 { q(1.0) } else { None },
                        "membership_secs": member_at,
                        "converged": ok,
                        "deadline_secs": deadline,
                        "all_started_secs": self.all_started,
                        "timing": r["timing"].clone(),
                        "resolution": r["resolution"].clone(),
                    });
                    let mut conv = conv;
                    if let Some(w) = come_up {
                        let mut t = self.window_end(w, true, None);
                        t["note"] = json!("the come-up: from the start of the first wait_converged (every node started) to its end; underlay = bytes in+out of each node's eth0 (L2 frames, read in its namespace), per second, the pinger's echoes included; packets likewise");
                        conv["come_up"] = t;
                    }
                    r["first_reply"] = conv.clone();
                    self.first_convergence = Some(conv);
                    self.pair_classes = self.class_table();
                }
                if let Some(rec) = self.pending_recovery.take() {
                    let v = self.recovery(&rec);
                    self.marker(format!(
                        "after {}: {}/{} affected pairs replied again, p50 {}, max {}",
                        rec.event,
                        v["recovered"],
                        v["affected_pairs"],
                        fmt_opt(v["p50_secs"].as_f64()),
                        fmt_opt(v["max_secs"].as_f64())
                    ));
                    r["recovery"] = v.clone();
                    self.recoveries.push(v);
                }
                let msg = format!(
                    "wait_converged: {done}/{total} pairs replied{}{}{}",
                    pairs_done_at.map(|t| format!(", all pairs at +{:.2}s", t - mark)).unwrap_or_default(),
                    member_at.map(|t| format!(", membership at +{:.2}s", t - mark)).unwrap_or_default(),
                    r["resolution"]["unanswered_probe_interval_secs"]["p99"]
                        .as_f64()
                        .map(|g| format!(" (unanswered pairs re-probed every {g:.2}s or sooner, p99)"))
                        .unwrap_or_default()
                );
                self.marker(msg);
                if !ok {
                    let m = format!(
                        "step {idx} wait_converged: not converged within {deadline}s ({done}/{total} pairs{})",
                        if check_members && member_at.is_none() { ", membership incomplete" } else { "" }
                    );
                    println!("  {m}");
                    if *required {
                        self.errors.push(m);
                    }
                }
                (ok || !*required, r)
            }
            Step::Kill { select } | Step::Leave { select } => {
                let how = if matches!(step, Step::Kill { .. }) { "kill" } else { "leave" };
                let live = self.nodes.live();
                let chosen = self.select(select, &live);
                for &i in &chosen {
                    self.stop_node(i, how)?;
                    self.marker(format!("{how} n{i} ({})", self.plan.nodes[i].kind.as_str()));
                }
                (true, json!({"nodes": chosen}))
            }
            Step::Restart { select } => {
                let pool: Vec<usize> = (0..self.nodes.len())
                    .filter(|i| matches!(self.nodes.life[*i], Life::Killed | Life::Left | Life::Crashed))
                    .collect();
                let chosen = self.select(select, &pool);
                for &i in &chosen {
                    self.start_node(i)?;
                    self.marker(format!("restart n{i}"));
                }
                (true, json!({"nodes": chosen}))
            }
            Step::Join { count, stagger_ms } => {
                // The mark before the first start: the next wait_converged
                // times every pair with a new node from here.
                let t = self.mark_now();
                let mut started = vec![];
                for _ in 0..*count {
                    if self.next_slot >= self.nodes.len() {
                        break;
                    }
                    let i = self.next_slot;
                    self.next_slot += 1;
                    self.start_node(i)?;
                    started.push(i);
                    if *stagger_ms > 0 {
                        let s = *stagger_ms as f64 / 1000.0;
                        self.wait(s, |_| false);
                    }
                }
                self.marker(format!("join {} new nodes", started.len()));
                let live = self.nodes.live();
                let pairs: Vec<(usize, usize)> = live
                    .iter()
                    .flat_map(|&i| live.iter().map(move |&j| (i, j)))
                    .filter(|&(i, j)| i != j && (started.contains(&i) || started.contains(&j)))
                    .collect();
                self.pending_recovery = Some(PendingRecovery { event: "join".into(), t, pairs, new_nodes: started.clone() });
                (true, json!({"nodes": started}))
            }
            Step::Partition => {
                self.plan.partition()?;
                let half: Vec<usize> = (0..self.plan.nodes.len()).filter(|i| self.plan.half_of(*i) == 0).collect();
                self.marker("partition".into());
                (true, json!({"half_a": half}))
            }
            Step::Heal => {
                self.plan.heal()?;
                self.marker("heal".into());
                (true, json!({}))
            }
            Step::FlushNat => {
                let t = self.mark_now();
                let n = self.plan.flush_nat()?;
                let live = self.nodes.live();
                let pairs: Vec<(usize, usize)> = live
                    .iter()
                    .flat_map(|&i| live.iter().map(move |&j| (i, j)))
                    .filter(|&(i, j)| i != j && (!self.plan.nodes[i].routers.is_empty() || !self.plan.nodes[j].routers.is_empty()))
                    .collect();
                self.pending_recovery = Some(PendingRecovery { event: "flush_nat".into(), t, pairs, new_nodes: vec![] });
                self.marker(format!("flush NAT mappings ({n} routers)"));
                (true, json!({"routers": n}))
            }
            Step::ChangePublicAddress { select } => {
                let live = self.nodes.live();
                let pool: Vec<usize> = live.iter().copied().filter(|i| self.plan.nodes[*i].outer_router().is_some()).collect();
                let chosen = self.select(select, &pool);
                let mut routers: Vec<String> = chosen.iter().filter_map(|i| self.plan.nodes[*i].outer_router().map(str::to_string)).collect();
                routers.sort();
                routers.dedup();
                let behind: Vec<usize> = live
                    .iter()
                    .copied()
                    .filter(|i| self.plan.nodes[*i].outer_router().map(|r| routers.iter().any(|x| x == r)).unwrap_or(false))
                    .collect();
                let t = self.mark_now();
                let mut changes = vec![];
                for r in &routers {
                    let isp = self.plan.hosts.iter().find(|h| &h.ns == r).map(|h| h.isp).unwrap_or(0);
                    let k = self.renumbered.entry(isp).or_insert(0);
                    let extra = *k;
                    *k += 1;
                    let (old, new) = self.plan.renumber(r, extra)?;
                    self.public_now.insert(r.clone(), new);
                    changes.push(json!({"router": r, "old": old, "new": new}));
                    self.marker(format!("public address of {r}: {old} -> {new}"));
                }
                let pairs: Vec<(usize, usize)> = live
                    .iter()
                    .flat_map(|&i| live.iter().map(move |&j| (i, j)))
                    .filter(|&(i, j)| i != j && (behind.contains(&i) || behind.contains(&j)))
                    .collect();
                self.pending_recovery = Some(PendingRecovery { event: "change_public_address".into(), t, pairs, new_nodes: vec![] });
                (true, json!({"nodes": chosen, "routers": changes, "nodes_behind": behind, "secs": self.now() - t}))
            }
            Step::ExpectPaths { deadline_secs, stable_secs, required } => {
                if self.poller.is_none() {
                    return Ok((true, json!({"skipped": "no path view for this engine"})));
                }
                let t0 = self.now();
                let stable = *stable_secs;
                let mut good_since: Option<f64> = None;
                let ok = self.wait(*deadline_secs, |c| {
                    let fresh = c.poller.as_ref().unwrap().with(|s| {
                        c.nodes.live().iter().all(|i| s.obs[*i].as_ref().map(|o| o.t >= t0).unwrap_or(false))
                    });
                    let m = c.matrix_now();
                    let good = fresh && m["mismatched"] == json!(0) && m["reached"] == m["pairs"];
                    let now = c.now();
                    if !good {
                        good_since = None;
                        return false;
                    }
                    let since = *good_since.get_or_insert(now);
                    now - since >= stable
                });
                let m = self.matrix_now();
                let settled = good_since.map(|t| t - t0);
                let n_bad = m["flagged"].as_array().map(Vec::len).unwrap_or(0);
                self.marker(format!(
                    "expect_paths: {} of {} ordered pairs on the expected path{}",
                    m["pairs"].as_u64().unwrap_or(0) as usize - n_bad,
                    m["pairs"],
                    settled.map(|t| format!(", all from +{t:.1}s")).unwrap_or_default()
                ));
                if !ok {
                    let flagged: Vec<String> = m["flagged"]
                        .as_array()
                        .map(|a| a.iter().take(12).map(|f| format!("{} {} expected {} got {}", f["pair"].as_str().unwrap_or(""), f["type"].as_str().unwrap_or(""), f["expected"].as_str().unwrap_or(""), f["path"].as_str().unwrap_or(""))).collect())
                        .unwrap_or_default();
                    let msg = format!(
                        "step {idx} expect_paths: {n_bad} pairs not on the expected path, {} of {} pairs reached, after {deadline_secs}s: {}",
                        m["reached"], m["pairs"], flagged.join("; ")
                    );
                    println!("  {msg}");
                    if *required {
                        self.errors.push(msg);
                    }
                }
                self.pair_matrix = Some(m.clone());
                (ok || !*required, json!({"ok": ok, "settled_after_secs": settled, "matrix": m}))
            }
            Step::CheckNat { deadline_secs, required } => {
                let Some(_) = &self.poller else {
                    return Ok((true, json!({"skipped": "no status for this engine"})));
                };
                let t0 = self.now();
                let check = |c: &Ctx| -> Vec<Value> {
                    let live = c.nodes.live();
                    c.poller.as_ref().unwrap().with(|s| {
                        live.iter()
                            .map(|&i| {
                                let n = &c.plan.nodes[i];
                                let want_nat = match n.kind {
                                    Kind::Public => "public",
                                    Kind::Symmetric => "symmetric",
                                    _ => "endpoint-independent",
                                };
                                let want_ip = c.public_ip_now(i);
                                let (nat, mapped, fresh) = match &s.obs[i] {
                                    Some(o) => (o.nat.clone(), o.mapped.clone(), o.t >= t0),
                                    None => (String::new(), vec![], false),
                                };
                                let ips: Vec<String> = mapped.iter().map(|m| m.rsplit_once(':').map(|x| x.0.to_string()).unwrap_or_default()).collect();
                                let ip_ok = if n.kind == Kind::Public {
                                    ips.iter().all(|ip| *ip == want_ip.to_string())
                                } else {
                                    !ips.is_empty() && ips[0] == want_ip.to_string()
                                };
                                json!({"node": i, "kind": n.kind, "want_nat": want_nat, "nat": nat, "want_public_ip": want_ip,
                                       "mapped_endpoints": mapped, "ok": fresh && nat == want_nat && ip_ok})
                            })
                            .collect()
                    })
                };
                let ok = self.wait(*deadline_secs, |c| check(c).iter().all(|v| v["ok"] == true));
                let rows = check(self);
                let bad: Vec<String> = rows.iter().filter(|v| v["ok"] != true).map(|v| format!("n{} ({}): nat {} mapped {} (want {} at {})", v["node"], v["kind"].as_str().unwrap_or(""), v["nat"], v["mapped_endpoints"], v["want_nat"], v["want_public_ip"])).collect();
                self.marker(format!("check_nat: {} of {} nodes show the expected NAT kind and public address", rows.len() - bad.len(), rows.len()));
                if !ok {
                    let msg = format!("step {idx} check_nat: {}", bad.join("; "));
                    println!("  {msg}");
                    if *required {
                        self.errors.push(msg);
                    }
                }
                let counters = self.plan.stun.as_ref().map(|(ns, _)| stun_counters(ns));
                (ok || !*required, json!({"ok": ok, "nodes": rows, "stun_server_counters": counters}))
            }
            Step::CheckSealed { required } => {
                if self.poller.is_none() {
                    return Ok((true, json!({"skipped": "no status for this engine"})));
                }
                let mut bad: Vec<String> = Vec::new();
                let (mut forwarded, mut dropped, mut relayed_paths) = (0u64, 0u64, 0usize);
                let live = self.nodes.live();
                for &i in &live {
                    let Some(st) = crate::nodes::control_status(&self.nodes.state_dir(i)) else {
                        bad.push(format!("n{i}: no status"));
                        continue;
                    };
                    forwarded += st["relay_forwarded"].as_u64().unwrap_or(0);
                    dropped += st["relay_dropped"].as_u64().unwrap_or(0);
                    let members = st["members"].as_array().cloned().unwrap_or_default();
                    relayed_paths += members.iter().filter(|m| m["path"] == "relayed").count();
                    let own: std::collections::HashMap<String, String> = members
                        .iter()
                        .filter_map(|m| Some((m["public_key"].as_str()?.to_string(), format!("{}/32", m["overlay_ip"].as_str()?))))
                        .collect();
                    let Some(peers) = crate::nodes::uapi_allowed_ips(&self.nodes.ifname(i)) else {
                        bad.push(format!("n{i}: cannot read its WireGuard device"));
                        continue;
                    };
                    for (key, ips) in peers {
                        let mine = own.get(&key);
                        for ip in ips {
                            if Some(&ip) != mine {
                                bad.push(format!("n{i}: peer {} holds {ip} (its own is {})", &key[..8], mine.map(String::as_str).unwrap_or("unknown")));
                            }
                        }
                    }
                }
                if relayed_paths > 0 && forwarded == 0 {
                    bad.push(format!("{relayed_paths} relayed paths, but no relay forwarded anything"));
                }
                let ok = bad.is_empty();
                self.marker(format!("check_sealed: {} nodes, {relayed_paths} relayed paths, relays forwarded {forwarded} sealed datagrams (dropped {dropped}); {} problems", live.len(), bad.len()));
                if !ok {
                    let msg = format!("step {idx} check_sealed: {}", bad.join("; "));
                    println!("  {msg}");
                    if *required {
                        self.errors.push(msg);
                    }
                }
                (ok || !*required, json!({"ok": ok, "relayed_paths": relayed_paths, "relay_forwarded": forwarded, "relay_dropped": dropped, "problems": bad}))
            }
            Step::StunClient { select, server, required } => {
                let live = self.nodes.live();
                let want_kind = select.kind.or(Some(Kind::Nat));
                let pool: Vec<usize> = live.iter().copied().filter(|i| !self.plan.nodes[*i].routers.is_empty()).collect();
                let sel = Select { kind: want_kind, ..select.clone() };
                let chosen = self.select(&sel, &pool);
                let srv = *server;
                let port = self.poller.as_ref().and_then(|p| p.with(|s| s.obs[srv].as_ref().and_then(|o| o.listen_port)));
                let Some(port) = port else {
                    bail!("stun_client: no WireGuard port known for n{srv}");
                };
                let target = format!("{}:{port}", self.plan.nodes[srv].underlay);
                let mut rows = vec![];
                let mut all_ok = !chosen.is_empty();
                for &i in &chosen {
                    let ns = self.plan.nodes[i].ns.clone();
                    let (code, out) = sys::output_in(&ns, "stun", &[target.clone(), "-v".into()], Duration::from_secs(30))?;
                    let mapped = out
                        .lines()
                        .find_map(|l| l.trim().strip_prefix("MappedAddress = ").map(|x| x.trim().to_string()));
                    let want = self.public_ip_now(i);
                    let ok = mapped.as_deref().and_then(|m| m.rsplit_once(':')).map(|(ip, _)| ip == want.to_string()).unwrap_or(false);
                    all_ok &= ok;
                    self.marker(format!(
                        "stun_client: `stun {target}` from n{i} ({}) printed mapped address {} (NAT public address {want}): {}",
                        self.plan.nodes[i].kind.as_str(),
                        mapped.as_deref().unwrap_or("none"),
                        if ok { "OK" } else { "WRONG" }
                    ));
                    let tail: String = out.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
                    rows.push(json!({"client": i, "namespace": ns, "server": target, "exit": code, "mapped": mapped, "want_ip": want, "ok": ok, "output": tail}));
                }
                if !all_ok {
                    let msg = format!("step {idx} stun_client: the stun client's mapped address is not the NAT's public address (or no client ran)");
                    println!("  {msg}");
                    if *required {
                        self.errors.push(msg);
                    }
                }
                (all_ok || !*required, json!({"ok": all_ok, "clients": rows}))
            }
            Step::CheckSites { deadline_secs, required } => {
                if self.plan.sites.is_empty() {
                    bail!("check_sites: the scenario has no [[site]]");
                }
                if self.poller.is_none() {
                    return Ok((true, json!({"skipped": "no routes for this engine"})));
                }
                let t0 = self.now();
                let mut last = (vec![], 0, 0);
                let ok = self.wait(*deadline_secs, |c| {
                    last = c.site_problems();
                    last.0.is_empty()
                });
                let took = self.now() - t0;
                let (bad, routes, pings) = last;
                self.marker(format!(
                    "check_sites: {} sites, {routes} route verdicts, {pings} pings across sites: {} ({took:.1} s)",
                    self.plan.sites.len(),
                    if ok { "all as expected".to_string() } else { format!("{} problems", bad.len()) }
                ));
                if !ok {
                    let msg = format!("step {idx} check_sites: {}", bad.join("; "));
                    println!("  {msg}");
                    if *required {
                        self.errors.push(msg);
                    }
                }
                let sites: Vec<Value> = self
                    .plan
                    .sites
                    .iter()
                    .zip(&self.sc.sites)
                    .map(|(s, spec)| json!({"gateway": s.gateway, "lan": s.lan, "hosts": s.hosts.iter().map(|h| h.1).collect::<Vec<_>>(), "intruders": spec.intruders}))
                    .collect();
                (ok || !*required, json!({"ok": ok, "secs": took, "sites": sites, "route_verdicts": routes, "pings": pings, "problems": bad}))
            }
            Step::WaitDetected { deadline_secs, required, peer_removal } => {
                let Some(poller) = &self.poller else {
                    return Ok((true, json!({"skipped": "no membership view for this engine"})));
                };
                let _ = poller;
                let from = self.events_checked;
                let want_removal = *peer_removal;
                let check = |c: &mut Ctx| -> bool {
                    let live = c.nodes.live();
                    c.poller.as_ref().unwrap().with(|s| {
                        // A node restarted meanwhile has nothing left to detect.
                        s.events[from..].iter().filter(|e| !live.contains(&e.node)).all(|e| {
                            live.iter().filter(|o| **o != e.node).all(|o| {
                                e.seen_down.contains_key(o) && (!want_removal || e.public_key.is_none() || e.peer_removed.contains_key(o))
                            })
                        })
                    })
                };
                let ok = self.wait(*deadline_secs, check);
                let live = self.nodes.live();
                let evs: Vec<Value> = self.poller.as_ref().unwrap().with(|s| {
                    s.events[from..]
                        .iter()
                        .map(|e| {
                            let obs: Vec<usize> = live.iter().copied().filter(|o| *o != e.node).collect();
                            let seen: Vec<f64> = obs.iter().filter_map(|o| e.seen_down.get(o).copied()).collect();
                            let rem: Vec<f64> = obs.iter().filter_map(|o| e.peer_removed.get(o).copied()).collect();
                            let mx = |v: &[f64]| v.iter().cloned().fold(f64::NAN, f64::max);
                            if live.contains(&e.node) {
                                return json!({"kind": e.kind, "node": e.node, "t": e.t, "restarted_before_detection": true});
                            }
                            let all_seen = seen.len() == obs.len() && !obs.is_empty();
                            // The sweeps' resolution: every observer still
                            // showed it up at its last poll before its
                            // verdict, so all saw it down after the latest
                            // of those (and by `all_see_down_secs`).
                            let lows: Vec<f64> = obs.iter().map(|o| e.last_up.get(o).copied().unwrap_or(e.t)).collect();
                            let all_after = all_seen.then(|| mx(&lows) - e.t);
                            let mut d: Vec<f64> = seen.iter().map(|t| t - e.t).collect();
                            d.sort_by(f64::total_cmp);
                            let p50 = d.get(d.len() / 2).copied();
                            json!({
                                "kind": e.kind, "node": e.node, "t": e.t,
                                "observers": obs.len(),
                                "seen_down_by": seen.len(),
                                "all_see_down_secs": if seen.len() == obs.len() && !obs.is_empty() { Some(mx(&seen) - e.t) } else { None },
                                "all_see_down_after_secs": all_after,
                                "seen_down_p50_secs": p50,
                                "peer_removed_by": rem.len(),
                                "peer_removed_everywhere_secs": if rem.len() == obs.len() && !obs.is_empty() { Some(mx(&rem) - e.t) } else { None },
                                "public_key_known": e.public_key.is_some(),
                            })
                        })
                        .collect()
                });
                self.events_checked = self.poller.as_ref().unwrap().with(|s| s.events.len());
                for e in evs.iter().filter(|e| e.get("restarted_before_detection").is_none()) {
                    self.marker(format!(
                        "detected {} n{}: all see it down after {}, WireGuard peer removed everywhere after {}",
                        e["kind"].as_str().unwrap_or(""),
                        e["node"],
                        fmt_opt(e["all_see_down_secs"].as_f64()),
                        fmt_opt(e["peer_removed_everywhere_secs"].as_f64())
                    ));
                }
                self.failures.extend(evs.iter().cloned());
                if !ok {
                    let m = format!("step {idx} wait_detected: not complete within {deadline_secs}s");
                    println!("  {m}");
                    if *required {
                        self.errors.push(m);
                    }
                }
                (ok || !*required, json!({"events": evs, "complete": ok}))
            }
            Step::MeasureSteady { secs, with_pings } => {
                let drain = if !*with_pings { Some(self.pinger.pause_and_drain()) } else { None };
                let live0 = self.nodes.live();
                let r = self.measure_window(&live0, *secs, *with_pings, drain);
                if !*with_pings {
                    self.pinger.set_paused(false);
                }
                self.marker(format!(
                    "steady state over {:.1}s: underlay in+out/node mean {}, cpu/node mean {:.2}%, gossip/node mean {}",
                    r["secs"].as_f64().unwrap_or(f64::NAN),
                    r["underlay_bytes_per_sec_per_node"]["mean"].as_f64().map(fmt_bps).unwrap_or_else(|| "n/a".into()),
                    r["cpu_percent_per_node"]["mean"].as_f64().unwrap_or(f64::NAN),
                    r["gossip_bytes_per_sec_per_node"]["mean"].as_f64().map(fmt_bps).unwrap_or_else(|| "n/a".into())
                ));
                self.steady = Some(r.clone());
                (true, r)
            }
            Step::Soak(k) => return self.run_soak(k),
            Step::SoakCheck(k) => return self.run_soak_check(idx, k),
            Step::Churn { secs, every_secs } => {
                let end = self.now() + secs;
                let mut killed = vec![];
                let mut joined = vec![];
                while self.now() < end && !stopping() {
                    let live = self.nodes.live();
                    let k = self.select(&Select { count: Some(1), ..Default::default() }, &live);
                    for &i in &k {
                        self.stop_node(i, "kill")?;
                        killed.push(i);
                    }
                    if self.next_slot < self.nodes.len() {
                        let i = self.next_slot;
                        self.next_slot += 1;
                        self.start_node(i)?;
                        joined.push(i);
                    }
                    self.marker(format!("churn: kill {:?}, join {:?}", k, joined.last()));
                    let e = *every_secs;
                    self.wait(e, |_| false);
                }
                (true, json!({"killed": killed, "joined": joined}))
            }
        })
        .map(|(ok, mut r)| {
            if let Value::Object(m) = &mut r {
                m.insert("t_start".into(), json!(t_start));
            }
            (ok, r)
        })
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.2}s"),
        _ => "n/a".into(),
    }
}

pub fn stats(v: &[f64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mean = s.iter().sum::<f64>() / s.len() as f64;
    let q = |p: f64| s[((s.len() as f64 - 1.0) * p).round() as usize];
    json!({"mean": mean, "p50": q(0.5), "p99": q(0.99), "max": q(1.0), "n": s.len()})
}

/// The time by which a share `q` of `total` items was done, from the
/// sorted done times (None: fewer were done).
pub fn share(sorted: &[f64], total: usize, q: f64) -> Option<f64> {
    if total == 0 {
        return None;
    }
    let k = ((total as f64) * q - 1e-9).ceil().max(1.0) as usize;
    sorted.get(k - 1).copied()
}

/// A node's counters at one end of a measuring window.
struct NodeSnap {
    t: f64,
    pid: Option<u32>,
    cpu: f64,
    gossip: Option<u64>,
    wakeups: Option<u64>,
}

/// One node's figures over a measuring window.
pub struct NodeRow {
    pub node: usize,
    pub cpu_percent: Option<f64>,
    /// Gossip bytes (sent + received) per second, from `status` (meshpeer).
    pub gossip: Option<f64>,
    /// Wake-ups of the daemon's event loop per second, from `status`
    /// (meshpeer): a spinning loop shows here first.
    pub wakeups: Option<f64>,
    /// Underlay bytes per second on the node's eth0: in+out, in, out.
    pub under: Option<f64>,
    pub rx: Option<f64>,
    pub tx: Option<f64>,
    /// Underlay packets (datagrams) per second on eth0, in+out.
    pub packets: Option<f64>,
    pub rss_mib: Option<f64>,
}

/// The counters at the start of a measuring window.
struct WindowStart {
    status: bool,
    live0: Vec<usize>,
    ns: Vec<String>,
    sent_a: u64,
    self_a: f64,
    ping_cpu_a: f64,
    ta: f64,
    ua: Vec<Option<sys::IfBytes>>,
    a: Vec<NodeSnap>,
}

/// The group of a node for the per-kind tables: "seed" (node 0) apart from
/// the other public nodes.
pub fn group_of(plan: &Plan, i: usize) -> &'static str {
    if i == 0 {
        "seed"
    } else {
        plan.nodes[i].kind.as_str()
    }
}

pub const GROUPS: [&str; 5] = ["seed", "public", "nat", "cgnat", "symmetric"];

/// Stats over the rows, overall and by group, plus the rows themselves.
pub fn node_table(plan: &Plan, rows: &[NodeRow]) -> Value {
    let col = |rs: &[&NodeRow], f: &dyn Fn(&NodeRow) -> Option<f64>| -> Value {
        let v: Vec<f64> = rs.iter().filter_map(|r| f(r)).collect();
        stats(&v)
    };
    let all: Vec<&NodeRow> = rows.iter().collect();
    let mut by_kind = serde_json::Map::new();
    for g in GROUPS {
        let of: Vec<&NodeRow> = rows
            .iter()
            .filter(|r| group_of(plan, r.node) == g)
            .collect();
        if of.is_empty() {
            continue;
        }
        by_kind.insert(
            g.into(),
            json!({
                "nodes": of.len(),
                "underlay_bytes_per_sec": col(&of, &|r| r.under),
                "underlay_packets_per_sec": col(&of, &|r| r.packets),
                "cpu_percent": col(&of, &|r| r.cpu_percent),
                "gossip_bytes_per_sec": col(&of, &|r| r.gossip),
                "loop_wakeups_per_sec": col(&of, &|r| r.wakeups),
                "rss_mib": col(&of, &|r| r.rss_mib),
            }),
        );
    }
    let per_node: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"node": r.node, "group": group_of(plan, r.node), "underlay_bytes_per_sec": r.under,
                   "underlay_rx_bytes_per_sec": r.rx, "underlay_tx_bytes_per_sec": r.tx,
                   "underlay_packets_per_sec": r.packets,
                   "cpu_percent": r.cpu_percent, "gossip_bytes_per_sec": r.gossip,
                   "loop_wakeups_per_sec": r.wakeups, "rss_mib": r.rss_mib})
        })
        .collect();
    json!({
        "nodes": rows.len(),
        "underlay_bytes_per_sec_per_node": col(&all, &|r| r.under),
        "underlay_rx_bytes_per_sec_per_node": col(&all, &|r| r.rx),
        "underlay_tx_bytes_per_sec_per_node": col(&all, &|r| r.tx),
        "underlay_packets_per_sec_per_node": col(&all, &|r| r.packets),
        "cpu_percent_per_node": col(&all, &|r| r.cpu_percent),
        "gossip_bytes_per_sec_per_node": col(&all, &|r| r.gossip),
        "loop_wakeups_per_sec_per_node": col(&all, &|r| r.wakeups),
        "rss_mib_per_node": col(&all, &|r| r.rss_mib),
        "by_kind": by_kind,
        "per_node": per_node,
        "units": "bytes per second; 1 KB = 1000 bytes; underlay bytes are L2 frame bytes (Ethernet header included) counted by the kernel on the node's eth0, in + out",
    })
}

/// Bytes per second for people: "512 B/s", "23.4 KB/s" (1 KB = 1000 B).
pub fn fmt_bps(x: f64) -> String {
    if !x.is_finite() {
        "n/a".into()
    } else if x < 1000.0 {
        format!("{x:.0} B/s")
    } else {
        format!("{:.1} KB/s", x / 1000.0)
    }
}

/// Runs the whole scenario with one engine.
pub fn run_engine(
    engine: EngineKind,
    sc: &Scenario,
    plan: &Plan,
    pinger: &Pinger,
    work: &Path,
    bin: &Path,
    initial: usize,
) -> Result<EngineResult> {
    let opts = DaemonOpts {
        down_grace_secs: sc.nodes.down_grace_secs,
        extra_args: sc.nodes.extra_args.clone(),
        join_args: sc.nodes.join_args.clone(),
        log: std::env::var("TESTNET_NODE_LOG").unwrap_or_else(|_| sc.nodes.log.clone()),
    };
    let nodes = Nodes::new(engine, plan, work, bin, opts)?;
    pinger.reset();
    let t0 = pinger.with(|s| s.t0);
    let poller = match engine {
        EngineKind::Meshpeer => {
            let ps = pinger.state.clone();
            Some(Poller::start(
                plan.nodes.len(),
                t0,
                Duration::from_millis(sc.measure.poll_interval_ms),
                Box::new(move |i, ip| crate::pinger::learn_addr(&ps, i, ip)),
            ))
        }
        EngineKind::Nebula => None,
    };
    let self_cpu0 = sys::self_cpu_secs();
    let ping_cpu0 = pinger.cpu_secs();
    let mut c = Ctx {
        sc,
        plan,
        pinger,
        nodes,
        poller,
        rng: rand::rngs::StdRng::seed_from_u64(sc.topology.seed ^ 0x5eed),
        next_slot: initial,
        mark: 0.0,
        markers: vec![],
        errors: vec![],
        events_checked: 0,
        first_convergence: None,
        pair_classes: vec![],
        failures: vec![],
        steady: None,
        crashes: vec![],
        pair_matrix: None,
        recoveries: vec![],
        self_marked: false,
        pending_recovery: None,
        renumbered: BTreeMap::new(),
        public_now: BTreeMap::new(),
        convergences: vec![],
        all_started: None,
        false_printed: 0,
        soak: None,
    };
    println!(
        "== {} ({} nodes, {})",
        engine.as_str(),
        initial,
        sc.topology.kind
    );
    let mut steps = vec![];
    let res = (|| -> Result<()> {
        c.start_node(0)?;
        c.wait_seed()?;
        c.marker("seed n0 up".into());
        c.prepare_sites()?;
        let stagger = if sc.nodes.start == "staggered" {
            sc.nodes.stagger_ms
        } else {
            0
        };
        for i in 1..initial {
            if stopping() {
                bail!("interrupted");
            }
            c.start_node(i)?;
            if stagger > 0 {
                c.wait(stagger as f64 / 1000.0, |_| false);
            }
        }
        c.all_started = Some(c.now());
        c.marker(format!("all {initial} nodes started"));
        for (idx, step) in sc.steps.iter().enumerate() {
            if stopping() {
                bail!("interrupted");
            }
            // A quiet period (for false "down" verdicts) ends before
            // anything that may rightly make a member look down; a join
            // does not (the new node is not a member of the period).
            if step.disruptive() && !matches!(step, Step::Join { .. }) {
                if let Some(p) = &c.poller {
                    p.end_quiet();
                }
            }
            let t_start = c.now();
            let (ok, result) = c.run_step(idx, step)?;
            let t_end = c.now();
            if step.disruptive() && !std::mem::take(&mut c.self_marked) {
                c.mark = c.pinger.set_mark();
                if let Some(p) = &c.poller {
                    p.mark_membership(c.mark);
                }
            }
            steps.push(StepLog {
                index: idx,
                action: step.name().into(),
                t_start,
                t_end,
                ok,
                result,
            });
        }
        Ok(())
    })();
    if let Err(e) = &res {
        c.errors.push(format!("{e:#}"));
        println!("  error: {e:#}");
    }
    // Final observations.
    if c.pair_matrix.is_none() && c.first_convergence.is_some() {
        c.pair_matrix = Some(c.matrix_now());
    }
    let live = c.nodes.live();
    let (backend, paths, handshakes) = match &c.poller {
        Some(p) => p.with(|s| {
            let mut backend = None;
            let (mut direct, mut relayed, mut hs, mut members) = (0, 0, 0, 0);
            for &i in &live {
                if let Some(o) = &s.obs[i] {
                    backend = Some(o.backend.clone());
                    direct += o.direct;
                    relayed += o.relayed;
                    hs += o.handshaken;
                    members += o.members.len().saturating_sub(1);
                }
            }
            let pairs = live.len() * live.len().saturating_sub(1);
            (
                backend,
                json!({"ordered_pairs": pairs, "direct": direct, "relayed": relayed, "none": pairs.saturating_sub(direct + relayed), "source": "meshpeer status `path` of each member"}),
                json!({"peers_with_handshake": hs, "peers_listed": members, "per_node_mean": if live.is_empty() {0.0} else {hs as f64 / live.len() as f64}}),
            )
        }),
        None => (None, json!({"source": "not available for this engine"}), Value::Null),
    };
    let status_table = if engine == EngineKind::Meshpeer && c.nodes.life[0] == Life::Running {
        c.nodes.status_table(0).ok()
    } else if engine == EngineKind::Meshpeer {
        live.first().and_then(|i| c.nodes.status_table(*i).ok())
    } else {
        None
    };
    let duration = c.now();
    let false_down = match &c.poller {
        Some(p) => {
            p.end_quiet();
            false_down_summary(p, sc.measure.poll_interval_ms)
        }
        None => json!({"source": "not available for this engine (no membership view)"}),
    };
    c.nodes.stop_all();
    let started: Vec<usize> = (0..c.nodes.len())
        .filter(|i| c.nodes.started_once[*i])
        .collect();
    let cpu: Vec<f64> = started.iter().map(|i| c.nodes.cpu_secs(*i)).collect();
    let rss: Vec<f64> = started
        .iter()
        .map(|i| c.nodes.peak_rss_kib(*i) as f64 / 1024.0)
        .collect();
    let overhead = json!({
        "cpu_secs_per_node": stats(&cpu),
        "cpu_secs_total": cpu.iter().sum::<f64>(),
        "peak_rss_mib_per_node": stats(&rss),
        "handshakes": handshakes,
    });
    let pstats = pinger.with(|s| json!({"sent": s.sent, "received": s.received, "send_errors": s.send_errors, "rate_cap_pps": s.rate, "retry_secs": s.retry, "keep_secs": s.keep, "good_share": s.good_share, "reach_window_secs": s.window(),
        "sent_by_class": {"unanswered": s.sent_by_class[0], "stale": s.sent_by_class[1], "good": s.sent_by_class[2]}}));
    let mut pstats = pstats;
    pstats["testnet_cpu_secs"] = json!(sys::self_cpu_secs() - self_cpu0);
    pstats["pinger_cpu_secs"] = json!(pinger.cpu_secs() - ping_cpu0);
    pstats["run_secs"] = json!(duration);
    pinger.set_paused(true);
    let timeline = pinger.with(|s| s.samples.clone());
    let ok = c.errors.is_empty();
    Ok(EngineResult {
        engine: engine.as_str().into(),
        ok,
        errors: c.errors,
        backend,
        steps,
        convergence: c.first_convergence,
        pair_classes: c.pair_classes,
        pair_matrix: c.pair_matrix,
        recoveries: c.recoveries,
        failure_detection: c.failures,
        convergences: c.convergences,
        false_down,
        steady: c.steady,
        overhead,
        paths,
        pinger: pstats,
        crashes: c.crashes,
        markers: c.markers,
        timeline,
        status_table,
        duration_secs: duration,
    })
}

/// The false "down" verdicts of a run, for the report.
fn false_down_summary(p: &Poller, poll_interval_ms: u64) -> Value {
    p.with(|s| {
        let v = &s.false_downs;
        let down = v.iter().filter(|f| f.verdict == "down").count();
        let mut pairs: Vec<(usize, usize)> = v.iter().map(|f| (f.observer, f.subject)).collect();
        pairs.sort();
        pairs.dedup();
        let mut subjects: Vec<usize> = v.iter().map(|f| f.subject).collect();
        subjects.sort();
        subjects.dedup();
        json!({
            "verdicts": v.len(),
            "down": down,
            "missing": v.len() - down,
            "observer_subject_pairs": pairs.len(),
            "subjects": subjects.len(),
            "quiet_secs": s.quiet_secs,
            "checks": s.quiet_checks,
            "sweeps": s.sweeps,
            "sweep_mean_secs": s.sweep_total_secs / (s.sweeps.max(1) as f64),
            "sweep_max_secs": s.sweep_max_secs,
            "poll_interval_secs": poll_interval_ms as f64 / 1000.0,
            "first": v.iter().take(10).collect::<Vec<_>>(),
            "note": "a verdict: a live member shown `down` (or not listed: missing) by another live member during a quiet period (from a successful wait_converged to the next kill, leave, restart, partition, heal, NAT flush, address change or churn; members are the nodes live at its start); counted once per observer and subject until shown up again; resolution: one status sweep",
        })
    })
}

/// nftables counters of the STUN host: (requests to udp/3478, answers from it).
pub fn stun_counters(ns: &str) -> Value {
    let out = sys::run_in(ns, "nft", &["list", "table", "ip", "tnstun"]).unwrap_or_default();
    let nums: Vec<u64> = out
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter()
                .position(|x| *x == "packets")
                .and_then(|p| w.get(p + 1))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    json!({"requests_in": nums.first(), "answers_out": nums.get(1)})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_counts_all_pairs_not_only_the_replied() {
        let t = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(share(&t, 4, 0.5), Some(2.0));
        assert_eq!(share(&t, 4, 1.0), Some(4.0));
        // 100 pairs, 99 replied: 99 % is there, 100 % is not.
        let t: Vec<f64> = (1..=99).map(|x| x as f64).collect();
        assert_eq!(share(&t, 100, 0.99), Some(99.0));
        assert_eq!(share(&t, 100, 1.0), None);
        assert_eq!(share(&[], 0, 0.5), None);
    }

    #[test]
    fn bytes_per_second_use_1000() {
        assert_eq!(fmt_bps(999.0), "999 B/s");
        assert_eq!(fmt_bps(61_040.0), "61.0 KB/s");
    }
}
