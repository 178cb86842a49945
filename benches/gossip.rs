//! A gossip round at 1,000 members (see benches/README.md): chitchat's
//! real messages between two nodes, with meshpeer's validator.

use std::hint::black_box;
use std::sync::Arc;

use chitchat::{Chitchat, ChitchatConfig};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use meshpeer::sim::fixtures::{mesh, FIXTURE_UNIX};
use meshpeer::trust::{TrustState, RECORD_KEY};

/// Runs a round from `a` to `b`; returns the messages and their bytes.
fn round(a: &mut Chitchat, b: &mut Chitchat, v: &TrustState) -> (usize, usize) {
    use chitchat::Serializable;
    let mut msg = a.syn();
    let mut at_b = true;
    let (mut n, mut bytes) = (0, 0);
    loop {
        n += 1;
        bytes += msg.serialized_len();
        let reply = if at_b {
            b.handle_message(msg, v)
        } else {
            a.handle_message(msg, v)
        };
        match reply {
            Some(r) => {
                msg = r;
                at_b = !at_b;
            }
            None => return (n, bytes),
        }
    }
}

fn node(id: &str, cluster: &str) -> Chitchat {
    Chitchat::new(ChitchatConfig::new(id, cluster))
}

fn bench(c: &mut Criterion) {
    let n = 1_000;
    let m = mesh(n, 3);
    let trust = TrustState::new(m.network, Arc::new(|| FIXTURE_UNIX));
    let cluster = m.network.id();
    let fill = |ch: &mut Chitchat, skip: Option<usize>| {
        for (i, x) in m.members.iter().enumerate() {
            if Some(i) == skip || x.node_id == **ch.node_id() {
                continue;
            }
            ch.inject(
                &x.node_id,
                RECORD_KEY,
                x.text.as_str(),
                x.body.version,
                &trust,
            );
        }
    };
    let mut a = node(&m.members[0].node_id, &cluster);
    let mut b = node(&m.members[1].node_id, &cluster);
    a.set(
        RECORD_KEY,
        m.members[0].text.as_str(),
        m.members[0].body.version,
    )
    .ok();
    b.set(
        RECORD_KEY,
        m.members[1].text.as_str(),
        m.members[1].body.version,
    )
    .ok();
    fill(&mut a, None);
    fill(&mut b, None);
    let (msgs, bytes) = round(&mut a, &mut b, &trust);
    eprintln!("in sync at {n}: {msgs} messages, {bytes} bytes");
    let mut g = c.benchmark_group("gossip_1000");
    g.sample_size(20);
    g.bench_function("round_in_sync", |bn| {
        bn.iter(|| black_box(round(&mut a, &mut b, &trust)))
    });
    // One member's record is new to B: summaries differ, B answers its
    // digest (1,000 states: under the bucket threshold, all of it), A a
    // one-value delta.
    let behind = || {
        let mut f = node(&m.members[1].node_id, &cluster);
        f.set(
            RECORD_KEY,
            m.members[1].text.as_str(),
            m.members[1].body.version,
        )
        .ok();
        fill(&mut f, Some(500));
        f
    };
    let (msgs, bytes) = round(&mut a, &mut behind(), &trust);
    eprintln!("one record behind at {n}: {msgs} messages, {bytes} bytes");
    g.bench_function("round_one_record_behind", |bn| {
        bn.iter_batched(
            behind,
            |mut f| black_box(round(&mut a, &mut f, &trust)),
            BatchSize::LargeInput,
        )
    });
    // A node that knows nobody: the full state in rounds of 64 KiB deltas.
    g.bench_function("rounds_until_in_sync_from_empty", |bn| {
        bn.iter_batched(
            || {
                let mut e = node(&m.members[1].node_id, &cluster);
                e.set(
                    RECORD_KEY,
                    m.members[1].text.as_str(),
                    m.members[1].body.version,
                )
                .ok();
                e
            },
            |mut e| {
                let mut rounds = 0;
                while e.summary() != a.summary() && rounds < 1000 {
                    round(&mut e, &mut a, &trust);
                    rounds += 1;
                }
                black_box(rounds)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
