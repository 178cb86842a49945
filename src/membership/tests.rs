use super::*;
use crate::admission::Revocations;
use crate::record::tests::sample;
use ed25519_dalek::SigningKey;

fn deaf(_: &[u8; 32]) -> bool {
    false
}
fn nobody_down(_: &PublicKeyBytes) -> Option<Duration> {
    None
}

struct World {
    net: SigningKey,
    nk: PublicKeyBytes,
    revoked: Revocations,
}

impl World {
    fn new() -> Self {
        let net = SigningKey::from_bytes(&[1; 32]);
        World {
            nk: net.verifying_key().to_bytes(),
            net,
            revoked: Revocations::default(),
        }
    }
    fn trust(&self) -> Trust<'_> {
        Trust {
            network_key: &self.nk,
            now_unix: 1000,
            revoked: &self.revoked,
        }
    }
    fn snap(&self, m: &mut Membership, now: Instant, e: &[GossipEntry]) -> Vec<Event> {
        m.handle_snapshot(now, e, &self.trust(), &nobody_down)
    }
}

fn entry(body: &RecordBody, node: &SigningKey) -> GossipEntry {
    GossipEntry {
        node_id: proto::node_id_string(&body.node_key).into(),
        record: Some(body.sign(node).into()),
        seen: None,
        alive: None,
        suspects: None,
    }
}

#[test]
fn join_update_replay_leave() {
    let w = World::new();
    let (me, my_body) = sample(2, &w.net, "10.77.0.1".parse().unwrap());
    let (node, mut body) = sample(3, &w.net, "10.77.0.2".parse().unwrap());
    let mut m = Membership::new(my_body.node_key, DEFAULT_DOWN_GRACE);
    let t0 = Instant::now();
    let ev = w.snap(&mut m, t0, &[entry(&my_body, &me), entry(&body, &node)]);
    assert_eq!(ev.len(), 2, "{ev:?}");
    let peers = m.desired_peers(t0, &[], &deaf, 0);
    assert_eq!(peers.len(), 1);
    assert_eq!(
        peers[0].allowed_ips,
        vec![ipnet::Ipv4Net::from(
            "10.77.0.2".parse::<Ipv4Addr>().unwrap()
        )]
    );

    let old = body.clone();
    body.version = 2;
    body.endpoints = vec!["192.0.2.9:51820".parse().unwrap()];
    let ev = w.snap(&mut m, t0, &[entry(&body, &node)]);
    assert_eq!(
        ev,
        vec![Event::Updated {
            name: "n3".into(),
            version: 2
        }]
    );
    let ev = w.snap(&mut m, t0, &[entry(&old, &node)]);
    assert!(matches!(
        ev[0],
        Event::Replay {
            held: 2,
            got: 1,
            ..
        }
    ));
    assert_eq!(
        m.desired_peers(t0, &[], &deaf, 0)[0].endpoints,
        body.endpoints
    );

    body.version = 3;
    body.left = true;
    let ev = w.snap(&mut m, t0, &[entry(&body, &node)]);
    assert_eq!(ev, vec![Event::Left { name: "n3".into() }]);
    assert!(m.desired_peers(t0, &[], &deaf, 0).is_empty());
    // Forgotten after a while (and then to be forgotten in gossip too).
    let later = t0 + FORGET_LEFT_AFTER;
    let e = [entry(&body, &node)];
    w.snap(&mut m, later, &e);
    assert_eq!(m.to_forget(&e), vec![&*e[0].node_id]);
}

/// A membership holding one live member, n3 (down grace 60 s), as of t0.
fn one_member(
    w: &World,
) -> (
    SigningKey,
    RecordBody,
    Membership,
    Instant,
    [GossipEntry; 1],
) {
    let (node, body) = sample(3, &w.net, "10.77.0.2".parse().unwrap());
    let mut m = Membership::new([0; 32], Duration::from_secs(60));
    let t0 = Instant::now();
    let e = [entry(&body, &node)];
    w.snap(&mut m, t0, &e);
    (node, body, m, t0, e)
}

#[test]
fn down_members_lose_their_peer_after_the_grace_period() {
    let w = World::new();
    let (node, body, mut m, t0, e) = one_member(&w);
    let ev = m.handle_snapshot(t0, &e, &w.trust(), &|_| Some(Duration::ZERO));
    assert_eq!(ev, vec![Event::Down { name: "n3".into() }]);
    assert_eq!(
        m.desired_peers(t0 + Duration::from_secs(59), &[], &deaf, 0)
            .len(),
        1
    );
    assert!(m
        .desired_peers(t0 + Duration::from_secs(60), &[], &deaf, 0)
        .is_empty());
    let hearing = |k: &[u8; 32]| *k == body.wg_public_key;
    assert_eq!(
        m.desired_peers(t0 + Duration::from_secs(60), &[], &hearing, 0)
            .len(),
        1
    );
    let ev = w.snap(&mut m, t0 + Duration::from_secs(61), &e);
    assert_eq!(ev, vec![Event::Up { name: "n3".into() }]);
    // Gone from gossip: forgotten; an older record is then a replay.
    let ev = w.snap(&mut m, t0, &[]);
    assert_eq!(ev, vec![Event::Forgotten { name: "n3".into() }]);
    let mut older = body.clone();
    older.version = 0;
    let ev = w.snap(&mut m, t0, &[entry(&older, &node)]);
    assert!(
        matches!(
            ev[0],
            Event::Replay {
                held: 1,
                got: 0,
                ..
            }
        ),
        "{ev:?}"
    );
}

/// A member we called down is no round target any more, but for
/// `GOSSIP_TO_THE_DOWN` the planner still visits it now and then, so a
/// member called down falsely (a partition, an overload) hears of the
/// accusation and refutes it.
#[test]
fn a_down_member_is_gossiped_with_for_a_while() {
    use crate::gossip::rounds::{down_targets, round_targets, GOSSIP_TO_THE_DOWN};
    let w = World::new();
    let (_, body, mut m, t0, e) = one_member(&w);
    let up = |_: &[u8; 32]| true;
    assert_eq!(round_targets(&m, &[0; 32], &[], &up).len(), 1);
    assert!(down_targets(&m, t0, &[], &up).is_empty(), "live: not down");
    m.handle_snapshot(t0, &e, &w.trust(), &|_| Some(Duration::ZERO));
    assert!(round_targets(&m, &[0; 32], &[], &up).is_empty());
    let down = down_targets(
        &m,
        t0 + GOSSIP_TO_THE_DOWN - Duration::from_millis(1),
        &[],
        &up,
    );
    assert_eq!(down.len(), 1);
    assert_eq!(down[0].key, body.node_key);
    assert!(down_targets(&m, t0 + GOSSIP_TO_THE_DOWN, &[], &up).is_empty());
}

#[test]
fn forged_and_revoked_records_are_rejected() {
    let mut w = World::new();
    let (node, body) = sample(3, &w.net, "10.77.0.2".parse().unwrap());
    let attacker = SigningKey::from_bytes(&[66; 32]);
    let mut m = Membership::new([0; 32], DEFAULT_DOWN_GRACE);
    let forged = entry(&body, &attacker);
    let ev = w.snap(&mut m, Instant::now(), std::slice::from_ref(&forged));
    assert!(matches!(ev[0], Event::Rejected { .. }));
    assert!(w.snap(&mut m, Instant::now(), &[forged]).is_empty());
    assert!(m.desired_peers(Instant::now(), &[], &deaf, 0).is_empty());
    // Accepted, then revoked: out at once.
    w.snap(&mut m, Instant::now(), &[entry(&body, &node)]);
    assert_eq!(m.desired_peers(Instant::now(), &[], &deaf, 0).len(), 1);
    let list = crate::admission::RevocationList {
        network_key: w.nk,
        issued_at_ms: 1,
        entries: vec![crate::admission::Revoked::Node(body.node_key)],
    };
    let text = list.sign(&w.net);
    w.revoked.update(list, text);
    let ev = w.snap(&mut m, Instant::now(), &[entry(&body, &node)]);
    assert!(
        ev.iter().any(|e| matches!(e, Event::Rejected { .. })),
        "{ev:?}"
    );
    assert!(m.desired_peers(Instant::now(), &[], &deaf, 0).is_empty());
}

#[test]
fn an_established_holder_keeps_its_address_whatever_a_claim_says() {
    let w = World::new();
    let ip: Ipv4Addr = "10.77.0.7".parse().unwrap();
    let (victim, vb) = sample(3, &w.net, ip);
    let mut m = Membership::new([0; 32], DEFAULT_DOWN_GRACE);
    let t0 = Instant::now();
    w.snap(&mut m, t0, &[entry(&vb, &victim)]);
    // The attacker claims the victim's address, with the earliest claim time
    // there is, a minute later.
    let (attacker, mut ab) = sample(4, &w.net, ip);
    ab.ip_claimed_at = 0;
    let t1 = t0 + PROVISIONAL;
    let ev = w.snap(&mut m, t1, &[entry(&vb, &victim), entry(&ab, &attacker)]);
    assert!(
        ev.iter().any(|e| matches!(e, Event::Conflict { claimant, holder, .. } if claimant == "n4" && holder == "n3")),
        "{ev:?}"
    );
    let peers = m.desired_peers(t1, &[], &deaf, 0);
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].public_key, vb.wg_public_key);
    assert_eq!(m.conflict_of(&ab.node_key), Some("address 10.77.0.7"));
    // Reloaded tables (a restart) are established from the start.
    let mut m2 = Membership::new([0; 32], DEFAULT_DOWN_GRACE);
    m2.holders_mut()
        .adopt(m.holders().ips(), m.holders().names());
    w.snap(&mut m2, t1, &[entry(&ab, &attacker), entry(&vb, &victim)]);
    assert_eq!(
        m2.desired_peers(t1, &[], &deaf, 0)[0].public_key,
        vb.wg_public_key
    );
}

#[test]
fn two_new_claims_race_by_admission_and_the_loser_moves() {
    let w = World::new();
    let ip: Ipv4Addr = "10.77.0.7".parse().unwrap();
    let (a, mut ab) = sample(3, &w.net, ip);
    let (b, bb) = sample(4, &w.net, ip);
    // Both stamped at 1 s: the smaller key wins. Claim times do not matter.
    ab.ip_claimed_at = 0;
    let winner = ab.node_key.min(bb.node_key);
    let t0 = Instant::now();
    for order in [[0, 1], [1, 0]] {
        let mut m = Membership::new(ab.node_key, DEFAULT_DOWN_GRACE);
        let es = [entry(&ab, &a), entry(&bb, &b)];
        w.snap(&mut m, t0, &[es[order[0]].clone()]);
        w.snap(&mut m, t0 + Duration::from_secs(1), &es);
        assert_eq!(m.holders().ip_holder(&ip), Some(winner));
        assert_eq!(m.must_move(&ip), winner != ab.node_key);
    }
}

#[test]
fn a_member_cannot_move_onto_a_fresh_address_by_backdating() {
    // The victim joined a moment ago (its holding is provisional); the
    // attacker, established elsewhere, claims it with the earliest claim
    // time there is: refused (a mover only takes free addresses).
    let w = World::new();
    let (attacker, mut ab) = sample(3, &w.net, "10.77.0.3".parse().unwrap());
    let ip: Ipv4Addr = "10.77.0.7".parse().unwrap();
    let (victim, vb) = sample(4, &w.net, ip);
    let mut m = Membership::new([0; 32], DEFAULT_DOWN_GRACE);
    let t0 = Instant::now();
    w.snap(&mut m, t0, &[entry(&ab, &attacker)]);
    w.snap(
        &mut m,
        t0 + Duration::from_secs(1),
        &[entry(&ab, &attacker), entry(&vb, &victim)],
    );
    ab.version = 2;
    ab.overlay_ip = ip;
    ab.ip_claimed_at = 0;
    let ev = w.snap(
        &mut m,
        t0 + Duration::from_secs(2),
        &[entry(&ab, &attacker), entry(&vb, &victim)],
    );
    assert!(
        ev.iter().any(|e| matches!(e, Event::Conflict { .. })),
        "{ev:?}"
    );
    assert_eq!(m.holders().ip_holder(&ip), Some(vb.node_key));
    // ... and stays refused at the next steps (it no longer holds anything).
    for i in 3..6 {
        w.snap(
            &mut m,
            t0 + Duration::from_secs(i),
            &[entry(&ab, &attacker), entry(&vb, &victim)],
        );
        assert_eq!(m.holders().ip_holder(&ip), Some(vb.node_key));
    }
    let peers = m.desired_peers(t0, &[], &deaf, 0);
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].public_key, vb.wg_public_key);
    // Moving to a free address is allowed (a loser of a race moves).
    ab.version = 3;
    ab.overlay_ip = "10.77.0.9".parse().unwrap();
    w.snap(
        &mut m,
        t0 + Duration::from_secs(7),
        &[entry(&ab, &attacker), entry(&vb, &victim)],
    );
    assert!(m.holds_address(&ab.node_key));
}

#[test]
fn duplicate_wireguard_keys_are_refused() {
    let w = World::new();
    let (a, ab) = sample(3, &w.net, "10.77.0.2".parse().unwrap());
    let (b, mut bb) = sample(4, &w.net, "10.77.0.3".parse().unwrap());
    bb.wg_public_key = ab.wg_public_key;
    let mut m = Membership::new([0; 32], DEFAULT_DOWN_GRACE);
    let ev = w.snap(&mut m, Instant::now(), &[entry(&ab, &a), entry(&bb, &b)]);
    assert!(
        ev.iter().any(
            |e| matches!(e, Event::Rejected { reason, .. } if reason.contains("WireGuard key"))
        ),
        "{ev:?}"
    );
    assert_eq!(m.desired_peers(Instant::now(), &[], &deaf, 0).len(), 1);
}

#[test]
fn a_wireguard_key_given_up_is_free_again() {
    let w = World::new();
    let (a, mut ab) = sample(3, &w.net, "10.77.0.2".parse().unwrap());
    let (b, mut bb) = sample(4, &w.net, "10.77.0.3".parse().unwrap());
    let old = ab.wg_public_key;
    let mut m = Membership::new([0; 32], DEFAULT_DOWN_GRACE);
    let t0 = Instant::now();
    w.snap(&mut m, t0, &[entry(&ab, &a), entry(&bb, &b)]);
    // A moves to a new WireGuard key; B may then take A's old one.
    ab.version += 1;
    ab.wg_public_key = [0xaa; 32];
    bb.version += 1;
    bb.wg_public_key = old;
    let ev = w.snap(&mut m, t0, &[entry(&ab, &a), entry(&bb, &b)]);
    assert!(
        !ev.iter().any(|e| matches!(e, Event::Rejected { .. })),
        "{ev:?}"
    );
    let keys: BTreeSet<[u8; 32]> = m
        .desired_peers(t0, &[], &deaf, 0)
        .iter()
        .map(|p| p.public_key)
        .collect();
    assert_eq!(keys, BTreeSet::from([[0xaa; 32], old]));
    // B is gone from gossip: once it is forgotten (at the end of the
    // snapshot that misses it), a newcomer may use its key.
    let (c, mut cb) = sample(5, &w.net, "10.77.0.4".parse().unwrap());
    cb.wg_public_key = old;
    w.snap(&mut m, t0, &[entry(&ab, &a)]);
    let ev = w.snap(&mut m, t0, &[entry(&ab, &a), entry(&cb, &c)]);
    assert!(
        !ev.iter().any(|e| matches!(e, Event::Rejected { .. })),
        "{ev:?}"
    );
    assert_eq!(m.desired_peers(t0, &[], &deaf, 0).len(), 2);
}

#[test]
fn names_are_unique_and_a_down_holder_releases_its_name() {
    let w = World::new();
    let (a, ab) = sample(3, &w.net, "10.77.0.2".parse().unwrap());
    let (b, mut bb) = sample(4, &w.net, "10.77.0.3".parse().unwrap());
    bb.name = ab.name.clone();
    let mut m = Membership::new([0; 32], Duration::from_secs(60));
    let t0 = Instant::now();
    w.snap(&mut m, t0, &[entry(&ab, &a)]);
    let ev = w.snap(&mut m, t0 + PROVISIONAL, &[entry(&ab, &a), entry(&bb, &b)]);
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::Conflict { what, .. } if what.starts_with("name"))),
        "{ev:?}"
    );
    assert_eq!(m.holders().name_holder("n3"), Some(ab.node_key));
    // a crashes; after the down grace its name goes to b (a node that came
    // back with a new identity).
    let a_down = |k: &PublicKeyBytes| (*k == ab.node_key).then_some(Duration::ZERO);
    let t1 = t0 + PROVISIONAL + Duration::from_secs(1);
    m.handle_snapshot(t1, &[entry(&ab, &a), entry(&bb, &b)], &w.trust(), &a_down);
    m.handle_snapshot(
        t1 + Duration::from_secs(61),
        &[entry(&ab, &a), entry(&bb, &b)],
        &w.trust(),
        &a_down,
    );
    assert_eq!(m.holders().name_holder("n3"), Some(bb.node_key));
}

#[test]
fn same_subnet_endpoints_come_first() {
    let c: Vec<SocketAddr> = vec![
        "203.0.113.1:1".parse().unwrap(),
        "192.168.1.5:1".parse().unwrap(),
    ];
    let nets = vec!["192.168.1.0/24".parse().unwrap()];
    assert_eq!(order_endpoints(&c, &nets)[0], c[1]);
    assert_eq!(order_endpoints(&c, &[])[0], c[0]);
}

#[test]
fn a_down_ephemeral_member_is_forgotten_after_the_grace_a_stateful_one_is_kept() {
    let w = World::new();
    let (a, mut ab) = sample(3, &w.net, "10.77.0.2".parse().unwrap());
    let (b, bb) = sample(4, &w.net, "10.77.0.3".parse().unwrap());
    ab.ephemeral = true;
    let mut m = Membership::new([0; 32], DEFAULT_DOWN_GRACE);
    let t0 = Instant::now();
    let e = [entry(&ab, &a), entry(&bb, &b)];
    w.snap(&mut m, t0, &e);
    let all_down = |_: &PublicKeyBytes| Some(Duration::ZERO);
    m.handle_snapshot(t0 + Duration::from_secs(1), &e, &w.trust(), &all_down);
    let later = t0 + Duration::from_secs(1) + FORGET_EPHEMERAL_AFTER;
    let ev = m.handle_snapshot(later, &e, &w.trust(), &all_down);
    assert_eq!(ev, vec![Event::Forgotten { name: "n3".into() }]);
    // Gossip is told to forget the ephemeral member only.
    assert_eq!(m.to_forget(&e), vec![&*e[0].node_id]);
    assert_eq!(m.holders().ip_holder(&"10.77.0.2".parse().unwrap()), None);
    assert_eq!(
        m.holders().ip_holder(&"10.77.0.3".parse().unwrap()),
        Some(bb.node_key)
    );
}

/// A member found down long after it died (this node restarted, the
/// mesh's accusations say since when): its down grace and forget time
/// count from then, so it is forgotten here when everywhere else.
#[test]
fn a_member_found_down_late_is_forgotten_with_the_rest() {
    let w = World::new();
    let (a, ab) = sample(3, &w.net, "10.77.0.2".parse().unwrap());
    let (b, bb) = sample(4, &w.net, "10.77.0.3".parse().unwrap());
    let mut m = Membership::new([0; 32], DEFAULT_DOWN_GRACE);
    // (An instant well after boot: it is moved back below.)
    let t0 = Instant::now() + Duration::from_secs(1000);
    let e = [entry(&ab, &a), entry(&bb, &b)];
    w.snap(&mut m, t0, &e);
    let known = FORGET_DOWN_AFTER - Duration::from_secs(5);
    let a_down = |k: &PublicKeyBytes| (*k == ab.node_key).then_some(known);
    let ev = m.handle_snapshot(t0, &e, &w.trust(), &a_down);
    assert_eq!(ev, vec![Event::Down { name: "n3".into() }]);
    // The down grace counts from now (a false verdict must not end its
    // peer at once) ...
    assert!(!m.gone(t0, m.member(&ab.node_key).unwrap()));
    // ... the forget time from the oldest accusation.
    let ev = m.handle_snapshot(t0 + Duration::from_secs(5), &e, &w.trust(), &a_down);
    assert_eq!(ev, vec![Event::Forgotten { name: "n3".into() }]);
}
