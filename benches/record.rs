//! Record signing, verification and decoding (see benches/README.md).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use meshpeer::admission::Revocations;
use meshpeer::proto::{self, domain, Signed};
use meshpeer::record::{verify_record, Trust};
use meshpeer::sim::fixtures::{mesh, FIXTURE_UNIX};

fn bench(c: &mut Criterion) {
    let m = mesh(1, 1);
    let member = &m.members[0];
    let revoked = Revocations::default();
    let trust = Trust {
        network_key: &m.network.key,
        now_unix: FIXTURE_UNIX,
        revoked: &revoked,
    };
    c.bench_function("record/sign", |b| {
        b.iter(|| black_box(member.body.sign(&member.signing)))
    });
    // One ed25519 verification as a first sight costs (no cache).
    let bytes = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(&member.text)
            .unwrap_or_default()
    };
    let signed: Signed = proto::decode("record", &bytes).unwrap_or(Signed {
        body: vec![],
        signature: vec![],
    });
    c.bench_function("record/verify_signature_uncached", |b| {
        b.iter(|| {
            black_box(proto::verify_uncached(
                &member.body.node_key,
                domain::RECORD,
                &signed.body,
                &signed.signature,
                "record",
            ))
        })
    });
    // The full check (decode, record signature, admission chain, stamp),
    // with the process-wide cache warm: what a node pays for a copy of a
    // record it has verified before.
    c.bench_function("record/verify_record_cached", |b| {
        b.iter(|| {
            black_box(verify_record(
                &member.text,
                &trust,
                Some(&member.body.node_key),
            ))
        })
    });
    c.bench_function("record/decode", |b| {
        b.iter(|| {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(black_box(&member.text))
                .unwrap_or_default();
            let signed: Result<Signed, _> = proto::decode("record", &bytes);
            let body: Option<meshpeer::record::RecordBody> = signed
                .ok()
                .and_then(|s| proto::decode("record body", &s.body).ok());
            black_box(body)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
