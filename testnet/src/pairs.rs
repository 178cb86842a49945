//! Pair types and expected paths: what kind of pair two nodes form (by node
//! kind, and same/different home and CGNAT from the topology), whether
//! meshpeer should connect them directly or through a relay, and the
//! per-pair-type matrix (reachable, direct, relayed, time to first reply)
//! built from the pinger and the status poller.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

use crate::pinger::State as PingState;
use crate::poller::PollState;
use crate::topology::{Kind, NodeSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expected {
    Direct,
    Relayed,
}

impl Expected {
    pub fn as_str(self) -> &'static str {
        match self {
            Expected::Direct => "direct",
            Expected::Relayed => "relayed",
        }
    }
}

/// The pair types in report order: (label, expected path).
pub const TYPES: [(&str, Expected); 14] = [
    ("public-public", Expected::Direct),
    ("public-nat", Expected::Direct),
    ("public-cgnat", Expected::Direct),
    ("public-symmetric", Expected::Direct),
    ("nat-nat (same home)", Expected::Direct),
    ("nat-nat (different homes)", Expected::Direct),
    ("nat-cgnat", Expected::Direct),
    ("cgnat-cgnat (same home)", Expected::Direct),
    (
        "cgnat-cgnat (same CGNAT, different homes)",
        Expected::Relayed,
    ),
    ("cgnat-cgnat (different CGNATs)", Expected::Direct),
    ("nat-symmetric", Expected::Relayed),
    ("cgnat-symmetric", Expected::Relayed),
    ("symmetric-symmetric (same home)", Expected::Direct),
    ("symmetric-symmetric (different homes)", Expected::Relayed),
];

fn same_home(a: &NodeSpec, b: &NodeSpec) -> bool {
    matches!((a.home(), b.home()), (Some(x), Some(y)) if x == y)
}

/// The pair type of two nodes (unordered).
pub fn pair_type(a: &NodeSpec, b: &NodeSpec) -> String {
    let (a, b) = if a.kind <= b.kind { (a, b) } else { (b, a) };
    let kinds = format!("{}-{}", a.kind.as_str(), b.kind.as_str());
    if a.kind != b.kind || a.kind == Kind::Public {
        return kinds;
    }
    let rel = if same_home(a, b) {
        "same home"
    } else if a.kind == Kind::Cgnat {
        if a.cgnat() == b.cgnat() {
            "same CGNAT, different homes"
        } else {
            "different CGNATs"
        }
    } else {
        "different homes"
    };
    format!("{kinds} ({rel})")
}

/// The path meshpeer should settle on (issue 4): direct for anything with a
/// public node, for two members of one home (over their LAN) and for two
/// home-NAT or CGNAT members in different homes, except two homes behind
/// the same CGNAT (it does not hairpin); relayed for a symmetric NAT facing
/// anything but a public member, and for two homes behind one CGNAT.
pub fn expected_path(a: &NodeSpec, b: &NodeSpec) -> Expected {
    if same_home(a, b) || a.kind == Kind::Public || b.kind == Kind::Public {
        return Expected::Direct;
    }
    if a.kind == Kind::Symmetric || b.kind == Kind::Symmetric {
        return Expected::Relayed;
    }
    if a.kind == Kind::Cgnat && b.kind == Kind::Cgnat && a.cgnat() == b.cgnat() {
        return Expected::Relayed;
    }
    Expected::Direct
}

/// The path node `i` shows for node `j` in its latest status: "direct",
/// "relayed", "trying", "down", or "none" (not listed / no status yet).
pub fn observed(poll: &PollState, i: usize, j: usize) -> (String, Value) {
    let Some(o) = &poll.obs[i] else {
        return ("none".into(), Value::Null);
    };
    let Some(m) = o.paths.get(&format!("n{j}")) else {
        return ("none".into(), Value::Null);
    };
    let p = if m.state == "down" {
        "down".to_string()
    } else {
        m.path.clone().unwrap_or_else(|| "none".into())
    };
    (p, serde_json::to_value(m).unwrap_or(Value::Null))
}

fn q(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Some(v[((v.len() as f64 - 1.0) * p).round() as usize])
}

/// The matrix over the live nodes `live`: one row per pair type present,
/// and every ordered pair whose observed path differs from the expected one
/// (`flagged`). `poll` is None for engines without a status view (paths
/// then read "n/a" and nothing is flagged).
pub fn matrix(
    nodes: &[NodeSpec],
    live: &[usize],
    ping: &PingState,
    poll: Option<&PollState>,
) -> Value {
    #[derive(Default)]
    struct Row {
        pairs: usize,
        reached: usize,
        direct: usize,
        relayed: usize,
        other: usize,
        mismatched: usize,
        ttfr: Vec<f64>,
        relays: BTreeMap<String, usize>,
    }
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut flagged = vec![];
    let mut unreached = vec![];
    let mut slowest: Vec<(f64, String, String)> = vec![];
    for &i in live {
        for &j in live {
            if i == j {
                continue;
            }
            let (a, b) = (&nodes[i], &nodes[j]);
            let ty = pair_type(a, b);
            let exp = expected_path(a, b);
            let r = rows.entry(ty.clone()).or_default();
            r.pairs += 1;
            let p = ping.pair(i, j);
            if p.first_reply >= 0.0 {
                r.reached += 1;
                r.ttfr.push(p.first_reply - p.since);
                slowest.push((p.first_reply - p.since, format!("n{i}->n{j}"), ty.clone()));
            } else {
                let side = |x: usize, y: usize| -> String {
                    let Some(poll) = poll else {
                        return "n/a".into();
                    };
                    let (p, d) = observed(poll, x, y);
                    match d["relay"].as_str() {
                        Some(r) => format!("{p} via {r}"),
                        None => p,
                    }
                };
                unreached.push(json!({
                    "pair": format!("n{i}->n{j}"),
                    "type": ty,
                    "sender_sees": side(i, j),
                    "receiver_sees": side(j, i),
                }));
            }
            let Some(poll) = poll else { continue };
            let (path, detail) = observed(poll, i, j);
            match path.as_str() {
                "direct" => r.direct += 1,
                "relayed" => {
                    r.relayed += 1;
                    let via = detail["relay"].as_str().unwrap_or("?").to_string();
                    *r.relays.entry(via).or_default() += 1;
                }
                _ => r.other += 1,
            }
            if path != exp.as_str() {
                r.mismatched += 1;
                flagged.push(json!({
                    "pair": format!("n{i}->n{j}"),
                    "type": ty,
                    "kinds": [a.kind, b.kind],
                    "expected": exp,
                    "path": path,
                    "status": detail,
                }));
            }
        }
    }
    let order = |t: &str| {
        TYPES
            .iter()
            .position(|(l, _)| *l == t)
            .unwrap_or(TYPES.len())
    };
    let mut keys: Vec<&String> = rows.keys().collect();
    keys.sort_by_key(|k| (order(k), (*k).clone()));
    let table: Vec<Value> = keys
        .iter()
        .map(|k| {
            let r = rows.get(*k).unwrap();
            let exp = TYPES
                .iter()
                .find(|(l, _)| l == k)
                .map(|(_, e)| e.as_str())
                .unwrap_or("direct");
            let mut t = r.ttfr.clone();
            json!({
                "type": k,
                "expected": exp,
                "pairs": r.pairs,
                "reached": r.reached,
                "direct": poll.map(|_| r.direct),
                "relayed": poll.map(|_| r.relayed),
                "other": poll.map(|_| r.other),
                "mismatched": poll.map(|_| r.mismatched),
                "relays": r.relays,
                "first_reply_p50_secs": q(&mut t, 0.5),
                "first_reply_max_secs": q(&mut t, 1.0),
            })
        })
        .collect();
    slowest.sort_by(|a, b| b.0.total_cmp(&a.0));
    let slowest: Vec<Value> = slowest
        .iter()
        .take(10)
        .map(|(t, pair, ty)| json!({"pair": pair, "type": ty, "first_reply_secs": t}))
        .collect();
    let pairs: usize = rows.values().map(|r| r.pairs).sum();
    let reached: usize = rows.values().map(|r| r.reached).sum();
    json!({
        "pairs": pairs,
        "reached": reached,
        "mismatched": if poll.is_some() { Some(flagged.len()) } else { None },
        "rows": table,
        "flagged": flagged,
        "unreached": unreached,
        "slowest": slowest,
        "first_reply_note": "seconds from the later of the two nodes' start to the pair's first echo reply",
        "path_source": "the sending node's `meshpeer status` entry for the receiver (path, relay, why_not_direct)",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{HomeSizes, Mix, Plan, TopoOptions};

    #[test]
    fn matrix_layout_has_every_pair_type_and_expectation() {
        let o = TopoOptions {
            kind: "mixed".into(),
            mix: Mix::parse("public=2,nat=4,cgnat=5,symmetric=2").unwrap(),
            slots: 14,
            nodes_per_home: 2,
            homes_per_cgnat: 2,
            hosts_per_isp: 128,
            udp_timeout_secs: None,
            udp_stream_timeout_secs: None,
            seed: 1,
            home_size_exact: false,
            home_sizes: HomeSizes {
                nat: vec![2],
                cgnat: vec![2, 1, 1, 1],
                symmetric: vec![1],
            },
            stun_server: false,
            sites: vec![],
        };
        let p = Plan::new("tn0000-", &o).unwrap();
        let mut seen: BTreeMap<String, Expected> = BTreeMap::new();
        for a in &p.nodes {
            for b in &p.nodes {
                if a.index != b.index {
                    seen.insert(pair_type(a, b), expected_path(a, b));
                    assert_eq!(pair_type(a, b), pair_type(b, a));
                }
            }
        }
        for (label, exp) in TYPES.iter() {
            if *label == "symmetric-symmetric (same home)" {
                continue; // symmetric homes hold one node in this layout
            }
            assert_eq!(seen.get(*label), Some(exp), "{label}: {seen:?}");
        }
        assert_eq!(seen.len(), 13, "{seen:?}");
    }
}
