//! The status poller: a thread that asks every live meshpeer daemon for its
//! status (control socket) and its WireGuard peers (UAPI socket), round
//! robin, and keeps the latest observation of each. From those it tracks
//! membership convergence ("every node lists every other") and failure
//! detection events (kill or leave → every other node shows the node down
//! or gone → its WireGuard peer is removed everywhere).

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
    #[serde(skip)]
    pub peer_removed: HashMap<usize, f64>,
}

#[derive(Clone)]
pub struct Target {
    pub state_dir: PathBuf,
    pub ifname: String,
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
    thread: Option<std::thread::JoinHandle<()>>,
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

impl Poller {
    pub fn start(n: usize, t0: Instant, min_sweep: Duration) -> Poller {
        let state = Arc::new(Mutex::new(PollState {
            t0,
            targets: vec![None; n],
            obs: vec![None; n],
            events: vec![],
            member_mark: 0.0,
            member_ok: None,
            sweeps: 0,
            last_sweep_secs: 0.0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (state.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("poller".into())
            .spawn(move || {
                crate::sys::boost_this_thread();
                while !st2.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let targets: Vec<(usize, Target)> = {
                        let s = s2.lock().unwrap();
                        s.targets
                            .iter()
                            .enumerate()
                            .filter_map(|(i, t)| t.clone().map(|t| (i, t)))
                            .collect()
                    };
                    for (i, t) in targets {
                        if st2.load(Ordering::Relaxed) {
                            return;
                        }
                        let v = control_status(&t.state_dir);
                        let peers = uapi_peers(&t.ifname).map(|v| v.into_iter().collect());
                        let mut s = s2.lock().unwrap();
                        if s.targets[i].is_none() {
                            continue; // stopped meanwhile
                        }
                        let now = s.now();
                        if let Some(v) = v {
                            let mut o = parse(&v, now);
                            o.peers = peers;
                            s.obs[i] = Some(o);
                            s.update_events(i);
                        }
                    }
                    {
                        let mut s = s2.lock().unwrap();
                        s.sweeps += 1;
                        s.last_sweep_secs = start.elapsed().as_secs_f64();
                        if s.member_ok.is_none() && s.all_listed() {
                            let now = s.now();
                            s.member_ok = Some(now);
                        }
                    }
                    let el = start.elapsed();
                    if el < min_sweep {
                        std::thread::sleep(min_sweep - el);
                    }
                }
            })
            .expect("spawn poller");
        Poller {
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn set_target(&self, i: usize, t: Option<Target>) {
        let mut s = self.state.lock().unwrap();
        if t.is_none() {
            s.obs[i] = None;
        }
        s.targets[i] = t;
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
            peer_removed: HashMap::new(),
        });
    }

    pub fn with<T>(&self, f: impl FnOnce(&PollState) -> T) -> T {
        f(&self.state.lock().unwrap())
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
