//! Liveness on a virtual clock: several nodes, a lossless network that can
//! drop chosen directions, and gossip that delivers published values to
//! everyone after a delay.

use std::collections::HashSet;

use ed25519_dalek::SigningKey;

use super::*;

const NET: [u8; 32] = [9; 32];
const STEP: Duration = Duration::from_millis(50);
/// Gossip spreads published values to every node after this long.
const GOSSIP_DELAY: Duration = Duration::from_millis(600);

struct Sim {
    t0: Instant,
    now: Instant,
    nodes: Vec<Liveness>,
    keys: Vec<PublicKeyBytes>,
    up: Vec<bool>,
    /// (from, to) pairs whose probes are lost.
    cut: HashSet<(usize, usize)>,
    /// Published values waiting to be delivered: (due, publisher, value).
    in_flight: Vec<(Instant, usize, Published)>,
    events: Vec<(Duration, usize, Event)>,
    pings_sent: Vec<usize>,
    /// Each node's values as gossip holds them now (what a node that
    /// starts later learns).
    latest: Vec<(Option<Suspicions>, Option<Alive>)>,
    /// An overloaded machine: answers take this long to come back ...
    ack_delay: Duration,
    /// ... a node's timers run only this often (its event loop is late) ...
    timers_every: Duration,
    /// ... and published values this long to spread.
    gossip_delay: Duration,
    /// Answers on their way: (due, to node, from address, nonce).
    acks: Vec<(Instant, usize, Ipv4Addr, u64)>,
    /// Gossip rounds the nodes ask for ([`Liveness::take_mismatches`]) are
    /// answered by live targets after [`ROUND_TRIP`] (`None`: no rounds),
    /// through the tunnel (`Some(true)`) or the underlay.
    rounds: Option<bool>,
    /// Round answers on their way: (due, to node, from node).
    heard: Vec<(Instant, usize, usize)>,
    /// Every `suspects` value published, in order: (publisher, value).
    published: Vec<(usize, Suspicions)>,
}

/// A gossip round's answer, in the tests that answer rounds.
const ROUND_TRIP: Duration = Duration::from_millis(200);

#[derive(Clone)]
enum Published {
    Suspicions(Suspicions),
    Alive(Alive),
}

fn ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, i as u8 + 1)
}

/// Every node as liveness sees it, `reachable(j)` saying which have a path.
fn views(keys: &[PublicKeyBytes], reachable: impl Fn(usize) -> bool) -> Vec<MemberView> {
    keys.iter()
        .enumerate()
        .map(|(j, k)| MemberView {
            key: *k,
            overlay_ip: ip(j),
            reachable: reachable(j),
            heard: reachable(j),
        })
        .collect()
}

impl Sim {
    fn new(n: usize) -> Self {
        let keys: Vec<PublicKeyBytes> = (0..n)
            .map(|i| {
                SigningKey::from_bytes(&[i as u8 + 1; 32])
                    .verifying_key()
                    .to_bytes()
            })
            .collect();
        let now = Instant::now();
        let mut nodes: Vec<Liveness> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| Liveness::new(NET, *k, i as u64))
            .collect();
        let views = views(&keys, |_| true);
        for n in nodes.iter_mut() {
            n.handle_members(now, &views);
        }
        Sim {
            t0: now,
            now,
            nodes,
            keys,
            up: vec![true; n],
            cut: HashSet::new(),
            in_flight: Vec::new(),
            events: Vec::new(),
            pings_sent: vec![0; n],
            latest: vec![(None, None); n],
            ack_delay: Duration::ZERO,
            timers_every: STEP,
            gossip_delay: GOSSIP_DELAY,
            acks: Vec::new(),
            rounds: None,
            heard: Vec::new(),
            published: Vec::new(),
        }
    }

    fn index_of_ip(&self, a: Ipv4Addr) -> usize {
        (0..self.keys.len()).find(|i| ip(*i) == a).unwrap()
    }

    fn step(&mut self) {
        self.now += STEP;
        let unix_ms = 1_000_000 + self.now.duration_since(self.t0).as_millis() as u64;
        // Gossip deliveries.
        let (due, later): (Vec<_>, Vec<_>) = self
            .in_flight
            .drain(..)
            .partition(|(at, _, _)| *at <= self.now);
        self.in_flight = later;
        for (_, _from, value) in due {
            for i in 0..self.nodes.len() {
                if !self.up[i] {
                    continue;
                }
                match &value {
                    Published::Suspicions(s) => self.nodes[i].handle_suspicions(self.now, s),
                    Published::Alive(a) => self.nodes[i].handle_alive(self.now, a),
                }
            }
        }
        let (due, later): (Vec<_>, Vec<_>) =
            self.acks.drain(..).partition(|(at, ..)| *at <= self.now);
        self.acks = later;
        for (_, i, from, nonce) in due {
            if self.up[i] {
                self.nodes[i].handle_ack(self.now, from, nonce, Summary::default());
            }
        }
        let (due, later): (Vec<_>, Vec<_>) =
            self.heard.drain(..).partition(|(at, ..)| *at <= self.now);
        self.heard = later;
        for (_, i, j) in due {
            if self.up[i] && self.up[j] {
                let from = match self.rounds {
                    Some(true) => std::net::IpAddr::V4(ip(j)),
                    _ => std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, j as u8 + 1)),
                };
                self.nodes[i].handle_heard(self.now, &self.keys[j], from);
            }
        }
        let elapsed = self.now.duration_since(self.t0);
        for i in 0..self.nodes.len() {
            if !self.up[i] {
                continue;
            }
            // A starved node's loop wakes only every `timers_every` (each
            // node at its own phase).
            let phase = STEP * (i as u32 % 7);
            if (elapsed + phase).as_millis() % self.timers_every.as_millis() >= STEP.as_millis() {
                continue;
            }
            self.nodes[i].handle_timeout(self.now, unix_ms);
            for (to_ip, probe) in self.nodes[i].poll_transmit() {
                self.pings_sent[i] += 1;
                let j = self.index_of_ip(to_ip);
                if !self.up[j] || self.cut.contains(&(i, j)) {
                    continue;
                }
                if let Probe::Ping { nonce, .. } = probe {
                    if self.ack_delay.is_zero() {
                        // The target answers at once.
                        self.nodes[i].handle_ack(self.now, ip(j), nonce, Summary::default());
                    } else {
                        self.acks.push((self.now + self.ack_delay, i, ip(j), nonce));
                    }
                }
            }
            while let Some(e) = self.nodes[i].poll_event() {
                self.events.push((self.now - self.t0, i, e));
            }
            for k in self.nodes[i].take_mismatches() {
                let j = self.keys.iter().position(|x| *x == k).unwrap();
                if self.rounds.is_some() && self.up[j] {
                    self.heard.push((self.now + ROUND_TRIP, i, j));
                }
            }
            if let Some(targets) = self.nodes[i].take_accusations() {
                let s = Suspicions {
                    network_key: NET,
                    accuser: self.keys[i],
                    issued_at_ms: unix_ms,
                    targets,
                };
                self.latest[i].0 = Some(s.clone());
                self.published.push((i, s.clone()));
                self.in_flight
                    .push((self.now + self.gossip_delay, i, Published::Suspicions(s)));
            }
            if let Some(refutes) = self.nodes[i].take_refutations() {
                let a = Alive {
                    network_key: NET,
                    node_key: self.keys[i],
                    issued_at_ms: unix_ms,
                    refutes,
                };
                self.latest[i].1 = Some(a.clone());
                self.in_flight
                    .push((self.now + self.gossip_delay, i, Published::Alive(a)));
            }
        }
    }

    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    /// Node `i` restarts with no liveness state: it learns the members and
    /// every value gossip holds now, the way a restarted daemon does.
    fn restart(&mut self, i: usize) {
        let mut fresh = Liveness::new(NET, self.keys[i], 1000 + i as u64);
        fresh.withdraw_previous();
        fresh.handle_members(self.now, &views(&self.keys, |_| true));
        for (j, (s, a)) in self.latest.iter().enumerate() {
            if j == i {
                continue;
            }
            if let Some(a) = a {
                fresh.handle_alive(self.now, a);
            }
            if let Some(s) = s {
                fresh.handle_suspicions(self.now, s);
            }
        }
        self.nodes[i] = fresh;
        self.up[i] = true;
    }

    /// Every other node's path to `j` stops working (no path at all, probes
    /// lost both ways); gossip still reaches everyone.
    fn silence_paths_to(&mut self, j: usize) {
        let silent = views(&self.keys, |x| x != j);
        let now = self.now;
        for i in (0..self.nodes.len()).filter(|i| *i != j) {
            self.nodes[i].handle_members(now, &silent);
            self.cut.insert((i, j));
            self.cut.insert((j, i));
        }
    }

    /// Kills `victim`, runs `d`; returns who called it down, and when the
    /// last of them did, counted from the kill.
    fn kill_and_watch(&mut self, victim: usize, d: Duration) -> (HashSet<usize>, Duration) {
        let killed_at = self.now - self.t0;
        self.up[victim] = false;
        self.run(d);
        let downs = self.downs_of(victim);
        let observers: HashSet<usize> = downs.iter().map(|(_, i)| *i).collect();
        let last = downs
            .iter()
            .map(|(t, _)| *t)
            .max()
            .map_or(Duration::ZERO, |t| t - killed_at);
        (observers, last)
    }

    fn downs_of(&self, victim: usize) -> Vec<(Duration, usize)> {
        self.events
            .iter()
            .filter(|(_, _, e)| *e == Event::Down(self.keys[victim]))
            .map(|(t, i, _)| (*t, *i))
            .collect()
    }

    /// When and by whom our path to `target` was reported broken
    /// ([`Event::PathBroken`]).
    fn broken_reports(&self, target: usize) -> Vec<(Duration, usize)> {
        self.events
            .iter()
            .filter(|(_, _, e)| *e == Event::PathBroken(self.keys[target]))
            .map(|(t, i, _)| (*t, *i))
            .collect()
    }
}

#[test]
fn a_killed_member_is_down_everywhere_within_ten_seconds() {
    let mut sim = Sim::new(12);
    sim.run(Duration::from_secs(10));
    assert!(sim.events.is_empty(), "{:?}", sim.events);
    let (observers, last) = sim.kill_and_watch(5, Duration::from_secs(15));
    assert_eq!(observers.len(), 11, "{:?}", sim.downs_of(5));
    assert!(
        last <= Duration::from_secs(10),
        "last verdict after {last:?}"
    );
    // Nobody else was called down.
    assert!(sim
        .events
        .iter()
        .all(|(_, _, e)| matches!(e, Event::Down(k) if *k == sim.keys[5])));
}

#[test]
fn a_false_accusation_makes_members_look_and_nothing_more() {
    let mut sim = Sim::new(8);
    sim.run(Duration::from_secs(5));
    // Node 7 accuses node 2, which is alive.
    let lie = Suspicions {
        network_key: NET,
        accuser: sim.keys[7],
        issued_at_ms: 1,
        targets: vec![Suspect {
            node_key: sim.keys[2],
            since_ms: 1_002_000,
        }],
    };
    sim.in_flight.push((sim.now, 7, Published::Suspicions(lie)));
    let sent_before: usize = sim.pings_sent.iter().sum();
    sim.run(Duration::from_secs(10));
    assert!(sim.events.is_empty(), "{:?}", sim.events);
    // Everyone looked (a probe each, at least), and 2 refuted.
    let sent_after: usize = sim.pings_sent.iter().sum();
    assert!(sent_after - sent_before >= 6);
    assert!(sim.nodes.iter().all(|n| !n.is_down(&sim.keys[2])));
    // The accused learns who could not reach it (once).
    assert_eq!(sim.nodes[2].take_new_accusers(), vec![sim.keys[7]]);
    assert!(sim.nodes[2].take_new_accusers().is_empty());
}

#[test]
fn a_broken_path_is_not_a_death() {
    let mut sim = Sim::new(6);
    sim.run(Duration::from_secs(5));
    // Node 0 can no longer reach node 1 (say, its NAT mapping broke; its
    // path stops working); the others can. Node 0 checks (path silent),
    // accuses, node 1 refutes.
    sim.cut.insert((0, 1));
    let now = sim.now;
    let silent = views(&sim.keys, |j| j != 1)
        .into_iter()
        .map(|mut v| {
            v.reachable = true;
            v
        })
        .collect::<Vec<_>>();
    sim.nodes[0].handle_members(now, &silent);
    sim.run(SILENT_CHECK + SILENT_SPREAD + Duration::from_secs(10));
    // Node 0 accused it once and it refuted: nobody calls it down, and
    // the path (already known not to work) is not reported broken again.
    assert_eq!(accusations_by(&sim, 0, 1), 1);
    let (_, alive) = &sim.latest[1];
    assert!(alive
        .as_ref()
        .is_some_and(|a| a.refutes.iter().any(|r| r.accuser == sim.keys[0])));
    assert!(sim.downs_of(1).is_empty(), "{:?}", sim.events);
    assert!(sim.broken_reports(1).is_empty(), "{:?}", sim.events);
}

/// A path that stays broken (a monitor cannot reach a live member): the
/// monitor accuses, the member refutes, and then the monitor's own misses
/// do not accuse again for a backoff that doubles, instead of a mesh-wide
/// accusation and refutation every few seconds (soak_short: 34 in 2.5
/// minutes from one node). A death meanwhile is still seen.
#[test]
fn a_path_that_stays_broken_is_not_accused_over_and_over() {
    let mut sim = Sim::new(6);
    sim.run(Duration::from_secs(5));
    let target = sim.nodes[0].monitored().next().copied().unwrap();
    let j = sim.keys.iter().position(|k| *k == target).unwrap();
    sim.cut.insert((0, j));
    sim.run(Duration::from_secs(150));
    let broken = sim
        .broken_reports(j)
        .iter()
        .filter(|(_, i)| *i == 0)
        .count();
    // 30 s, 60 s, then 120 s of quiet after each: at most 4 in 150 s
    // (without the backoff: one every 5-8 s, about 20).
    assert!((1..=4).contains(&broken), "{broken}: {:?}", sim.events);
    assert!(sim.downs_of(j).is_empty(), "{:?}", sim.events);
    // The member dies: the other monitors' accusations still get node 0
    // to check it and call it down.
    sim.up[j] = false;
    sim.run(Duration::from_secs(20));
    assert!(sim.nodes[0].is_down(&target), "{:?}", sim.events);
}

#[test]
fn a_node_started_long_after_a_kill_sees_the_killed_member_down() {
    let mut sim = Sim::new(6);
    sim.run(Duration::from_secs(5));
    sim.up[3] = false;
    sim.run(Duration::from_secs(15));
    assert_eq!(sim.downs_of(3).len(), 5, "{:?}", sim.events);
    // Well past the accusation lifetime, node 0 restarts: the accusers'
    // verdicts still stand in gossip, so it checks 3 and finds it down.
    sim.run(ACCUSATION_TTL + Duration::from_secs(30));
    sim.up[0] = false;
    sim.run(Duration::from_secs(1));
    sim.restart(0);
    sim.run(NEW_MEMBER_GRACE + Duration::from_secs(10));
    assert!(sim.nodes[0].is_down(&sim.keys[3]), "{:?}", sim.events);
    // Live members are not called down by the restarted node.
    for j in [1, 2, 4, 5] {
        assert!(!sim.nodes[0].is_down(&sim.keys[j]), "{j}: {:?}", sim.events);
    }
    // And once 3 is back, the accusations are withdrawn.
    sim.up[3] = true;
    sim.run(Duration::from_secs(15));
    assert!(sim.nodes.iter().all(|n| !n.is_down(&sim.keys[3])));
    assert!(sim
        .latest
        .iter()
        .filter_map(|(s, _)| s.as_ref())
        .all(|s| s.targets.iter().all(|t| t.node_key != sim.keys[3])));
}

/// How many times node `i` started accusing `target` (a published list
/// naming it after one that did not).
fn accusations_by(sim: &Sim, i: usize, target: usize) -> usize {
    let mut naming = false;
    let mut n = 0;
    for (p, s) in &sim.published {
        if *p != i {
            continue;
        }
        let now = s.targets.iter().any(|t| t.node_key == sim.keys[target]);
        if now && !naming {
            n += 1;
        }
        naming = now;
    }
    n
}

/// The nodes whose accusations of `victim` stand in gossip now.
fn accusers_of(sim: &Sim, victim: usize) -> Vec<usize> {
    (0..sim.nodes.len())
        .filter(|i| {
            sim.latest[*i]
                .0
                .as_ref()
                .is_some_and(|s| s.targets.iter().any(|t| t.node_key == sim.keys[victim]))
        })
        .collect()
}

/// The members whose accusations made everyone check a dead member
/// restart: their old accusations are withdrawn, members that hold the dead
/// one down take the accusation over, and the restarted accusers find the
/// dead member down too (soak_short: a restarted accuser showed it
/// `connecting` until the never-reached check).
#[test]
fn the_accusers_restart_and_still_see_the_dead_member_down() {
    let mut sim = Sim::new(6);
    sim.run(Duration::from_secs(5));
    sim.up[3] = false;
    sim.run(Duration::from_secs(15));
    assert_eq!(sim.downs_of(3).len(), 5, "{:?}", sim.events);
    let accusers = accusers_of(&sim, 3);
    assert!(!accusers.is_empty());
    let killed_at = Duration::from_secs(5);
    for a in &accusers {
        sim.up[*a] = false;
        sim.run(Duration::from_secs(1));
        sim.restart(*a);
    }
    sim.run(NEW_MEMBER_GRACE + HANDOFF_STEP * 6 + HANDOFF_JITTER + Duration::from_secs(5));
    let elapsed = sim.now - sim.t0;
    let unix_now = 1_000_000 + elapsed.as_millis() as u64;
    for a in &accusers {
        assert!(sim.nodes[*a].is_down(&sim.keys[3]), "{a}: {:?}", sim.events);
        // Known down since about the death (the first accusation, a few
        // seconds after it), not since the restart: forgotten with the rest.
        let known = sim.nodes[*a].down_for(&sim.keys[3], unix_now).unwrap();
        assert!(
            known + killed_at + Duration::from_secs(10) >= elapsed,
            "{a}: known down for {known:?}, {elapsed:?} into the run"
        );
    }
    assert!(!accusers_of(&sim, 3).is_empty());
    // Nobody live was called down on the way.
    assert!(sim
        .events
        .iter()
        .all(|(_, _, e)| !matches!(e, Event::Down(k) if *k != sim.keys[3])));
    // And when 3 comes back, every accusation of it is withdrawn.
    sim.up[3] = true;
    sim.run(Duration::from_secs(15));
    assert!(sim.nodes.iter().all(|n| !n.is_down(&sim.keys[3])));
    assert!(accusers_of(&sim, 3).is_empty());
}

/// The accusers of a dead member leave the mesh: a member that holds the
/// dead member down accuses it instead (their word left with them), and
/// only a few do.
#[test]
fn when_the_accusers_leave_another_member_takes_the_accusation_over() {
    let mut sim = Sim::new(8);
    sim.run(Duration::from_secs(5));
    sim.up[3] = false;
    sim.run(Duration::from_secs(15));
    let accusers = accusers_of(&sim, 3);
    assert!(!accusers.is_empty());
    // They leave: everyone else drops them from the members.
    let rest: Vec<PublicKeyBytes> = (0..8)
        .filter(|i| !accusers.contains(i))
        .map(|i| sim.keys[i])
        .collect();
    let v: Vec<MemberView> = views(&sim.keys, |_| true)
        .into_iter()
        .filter(|m| rest.contains(&m.key))
        .collect();
    let now = sim.now;
    for a in &accusers {
        sim.up[*a] = false;
        sim.latest[*a].0 = None;
    }
    for i in (0..8).filter(|i| !accusers.contains(i)) {
        sim.nodes[i].handle_members(now, &v);
    }
    assert!(accusers_of(&sim, 3).is_empty());
    sim.run(HANDOFF_STEP * 8 + HANDOFF_JITTER + GOSSIP_DELAY);
    let takers = accusers_of(&sim, 3);
    assert!(!takers.is_empty(), "{:?}", sim.events);
    // The nearest on the ring acts first; the others see it and do not.
    assert!(takers.len() <= 2, "{takers:?}");
}

/// Every machine overloaded (the testnet's 100 daemons on 2 cores): answers
/// take 1.5 s, event loops wake every 700 ms, gossip takes 3 s. Nobody live
/// is called down, and a kill is still seen.
#[test]
fn an_overloaded_mesh_does_not_call_live_members_down() {
    let mut sim = Sim::new(12);
    sim.ack_delay = Duration::from_millis(1500);
    sim.timers_every = Duration::from_millis(700);
    sim.gossip_delay = Duration::from_secs(3);
    sim.run(Duration::from_secs(300));
    let downs: Vec<_> = sim
        .events
        .iter()
        .filter(|(_, _, e)| matches!(e, Event::Down(_)))
        .collect();
    assert!(downs.is_empty(), "false downs: {downs:?}");
    let (observers, last) = sim.kill_and_watch(5, Duration::from_secs(120));
    assert_eq!(observers.len(), 11, "{:?}", sim.events);
    eprintln!("overloaded: kill seen by all after {last:?}");
    assert!(
        last <= Duration::from_secs(90),
        "last verdict after {last:?}"
    );
}

#[test]
fn a_member_that_comes_back_is_up_again() {
    let mut sim = Sim::new(5);
    sim.run(Duration::from_secs(5));
    sim.up[3] = false;
    sim.run(Duration::from_secs(15));
    assert_eq!(sim.downs_of(3).len(), 4);
    sim.up[3] = true;
    sim.run(Duration::from_secs(12));
    let ups = sim
        .events
        .iter()
        .filter(|(_, _, e)| *e == Event::Up(sim.keys[3]))
        .count();
    assert_eq!(ups, 4, "{:?}", sim.events);
    assert!(sim.nodes.iter().all(|n| !n.is_down(&sim.keys[3])));
}

#[test]
fn each_member_probes_about_once_a_second_whatever_the_size() {
    for n in [4, 30] {
        let mut sim = Sim::new(n);
        sim.run(Duration::from_secs(60));
        let per_node_per_sec = sim.pings_sent.iter().sum::<usize>() as f64 / n as f64 / 60.0;
        // 2 monitored targets every 4 s, plus a spot check every 30 s.
        assert!(
            (0.4..0.7).contains(&per_node_per_sec),
            "{n} nodes: {per_node_per_sec} probes/s per node"
        );
        for node in &sim.nodes {
            assert_eq!(node.monitored().count(), MONITORS.min(n - 1));
        }
    }
}

#[test]
fn answers_from_the_wrong_address_do_not_count() {
    let mut sim = Sim::new(3);
    sim.run(Duration::from_secs(1));
    let now = sim.now;
    let n = &mut sim.nodes[0];
    n.handle_timeout(now + Duration::from_secs(5), 1);
    let sent = n.poll_transmit();
    let (to, Probe::Ping { nonce, .. }) = sent[0].clone() else {
        panic!("no ping")
    };
    let other = if to == ip(1) { ip(2) } else { ip(1) };
    n.handle_ack(now, other, nonce, Summary::default());
    // Still pending: it times out.
    n.handle_timeout(now + Duration::from_secs(7), 1);
    assert!(!n.poll_transmit().is_empty(), "expected a retry");
}

#[test]
fn wire_values_round_trip_and_forgeries_fail() {
    let p = Probe::Ping {
        nonce: 7,
        summary: Summary { count: 3, hash: 9 },
        proof_for: None,
    };
    assert_eq!(Probe::decode(&p.encode()).unwrap(), p);
    for i in 0..64u8 {
        let _ = Probe::decode(&[2, i, 1, 2, 3]);
    }
    assert!(Probe::decode(&vec![2u8; 600]).is_err());
    let k = SigningKey::from_bytes(&[1; 32]);
    let pk = k.verifying_key().to_bytes();
    let a = Alive {
        network_key: NET,
        node_key: pk,
        issued_at_ms: 5,
        refutes: vec![Accusation {
            accuser: [3; 32],
            since_ms: 4,
        }],
    };
    let text = a.sign(&k);
    assert_eq!(verify_alive(&text, &NET, &pk).unwrap(), a);
    assert!(verify_alive(&text, &NET, &[4; 32]).is_err());
    assert!(verify_alive(&text, &[0; 32], &pk).is_err());
    let other = SigningKey::from_bytes(&[2; 32]);
    assert!(verify_alive(&a.sign(&other), &NET, &pk).is_err());
    let s = Suspicions {
        network_key: NET,
        accuser: pk,
        issued_at_ms: 5,
        targets: vec![Suspect {
            node_key: [3; 32],
            since_ms: 4,
        }],
    };
    assert_eq!(verify_suspicions(&s.sign(&k), &NET, &pk).unwrap(), s);
    assert!(verify_suspicions(&s.sign(&other), &NET, &pk).is_err());
}

/// An accusation that arrives before its target's record (gossip delivers
/// each member's state on its own) is acted on once the record arrives.
#[test]
fn an_accusation_before_its_targets_record_is_kept_until_the_record_comes() {
    let signer = |i: u8| SigningKey::from_bytes(&[i + 1; 32]);
    let keys: Vec<PublicKeyBytes> = (0..3u8)
        .map(|i| signer(i).verifying_key().to_bytes())
        .collect();
    let view = |i: usize| MemberView {
        key: keys[i],
        overlay_ip: ip(i),
        reachable: false,
        heard: false,
    };
    let now = Instant::now();
    let mut n = Liveness::new(NET, keys[0], 1);
    n.handle_members(now, &[view(0), view(1)]);
    let text = Suspicions {
        network_key: NET,
        accuser: keys[1],
        issued_at_ms: 5,
        targets: vec![Suspect {
            node_key: keys[2],
            since_ms: 4,
        }],
    }
    .sign(&signer(1));
    let entries = vec![crate::membership::GossipEntry {
        node_id: proto::node_id_string(&keys[1]).into(),
        record: None,
        seen: None,
        alive: None,
        suspects: Some(text.into()),
    }];
    let membership = crate::membership::Membership::new(keys[0], Duration::from_secs(60));
    let mut feed = ValueFeed::default();
    feed.feed(now, &mut n, &membership, &NET, &entries);
    n.handle_timeout(now, 10);
    assert!(n.poll_transmit().iter().all(|(to, _)| *to != ip(2)));
    // Node 2's record arrives; the same entries come again, unchanged.
    n.handle_members(now, &[view(0), view(1), view(2)]);
    feed.feed(now, &mut n, &membership, &NET, &entries);
    // The check waits NEW_MEMBER_GRACE after we learned of node 2.
    n.handle_timeout(now, 10);
    assert!(n.poll_transmit().iter().all(|(to, _)| *to != ip(2)));
    n.handle_timeout(now + NEW_MEMBER_GRACE, 10);
    assert!(
        n.poll_transmit().iter().any(|(to, _)| *to == ip(2)),
        "node 2 was not checked"
    );
}

/// Every member sees member 4 as never reached (no path, so nobody
/// monitors it and nobody accuses it).
fn sim_with_unreached_member() -> Sim {
    let mut sim = Sim::new(5);
    let views = views(&sim.keys, |j| j != 4);
    let now = sim.now;
    for n in sim.nodes.iter_mut() {
        n.handle_members(now, &views);
    }
    // Fresh targets for 4 on the others: rebuild them as never reached.
    for i in 0..4 {
        let mut fresh = Liveness::new(NET, sim.keys[i], 77 + i as u64);
        fresh.handle_members(now, &views);
        sim.nodes[i] = fresh;
    }
    sim
}

/// A member that died before we learned of it, with no accusation left
/// anywhere: checked once after NEVER_REACHED_CHECK (spread over
/// NEVER_REACHED_SPREAD) and found down.
#[test]
fn a_member_never_reached_and_dead_is_found_down() {
    let mut sim = sim_with_unreached_member();
    sim.up[4] = false;
    sim.run(NEVER_REACHED_CHECK - Duration::from_secs(5));
    assert!(sim.downs_of(4).is_empty(), "{:?}", sim.events);
    sim.run(NEVER_REACHED_SPREAD + Duration::from_secs(15));
    let observers: HashSet<usize> = sim.downs_of(4).iter().map(|(_, i)| *i).collect();
    assert_eq!(observers.len(), 4, "{:?}", sim.events);
    // Nobody else was called down.
    assert!(sim
        .events
        .iter()
        .all(|(_, _, e)| !matches!(e, Event::Down(k) if *k != sim.keys[4])));
}

/// A live member nobody has a path to (but gossip reaches) refutes the
/// check: our path is broken, it is not dead. The first check's refutation
/// is signed life: the others' checks wait until it is old, so one
/// accusation and one refutation go round, not one per node.
#[test]
fn a_member_never_reached_but_alive_refutes() {
    let mut sim = sim_with_unreached_member();
    for i in 0..4 {
        sim.cut.insert((i, 4));
        sim.cut.insert((4, i));
    }
    sim.run(NEVER_REACHED_CHECK + NEVER_REACHED_SPREAD + Duration::from_secs(30));
    assert!(sim.downs_of(4).is_empty(), "{:?}", sim.events);
    let broken: HashSet<usize> = sim.broken_reports(4).iter().map(|(_, i)| *i).collect();
    assert_eq!(broken.len(), 1, "{:?}", sim.events);
    // It refuted once, and no accusation of it stands.
    let (_, alive) = &sim.latest[4];
    assert!(alive.as_ref().is_some_and(|a| a.refutes.len() == 1));
    assert!(sim.latest[..4]
        .iter()
        .all(|(s, _)| s.as_ref().is_none_or(|s| s.targets.is_empty())));
}

/// A member found down that nobody accuses and that never answered us (its
/// state came back through gossip after everyone forgot it) is known down
/// since its newest signed value, so it is forgotten again at once; a
/// member that answered us and then died is known down since now.
#[test]
fn a_long_dead_member_seen_again_counts_from_its_last_value() {
    let mut sim = Sim::new(2);
    sim.up[1] = false;
    // Its newest signed value is ~1,000 s old (sim unix time starts at
    // 1,000,000 ms).
    let k1 = sim.keys[1];
    let now = sim.now;
    sim.nodes[0].handle_version(now, &k1, 1);
    sim.run(Duration::from_secs(20));
    assert!(sim.nodes[0].is_down(&k1), "{:?}", sim.events);
    let unix_now = 1_000_000 + (sim.now - sim.t0).as_millis() as u64;
    let known = sim.nodes[0].down_for(&k1, unix_now).unwrap();
    assert!(known > Duration::from_secs(900), "{known:?}");
    // Our own accusation carries that oldest known time, not the moment of
    // our check: a member that learns of the death later counts the forget
    // time from the same moment.
    let published = sim.latest[0].0.clone().expect("an accusation");
    let since = published
        .targets
        .iter()
        .find(|t| t.node_key == k1)
        .expect("member 1 accused")
        .since_ms;
    assert_eq!(since, 1, "the time of its newest value");

    let mut sim = Sim::new(2);
    let now = sim.now;
    sim.nodes[0].handle_version(now, &k1, 1);
    sim.run(Duration::from_secs(10));
    sim.up[1] = false;
    sim.run(Duration::from_secs(20));
    assert!(sim.nodes[0].is_down(&k1), "{:?}", sim.events);
    let unix_now = 1_000_000 + (sim.now - sim.t0).as_millis() as u64;
    let known = sim.nodes[0].down_for(&k1, unix_now).unwrap();
    assert!(known < Duration::from_secs(20), "{known:?}");
}

/// A member we only chose a path to (a relay carries it, say) but never
/// heard from is not "reached": when it is dead and no accusation reaches
/// us (here: gossip never arrives), the never-reached check still finds it
/// down. (Soak, session 13: a restarted node held a dead member
/// `connecting` for 300 s because its relayed path counted as reached.)
#[test]
fn a_member_with_a_chosen_path_but_never_heard_is_still_checked() {
    // 40 members, so that random spot probes (one member every 30 s) do
    // not find the dead one by luck within the check's time.
    let n = 40;
    let dead = n - 1;
    let mut sim = Sim::new(n);
    let now = sim.now;
    let views: Vec<MemberView> = views(&sim.keys, |_| true)
        .into_iter()
        .map(|mut v| {
            v.heard = v.key != sim.keys[dead];
            v
        })
        .collect();
    for i in 0..dead {
        let mut fresh = Liveness::new(NET, sim.keys[i], 300 + i as u64);
        fresh.handle_members(now, &views);
        sim.nodes[i] = fresh;
    }
    sim.up[dead] = false;
    sim.gossip_delay = Duration::from_secs(100_000);
    sim.run(NEVER_REACHED_CHECK + NEVER_REACHED_SPREAD + Duration::from_secs(15));
    let observers: HashSet<usize> = sim.downs_of(dead).iter().map(|(_, i)| *i).collect();
    assert_eq!(observers.len(), dead, "{:?}", sim.events);
}

/// A never-reached member that signed a value lately (it refuted, or
/// republished its record) was alive then: its check waits until that
/// value is NEVER_REACHED_CHECK old, then finds it down if it died.
#[test]
fn a_never_reached_member_that_signed_lately_is_checked_later() {
    let mut sim = sim_with_unreached_member();
    sim.up[4] = false;
    let k4 = sim.keys[4];
    // Signed 150 s into the run (sim unix time starts at 1,000,000 ms).
    let signed = 1_000_000 + 150_000;
    for i in 0..4 {
        let now = sim.now;
        sim.nodes[i].handle_version(now, &k4, signed);
    }
    // Past the first due time (120–180 s): not yet.
    sim.run(Duration::from_secs(265));
    assert!(sim.downs_of(4).is_empty(), "{:?}", sim.events);
    sim.run(Duration::from_secs(20));
    let observers: HashSet<usize> = sim.downs_of(4).iter().map(|(_, i)| *i).collect();
    assert_eq!(observers.len(), 4, "{:?}", sim.events);
}

/// Members whose path is chosen but does not work yet (a relay being set
/// up, a punch under way) are neither monitored nor spot-probed: their
/// probes could only fail, and each run of failures was an accusation and
/// a refutation gossiped to everyone while a mesh comes up. Once the paths
/// work, they are monitored.
#[test]
fn paths_still_coming_up_make_no_accusations() {
    let n = 10;
    let mut sim = Sim::new(n);
    let now = sim.now;
    let coming_up: Vec<MemberView> = views(&sim.keys, |_| true)
        .into_iter()
        .map(|mut v| {
            v.heard = false;
            v
        })
        .collect();
    for i in 0..n {
        let mut fresh = Liveness::new(NET, sim.keys[i], 500 + i as u64);
        fresh.handle_members(now, &coming_up);
        sim.nodes[i] = fresh;
    }
    for i in 0..n {
        for j in 0..n {
            sim.cut.insert((i, j));
        }
    }
    sim.run(Duration::from_secs(100));
    assert_eq!(
        sim.pings_sent.iter().sum::<usize>(),
        0,
        "{:?}",
        sim.pings_sent
    );
    assert!(sim.latest.iter().all(|(s, _)| s.is_none()), "an accusation");
    assert!(sim.events.is_empty(), "{:?}", sim.events);
    // The paths come up: monitoring starts, nobody is accused.
    sim.cut.clear();
    let now = sim.now;
    let working = views(&sim.keys, |_| true);
    for node in sim.nodes.iter_mut() {
        node.handle_members(now, &working);
    }
    sim.run(Duration::from_secs(20));
    assert!(sim.nodes.iter().all(|x| x.monitored().count() == MONITORS));
    assert!(
        sim.pings_sent.iter().all(|p| *p > 0),
        "{:?}",
        sim.pings_sent
    );
    assert!(sim.events.is_empty(), "{:?}", sim.events);
}

/// One node's view: node 1 accuses node 2, which never answers our probes
/// (busy) and never refutes (it never saw the accusation): a withdrawal by
/// the accuser ends our check; without it, node 2 would be down.
#[test]
fn a_withdrawn_accusation_ends_the_checks_on_its_word() {
    let keys: Vec<PublicKeyBytes> = (0..4)
        .map(|i| {
            SigningKey::from_bytes(&[i as u8 + 1; 32])
                .verifying_key()
                .to_bytes()
        })
        .collect();
    let accuse = |targets: Vec<Suspect>| Suspicions {
        network_key: NET,
        accuser: keys[1],
        issued_at_ms: 1,
        targets,
    };
    let run = |withdraw: bool| -> Vec<Event> {
        let t0 = Instant::now();
        let mut l = Liveness::new(NET, keys[0], 3);
        l.handle_members(t0, &views(&keys, |_| true));
        let mut now = t0 + NEW_MEMBER_GRACE + Duration::from_secs(1);
        l.handle_suspicions(
            now,
            &accuse(vec![Suspect {
                node_key: keys[2],
                since_ms: 1_010_000,
            }]),
        );
        let mut events = Vec::new();
        let end = now + Duration::from_secs(10);
        let mut withdrawn = false;
        while now < end {
            now += STEP;
            if withdraw && !withdrawn && now >= t0 + NEW_MEMBER_GRACE + Duration::from_millis(2500)
            {
                // The accuser got an answer: its list no longer names 2.
                l.handle_suspicions(now, &accuse(Vec::new()));
                withdrawn = true;
            }
            l.handle_timeout(now, 1_000_000 + (now - t0).as_millis() as u64);
            // Probes to 2 go unanswered; the others answer.
            for (to, probe) in l.poll_transmit() {
                if let Probe::Ping { nonce, .. } = probe {
                    if to != ip(2) {
                        l.handle_ack(now, to, nonce, Summary::default());
                    }
                }
            }
            while let Some(e) = l.poll_event() {
                events.push(e);
            }
        }
        events
    };
    assert_eq!(run(false), vec![Event::Down(keys[2])]);
    assert_eq!(run(true), Vec::<Event>::new());
}

/// A member whose probes go unanswered (too busy to answer through its
/// tunnels in time, or its tunnels are what fails) but that answers gossip
/// rounds on its own connection is not called down: monitors do not
/// accuse it, checkers' failed probes end at its answer. Answering again
/// and then killed, it is down everywhere within ten seconds.
#[test]
fn a_member_that_answers_gossip_is_not_called_down_for_missed_probes() {
    let mut sim = Sim::new(10);
    sim.rounds = Some(false);
    sim.run(Duration::from_secs(5));
    for i in 0..10 {
        sim.cut.insert((i, 3));
    }
    // Someone accuses it too (as a monitor whose rounds did not get
    // through would): every checker's probes fail.
    let lie = Suspicions {
        network_key: NET,
        accuser: sim.keys[7],
        issued_at_ms: 1,
        targets: vec![Suspect {
            node_key: sim.keys[3],
            since_ms: 1_005_000,
        }],
    };
    sim.in_flight.push((sim.now, 7, Published::Suspicions(lie)));
    sim.run(Duration::from_secs(40));
    assert!(sim.downs_of(3).is_empty(), "{:?}", sim.events);
    // Answers over the underlay with failed probes: our tunnel is what
    // fails, which the path logic hears of.
    assert!(!sim.broken_reports(3).is_empty(), "{:?}", sim.events);
    // Its monitors heard it and accused nobody.
    assert!(
        sim.nodes
            .iter()
            .enumerate()
            .all(|(i, n)| i == 7 || !n.accusing.contains_key(&sim.keys[3])),
        "an accusation of a member that answers rounds"
    );
    // It answers probes again, then dies: down everywhere within ten
    // seconds.
    sim.cut.clear();
    sim.run(Duration::from_secs(10));
    let (observers, last) = sim.kill_and_watch(3, Duration::from_secs(15));
    assert_eq!(observers.len(), 9, "{:?}", sim.downs_of(3));
    assert!(
        last <= Duration::from_secs(10),
        "last verdict after {last:?}"
    );
}

/// Heard through the tunnel itself, a failed check says nothing about the
/// path: no [`Event::PathBroken`] (which would move the pair to a relay).
#[test]
fn heard_through_the_tunnel_the_path_is_not_called_broken() {
    let mut sim = Sim::new(6);
    sim.rounds = Some(true);
    sim.run(Duration::from_secs(5));
    for i in 0..6 {
        sim.cut.insert((i, 2));
    }
    sim.run(Duration::from_secs(30));
    assert!(sim.downs_of(2).is_empty(), "{:?}", sim.events);
    assert!(sim.broken_reports(2).is_empty(), "{:?}", sim.events);
}

/// Every member's path to member 7 stops working (a partition, a NAT that
/// dropped its mappings): nobody can monitor it any more. It then dies. A
/// member whose path went silent is checked by each node that once reached
/// it, so the death is still found (soak_short in CI: a member killed while
/// partitioned off was monitored by nobody and shown `connected` by three
/// members 82 s later).
#[test]
fn a_member_that_dies_after_every_path_to_it_stopped_working_is_found_down() {
    let n = 8;
    let victim = n - 1;
    let mut sim = Sim::new(n);
    sim.run(Duration::from_secs(10));
    assert!(sim.events.is_empty(), "{:?}", sim.events);
    sim.silence_paths_to(victim);
    // Alive a little longer (gossip still carries its refutations) ...
    sim.run(Duration::from_secs(3));
    // ... then killed.
    let (observers, last) = sim.kill_and_watch(victim, Duration::from_secs(90));
    assert_eq!(observers.len(), victim, "{:?}", sim.events);
    assert!(
        last <= Duration::from_secs(60),
        "last verdict after {last:?}"
    );
    assert!(sim
        .events
        .iter()
        .all(|(_, _, e)| !matches!(e, Event::Down(k) if *k != sim.keys[victim])));
}

/// A live member that no node has a working path to (but gossip reaches):
/// the silence checks find the path broken, not the member dead, and come
/// back ever more rarely (the broken-path backoff), not every few seconds.
#[test]
fn a_live_member_behind_paths_that_stay_broken_is_checked_ever_more_rarely() {
    let n = 8;
    let far = n - 1;
    let mut sim = Sim::new(n);
    sim.run(Duration::from_secs(10));
    sim.silence_paths_to(far);
    sim.run(Duration::from_secs(300));
    assert!(sim.downs_of(far).is_empty(), "{:?}", sim.events);
    for i in 0..far {
        let checks = accusations_by(&sim, i, far);
        // Quiet for 30, 60, 120 s after each: at most 5 in 300 s.
        assert!((1..=5).contains(&checks), "node {i}: {checks}");
    }
    // The silence checks report no broken path (the path logic knows it
    // already): no path reset from them.
    assert!(sim.broken_reports(far).is_empty(), "{:?}", sim.events);
}

/// A member that accuses us removes (or will remove) its WireGuard peer for
/// us, which explains our path to it breaking: no silence check of it while
/// its accusation stands (under load each false verdict made its victim
/// accuse the judge in turn); once it withdraws, the silence counts again.
#[test]
fn a_member_that_accuses_us_is_not_checked_for_the_silence_it_causes() {
    let keys: Vec<PublicKeyBytes> = (0..2u8)
        .map(|i| {
            SigningKey::from_bytes(&[i + 1; 32])
                .verifying_key()
                .to_bytes()
        })
        .collect();
    let t0 = Instant::now();
    let mut n = Liveness::new(NET, keys[0], 7);
    let view = |heard: bool| {
        vec![MemberView {
            key: keys[1],
            overlay_ip: ip(1),
            reachable: true,
            heard,
        }]
    };
    n.handle_members(t0, &view(true));
    n.handle_members(t0 + Duration::from_secs(1), &view(false));
    let accusing = |targets: Vec<Suspect>| Suspicions {
        network_key: NET,
        accuser: keys[1],
        issued_at_ms: 5,
        targets,
    };
    n.handle_suspicions(
        t0 + Duration::from_secs(2),
        &accusing(vec![Suspect {
            node_key: keys[0],
            since_ms: 4,
        }]),
    );
    let probes_to_1 = |n: &mut Liveness, at: Instant| {
        n.handle_timeout(at, 10);
        n.poll_transmit()
            .iter()
            .filter(|(to, _)| *to == ip(1))
            .count()
    };
    let mut at = t0 + Duration::from_secs(2);
    while at < t0 + Duration::from_secs(60) {
        at += Duration::from_millis(500);
        assert_eq!(probes_to_1(&mut n, at), 0, "checked at {:?}", at - t0);
    }
    // Withdrawn: silent since t0 + 1 s, so checked at once.
    n.handle_suspicions(at, &accusing(Vec::new()));
    at += Duration::from_millis(500);
    assert_eq!(probes_to_1(&mut n, at), 1);
}

/// A live member whose path to us comes back and goes silent again and
/// again (relayed paths at rest in a mixed mesh): its silence checks back
/// off across the flaps (an answer in between does not reset it), instead
/// of one accusation, and its refutation, per flap.
#[test]
fn a_path_that_keeps_flapping_is_not_checked_at_every_silence() {
    let n = 4;
    let mut sim = Sim::new(n);
    sim.run(Duration::from_secs(5));
    let working = views(&sim.keys, |_| true);
    let silent: Vec<MemberView> = views(&sim.keys, |_| true)
        .into_iter()
        .map(|mut v| {
            v.heard = v.key != sim.keys[1];
            v
        })
        .collect();
    for _ in 0..8 {
        // 35 s silent, then 5 s working.
        let now = sim.now;
        sim.nodes[0].handle_members(now, &silent);
        sim.cut.insert((0, 1));
        sim.cut.insert((1, 0));
        sim.run(Duration::from_secs(35));
        let now = sim.now;
        sim.nodes[0].handle_members(now, &working);
        sim.cut.clear();
        sim.run(Duration::from_secs(5));
    }
    // 320 s, 8 silences of 35 s: backoff 30, 60, 120 s after each check.
    let checks = accusations_by(&sim, 0, 1);
    assert!((1..=4).contains(&checks), "{checks}");
    assert!(sim.downs_of(1).is_empty(), "{:?}", sim.events);
}
