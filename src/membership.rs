//! The membership core (sans-IO): which members exist, who holds which
//! address and name, in what state, and which WireGuard peers this node
//! should therefore have.
//!
//! Driving contract: the shell reads a snapshot of the gossip state (one
//! [`GossipEntry`] per member: its id and its values) and calls
//! [`Membership::handle_snapshot`] with the current `now`, the [`Trust`]
//! (network, clock, revocations) and the liveness verdicts. The core verifies
//! new records, drops forged, foreign, revoked and replayed ones, applies the
//! holder rule (proto/PROTOCOL.md §3.1) and returns [`Event`]s for the shell
//! to log. [`Membership::desired_peers`] then says what WireGuard should
//! hold. The core does no I/O and reads no clock.
//!
//! Invariants:
//! * only records that passed [`verify_record`] are ever stored;
//! * a member's stored version never decreases (replays are dropped);
//! * an address or name is held by at most one member, and a member gets a
//!   WireGuard peer only for an address it holds here;
//! * no two peers share a WireGuard key;
//! * a member that left, is revoked, or stayed down longer than the grace
//!   period has no desired peer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use crate::proto::{self, PublicKeyBytes};
use crate::record::{verify_record, RecordBody, Trust};

/// How long a member may be down before its WireGuard peer is removed.
pub const DEFAULT_DOWN_GRACE: Duration = Duration::from_secs(60);
/// How long a down member is kept before it is forgotten (its address and
/// name released).
pub const FORGET_DOWN_AFTER: Duration = Duration::from_secs(600);
/// How long a down ephemeral member is kept before it is forgotten: a
/// stateless node that crashed comes back under a new identity, and its
/// name and address should be free for it by then.
pub const FORGET_EPHEMERAL_AFTER: Duration = DEFAULT_DOWN_GRACE;
/// How long a member that left is kept (shown as gone) before it is
/// forgotten.
pub const FORGET_LEFT_AFTER: Duration = Duration::from_secs(60);
/// A holding younger than this is provisional: a competing claim made at
/// the same time (two joiners picking one free address) may still win it by
/// the race rule; after it, nothing takes it.
pub const PROVISIONAL: Duration = Duration::from_secs(60);
/// Keepalive interval for peers when this node is behind NAT (seconds), as
/// users set it by hand: it keeps our NAT mapping towards the peer open.
pub const KEEPALIVE_SECS: u16 = 25;

/// The persistent keepalive this node sets on its peers: none on a public
/// member (its tunnels lapse when unused), [`KEEPALIVE_SECS`] behind NAT
/// (it keeps our mappings open).
pub fn keepalive_for(our_nat: crate::record::NatKind) -> u16 {
    if our_nat == crate::record::NatKind::Public {
        0
    } else {
        KEEPALIVE_SECS
    }
}

/// One member as the gossip layer holds it: its values (signed text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipEntry {
    /// Shared with the gossip state (no copy per member per step).
    pub node_id: Arc<str>,
    pub record: Option<Arc<str>>,
    /// Its signed observations of other members ([`crate::observe`]).
    pub seen: Option<Arc<str>>,
    /// Its refutations ([`crate::liveness::Alive`]).
    pub alive: Option<Arc<str>>,
    /// Its accusations ([`crate::liveness::Suspicions`]).
    pub suspects: Option<Arc<str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Live,
    /// Liveness called it down at `since` (the down grace counts from
    /// here: a false verdict must not end its peer and relay allocations
    /// at once); the mesh has held it down since `known` (the oldest
    /// accusation, earlier when this node found it down late: the forget
    /// time counts from here).
    Down {
        since: Instant,
        known: Instant,
    },
    /// It left on purpose, at this instant.
    Left {
        since: Instant,
    },
}

#[derive(Debug, Clone)]
pub struct Member {
    /// Shared with the decoded-record cache ([`crate::record::share_decoded`]).
    pub record: Arc<RecordBody>,
    pub liveness: Liveness,
    /// The member was stamped by the network key (may advertise any route).
    pub by_network: bool,
    /// Its stamp's signature (relay choice hashes it).
    pub stamp_signature: Vec<u8>,
    /// Its admission's token (routes it may advertise).
    pub allow_routes: Vec<crate::proto::Route>,
    /// When it was admitted (its stamp's time, unix s): bounds its address
    /// claim from below.
    pub admitted_at: u64,
    /// The record text last accepted (to skip re-verifying it).
    raw: Arc<str>,
}

/// What changed; the shell logs these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Joined {
        name: String,
        node: String,
        overlay_ip: Ipv4Addr,
    },
    Updated {
        name: String,
        version: u64,
    },
    Left {
        name: String,
    },
    Down {
        name: String,
    },
    Up {
        name: String,
    },
    Forgotten {
        name: String,
    },
    Rejected {
        node: String,
        reason: String,
    },
    Replay {
        node: String,
        held: u64,
        got: u64,
    },
    /// A member claims something another member holds; it does not get it.
    Conflict {
        what: String,
        claimant: String,
        holder: String,
    },
}

/// A WireGuard peer this node should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    pub public_key: [u8; 32],
    /// What is routed to this peer: its own overlay address (a /32) and the
    /// subnets it advertises that this node installs ([`crate::routes`]).
    pub allowed_ips: Vec<Ipv4Net>,
    /// Candidate endpoints, best first.
    pub endpoints: Vec<SocketAddr>,
    pub keepalive: u16,
}

/// Who holds an address or a name here, since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holding {
    key: PublicKeyBytes,
    /// `None`: established (adopted or reloaded; nothing takes it).
    since: Option<Instant>,
}

/// The holder table (proto/PROTOCOL.md §3.1).
#[derive(Debug, Clone, Default)]
pub struct Holders {
    ips: BTreeMap<Ipv4Addr, Holding>,
    names: BTreeMap<String, Holding>,
}

impl Holders {
    /// Established holdings, e.g. reloaded from the state directory or
    /// adopted from the member that admitted us.
    pub fn adopt(
        &mut self,
        ips: impl IntoIterator<Item = (Ipv4Addr, PublicKeyBytes)>,
        names: impl IntoIterator<Item = (String, PublicKeyBytes)>,
    ) {
        for (ip, key) in ips {
            self.ips.entry(ip).or_insert(Holding { key, since: None });
        }
        for (name, key) in names {
            self.names
                .entry(name)
                .or_insert(Holding { key, since: None });
        }
    }

    pub fn ips(&self) -> Vec<(Ipv4Addr, PublicKeyBytes)> {
        self.ips.iter().map(|(ip, h)| (*ip, h.key)).collect()
    }

    pub fn names(&self) -> Vec<(String, PublicKeyBytes)> {
        self.names.iter().map(|(n, h)| (n.clone(), h.key)).collect()
    }

    pub fn ip_holder(&self, ip: &Ipv4Addr) -> Option<PublicKeyBytes> {
        self.ips.get(ip).map(|h| h.key)
    }

    pub fn name_holder(&self, name: &str) -> Option<PublicKeyBytes> {
        self.names.get(name).map(|h| h.key)
    }
}

/// The race order of first claims: the earlier admission (the stamp's
/// time, dated by the admitting member, not by the claimant), then the
/// smaller key. Nothing in a claimant's own record moves it.
fn claim_order(r: &RecordBody, admitted_at: u64) -> (u64, PublicKeyBytes) {
    (admitted_at, r.node_key)
}

pub struct Membership {
    self_key: PublicKeyBytes,
    down_grace: Duration,
    members: BTreeMap<PublicKeyBytes, Member>,
    /// Which member holds each WireGuard key (an index of `members`, kept
    /// by `insert_member`/`remove_member`: one lookup instead of a scan of
    /// every member for each new record).
    wg_keys: HashMap<[u8; 32], PublicKeyBytes>,
    /// Highest version ever accepted per node, kept after a member is
    /// forgotten so an old record cannot be replayed into the mesh.
    high_water: BTreeMap<PublicKeyBytes, u64>,
    holders: Holders,
    /// Members refused an address or name here (a conflict), and what.
    conflicts: BTreeMap<PublicKeyBytes, String>,
    /// Members that have held an address here: any other address they
    /// claim, they get only if it is free (they cannot race).
    settled: BTreeSet<PublicKeyBytes>,
    /// Node ids whose bad value was already reported (log once).
    reported: BTreeMap<String, String>,
}

impl Membership {
    pub fn new(self_key: PublicKeyBytes, down_grace: Duration) -> Self {
        Self {
            self_key,
            down_grace,
            members: BTreeMap::new(),
            wg_keys: HashMap::new(),
            high_water: BTreeMap::new(),
            holders: Holders::default(),
            conflicts: BTreeMap::new(),
            settled: BTreeSet::new(),
            reported: BTreeMap::new(),
        }
    }

    fn insert_member(&mut self, key: PublicKeyBytes, member: Member) {
        let wg = member.record.wg_public_key;
        if let Some(old) = self.members.insert(key, member) {
            let old_wg = old.record.wg_public_key;
            if old_wg != wg && self.wg_keys.get(&old_wg) == Some(&key) {
                self.wg_keys.remove(&old_wg);
            }
        }
        self.wg_keys.insert(wg, key);
    }

    fn remove_member(&mut self, key: &PublicKeyBytes) -> Option<Member> {
        let m = self.members.remove(key)?;
        if self.wg_keys.get(&m.record.wg_public_key) == Some(key) {
            self.wg_keys.remove(&m.record.wg_public_key);
        }
        Some(m)
    }

    pub fn holders(&self) -> &Holders {
        &self.holders
    }

    pub fn holders_mut(&mut self) -> &mut Holders {
        &mut self.holders
    }

    /// Feeds one snapshot of the gossip state. `down` says which members
    /// liveness calls down, and for how long the mesh has held them down
    /// (the oldest accusation): a member found down here long after it
    /// died (this node restarted) counts its forget time from then, not
    /// from now (capped at [`FORGET_DOWN_AFTER`]); its down grace counts
    /// from now.
    pub fn handle_snapshot(
        &mut self,
        now: Instant,
        entries: &[GossipEntry],
        trust: &Trust<'_>,
        down: &dyn Fn(&PublicKeyBytes) -> Option<Duration>,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        let mut present: BTreeSet<PublicKeyBytes> = BTreeSet::new();
        for e in entries {
            let Some(key) = proto::parse_node_id(&e.node_id) else {
                self.report(
                    &e.node_id,
                    "node id is not a meshpeer key".into(),
                    &mut events,
                );
                continue;
            };
            present.insert(key);
            if let Some(text) = &e.record {
                self.handle_record(now, &key, &e.node_id, text, trust, &mut events);
            }
        }
        // Revoked since their record was accepted: out at once.
        let revoked: Vec<PublicKeyBytes> = self
            .members
            .keys()
            .filter(|k| trust.revoked.node_revoked(k))
            .copied()
            .collect();
        for k in revoked {
            if let Some(m) = self.remove_member(&k) {
                events.push(Event::Rejected {
                    node: proto::node_id_string(&k),
                    reason: format!("{} is revoked", m.record.name),
                });
            }
        }
        for key in present.iter() {
            self.handle_liveness(now, key, down(key), &mut events);
        }
        // Members gone from gossip (forgotten there), or kept long enough.
        let gone: Vec<PublicKeyBytes> = self
            .members
            .iter()
            .filter(|(k, m)| {
                **k != self.self_key
                    && (!present.contains(*k)
                        || match m.liveness {
                            Liveness::Left { since } => {
                                now.saturating_duration_since(since) >= FORGET_LEFT_AFTER
                            }
                            Liveness::Down { known, .. } => {
                                let since = known;
                                let after = if m.record.ephemeral {
                                    FORGET_EPHEMERAL_AFTER
                                } else {
                                    FORGET_DOWN_AFTER
                                };
                                now.saturating_duration_since(since) >= after
                            }
                            Liveness::Live => false,
                        })
            })
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            if let Some(m) = self.remove_member(&key) {
                if !matches!(m.liveness, Liveness::Left { .. }) {
                    events.push(Event::Forgotten {
                        name: m.record.name.clone(),
                    });
                }
            }
        }
        self.apply_holder_rule(now, &mut events);
        events
    }

    /// Members to forget in gossip too (left long ago, down long enough,
    /// revoked): not held here any more but still in `entries`.
    pub fn to_forget<'a>(&self, entries: &'a [GossipEntry]) -> Vec<&'a str> {
        entries
            .iter()
            .filter(|e| {
                proto::parse_node_id(&e.node_id)
                    .is_some_and(|k| k != self.self_key && !self.members.contains_key(&k))
                    && e.record.is_some()
            })
            .map(|e| &*e.node_id)
            .collect()
    }

    fn report(&mut self, node: &str, reason: String, events: &mut Vec<Event>) {
        if self.reported.get(node) != Some(&reason) {
            if self.reported.len() > 4096 {
                self.reported.clear();
            }
            self.reported.insert(node.to_string(), reason.clone());
            events.push(Event::Rejected {
                node: node.to_string(),
                reason,
            });
        }
    }

    fn handle_record(
        &mut self,
        now: Instant,
        key: &PublicKeyBytes,
        node_id: &str,
        text: &Arc<str>,
        trust: &Trust<'_>,
        events: &mut Vec<Event>,
    ) {
        // The same value gossip already gave us is usually the same
        // allocation: compare pointers before bytes (every record, every
        // step; the byte comparison was a public member's top step cost in
        // a loaded come-up).
        if self
            .members
            .get(key)
            .is_some_and(|m| Arc::ptr_eq(&m.raw, text) || m.raw == *text)
        {
            return;
        }
        let verified = match verify_record(text, trust, Some(key)) {
            Ok(v) => v,
            Err(e) => {
                self.report(node_id, e.to_string(), events);
                return;
            }
        };
        let record = verified.body;
        let held = self.high_water.get(key).copied();
        if let Some(held) = held {
            // The same version again is only news if we had forgotten the
            // member; anything older is a replay.
            if record.version < held || (record.version == held && self.members.contains_key(key)) {
                if record.version < held {
                    let reason = format!("replay v{} < v{held}", record.version);
                    if self.reported.get(node_id) != Some(&reason) {
                        self.reported.insert(node_id.to_string(), reason);
                        events.push(Event::Replay {
                            node: node_id.to_string(),
                            held,
                            got: record.version,
                        });
                    }
                }
                return;
            }
        }
        // Two members with one WireGuard key would fight over one peer: the
        // one already held keeps it.
        if let Some(other) = self
            .wg_keys
            .get(&record.wg_public_key)
            .filter(|k| *k != key)
            .and_then(|k| self.members.get(k))
        {
            let reason = format!(
                "its WireGuard key is {}'s (the member already held keeps it)",
                other.record.name
            );
            self.report(node_id, reason, events);
            return;
        }
        self.high_water.insert(*key, record.version);
        self.reported.remove(node_id);
        let name = record.name.clone();
        let prev = self.members.get(key).map(|m| m.liveness);
        let liveness = if record.left {
            match prev {
                Some(l @ Liveness::Left { .. }) => l,
                _ => {
                    events.push(Event::Left { name: name.clone() });
                    Liveness::Left { since: now }
                }
            }
        } else {
            match prev {
                None | Some(Liveness::Left { .. }) => {
                    events.push(Event::Joined {
                        name: name.clone(),
                        node: node_id.to_string(),
                        overlay_ip: record.overlay_ip,
                    });
                    Liveness::Live
                }
                Some(l) => {
                    events.push(Event::Updated {
                        name: name.clone(),
                        version: record.version,
                    });
                    l
                }
            }
        };
        self.insert_member(
            *key,
            Member {
                record,
                liveness,
                by_network: verified.admission.by_network,
                stamp_signature: verified.admission.stamp_signature,
                allow_routes: verified.admission.allow_routes,
                admitted_at: verified.admission.admitted_at,
                raw: text.clone(),
            },
        );
    }

    fn handle_liveness(
        &mut self,
        now: Instant,
        key: &PublicKeyBytes,
        down: Option<Duration>,
        events: &mut Vec<Event>,
    ) {
        if *key == self.self_key {
            return;
        }
        let Some(m) = self.members.get_mut(key) else {
            return;
        };
        match (m.liveness, down) {
            (Liveness::Live, Some(age)) => {
                let known = now.checked_sub(age.min(FORGET_DOWN_AFTER)).unwrap_or(now);
                m.liveness = Liveness::Down { since: now, known };
                events.push(Event::Down {
                    name: m.record.name.clone(),
                });
            }
            (Liveness::Down { .. }, None) => {
                m.liveness = Liveness::Live;
                events.push(Event::Up {
                    name: m.record.name.clone(),
                });
            }
            _ => {}
        }
    }

    /// Assigns addresses and names to members by the holder rule
    /// (proto/PROTOCOL.md §3.1):
    /// * a holder keeps what it holds;
    /// * a member that already held an address here and now claims another
    ///   (a *mover*) gets it only if nobody holds it: it cannot race;
    /// * first claims race while the holding is provisional, by
    ///   [`claim_order`].
    fn apply_holder_rule(&mut self, now: Instant, events: &mut Vec<Event>) {
        let present = |k: &PublicKeyBytes, members: &BTreeMap<PublicKeyBytes, Member>| {
            members
                .get(k)
                .is_some_and(|m| !matches!(m.liveness, Liveness::Left { .. }))
        };
        // Members that held an address here (adopted holdings included);
        // those claiming another one now are movers.
        self.settled
            .extend(self.holders.ips.values().map(|h| h.key));
        self.settled.retain(|k| self.members.contains_key(k));
        let movers: BTreeSet<PublicKeyBytes> = self
            .settled
            .iter()
            .filter(|k| {
                self.members
                    .get(*k)
                    .is_some_and(|m| self.holders.ip_holder(&m.record.overlay_ip) != Some(**k))
            })
            .copied()
            .collect();
        // Release what absent members held, and what a member no longer claims.
        let members = &self.members;
        self.holders
            .ips
            .retain(|ip, h| present(&h.key, members) && members[&h.key].record.overlay_ip == *ip);
        self.holders
            .names
            .retain(|n, h| present(&h.key, members) && members[&h.key].record.name == *n);
        let mut conflicts = BTreeMap::new();
        // First claims in race order, then movers.
        let mut claims: Vec<(&PublicKeyBytes, &Member)> = self
            .members
            .iter()
            .filter(|(_, m)| !matches!(m.liveness, Liveness::Left { .. }))
            .collect();
        claims.sort_by_key(|(k, m)| (movers.contains(*k), claim_order(&m.record, m.admitted_at)));
        for (key, m) in claims {
            let ip = m.record.overlay_ip;
            match self.holders.ips.get(&ip).copied() {
                None => {
                    self.holders.ips.insert(
                        ip,
                        Holding {
                            key: *key,
                            since: Some(now),
                        },
                    );
                }
                Some(h) if h.key == *key => {}
                Some(h) => {
                    let holder = &self.members[&h.key];
                    let provisional = h
                        .since
                        .is_some_and(|s| now.saturating_duration_since(s) < PROVISIONAL);
                    if provisional
                        && !movers.contains(key)
                        && claim_order(&m.record, m.admitted_at)
                            < claim_order(&holder.record, holder.admitted_at)
                    {
                        conflicts.insert(h.key, format!("address {ip}"));
                        self.holders.ips.insert(
                            ip,
                            Holding {
                                key: *key,
                                since: Some(now),
                            },
                        );
                    } else {
                        conflicts.insert(*key, format!("address {ip}"));
                    }
                }
            }
            let name = &m.record.name;
            match self.holders.names.get(name).copied() {
                None => {
                    self.holders.names.insert(
                        name.clone(),
                        Holding {
                            key: *key,
                            since: Some(now),
                        },
                    );
                }
                Some(h) if h.key == *key => {}
                Some(h) => {
                    // A name held by a member that is down (a crashed or
                    // ephemeral node coming back with a new identity) is
                    // released to the newcomer.
                    let holder_down = matches!(
                        self.members[&h.key].liveness,
                        Liveness::Down { since, .. } if now.saturating_duration_since(since) >= self.down_grace
                    );
                    if holder_down {
                        self.holders.names.insert(
                            name.clone(),
                            Holding {
                                key: *key,
                                since: Some(now),
                            },
                        );
                    } else {
                        conflicts
                            .entry(*key)
                            .or_insert_with(|| format!("name {name}"));
                    }
                }
            }
        }
        for (k, what) in &conflicts {
            if self.conflicts.get(k) != Some(what) {
                let holder = self
                    .members
                    .get(k)
                    .and_then(|m| {
                        if what.starts_with("address") {
                            self.holders.ip_holder(&m.record.overlay_ip)
                        } else {
                            self.holders.name_holder(&m.record.name)
                        }
                    })
                    .and_then(|h| self.members.get(&h))
                    .map(|h| h.record.name.clone())
                    .unwrap_or_default();
                events.push(Event::Conflict {
                    what: what.clone(),
                    claimant: self
                        .members
                        .get(k)
                        .map(|m| m.record.name.clone())
                        .unwrap_or_default(),
                    holder,
                });
            }
        }
        self.conflicts = conflicts;
    }

    /// All known members except those that left, self included.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members
            .values()
            .filter(|m| !matches!(m.liveness, Liveness::Left { .. }))
    }

    pub fn member(&self, key: &PublicKeyBytes) -> Option<&Member> {
        self.members.get(key)
    }

    /// Whether the member with gossip node id `node_id` is public (its
    /// record says so): a joiner's reply carries public members' records
    /// first (`gossip::transport::hello_records`).
    pub fn is_public_node(&self, node_id: &str) -> bool {
        crate::proto::parse_node_id(node_id)
            .and_then(|k| self.member(&k))
            .is_some_and(|m| m.record.nat == crate::record::NatKind::Public)
    }

    /// The member holding `wg_key` as WireGuard key.
    pub fn by_wg_key(&self, wg_key: &[u8; 32]) -> Option<&Member> {
        self.members
            .values()
            .find(|m| &m.record.wg_public_key == wg_key)
    }

    /// What a member claims but does not hold here.
    pub fn conflict_of(&self, key: &PublicKeyBytes) -> Option<&str> {
        self.conflicts.get(key).map(String::as_str)
    }

    /// Whether `key` holds its address here.
    pub fn holds_address(&self, key: &PublicKeyBytes) -> bool {
        self.members
            .get(key)
            .is_some_and(|m| self.holders.ip_holder(&m.record.overlay_ip) == Some(*key))
    }

    /// Overlay addresses held or claimed by members other than `except`.
    pub fn taken_ips(&self, except: &PublicKeyBytes) -> BTreeSet<Ipv4Addr> {
        let mut taken: BTreeSet<Ipv4Addr> = self
            .members()
            .filter(|m| &m.record.node_key != except)
            .map(|m| m.record.overlay_ip)
            .collect();
        taken.extend(
            self.holders
                .ips
                .iter()
                .filter(|(_, h)| &h.key != except)
                .map(|(ip, _)| *ip),
        );
        taken
    }

    /// Whether we must move off `ip`: another member holds it here. (Once
    /// we have held it for [`PROVISIONAL`], nobody can.)
    pub fn must_move(&self, ip: &Ipv4Addr) -> bool {
        self.holders
            .ip_holder(ip)
            .is_some_and(|h| h != self.self_key)
    }

    /// The members liveness watches: everyone (not left) but us who holds
    /// its address here; `reachable` (by WireGuard key) says whether a
    /// WireGuard path exists that probes can take.
    /// `reachable`: a path to it exists (by WireGuard key); `heard`: a
    /// WireGuard session with it was established (see
    /// [`crate::liveness::MemberView::heard`]).
    pub fn liveness_views(
        &self,
        reachable: &dyn Fn(&[u8; 32]) -> bool,
        heard: &dyn Fn(&[u8; 32]) -> bool,
    ) -> Vec<crate::liveness::MemberView> {
        self.members()
            .filter(|m| {
                m.record.node_key != self.self_key && self.holds_address(&m.record.node_key)
            })
            .map(|m| crate::liveness::MemberView {
                key: m.record.node_key,
                overlay_ip: m.record.overlay_ip,
                reachable: reachable(&m.record.wg_public_key),
                heard: heard(&m.record.wg_public_key),
            })
            .collect()
    }

    /// Whether a member is gone for the mesh's purposes: it left, or it
    /// has been down longer than the down grace (its WireGuard peer is
    /// removed, relays end its allocations).
    pub fn gone(&self, now: Instant, m: &Member) -> bool {
        match m.liveness {
            Liveness::Live => false,
            Liveness::Down { since, .. } => now.saturating_duration_since(since) >= self.down_grace,
            Liveness::Left { .. } => true,
        }
    }

    /// The WireGuard peers we want: live members holding their address, and
    /// down ones within the down grace or still `hearing` (the data plane
    /// received from their key recently: the member is there, whatever
    /// gossip says). `keepalive` is the persistent keepalive to set (this
    /// node's NAT decides it, see [`KEEPALIVE_SECS`]).
    pub fn desired_peers(
        &self,
        now: Instant,
        local_nets: &[Ipv4Net],
        hearing: &dyn Fn(&[u8; 32]) -> bool,
        keepalive: u16,
    ) -> Vec<DesiredPeer> {
        self.members()
            .filter(|m| m.record.node_key != self.self_key)
            .filter(|m| match m.liveness {
                Liveness::Live => true,
                Liveness::Down { since, .. } => {
                    now.saturating_duration_since(since) < self.down_grace
                        || hearing(&m.record.wg_public_key)
                }
                Liveness::Left { .. } => false,
            })
            .filter(|m| self.holds_address(&m.record.node_key))
            .map(|m| DesiredPeer {
                public_key: m.record.wg_public_key,
                allowed_ips: vec![Ipv4Net::from(m.record.overlay_ip)],
                endpoints: order_endpoints(&m.record.endpoints, local_nets),
                keepalive,
            })
            .collect()
    }
}

/// A joiner's overlay address (proto/PROTOCOL.md §6): what the member that
/// admitted us says is held (`holders`, `names`) and the records it handed
/// over, run through a scratch membership, then [`crate::ipalloc::choose`]
/// among the addresses nobody holds or claims. `None`: the network is full.
#[allow(clippy::too_many_arguments)]
pub fn choose_joiner_address(
    now: Instant,
    me: &PublicKeyBytes,
    cidr: Ipv4Net,
    holders: &[(Ipv4Addr, PublicKeyBytes)],
    names: &[(String, PublicKeyBytes)],
    records: &[Arc<str>],
    trust: &Trust<'_>,
    down_grace: Duration,
) -> Option<Ipv4Addr> {
    let mut scratch = Membership::new(*me, down_grace);
    scratch
        .holders_mut()
        .adopt(holders.iter().copied(), names.iter().cloned());
    let entries: Vec<GossipEntry> = records
        .iter()
        .filter_map(|text| {
            let v = verify_record(text, trust, None).ok()?;
            Some(GossipEntry {
                node_id: proto::node_id_string(&v.body.node_key).into(),
                record: Some(text.clone()),
                seen: None,
                alive: None,
                suspects: None,
            })
        })
        .collect();
    scratch.handle_snapshot(now, &entries, trust, &|_| None);
    crate::ipalloc::choose(cidr, me, &scratch.taken_ips(me))
}

/// Whether `a` is on one of our own networks (our LAN).
pub fn on_local_net(local_nets: &[Ipv4Net], a: &SocketAddr) -> bool {
    match a {
        SocketAddr::V4(v4) => local_nets.iter().any(|n| n.contains(v4.ip())),
        SocketAddr::V6(_) => false,
    }
}

/// Orders candidates: same subnet as one of ours first, then the record's order.
pub fn order_endpoints(candidates: &[SocketAddr], local_nets: &[Ipv4Net]) -> Vec<SocketAddr> {
    let local = |a: &SocketAddr| on_local_net(local_nets, a);
    let mut out: Vec<SocketAddr> = candidates.iter().filter(|a| local(a)).copied().collect();
    out.extend(candidates.iter().filter(|a| !local(a)));
    out
}

#[cfg(test)]
mod tests;
