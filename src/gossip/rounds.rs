//! When to gossip, and with whom (sans-IO; proto/PROTOCOL.md §4.5).
//!
//! * **Busy**: for [`BUSY_FOR`] after the state changed (our value, or a
//!   new one from anyone), a round every [`BUSY_EVERY`] with
//!   [`BUSY_FANOUT`] random members ([`SMALL_FANOUT`] in meshes of up to
//!   [`SMALL_MESH`]): news spreads by infection, and whoever learns it
//!   spreads it in turn. In larger meshes the two are drawn from
//!   [`PARTNERS`] partners, one swapped for a random member every
//!   [`PARTNER_SWAP_EVERY`] busy rounds: a new member drawn is a new QUIC
//!   connection (see `RoundPlanner::refresh_partners`). The first busy round
//!   after a quiet spell still draws from everyone (see `RoundPlanner::fresh`).
//! * **At rest**: one round every [`REST_EVERY`] with a fixed partner (our
//!   first gossip partner when we have partners, over the connection the
//!   busy rounds opened; else our first monitoring target); nothing else.
//!   Divergence at rest is found by liveness probes, which carry
//!   summaries: a mismatch asks for a round with that member at once
//!   ([`RoundPlanner::handle_mismatch`], at most one per member per
//!   [`MISMATCH_GAP`]).
//! * **Alone** (no member reachable yet): rounds to the seeds and the
//!   members known from last time, backing off from 1 s to 30 s.
//! * **Recently down**: members we called down less than
//!   [`GOSSIP_TO_THE_DOWN`] ago ([`down_targets`]) stay among those busy
//!   rounds draw from, and a probe mismatch with one of them is a round too
//!   (memberlist's "gossip to the dead"). A member called down falsely
//!   (cut off by a partition, or too busy to answer in time) learns of the
//!   accusation from us and refutes it, and its refutation comes back the
//!   same way: without it, nobody on either side of a healed partition
//!   gossiped with the other (each held the other down) until its own
//!   recheck, every 10 s per pair.
//! * **Strangers**: seeds and last-known members that no current member
//!   holds (a node restarted while cut off, then joined by others, forms a
//!   mesh of its own that thinks it is whole): one of them gets a round
//!   every [`STRANGER_EVERY`], so two such meshes merge. In a whole mesh
//!   every seed is a member, and this costs nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::membership::{on_local_net, Liveness, Membership};
use crate::proto::PublicKeyBytes;
use crate::record::NatKind;

pub const BUSY_FOR: Duration = Duration::from_secs(3);
pub const BUSY_EVERY: Duration = Duration::from_millis(250);
pub const BUSY_FANOUT: usize = 2;
pub const SMALL_FANOUT: usize = 3;
pub const SMALL_MESH: usize = 30;
/// The fanout of the first busy round after our own record changed (a
/// start, a join, a new endpoint): our news starts from this many members
/// at once instead of two, which saves about two rounds of infection
/// (flat 40: a new member's record reached the last member 0.9 s after its
/// start, 3 to 4 rounds of 250 ms).
pub const ANNOUNCE_FANOUT: usize = 8;
/// Busy rounds in meshes of more than [`SMALL_MESH`] draw from this many
/// partners, not from every member (see [`RoundPlanner::poll`]).
pub const PARTNERS: usize = 8;
/// One busy round in this many swaps one partner for a random member.
pub const PARTNER_SWAP_EVERY: u32 = 16;
pub const REST_EVERY: Duration = Duration::from_secs(30);
pub const MISMATCH_GAP: Duration = Duration::from_secs(1);
/// How long after we called a member down our rounds still visit it (see
/// the module doc); the member's WireGuard peer is kept as long
/// (`membership::DEFAULT_DOWN_GRACE`), so a path to it remains.
pub const GOSSIP_TO_THE_DOWN: Duration = Duration::from_secs(60);
const ALONE_FIRST: Duration = Duration::from_secs(1);
const ALONE_MAX: Duration = Duration::from_secs(30);
pub const STRANGER_EVERY: Duration = Duration::from_secs(30);

/// A member we can gossip with, and the address to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub key: PublicKeyBytes,
    pub addr: SocketAddr,
}

/// Members we can gossip with now, and the address to use (PROTOCOL §4.5):
/// the gossip address of members reachable there (public, or on one of
/// `local_nets`), else `overlay_ip:gossip_port` when a WireGuard path to it
/// works (`path_up`, by WireGuard key) and it holds its address here.
pub fn round_targets(
    membership: &Membership,
    me: &PublicKeyBytes,
    local_nets: &[ipnet::Ipv4Net],
    path_up: &dyn Fn(&[u8; 32]) -> bool,
) -> Vec<Target> {
    membership
        .members()
        .filter(|m| &m.record.node_key != me && m.liveness == Liveness::Live)
        .filter_map(|m| target_of(m, membership, local_nets, path_up))
        .collect()
}

/// How long after a member's last gossip message on a connection of ours
/// our rounds to it still take that connection (see [`prefer_underlay`]):
/// well inside the 30 s a NAT keeps an idle UDP mapping at the least.
pub const REUSE_WITHIN: Duration = Duration::from_secs(20);

/// Rounds to members we would reach over the overlay (an address in
/// `overlay`) go instead on the underlay connection their gossip came on
/// lately (`recent`: its remote address, as the transport knows it): a
/// member behind NAT that opened a connection to us is reached through it,
/// without WireGuard and often without a relay. In the come-up of mixed
/// 100, gossip through WireGuard was 90 k of 230 k datagrams (30 MB), each
/// one encrypted twice and sometimes relayed, and rounds opened a second
/// QUIC connection (a TLS handshake more) to members already connected to
/// us. Targets reached on the underlay already, and connections that came
/// through the overlay, are left as they are.
pub fn prefer_underlay(
    targets: &mut [Target],
    overlay: ipnet::Ipv4Net,
    recent: &dyn Fn(&PublicKeyBytes) -> Option<SocketAddr>,
) {
    let in_overlay = |a: &SocketAddr| match a.ip() {
        std::net::IpAddr::V4(ip) => overlay.contains(&ip),
        std::net::IpAddr::V6(_) => false,
    };
    for t in targets.iter_mut() {
        if !in_overlay(&t.addr) {
            continue;
        }
        if let Some(a) = recent(&t.key).filter(|a| !in_overlay(a)) {
            t.addr = a;
        }
    }
}

/// Members we called down less than [`GOSSIP_TO_THE_DOWN`] before `now`
/// and can still gossip with (addresses as for [`round_targets`]).
pub fn down_targets(
    membership: &Membership,
    now: Instant,
    local_nets: &[ipnet::Ipv4Net],
    path_up: &dyn Fn(&[u8; 32]) -> bool,
) -> Vec<Target> {
    membership
        .members()
        .filter(|m| match m.liveness {
            Liveness::Down { since, .. } => {
                now.saturating_duration_since(since) < GOSSIP_TO_THE_DOWN
            }
            _ => false,
        })
        .filter_map(|m| target_of(m, membership, local_nets, path_up))
        .collect()
}

fn target_of(
    m: &crate::membership::Member,
    membership: &Membership,
    local_nets: &[ipnet::Ipv4Net],
    path_up: &dyn Fn(&[u8; 32]) -> bool,
) -> Option<Target> {
    let r = &m.record;
    let underlay = r.nat == NatKind::Public || on_local_net(local_nets, &r.gossip_addr);
    let addr = if underlay {
        r.gossip_addr
    } else if path_up(&r.wg_public_key) && membership.holds_address(&r.node_key) {
        SocketAddr::new(std::net::IpAddr::V4(r.overlay_ip), r.gossip_addr.port())
    } else {
        return None;
    };
    Some(Target {
        key: r.node_key,
        addr,
    })
}

/// The rest-time partner: our first monitoring target, if we can gossip
/// with it.
pub fn rest_partner<'a>(
    mut monitored: impl Iterator<Item = &'a PublicKeyBytes>,
    targets: &[Target],
) -> Option<Target> {
    monitored
        .next()
        .and_then(|k| targets.iter().find(|t| &t.key == k).copied())
}

pub struct RoundPlanner {
    last_changes: u64,
    busy_until: Option<Instant>,
    next_busy: Option<Instant>,
    next_rest: Option<Instant>,
    mismatches: Vec<PublicKeyBytes>,
    last_mismatch: HashMap<PublicKeyBytes, Instant>,
    alone_backoff: Duration,
    next_alone: Option<Instant>,
    next_stranger: Option<Instant>,
    /// Our own record changed: the next busy round goes to
    /// [`ANNOUNCE_FANOUT`] members.
    announce: bool,
    /// Members called down lately ([`down_targets`]).
    down: Vec<Target>,
    /// The members busy rounds draw from in a large mesh (see
    /// [`PARTNERS`]), and the busy rounds since the last swap.
    partners: Vec<PublicKeyBytes>,
    since_swap: u32,
    /// The next busy round is the first after a quiet spell: it draws from
    /// every member, not from the partners. News to a mesh at rest (an
    /// accusation, a join, a leave) then starts from random members, which
    /// reach the uninformed faster (simulated, 300 members, 3 × 20 kills:
    /// a kill seen by all 9.2 s on average this way, 10.1 s with partners
    /// only, 9.0 s with random rounds only), while a come-up, where a node
    /// stays busy for many rounds in a row, keeps to its partners.
    fresh: bool,
    rng: SmallRng,
}

impl RoundPlanner {
    pub fn new(seed: u64) -> Self {
        RoundPlanner {
            last_changes: 0,
            busy_until: None,
            next_busy: None,
            next_rest: None,
            mismatches: Vec::new(),
            last_mismatch: HashMap::new(),
            alone_backoff: ALONE_FIRST,
            next_alone: None,
            next_stranger: None,
            // A node that starts has news: its record.
            announce: true,
            down: Vec::new(),
            partners: Vec::new(),
            since_swap: 0,
            fresh: true,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// The state's change counter (see `chitchat::Chitchat::changes`): a new
    /// value makes us busy.
    pub fn handle_changes(&mut self, now: Instant, changes: u64) {
        if changes != self.last_changes {
            self.last_changes = changes;
            self.become_busy(now, now + BUSY_EVERY);
        }
    }

    /// Busy for [`BUSY_FOR`] from `now`; the next busy round comes now
    /// unless one is already due by `latest`.
    fn become_busy(&mut self, now: Instant, latest: Instant) {
        if !self.busy(now) {
            self.fresh = true;
        }
        self.busy_until = Some(now + BUSY_FOR);
        if self.next_busy.is_none_or(|t| t > latest) {
            self.next_busy = Some(now);
        }
    }

    /// We published a new version of our own record: the next busy round
    /// announces it widely (and we are busy, as with any change).
    pub fn handle_own_news(&mut self, now: Instant) {
        self.announce = true;
        self.become_busy(now, now);
    }

    /// The members called down lately that we can gossip with
    /// ([`down_targets`]): busy rounds draw from them as from live members,
    /// and probe mismatches with them are rounds too.
    pub fn handle_down(&mut self, down: Vec<Target>) {
        self.down = down;
    }

    /// A probe answer carried a summary other than ours.
    pub fn handle_mismatch(&mut self, key: PublicKeyBytes) {
        if !self.mismatches.contains(&key) {
            self.mismatches.push(key);
        }
    }

    pub fn busy(&self, now: Instant) -> bool {
        self.busy_until.is_some_and(|t| now < t)
    }

    /// The rounds to start now: addresses, each at most once. `targets` are
    /// the members we can reach; `partner` the rest-time partner;
    /// `bootstrap` the seeds and last-known members that no current member
    /// holds: all of them while `targets` is empty, else one every
    /// [`STRANGER_EVERY`].
    pub fn poll(
        &mut self,
        now: Instant,
        targets: &[Target],
        partner: Option<Target>,
        bootstrap: &[SocketAddr],
    ) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        let add = |a: SocketAddr, out: &mut Vec<SocketAddr>| {
            if !out.contains(&a) {
                out.push(a);
            }
        };
        if targets.is_empty() {
            if self.next_alone.is_none_or(|t| now >= t) {
                for a in bootstrap {
                    add(*a, &mut out);
                }
                self.next_alone = Some(now + self.alone_backoff);
                self.alone_backoff = (self.alone_backoff * 2).min(ALONE_MAX);
            }
            self.mismatches.clear();
            // Nobody to be busy with: the busy round is not due again
            // before its time (a due time left in the past made
            // `poll_timeout` wake the loop at once, again and again: a lone
            // node spun a core for the 3 s after each change).
            if self.next_busy.is_some_and(|t| now >= t) {
                self.next_busy = Some(now + BUSY_EVERY);
            }
            return out;
        }
        self.alone_backoff = ALONE_FIRST;
        self.next_alone = None;
        // Strangers: another mesh we may be cut off from.
        let strangers: Vec<SocketAddr> = bootstrap
            .iter()
            .filter(|a| !targets.iter().any(|t| t.addr == **a))
            .copied()
            .collect();
        if strangers.is_empty() {
            self.next_stranger = None;
        } else {
            match self.next_stranger {
                None => self.next_stranger = Some(now + STRANGER_EVERY),
                Some(at) if now >= at => {
                    self.next_stranger = Some(now + STRANGER_EVERY);
                    if let Some(a) = strangers.choose(&mut self.rng) {
                        add(*a, &mut out);
                    }
                }
                Some(_) => {}
            }
        }
        // Mismatches found by probes.
        for key in std::mem::take(&mut self.mismatches) {
            if self
                .last_mismatch
                .get(&key)
                .is_some_and(|t| now.saturating_duration_since(*t) < MISMATCH_GAP)
            {
                continue;
            }
            if let Some(t) = targets.iter().chain(&self.down).find(|t| t.key == key) {
                self.last_mismatch.insert(key, now);
                add(t.addr, &mut out);
            }
        }
        if self.last_mismatch.len() > 4 * targets.len() + 16 {
            self.last_mismatch
                .retain(|_, t| now.saturating_duration_since(*t) < MISMATCH_GAP);
        }
        // Busy rounds.
        if self.busy(now) && self.next_busy.is_some_and(|t| now >= t) {
            let mut fanout = if targets.len() <= SMALL_MESH {
                SMALL_FANOUT
            } else {
                BUSY_FANOUT
            };
            if std::mem::take(&mut self.announce) {
                fanout = fanout.max(ANNOUNCE_FANOUT);
            }
            // Members called down lately are drawn as any other: a share
            // of their own. (One extra round to one of them in every busy
            // round piled rounds on a busy member that many held down,
            // and the simulation of an overloaded mesh had twice the false
            // verdicts.)
            // The first busy round after a quiet spell draws from
            // everyone (see `fresh`).
            let fresh = std::mem::take(&mut self.fresh);
            let pool: Vec<&Target> = if targets.len() <= SMALL_MESH || fresh {
                targets.iter().chain(&self.down).collect()
            } else {
                self.refresh_partners(targets);
                let partners = &self.partners;
                targets
                    .iter()
                    .filter(|t| partners.contains(&t.key))
                    .chain(&self.down)
                    .collect()
            };
            for t in pool.choose_multiple(&mut self.rng, fanout) {
                add(t.addr, &mut out);
            }
            self.next_busy = Some(now + BUSY_EVERY);
        }
        // The rest round.
        match self.next_rest {
            None => self.next_rest = Some(now + REST_EVERY),
            Some(at) if now >= at => {
                self.next_rest = Some(now + REST_EVERY);
                // Our first gossip partner, whose connection the busy
                // rounds opened, when we have partners: the monitoring
                // target mostly had none, and a TLS handshake for a round
                // every 30 s was most of a node's bytes at rest (flat 40:
                // 590-606 B/s median per node against 332-337 B/s).
                let gossip_partner = self
                    .partners
                    .first()
                    .and_then(|k| targets.iter().find(|t| &t.key == k))
                    .copied();
                if let Some(p) = gossip_partner
                    .or(partner)
                    .or_else(|| targets.choose(&mut self.rng).copied())
                {
                    add(p.addr, &mut out);
                }
            }
            Some(_) => {}
        }
        out
    }

    /// Keeps [`PARTNERS`] partners among `targets` (more than
    /// [`SMALL_MESH`] of them): partners no longer among them are replaced,
    /// and every [`PARTNER_SWAP_EVERY`] busy rounds one is swapped for a
    /// random member, so the partners drift over the whole mesh (a member
    /// behind NAT first reaches only public members) and the graph of
    /// partners stays random.
    ///
    /// Why partners: each member drawn at random from all is a new QUIC
    /// connection (a TLS handshake on both sides, about ten datagrams);
    /// in the come-up of mixed 100 every node ended with a connection to
    /// nearly every other (97 on average), made while the machine was
    /// saturated. Random partners spread news about as fast: a random
    /// graph of degree 8 has a diameter of about log N / log 8.
    fn refresh_partners(&mut self, targets: &[Target]) {
        let is_target = |k: &PublicKeyBytes| targets.iter().any(|t| &t.key == k);
        self.partners.retain(is_target);
        self.since_swap += 1;
        if self.since_swap >= PARTNER_SWAP_EVERY && !self.partners.is_empty() {
            self.since_swap = 0;
            let i = self.rng.gen_range(0..self.partners.len());
            self.partners.swap_remove(i);
        }
        let want = PARTNERS.min(targets.len());
        while self.partners.len() < want {
            // More than SMALL_MESH targets and at most PARTNERS partners:
            // a few draws find one that is not a partner yet.
            let t = targets[self.rng.gen_range(0..targets.len())].key;
            if !self.partners.contains(&t) {
                self.partners.push(t);
            }
        }
    }

    /// When [`RoundPlanner::poll`] has something to do next (a mismatch is
    /// handled at the next poll).
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        let mut next = self.next_rest.unwrap_or(now + REST_EVERY);
        if self.busy(now) {
            if let Some(b) = self.next_busy {
                next = next.min(b);
            }
        }
        if let Some(a) = self.next_alone {
            next = next.min(a);
        }
        if let Some(a) = self.next_stranger {
            next = next.min(a);
        }
        if !self.mismatches.is_empty() {
            next = now;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_targets_take_the_connection_their_gossip_came_on() {
        let overlay: ipnet::Ipv4Net = "10.77.0.0/16".parse().unwrap();
        let nat = Target {
            key: [1; 32],
            addr: "10.77.0.5:51821".parse().unwrap(),
        };
        let public = Target {
            key: [2; 32],
            addr: "198.18.0.2:51821".parse().unwrap(),
        };
        let quiet = Target {
            key: [3; 32],
            addr: "10.77.0.6:51821".parse().unwrap(),
        };
        let mapped: SocketAddr = "198.18.4.1:40000".parse().unwrap();
        let mut targets = vec![nat, public, quiet];
        prefer_underlay(&mut targets, overlay, &|k| match k[0] {
            // Its gossip came from its NAT's public address: reused.
            1 => Some(mapped),
            // A public member that reached us through the overlay: its
            // gossip address stays (the underlay is cheaper).
            2 => Some("10.77.0.2:51821".parse().unwrap()),
            // Heard only through the overlay: stays there.
            _ => Some("10.77.0.6:51821".parse().unwrap()),
        });
        assert_eq!(targets[0].addr, mapped);
        assert_eq!(targets[1].addr, public.addr);
        assert_eq!(targets[2].addr, quiet.addr);
        // Nothing heard lately: the overlay.
        let mut targets = vec![nat];
        prefer_underlay(&mut targets, overlay, &|_| None);
        assert_eq!(targets[0].addr, nat.addr);
    }

    fn targets(n: usize) -> Vec<Target> {
        (0..n)
            .map(|i| Target {
                key: [i as u8; 32],
                addr: SocketAddr::from(([192, 0, 2, i as u8 + 1], 51821)),
            })
            .collect()
    }

    /// Drives the planner as the daemon's loop does (sleep until
    /// `poll_timeout`, then `poll`) for `secs` simulated seconds with a
    /// change at the start; returns how often the loop woke up.
    fn wakeups(p: &mut RoundPlanner, t0: Instant, secs: u64, ts: &[Target]) -> usize {
        let end = t0 + Duration::from_secs(secs);
        let mut now = t0;
        p.handle_changes(now, 1);
        let mut n = 0;
        while now < end && n < 100_000 {
            p.poll(now, ts, ts.first().copied(), &[]);
            n += 1;
            now = p.poll_timeout(now).max(now);
        }
        n
    }

    #[test]
    fn a_node_with_nobody_to_gossip_with_does_not_spin() {
        // Alone (a lone seed, or every member out of reach): was 100,000
        // wake-ups at the same instant (the busy round's due time stayed in
        // the past); now about one per busy round and the alone backoff.
        let t0 = Instant::now();
        let n = wakeups(&mut RoundPlanner::new(1), t0, 10, &[]);
        assert!(n <= 30, "{n} wake-ups in 10 s alone");
        let n = wakeups(&mut RoundPlanner::new(1), t0, 10, &targets(5));
        assert!(n <= 30, "{n} wake-ups in 10 s with members");
    }

    /// Rounds started over `secs` seconds, polled every 50 ms.
    fn run(p: &mut RoundPlanner, t0: Instant, secs: u64, ts: &[Target]) -> usize {
        let mut n = 0;
        for i in 0..secs * 20 {
            n += p
                .poll(t0 + Duration::from_millis(i * 50), ts, Some(ts[0]), &[])
                .len();
        }
        n
    }

    #[test]
    fn busy_after_a_change_then_quiet() {
        let ts = targets(10);
        let t0 = Instant::now();
        let mut p = RoundPlanner::new(1);
        p.handle_changes(t0, 5);
        let busy = run(&mut p, t0, 3, &ts);
        // 12 busy rounds of 3 (small mesh), give or take the first; the
        // first announces our record (a fresh node has news) to 8.
        assert!((38..=44).contains(&busy), "{busy}");
        // Then at rest: one round per REST_EVERY.
        let t1 = t0 + Duration::from_secs(3);
        let rest = run(&mut p, t1, 120, &ts);
        assert!((3..=4).contains(&rest), "{rest}");
        // The same counter again is no news.
        p.handle_changes(t1, 5);
        assert!(!p.busy(t1));
    }

    #[test]
    fn large_meshes_use_a_smaller_fanout() {
        let ts = targets(100);
        let t0 = Instant::now();
        let mut p = RoundPlanner::new(1);
        p.handle_changes(t0, 1);
        // A fresh node first announces its record widely...
        let out = p.poll(t0, &ts, None, &[]);
        assert_eq!(out.len(), ANNOUNCE_FANOUT);
        // ... then busy rounds go to two.
        let out = p.poll(t0 + BUSY_EVERY, &ts, None, &[]);
        assert_eq!(out.len(), BUSY_FANOUT);
        // A new version of our own record is announced again, at once.
        let t1 = t0 + BUSY_EVERY + Duration::from_millis(10);
        p.handle_own_news(t1);
        assert!(p.poll_timeout(t1) <= t1);
        let out = p.poll(t1, &ts, None, &[]);
        assert_eq!(out.len(), ANNOUNCE_FANOUT);
        assert_eq!(p.poll(t1 + BUSY_EVERY, &ts, None, &[]).len(), BUSY_FANOUT);
    }

    /// In a large mesh busy rounds go to a few partners (one connection
    /// each, not one per member drawn), swapped slowly: over a minute of
    /// busy rounds a node reaches a couple of dozen members, not all 200
    /// (the first round after a quiet spell excepted).
    /// A partner that is no longer a target is replaced at once, and over
    /// a long time every member gets its turn.
    #[test]
    fn busy_rounds_in_a_large_mesh_go_to_a_few_partners() {
        let mut ts = targets(200);
        let t0 = Instant::now();
        let mut p = RoundPlanner::new(7);
        // The rest round (every 30 s) goes to a partner of its own.
        let rest = ts.last().copied();
        let mut reached = std::collections::HashSet::new();
        let busy_rounds = 240u32; // a minute of busy rounds
        for i in 0..busy_rounds {
            let now = t0 + BUSY_EVERY * i;
            p.handle_changes(now, u64::from(i) + 1);
            let out = p.poll(now, &ts, rest, &[]);
            assert!(!out.is_empty());
            reached.extend(out);
        }
        // The first round (a fresh node announcing its record) goes to
        // ANNOUNCE_FANOUT members drawn from everyone.
        let most = PARTNERS + (busy_rounds / PARTNER_SWAP_EVERY) as usize + 1 + ANNOUNCE_FANOUT;
        assert!(
            reached.len() > PARTNERS && reached.len() <= most,
            "{} members reached, at most {most} expected",
            reached.len()
        );
        // Partners that leave the targets are replaced: the rounds go on,
        // and only to members still there.
        let gone: Vec<Target> = ts.drain(..100).collect();
        let mut after = std::collections::HashSet::new();
        for i in 0..8 {
            let now = t0 + BUSY_EVERY * (busy_rounds + i);
            p.handle_changes(now, u64::from(busy_rounds + i) + 1);
            let out = p.poll(now, &ts, rest, &[]);
            assert!(out.len() >= BUSY_FANOUT);
            after.extend(out);
        }
        assert!(after.iter().all(|a| !gone.iter().any(|g| g.addr == *a)));
        assert!(after.len() <= PARTNERS + 1);
        // Over a long time the swaps visit every member.
        let mut all = std::collections::HashSet::new();
        for i in 0..20_000u32 {
            let now = t0 + BUSY_EVERY * (busy_rounds + 8 + i);
            p.handle_changes(now, u64::from(i) + 1_000_000);
            all.extend(p.poll(now, &ts, rest, &[]));
        }
        assert_eq!(all.len(), ts.len());
        // After a quiet spell, the first busy round draws from everyone
        // (news to a mesh at rest spreads from random members), the next
        // ones from the partners again.
        let mut quiet = t0 + BUSY_EVERY * (busy_rounds + 20_010) + BUSY_FOR;
        let (mut outside, mut counter) = (0, 5_000_000u64);
        for _ in 0..20 {
            quiet += BUSY_FOR + Duration::from_secs(1);
            assert!(!p.busy(quiet));
            counter += 1;
            p.handle_changes(quiet, counter);
            let first = p.poll(quiet, &ts, rest, &[]);
            let partners: Vec<SocketAddr> = ts
                .iter()
                .filter(|t| p.partners.contains(&t.key))
                .map(|t| t.addr)
                .collect();
            outside += first.iter().filter(|a| !partners.contains(a)).count();
            let next = p.poll(quiet + BUSY_EVERY, &ts, rest, &[]);
            let partners: Vec<SocketAddr> = ts
                .iter()
                .filter(|t| p.partners.contains(&t.key))
                .map(|t| t.addr)
                .collect();
            assert!(next
                .iter()
                .all(|a| partners.contains(a) || Some(*a) == rest.map(|r| r.addr)));
        }
        assert!(
            outside > 20,
            "{outside} of 40 first-round picks outside the partners"
        );
        // At rest the round every REST_EVERY goes to our first gossip
        // partner, whose connection is open, not to the partner the caller
        // names (the monitoring target, with mostly no connection: a TLS
        // handshake for every rest round).
        let rest_at = quiet + BUSY_FOR + REST_EVERY + Duration::from_secs(1);
        let first = ts.iter().find(|t| t.key == p.partners[0]).unwrap().addr;
        assert_eq!(p.poll(rest_at, &ts, rest, &[]), vec![first]);
        assert_ne!(Some(first), rest.map(|r| r.addr));
        // A small mesh: every member, as before.
        let small = targets(SMALL_MESH);
        let mut q = RoundPlanner::new(7);
        let mut seen = std::collections::HashSet::new();
        for i in 0..40u32 {
            let now = t0 + BUSY_EVERY * i;
            q.handle_changes(now, u64::from(i) + 1);
            seen.extend(q.poll(now, &small, None, &[]));
        }
        assert_eq!(seen.len(), SMALL_MESH);
    }

    #[test]
    fn mismatches_ask_for_a_round_at_most_once_a_second() {
        let ts = targets(10);
        let t0 = Instant::now();
        let mut p = RoundPlanner::new(1);
        p.poll(t0, &ts, None, &[]);
        p.handle_mismatch(ts[4].key);
        assert_eq!(p.poll_timeout(t0), t0);
        assert_eq!(p.poll(t0, &ts, None, &[]), vec![ts[4].addr]);
        p.handle_mismatch(ts[4].key);
        assert!(p
            .poll(t0 + Duration::from_millis(500), &ts, None, &[])
            .is_empty());
        p.handle_mismatch(ts[4].key);
        assert_eq!(
            p.poll(t0 + Duration::from_millis(1100), &ts, None, &[]),
            vec![ts[4].addr]
        );
        // A member we cannot reach is skipped.
        p.handle_mismatch([99; 32]);
        assert!(p
            .poll(t0 + Duration::from_secs(5), &ts, None, &[])
            .is_empty());
    }

    /// Busy rounds draw members called down lately as live ones (so a
    /// member called down falsely hears of it and refutes), at rest none
    /// visits them; a probe mismatch with one is a round at once.
    #[test]
    fn busy_rounds_draw_members_called_down_lately_too() {
        let all = targets(10);
        let (ts, down) = (&all[..5], &all[5..]);
        let t0 = Instant::now();
        let mut p = RoundPlanner::new(1);
        p.handle_down(down.to_vec());
        let mut to_down = 0;
        let mut rounds = 0;
        for i in 0..BUSY_FOR.as_millis() as u32 / BUSY_EVERY.as_millis() as u32 {
            p.handle_changes(t0, 1);
            for a in p.poll(t0 + BUSY_EVERY * i, ts, None, &[]) {
                rounds += 1;
                to_down += usize::from(down.iter().any(|d| d.addr == a));
            }
        }
        // Half the pool is down: about half the rounds (never all, never
        // none) go there.
        assert!(
            to_down > rounds / 4 && to_down < rounds * 3 / 4,
            "{to_down} of {rounds}"
        );
        // At rest: the rest round only, to a live member.
        let rest = t0 + BUSY_FOR + REST_EVERY;
        let out = p.poll(rest, ts, Some(ts[0]), &[]);
        assert_eq!(out, vec![ts[0].addr]);
        p.handle_mismatch(down[0].key);
        assert_eq!(p.poll(rest, ts, None, &[]), vec![down[0].addr]);
        // Nobody down: busy rounds to live members only.
        p.handle_down(Vec::new());
        p.handle_changes(rest, 2);
        let out = p.poll(rest, ts, None, &[]);
        assert_eq!(out.len(), SMALL_FANOUT);
        assert!(out.iter().all(|a| ts.iter().any(|t| t.addr == *a)));
    }

    /// A seed no member holds (another mesh we are cut off from) gets a
    /// round every STRANGER_EVERY; a seed that is a member gets none beyond
    /// the usual rounds.
    #[test]
    fn a_seed_outside_the_mesh_is_visited_every_half_minute() {
        let ts = targets(3);
        let seed = SocketAddr::from(([198, 18, 0, 1], 51821));
        let t0 = Instant::now();
        let mut p = RoundPlanner::new(1);
        let boot = [seed, ts[0].addr];
        let count = |p: &mut RoundPlanner, from: u64, to: u64| {
            (from * 10..to * 10)
                .filter(|i| {
                    p.poll(t0 + Duration::from_millis(i * 100), &ts, Some(ts[1]), &boot)
                        .contains(&seed)
                })
                .count()
        };
        assert_eq!(count(&mut p, 0, 29), 0);
        assert_eq!(count(&mut p, 29, 31), 1);
        assert_eq!(count(&mut p, 31, 91), 2);
        // The seed is a member now: no more extra rounds.
        let mut with_seed = ts.clone();
        with_seed.push(Target {
            key: [42; 32],
            addr: seed,
        });
        let extra = (910..2000)
            .filter(|i| {
                p.poll(
                    t0 + Duration::from_millis(i * 100),
                    &with_seed,
                    Some(ts[1]),
                    &boot,
                )
                .contains(&seed)
            })
            .count();
        assert_eq!(extra, 0);
    }

    #[test]
    fn alone_it_knocks_on_the_seeds_with_backoff() {
        let t0 = Instant::now();
        let mut p = RoundPlanner::new(1);
        let seeds = [SocketAddr::from(([198, 18, 0, 1], 51821))];
        let mut at = Vec::new();
        for i in 0..1200u64 {
            let now = t0 + Duration::from_millis(i * 100);
            if !p.poll(now, &[], None, &seeds).is_empty() {
                at.push(i as f64 / 10.0);
            }
        }
        assert_eq!(at[..5], [0.0, 1.0, 3.0, 7.0, 15.0]);
        assert_eq!(at[5], 31.0);
        assert_eq!(at[6], 61.0);
    }
}
