//! Cluster-level tests: rounds between in-memory nodes.

use rand::{Rng, SeedableRng};

use super::*;

struct Trusting;
impl Validator for Trusting {
    fn validate(&self, _: &str, _: &str, _: &str, _: Version) -> bool {
        true
    }
}

/// Accepts a value only if it is "<node id>:<version>:..." (a stand-in for
/// a signature binding value, owner and version).
struct Signed;
impl Validator for Signed {
    fn validate(&self, node: &str, _key: &str, value: &str, version: Version) -> bool {
        value.starts_with(&format!("{node}:{version}:"))
    }
}

fn node(id: &str) -> Chitchat {
    Chitchat::new(ChitchatConfig::new(id, "test"))
}

fn signed(id: &str, version: Version, what: &str) -> String {
    format!("{id}:{version}:{what}")
}

/// Runs one round from `a` to `b`; returns the number of messages.
fn round(nodes: &mut [Chitchat], a: usize, b: usize, v: &dyn Validator) -> usize {
    let mut msg = nodes[a].syn();
    let mut n = 1;
    let mut at = b;
    loop {
        let bytes = msg.serialize_to_vec();
        let decoded = ChitchatMessage::deserialize(&mut &bytes[..]).expect("decodes");
        match nodes[at].handle_message(decoded, v) {
            Some(r) => {
                msg = r;
                n += 1;
                at = if at == a { b } else { a };
            }
            None => return n,
        }
    }
}

#[test]
fn a_round_between_nodes_in_sync_is_two_messages() {
    let mut nodes = vec![node("a"), node("b")];
    nodes[0].set("record", signed("a", 1, "r"), 1).unwrap();
    nodes[1].set("record", signed("b", 1, "r"), 1).unwrap();
    assert_eq!(round(&mut nodes, 0, 1, &Signed), 4);
    assert_eq!(nodes[0].summary(), nodes[1].summary());
    assert_eq!(round(&mut nodes, 0, 1, &Signed), 2);
    assert_eq!(round(&mut nodes, 1, 0, &Signed), 2);
}

#[test]
fn many_nodes_converge_by_random_rounds() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(42);
    let n = 60;
    let mut nodes: Vec<Chitchat> = (0..n).map(|i| node(&format!("n{i}"))).collect();
    for (i, c) in nodes.iter_mut().enumerate() {
        let id = format!("n{i}");
        c.set("record", signed(&id, 10, "r"), 10).unwrap();
        c.set("seen", signed(&id, 11, "s"), 11).unwrap();
    }
    let mut rounds = 0;
    loop {
        let all_equal = nodes.windows(2).all(|w| w[0].summary() == w[1].summary());
        if all_equal && nodes[0].summary().count as usize == n {
            break;
        }
        let a = rng.gen_range(0..n);
        let mut b = rng.gen_range(0..n);
        while b == a {
            b = rng.gen_range(0..n);
        }
        round(&mut nodes, a, b, &Signed);
        rounds += 1;
        assert!(rounds < 100 * n, "no convergence after {rounds} rounds");
    }
    for c in &nodes {
        assert_eq!(c.node_states().len(), n);
    }
}

#[test]
fn forged_and_replayed_values_are_not_taken() {
    let mut nodes = vec![node("a"), node("b"), node("evil")];
    nodes[0].set("record", signed("a", 5, "real"), 5).unwrap();
    round(&mut nodes, 0, 1, &Signed);
    round(&mut nodes, 0, 2, &Signed);
    // The attacker puts a forged value of "a" in its own copy, at a high
    // version, and gossips it: the validator refuses it and a's version at
    // b does not move, so a's real next update still gets through.
    let forged: Arc<str> = "a:999:mine".replace("999", "1000000").into();
    let evil = &mut nodes[2];
    assert!(!evil.inject("a", "record", forged.clone(), 999, &Signed));
    // Even an attacker that bypasses its own validator cannot make b take it.
    evil.inject("a", "record", forged, 999, &Trusting);
    round(&mut nodes, 2, 1, &Signed);
    assert_eq!(nodes[1].node_state("a").map(|s| s.max_version()), Some(5));
    nodes[0].set("record", signed("a", 6, "next"), 6).unwrap();
    round(&mut nodes, 0, 1, &Signed);
    assert_eq!(
        nodes[1].node_state("a").and_then(|s| s.get("record")),
        Some("a:6:next")
    );
    // Nobody's copy of our own node is taken; a newer one is reported.
    assert!(nodes[1].node_state("b").is_none());
}

#[test]
fn a_restarted_node_learns_its_old_version() {
    let mut nodes = vec![node("a"), node("b")];
    nodes[0]
        .set("record", signed("a", 500, "old life"), 500)
        .unwrap();
    round(&mut nodes, 0, 1, &Signed);
    // "a" restarts without its counter and publishes at version 7.
    nodes[0] = node("a");
    nodes[0]
        .set("record", signed("a", 7, "new life"), 7)
        .unwrap();
    round(&mut nodes, 0, 1, &Signed);
    assert_eq!(nodes[0].take_self_seen(), Some(500));
    assert_eq!(nodes[0].take_self_seen(), None);
}

/// Two nodes holding `n` members alike, except that `a` holds a newer
/// record of one of them: `(a, b, that member's id)`.
fn pair_one_record_apart(n: usize, newer: usize) -> (Chitchat, Chitchat, String) {
    let mut a = node("a");
    let mut b = node("b");
    for i in 0..n {
        let id = format!("member-{i}");
        for c in [&mut a, &mut b] {
            assert!(c.inject(&id, "record", signed(&id, 1, "r"), 1, &Signed));
        }
    }
    let id = format!("member-{newer}");
    assert!(a.inject(&id, "record", signed(&id, 2, "r2"), 2, &Signed));
    (a, b, id)
}

/// Runs the round `syn` opens from `a` to `b`, asserting that `b` answers
/// with a digest of at most 3 buckets (the one that differs, plus the
/// nodes' own, which differ as each holds itself and not the other) and
/// fewer than `max_entries` entries; then checks that `b` got `id`'s
/// newer record.
fn narrowed_round(
    a: &mut Chitchat,
    b: &mut Chitchat,
    syn: ChitchatMessage,
    max_entries: usize,
    id: &str,
) {
    let ChitchatMessage::Syn { ref buckets, .. } = syn else {
        panic!("not a syn")
    };
    assert_eq!(buckets.len(), BUCKETS);
    let Some(ChitchatMessage::SynAck {
        digest: Some(digest),
    }) = b.handle_message(syn, &Signed)
    else {
        panic!("expected a digest")
    };
    assert!(digest.scope.len() <= 3, "{:?}", digest.scope);
    assert!(
        digest.entries.len() < max_entries,
        "{}",
        digest.entries.len()
    );
    let ack = a.handle_message(
        ChitchatMessage::SynAck {
            digest: Some(digest),
        },
        &Signed,
    );
    if let Some(m) = b.handle_message(ack.expect("ack"), &Signed) {
        a.handle_message(m, &Signed);
    }
    assert_eq!(
        b.node_state(id).and_then(|s| s.get("record")),
        Some(signed(id, 2, "r2").as_str())
    );
}

#[test]
fn large_meshes_narrow_a_mismatch_to_the_buckets_that_differ() {
    let (mut a, mut b, id) = pair_one_record_apart(3000, 17);
    // Any round: 3000 nodes is above the threshold of every Syn.
    let syn = a.syn();
    narrowed_round(&mut a, &mut b, syn, 250, &id);
}

#[test]
fn a_busy_round_narrows_at_a_hundred_nodes_and_a_rest_round_does_not() {
    let (mut a, mut b, id) = pair_one_record_apart(100, 42);
    // At rest: summary only (the summaries are almost always equal).
    let ChitchatMessage::Syn { buckets, .. } = a.syn_busy(false) else {
        panic!("not a syn")
    };
    assert!(buckets.is_empty());
    // Busy: bucket hashes, and an answer about the buckets that differ.
    let syn = a.syn_busy(true);
    narrowed_round(&mut a, &mut b, syn, 20, &id);
}

#[test]
fn arbitrary_bytes_never_panic_the_decoder_or_the_state_machine() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut c = node("victim");
    // Valid prefixes with random tails, and pure noise.
    let seeds: Vec<Vec<u8>> = vec![
        ChitchatMessage::SynAck { digest: None }.serialize_to_vec(),
        node("x").syn().serialize_to_vec(),
        vec![],
    ];
    for i in 0..20_000 {
        let mut b = seeds[i % seeds.len()].clone();
        let cut = if b.is_empty() {
            0
        } else {
            rng.gen_range(0..b.len())
        };
        b.truncate(cut);
        let extra = rng.gen_range(0..64);
        b.extend((0..extra).map(|_| rng.gen::<u8>()));
        if let Ok(m) = ChitchatMessage::deserialize(&mut &b[..]) {
            let _ = c.handle_message(m, &Signed);
        }
    }
}
