//! A full membership of 1,000 and 10,000 members to desired WireGuard
//! peers, and the reconcile diff at those sizes (see benches/README.md).

use std::collections::BTreeSet;
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use meshpeer::admission::Revocations;
use meshpeer::membership::{GossipEntry, Membership, DEFAULT_DOWN_GRACE};
use meshpeer::reconcile::{reconcile, ActualPeer};
use meshpeer::record::Trust;
use meshpeer::sim::fixtures::{mesh, FIXTURE_UNIX};

fn bench(c: &mut Criterion) {
    for n in [1_000usize, 10_000] {
        let m = mesh(n, 2);
        let revoked = Revocations::default();
        let trust = Trust {
            network_key: &m.network.key,
            now_unix: FIXTURE_UNIX,
            revoked: &revoked,
        };
        let entries: Vec<GossipEntry> = m
            .members
            .iter()
            .map(|x| GossipEntry {
                node_id: Arc::from(x.node_id.as_str()),
                record: Some(Arc::from(x.text.as_str())),
                seen: None,
                alive: None,
                suspects: None,
            })
            .collect();
        let me = m.members[0].body.node_key;
        let now = Instant::now();
        let mut g = c.benchmark_group(format!("membership_{n}"));
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(if n > 1000 { 20 } else { 5 }));
        // Every record new to a node (signatures cached process-wide, as in
        // a daemon that verified them in gossip first): snapshot → members,
        // holder rule → desired peers.
        g.bench_function("snapshot_to_desired_peers_first_sight", |b| {
            b.iter_batched(
                || Membership::new(me, DEFAULT_DOWN_GRACE),
                |mut ms| {
                    ms.handle_snapshot(now, &entries, &trust, &|_| None);
                    black_box(ms.desired_peers(now, &[], &|_| false, 25))
                },
                BatchSize::LargeInput,
            )
        });
        // A step at rest: the same snapshot again, then desired peers.
        let mut ms = Membership::new(me, DEFAULT_DOWN_GRACE);
        ms.handle_snapshot(now, &entries, &trust, &|_| None);
        g.bench_function("snapshot_to_desired_peers_steady", |b| {
            b.iter(|| {
                ms.handle_snapshot(now, &entries, &trust, &|_| None);
                black_box(ms.desired_peers(now, &[], &|_| false, 25))
            })
        });
        let desired = ms.desired_peers(now, &[], &|_| false, 25);
        let actual: Vec<ActualPeer> = desired
            .iter()
            .map(|d| ActualPeer {
                public_key: d.public_key,
                endpoint: d.endpoints.first().copied(),
                allowed_ips: d
                    .allowed_ips
                    .iter()
                    .map(|n| (IpAddr::V4(n.addr()), n.prefix_len()))
                    .collect(),
                keepalive: Some(25),
                handshake_age: Some(Duration::from_secs(5)),
                rx_bytes: 1,
                tx_bytes: 1,
            })
            .collect();
        let owned: BTreeSet<[u8; 32]> = desired.iter().map(|d| d.public_key).collect();
        g.bench_function("reconcile_empty_device", |b| {
            b.iter(|| black_box(reconcile(&desired, &[], &owned, 0, false, &|_| false)))
        });
        g.bench_function("reconcile_in_sync", |b| {
            b.iter(|| black_box(reconcile(&desired, &actual, &owned, 0, false, &|_| false)))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
