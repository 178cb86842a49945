//! Deterministic meshes of signed members, for benches and tests: a
//! network key, a token, and `n` members each admitted with it, stamped by
//! the network key, with a signed record.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ed25519_dalek::SigningKey;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::admission::{self, Network, Stamper};
use crate::proto;
use crate::record::{NatKind, RecordBody};

/// Unix seconds the fixtures are dated at.
pub const FIXTURE_UNIX: u64 = 1_800_000_000;

/// One member: its key, its record and the record's gossip text.
pub struct Member {
    pub signing: SigningKey,
    pub body: RecordBody,
    pub text: String,
    pub node_id: String,
}

/// A mesh of `n` members (seeded).
pub struct Mesh {
    pub network: Network,
    pub network_signing: SigningKey,
    pub members: Vec<Member>,
}

/// Builds a mesh of `n` members from `seed`.
pub fn mesh(n: usize, seed: u64) -> Mesh {
    let mut rng = SmallRng::seed_from_u64(seed);
    let net = SigningKey::from_bytes(&rng.gen());
    let cidr: ipnet::Ipv4Net = ipnet::Ipv4Net::new(Ipv4Addr::new(10, 64, 0, 0), 10)
        .unwrap_or_else(|_| ipnet::Ipv4Net::default());
    let network = Network {
        key: net.verifying_key().to_bytes(),
        cidr,
    };
    let token_id: [u8; 16] = rng.gen();
    let token = admission::issue_token_with(
        &net,
        cidr,
        0,
        vec![],
        token_id,
        SigningKey::from_bytes(&rng.gen()),
    );
    let members = (0..n)
        .map(|i| {
            let signing = SigningKey::from_bytes(&rng.gen());
            let node_key = signing.verifying_key().to_bytes();
            let ip = Ipv4Addr::from(u32::from(cidr.network()) + 1 + i as u32);
            let public = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i as u32);
            let body = RecordBody {
                network_key: network.key,
                node_key,
                version: 1_800_000_000_000 + i as u64,
                name: format!("n{i}"),
                overlay_ip: ip,
                ip_claimed_at: 1_800_000_000_000,
                wg_public_key: rng.gen(),
                wg_port: 51820,
                endpoints: vec![SocketAddr::new(IpAddr::V4(public), 51820)],
                gossip_addr: SocketAddr::new(IpAddr::V4(public), 51821),
                tags: vec![],
                routes: vec![],
                left: false,
                ephemeral: false,
                nat: NatKind::Public,
                relay: true,
                admission: token.admit(node_key, FIXTURE_UNIX),
                stamp: admission::stamp(
                    &net,
                    Stamper::Network,
                    network.key,
                    node_key,
                    token_id,
                    FIXTURE_UNIX,
                ),
            };
            let text = body.sign(&signing);
            Member {
                node_id: proto::node_id_string(&node_key),
                signing,
                body,
                text,
            }
        })
        .collect();
    Mesh {
        network,
        network_signing: net,
        members,
    }
}
