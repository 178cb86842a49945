//! The status poller: a thread that asks every live meshpeer daemon for its
//! status (control socket) and its WireGuard peers (UAPI socket), round
//! robin, and keeps the latest observation of each. From those it tracks
//! membership convergence ("every node lists every other") and failure
//! detection events (kill or leave → every other node shows the node down
//! or gone → its WireGuard peer is removed everywhere), and false "down"
//! verdicts: a live member shown `down` (or not listed) by another live
//! member during a quiet period (after a convergence, before the next kill,
//! leave, restart, partition, NAT change or churn).
//!
//! Nodes whose overlay address is not known yet are asked every 20 ms
//! between sweeps (the pinger cannot probe a node before), so a low sweep
//! rate does not delay the convergence measurement; a sweep itself does
//! (one daemon at a time: at 100 nodes started at once on 2 cores a sweep
//! took seconds, reported as `sweep_mean_secs`/`sweep_max_secs`). Polling
//! more (a fast lane on its own thread, or 16 daemons at a time) took CPU
//! from the daemons and made 100 nodes converge in 56 s instead of 28 s, so
//! the harness stays this frugal.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::nodes::{control_status, uapi_peers};

#[derive(Debug, Clone, Default)]
pub struct Obs {
    pub t: f64,
    /// name → (state, public key)
    pub members: HashMap<String, (String, String)>,
    pub overlay_ip: Option<std::net::Ipv4Addr>,
    pub public_key: Option<String>,
    pub gossip_sent: u64,
    pub gossip_received: u64,
    pub connected: usize,
    pub handshaken: usize,
    pub direct: usize,
    pub relayed: usize,
    pub backend: String,
    pub peers: Option<HashSet<String>>,
    /// member name → its path as this node sees it
    pub paths: HashMap<String, MemberPath>,
    /// This node's NAT as it measured it, and its mapped endpoints.
    pub nat: String,
    pub mapped: Vec<String>,
    pub listen_port: Option<u16>,
}

/// One member's path in a node's `status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemberPath {
    pub state: String,
    /// "direct", "relayed", "trying" or null
    pub path: Option<String>,
    pub relay: Option<String>,
    pub why_not_direct: Option<String>,
    pub endpoint: Option<String>,
    pub nat: Option<String>,
    pub last_handshake_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub kind: String,
    pub node: usize,
    pub t: f64,
    #[serde(skip)]
    pub public_key: Option<String>,
    /// observer → first time it showed the node down or gone
    #[serde(skip)]
    pub seen_down: HashMap<usize, f64>,
    /// observer → its last observation after the event that still showed
    /// the node up (the observer's verdict came after it: the lower bound
    /// of `seen_down`, which is only as exact as the sweeps)
    #[serde(skip)]
    pub last_up: HashMap<usize, f64>,
    #[serde(skip)]
    pub peer_removed: HashMap<usize, f64>,
}

#[derive(Clone)]
pub struct Target {
    pub state_dir: PathBuf,
    pub ifname: String,
}

/// A live member shown `down` (or missing from the member list) by another
/// live member during a quiet period.
#[derive(Debug, Clone, Serialize)]
pub struct FalseDown {
    /// First sweep that showed it.
    pub t: f64,
    pub observer: usize,
    pub subject: usize,
    /// "down" (listed with state down) or "missing" (not listed).
    pub verdict: String,
    /// First later sweep that showed the subject up again (None: not within
    /// the quiet period).
    pub until: Option<f64>,
}

/// A quiet period: nothing was killed, left, restarted, partitioned or
/// renumbered since it began; `members` were live and converged then.
pub struct Quiet {
    pub since: f64,
    pub members: Vec<bool>,
}

pub struct PollState {
    pub t0: Instant,
    pub targets: Vec<Option<Target>>,
    pub obs: Vec<Option<Obs>>,
    pub events: Vec<Event>,
    /// membership convergence: (mark, first time all listed all after mark)
    pub member_mark: f64,
    pub member_ok: Option<f64>,
    pub sweeps: u64,
    pub last_sweep_secs: f64,
    /// Longest full sweep, and all sweeps' time (mean = total / sweeps).
    pub sweep_max_secs: f64,
    pub sweep_total_secs: f64,
    pub quiet: Option<Quiet>,
    /// Quiet time so far (closed periods).
    pub quiet_secs: f64,
    pub false_downs: Vec<FalseDown>,
    /// (observer, subject) → index of its open verdict in `false_downs`.
    open: HashMap<(usize, usize), usize>,
    /// Observations compared with the quiet-period members.
    pub quiet_checks: u64,
}

impl PollState {
    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
    fn live(&self) -> Vec<usize> {
        (0..self.targets.len())
            .filter(|i| self.targets[*i].is_some())
            .collect()
    }
    /// Does every live node list every other live node as not down?
    pub fn all_listed(&self) -> bool {
        let live = self.live();
        for &o in &live {
            let Some(obs) = &self.obs[o] else {
                return false;
            };
            if obs.t < self.member_mark {
                return false;
            }
            for &x in &live {
                if x == o {
                    continue;
                }
                match obs.members.get(&format!("n{x}")) {
                    Some((st, _)) if st != "down" => {}
                    _ => return false,
                }
            }
        }
        !live.is_empty()
    }
    /// Checks observer o's latest view against the quiet period.
    fn update_quiet(&mut self, o: usize) {
        let Some(q) = &self.quiet else {
            return;
        };
        if !q.members.get(o).copied().unwrap_or(false) {
            return;
        }
        let Some(obs) = &self.obs[o] else {
            return;
        };
        if obs.t < q.since {
            return;
        }
        let t = obs.t;
        let mut opened = vec![];
        let mut closed = vec![];
        for (x, member) in q.members.iter().enumerate() {
            if !member || x == o || self.targets[x].is_none() {
                continue;
            }
            let verdict = match obs.members.get(&format!("n{x}")) {
                None => Some("missing"),
                Some((st, _)) if st == "down" => Some("down"),
                Some(_) => None,
            };
            match (verdict, self.open.get(&(o, x))) {
                (Some(v), None) => opened.push((x, v)),
                (None, Some(&k)) => closed.push(((o, x), k)),
                _ => {}
            }
        }
        self.quiet_checks += 1;
        for (key, k) in closed {
            self.false_downs[k].until = Some(t);
            self.open.remove(&key);
        }
        for (x, v) in opened {
            self.open.insert((o, x), self.false_downs.len());
            self.false_downs.push(FalseDown {
                t,
                observer: o,
                subject: x,
                verdict: v.into(),
                until: None,
            });
        }
    }
    fn update_events(&mut self, o: usize) {
        let Some(obs) = self.obs[o].clone() else {
            return;
        };
        for ev in self.events.iter_mut() {
            if ev.node == o || obs.t < ev.t {
                continue;
            }
            let name = format!("n{}", ev.node);
            let gone = match obs.members.get(&name) {
                None => true,
                Some((st, _)) => st == "down",
            };
            if gone {
                ev.seen_down.entry(o).or_insert(obs.t);
            } else if !ev.seen_down.contains_key(&o) {
                ev.last_up.insert(o, obs.t);
            }
            if let (Some(peers), Some(k)) = (&obs.peers, &ev.public_key) {
                if !peers.contains(k) {
                    ev.peer_removed.entry(o).or_insert(obs.t);
                }
            }
        }
    }
}

pub struct Poller {
    pub state: Arc<Mutex<PollState>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn parse(v: &Value, t: f64) -> Obs {
    let mut o = Obs {
        t,
        ..Default::default()
    };
    o.gossip_sent = v
        .get("gossip_bytes_sent")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    o.gossip_received = v
        .get("gossip_bytes_received")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    o.backend = v
        .get("backend")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let st = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    o.nat = st(v, "nat").unwrap_or_default();
    o.mapped = v
        .get("mapped_endpoints")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    o.listen_port = v
        .get("listen_port")
        .and_then(Value::as_u64)
        .map(|p| p as u16);
    if let Some(me) = v.get("self") {
        o.overlay_ip = me
            .get("overlay_ip")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok());
        o.public_key = me
            .get("public_key")
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    if let Some(ms) = v.get("members").and_then(Value::as_array) {
        for m in ms {
            let name = m
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let st = m
                .get("state")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let key = m
                .get("public_key")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if st == "connected" {
                o.connected += 1;
            }
            if st != "self"
                && m.get("last_handshake_secs")
                    .map(|x| !x.is_null())
                    .unwrap_or(false)
            {
                o.handshaken += 1;
            }
            match m.get("path").and_then(Value::as_str) {
                Some("direct") => o.direct += 1,
                Some(p) if p.contains("relay") => o.relayed += 1,
                _ => {}
            }
            o.paths.insert(
                name.clone(),
                MemberPath {
                    state: st.clone(),
                    path: m.get("path").and_then(Value::as_str).map(str::to_string),
                    relay: m.get("relay").and_then(Value::as_str).map(str::to_string),
                    why_not_direct: m
                        .get("why_not_direct")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    endpoint: m
                        .get("endpoint")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    nat: m.get("nat").and_then(Value::as_str).map(str::to_string),
                    last_handshake_secs: m.get("last_handshake_secs").and_then(Value::as_u64),
                },
            );
            o.members.insert(name, (st, key));
        }
    }
    o
}

/// Threads that share a full status sweep.
const SWEEP_THREADS: usize = 4;

impl Poller {
    /// `on_addr(i, ip)` is called (outside the lock) when node i's overlay
    /// address is first seen, so the pinger can probe it at once.
    pub fn start(n: usize, t0: Instant, min_sweep: Duration, on_addr: AddrHook) -> Poller {
        let state = Arc::new(Mutex::new(PollState {
            t0,
            targets: vec![None; n],
            obs: vec![None; n],
            events: vec![],
            member_mark: 0.0,
            member_ok: None,
            sweeps: 0,
            last_sweep_secs: 0.0,
            sweep_max_secs: 0.0,
            sweep_total_secs: 0.0,
            quiet: None,
            quiet_secs: 0.0,
            false_downs: vec![],
            open: HashMap::new(),
            quiet_checks: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let on_addr: Arc<AddrHook> = Arc::new(on_addr);
        // Fast lane, a thread of its own: nodes whose overlay address is
        // unknown, asked every 20 ms. It must not wait for a full sweep: on
        // a loaded machine a sweep of 100 nodes took up to 16 s in the
        // come-up, and addresses learned only after it made every pair
        // look 14 s slower than it was (the measuring side timed itself).
        let (s1, st1, hook1) = (state.clone(), stop.clone(), on_addr.clone());
        let fast = std::thread::Builder::new()
            .name("poller-addr".into())
            .spawn(move || {
                crate::sys::boost_this_thread();
                while !st1.load(Ordering::Relaxed) {
                    let pending: Vec<(usize, Target)> = {
                        let s = s1.lock().unwrap();
                        s.targets
                            .iter()
                            .enumerate()
                            .filter(|(i, t)| {
                                t.is_some()
                                    && s.obs[*i].as_ref().and_then(|o| o.overlay_ip).is_none()
                            })
                            .filter_map(|(i, t)| t.clone().map(|t| (i, t)))
                            .collect()
                    };
                    for (i, t) in pending {
                        if st1.load(Ordering::Relaxed) {
                            return;
                        }
                        poll_one(&s1, i, &t, false, &hook1);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .expect("spawn poller");
        let (s2, st2) = (state.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("poller".into())
            .spawn(move || {
                crate::sys::boost_this_thread();
                let mut next_sweep = Instant::now();
                while !st2.load(Ordering::Relaxed) {
                    if Instant::now() < next_sweep {
                        let left = next_sweep - Instant::now();
                        std::thread::sleep(left.min(Duration::from_millis(20)));
                        continue;
                    }
                    let start = Instant::now();
                    next_sweep = start + min_sweep;
                    let targets: Vec<(usize, Target)> = {
                        let s = s2.lock().unwrap();
                        s.targets
                            .iter()
                            .enumerate()
                            .filter_map(|(i, t)| t.clone().map(|t| (i, t)))
                            .collect()
                    };
                    // A few threads, each asking its share of the nodes one
                    // after the other: a loaded daemon takes 100-200 ms to
                    // answer, and one thread made a sweep of the mixed-100
                    // come-up last up to 27 s (the membership time is known
                    // to within a sweep).
                    let share = targets.len().div_ceil(SWEEP_THREADS).max(1);
                    std::thread::scope(|sc| {
                        for chunk in targets.chunks(share) {
                            let (s2, st2, on_addr) = (&s2, &st2, &on_addr);
                            sc.spawn(move || {
                                crate::sys::boost_this_thread();
                                for (i, t) in chunk {
                                    if st2.load(Ordering::Relaxed) {
                                        return;
                                    }
                                    poll_one(s2, *i, t, true, on_addr);
                                }
                            });
                        }
                    });
                    if st2.load(Ordering::Relaxed) {
                        return;
                    }
                    {
                        let mut s = s2.lock().unwrap();
                        s.sweeps += 1;
                        let took = start.elapsed().as_secs_f64();
                        s.last_sweep_secs = took;
                        s.sweep_max_secs = s.sweep_max_secs.max(took);
                        s.sweep_total_secs += took;
                        if s.member_ok.is_none() && s.all_listed() {
                            let now = s.now();
                            s.member_ok = Some(now);
                        }
                    }
                }
            })
            .expect("spawn poller");
        Poller {
            state,
            stop,
            threads: vec![fast, thread],
        }
    }

    pub fn set_target(&self, i: usize, t: Option<Target>) {
        let mut s = self.state.lock().unwrap();
        if t.is_none() {
            s.obs[i] = None;
            // A node that is gone is no longer a quiet-period member.
            if let Some(q) = s.quiet.as_mut() {
                if let Some(m) = q.members.get_mut(i) {
                    *m = false;
                }
            }
        }
        s.targets[i] = t;
    }

    /// Starts a quiet period with these members (live and converged now),
    /// unless one is running.
    pub fn begin_quiet(&self, members: &[usize]) {
        let mut s = self.state.lock().unwrap();
        if s.quiet.is_some() {
            return;
        }
        let n = s.targets.len();
        let mut m = vec![false; n];
        for &i in members {
            m[i] = true;
        }
        let since = s.now();
        s.quiet = Some(Quiet { since, members: m });
    }

    /// Ends the quiet period (before a kill, leave, partition, ...).
    pub fn end_quiet(&self) {
        let mut s = self.state.lock().unwrap();
        if let Some(q) = s.quiet.take() {
            let now = s.now();
            s.quiet_secs += now - q.since;
            s.open.clear();
        }
    }

    pub fn mark_membership(&self, t: f64) {
        let mut s = self.state.lock().unwrap();
        s.member_mark = t;
        s.member_ok = None;
    }

    pub fn add_event(&self, kind: &str, node: usize, t: f64) {
        let mut s = self.state.lock().unwrap();
        let key = s.obs[node].as_ref().and_then(|o| o.public_key.clone());
        s.events.push(Event {
            kind: kind.into(),
            node,
            t,
            public_key: key,
            seen_down: HashMap::new(),
            last_up: HashMap::new(),
            peer_removed: HashMap::new(),
        });
    }

    pub fn with<T>(&self, f: impl FnOnce(&PollState) -> T) -> T {
        f(&self.state.lock().unwrap())
    }
}

/// Asks node i for its status (and, on a full sweep, its WireGuard peers)
/// and records the observation.
pub type AddrHook = Box<dyn Fn(usize, std::net::Ipv4Addr) + Send + Sync>;

fn poll_one(state: &Arc<Mutex<PollState>>, i: usize, t: &Target, full: bool, on_addr: &AddrHook) {
    let v = control_status(&t.state_dir);
    let peers = if full {
        uapi_peers(&t.ifname).map(|v| v.into_iter().collect())
    } else {
        None
    };
    let mut s = state.lock().unwrap();
    if s.targets[i].is_none() {
        return; // stopped meanwhile
    }
    let now = s.now();
    let mut learned = None;
    if let Some(v) = v {
        let mut o = parse(&v, now);
        o.peers = peers;
        if s.obs[i].as_ref().and_then(|x| x.overlay_ip).is_none() {
            learned = o.overlay_ip;
        }
        s.obs[i] = Some(o);
        s.update_events(i);
        s.update_quiet(i);
    }
    drop(s);
    if let Some(ip) = learned {
        on_addr(i, ip);
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(n: usize) -> PollState {
        PollState {
            t0: Instant::now(),
            targets: (0..n)
                .map(|i| {
                    Some(Target {
                        state_dir: PathBuf::from(format!("/nonexistent/n{i}")),
                        ifname: format!("x{i}"),
                    })
                })
                .collect(),
            obs: vec![None; n],
            events: vec![],
            member_mark: 0.0,
            member_ok: None,
            sweeps: 0,
            last_sweep_secs: 0.0,
            sweep_max_secs: 0.0,
            sweep_total_secs: 0.0,
            quiet: None,
            quiet_secs: 0.0,
            false_downs: vec![],
            open: HashMap::new(),
            quiet_checks: 0,
        }
    }

    fn obs(t: f64, members: &[(usize, &str)]) -> Obs {
        Obs {
            t,
            members: members
                .iter()
                .map(|(i, st)| (format!("n{i}"), (st.to_string(), String::new())))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn false_downs_are_counted_once_per_episode() {
        let mut s = state(4);
        // Outside a quiet period nothing counts.
        s.obs[0] = Some(obs(1.0, &[(1, "down"), (2, "connected"), (3, "connected")]));
        s.update_quiet(0);
        assert!(s.false_downs.is_empty());
        // Members 0, 1, 2 (3 joined later: not a member, never a subject).
        s.quiet = Some(Quiet {
            since: 2.0,
            members: vec![true, true, true, false],
        });
        s.obs[0] = Some(obs(3.0, &[(1, "down"), (2, "connected")]));
        s.update_quiet(0);
        s.obs[0] = Some(obs(4.0, &[(1, "down"), (2, "connected")]));
        s.update_quiet(0);
        assert_eq!(s.false_downs.len(), 1, "one episode, seen twice");
        s.obs[0] = Some(obs(5.0, &[(1, "connected"), (2, "connected")]));
        s.update_quiet(0);
        assert_eq!(s.false_downs[0].until, Some(5.0));
        // Node 1 misses node 2 entirely: a "missing" verdict.
        s.obs[1] = Some(obs(6.0, &[(0, "connected")]));
        s.update_quiet(1);
        assert_eq!(s.false_downs.len(), 2);
        assert_eq!(
            (s.false_downs[1].observer, s.false_downs[1].subject),
            (1, 2)
        );
        assert_eq!(s.false_downs[1].verdict, "missing");
        assert_eq!(s.quiet_checks, 4);
    }
}
