//! Overlay address allocation, without a coordinator.
//!
//! A node prefers an address derived from a hash of its node key and probes
//! upwards past addresses other members already hold. Two nodes that join at
//! the same moment may still pick the same address; both see the conflict
//! through gossip and apply the same rule, [`Claim::beats`]: the earlier claim
//! keeps the address (ties: the smaller node key), the other picks again. The
//! rule is a total order, so every member reaches the same verdict, and a node
//! keeps its address across restarts because it is stored with its state.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use crate::proto::PublicKeyBytes;

/// A node's claim on an overlay address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub ip: Ipv4Addr,
    pub claimed_at: u64,
    pub node_key: PublicKeyBytes,
}

impl Claim {
    /// Whether this claim keeps the address against `other`.
    pub fn beats(&self, other: &Claim) -> bool {
        (self.claimed_at, self.node_key) < (other.claimed_at, other.node_key)
    }
}

/// Usable host addresses of `cidr` (network and broadcast excluded).
fn host_range(cidr: Ipv4Net) -> (u32, u32) {
    let net = u32::from(cidr.network());
    let bcast = u32::from(cidr.broadcast());
    (net + 1, bcast - 1)
}

/// The first host address of the network (what `init` takes).
pub fn first_host(cidr: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(host_range(cidr).0)
}

/// Picks a free address for `node_key`, or `None` if the network is full.
pub fn choose(
    cidr: Ipv4Net,
    node_key: &PublicKeyBytes,
    taken: &BTreeSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let (lo, hi) = host_range(cidr);
    if hi < lo {
        return None;
    }
    let size = u64::from(hi - lo) + 1;
    let digest = Sha256::digest(node_key);
    let mut h = [0u8; 8];
    h.copy_from_slice(&digest[..8]);
    let start = u64::from_be_bytes(h) % size;
    (0..size)
        .map(|i| Ipv4Addr::from(lo + ((start + i) % size) as u32))
        .find(|ip| !taken.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_free_addresses_inside_the_network() {
        let cidr: Ipv4Net = "10.77.0.0/29".parse().unwrap();
        let mut taken = BTreeSet::new();
        for i in 0..6u8 {
            let ip = choose(cidr, &[i; 32], &taken).unwrap();
            assert!(cidr.contains(&ip));
            assert_ne!(ip, cidr.network());
            assert_ne!(ip, cidr.broadcast());
            assert!(taken.insert(ip), "{ip} handed out twice");
        }
        assert_eq!(choose(cidr, &[99; 32], &taken), None);
        assert_eq!(first_host(cidr), "10.77.0.1".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn same_key_same_preference() {
        let cidr: Ipv4Net = "10.77.0.0/16".parse().unwrap();
        let empty = BTreeSet::new();
        assert_eq!(
            choose(cidr, &[3; 32], &empty),
            choose(cidr, &[3; 32], &empty)
        );
    }

    #[test]
    fn conflict_rule_is_a_total_order() {
        let ip = "10.0.0.5".parse().unwrap();
        let a = Claim {
            ip,
            claimed_at: 5,
            node_key: [2; 32],
        };
        let b = Claim {
            ip,
            claimed_at: 5,
            node_key: [1; 32],
        };
        let c = Claim {
            ip,
            claimed_at: 4,
            node_key: [9; 32],
        };
        assert!(b.beats(&a) && !a.beats(&b));
        assert!(c.beats(&a) && c.beats(&b));
    }
}
