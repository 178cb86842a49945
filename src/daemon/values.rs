//! What this node publishes in gossip: its record, observations,
//! refutations and accusations, each signed, each at a version from one
//! counter (proto/PROTOCOL.md §4.2).

use std::net::{IpAddr, SocketAddr};

use ipnet::Ipv4Net;

use crate::admission::Network;
use crate::identity::Identity;
use crate::nat::discovery::NatInfo;
use crate::proto::Signed;
use crate::record::{NatKind, RecordBody};
use crate::state::NodeState;

/// Everything a record is built from.
pub struct RecordInputs<'a> {
    pub id: &'a Identity,
    pub network: &'a Network,
    pub admission: &'a Signed,
    pub stamp: &'a Signed,
    pub state: &'a NodeState,
    pub wg_port: u16,
    pub gossip_port: u16,
    pub advertise: IpAddr,
    pub nat: &'a NatInfo,
    /// Where live members see our WireGuard packets (for an unknown NAT).
    pub observed: &'a [SocketAddr],
    /// The host's other IPv4 networks (host candidates).
    pub local_nets: &'a [Ipv4Net],
    pub relay: bool,
    pub ephemeral: bool,
    pub left: bool,
    pub tags: &'a [String],
    /// Subnets behind this node (`--advertise-route`).
    pub routes: &'a [Ipv4Net],
    pub version: u64,
}

/// Builds this node's record.
pub fn build_record(i: &RecordInputs<'_>) -> RecordBody {
    // Candidates, best first: the server-reflexive endpoint (if the NAT keeps
    // one mapping for all destinations), or, when STUN cannot tell (kernel
    // WireGuard), the endpoint our peers observe; then host addresses.
    let mut endpoints = Vec::new();
    if i.nat.kind == NatKind::EndpointIndependent {
        endpoints.extend(i.nat.mapped.first().copied());
    }
    if i.nat.kind == NatKind::Unknown {
        endpoints.extend(i.observed.iter().take(2).copied());
    }
    let host = SocketAddr::new(i.advertise, i.wg_port);
    if !endpoints.contains(&host) {
        endpoints.push(host);
    }
    for net in i.local_nets {
        let a = SocketAddr::new(IpAddr::V4(net.addr()), i.wg_port);
        // Not an address on a subnet we route for the mesh: members reach
        // that subnet through us, and would refuse our route if it covered
        // one of our endpoints (a loop).
        if !endpoints.contains(&a)
            && !i.network.cidr.contains(&net.addr())
            && !i.routes.iter().any(|r| r.contains(&net.addr()))
            && endpoints.len() < crate::record::MAX_ENDPOINTS
        {
            endpoints.push(a);
        }
    }
    RecordBody {
        network_key: i.network.key,
        node_key: i.id.node_key(),
        version: i.version,
        name: i.state.name.clone(),
        overlay_ip: i
            .state
            .overlay_ip
            .unwrap_or(crate::ipalloc::first_host(i.network.cidr)),
        ip_claimed_at: i.state.ip_claimed_at,
        wg_public_key: i.id.wg_public(),
        wg_port: i.wg_port,
        endpoints,
        gossip_addr: SocketAddr::new(i.advertise, i.gossip_port),
        tags: i.tags.to_vec(),
        routes: i
            .routes
            .iter()
            .map(|r| crate::routes::from_net(*r))
            .collect(),
        left: i.left,
        nat: i.nat.kind,
        relay: i.relay,
        ephemeral: i.ephemeral,
        admission: i.admission.clone(),
        stamp: i.stamp.clone(),
    }
}

#[cfg(test)]
mod tests {
    use crate::record::next_version;

    #[test]
    fn versions_only_grow_even_when_the_clock_goes_back() {
        assert_eq!(next_version(0, 0, 1000), 1000);
        assert_eq!(next_version(1000, 0, 1000), 1001);
        assert_eq!(next_version(5000, 0, 1000), 5001);
        assert_eq!(next_version(10, 7000, 1000), 7001);
    }
}
