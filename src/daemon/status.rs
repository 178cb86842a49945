//! Building `status` (the data model is `crate::status`).

use std::net::SocketAddr;

use super::{traversal, Node};
use crate::membership::Liveness;
use crate::nat::paths::Path;
use crate::proto;
use crate::reconcile::{ActualPeer, FRESH_HANDSHAKE};
use crate::record::NatKind;
use crate::status::{MemberState, MemberStatus, RouteStatus, Status};

pub fn nat_name(k: NatKind) -> &'static str {
    match k {
        NatKind::Unknown => "unknown",
        NatKind::Public => "public",
        NatKind::EndpointIndependent => "endpoint-independent",
        NatKind::EndpointDependent => "symmetric",
    }
}

impl Node {
    pub(super) fn build_status(&self, actual: &[ActualPeer]) -> Status {
        let peer_of = |k: &[u8; 32]| actual.iter().find(|p| &p.public_key == k);
        let fresh = |k: &[u8; 32]| {
            peer_of(k)
                .and_then(|p| p.handshake_age)
                .is_some_and(|a| a < FRESH_HANDSHAKE)
        };
        let name_of = |k: &[u8; 32]| {
            self.membership
                .by_wg_key(k)
                .map(|x| x.record.name.clone())
                .unwrap_or_default()
        };
        let me = self.id.node_key();
        let mut members: Vec<MemberStatus> = self
            .membership
            .members()
            .map(|m| {
                let r = &m.record;
                let is_self = r.node_key == me;
                let peer = peer_of(&r.wg_public_key);
                let age = peer.and_then(|p| p.handshake_age);
                let path = self.traversal.paths.get(&r.wg_public_key).copied();
                // Relayed or not, the session is end to end.
                let reachable = fresh(&r.wg_public_key);
                // A tunnel that worked and lapsed while unused (no keepalive
                // between public members; the userspace device renews a
                // session only for data, so any pair at rest) is idle: it
                // comes back on the first packet, direct or relayed.
                let lapsed = !reachable
                    && matches!(path, Some(Path::Direct) | Some(Path::Relayed { .. }))
                    && peer.is_some_and(|p| p.endpoint.is_some() && p.handshake_age.is_some());
                let state = if is_self {
                    MemberState::Myself
                } else if matches!(m.liveness, Liveness::Down { .. }) {
                    MemberState::Down
                } else if reachable {
                    MemberState::Connected
                } else if lapsed {
                    MemberState::Idle
                } else {
                    MemberState::Connecting
                };
                let endpoint = if is_self {
                    Some(SocketAddr::new(self.advertise, self.cfg.wg_port()))
                } else {
                    peer.and_then(|p| p.endpoint)
                };
                let (path_text, relay, why) = match path {
                    _ if is_self || state == MemberState::Down => (None, None, None),
                    Some(Path::Direct) => (Some("direct".to_string()), None, None),
                    Some(Path::Relayed { via }) => (
                        Some("relayed".to_string()),
                        Some(name_of(&via)),
                        Some(traversal::relay_reason(
                            self.traversal.nat.kind,
                            r.nat,
                            &self.traversal.nat.mapped,
                            &r.endpoints,
                        )),
                    ),
                    Some(Path::Trying) | None => (Some("trying".to_string()), None, None),
                };
                MemberStatus {
                    name: r.name.clone(),
                    node_id: proto::node_id_string(&r.node_key),
                    overlay_ip: r.overlay_ip,
                    public_key: proto::key_b64(&r.wg_public_key),
                    endpoint: endpoint.map(|e| e.to_string()),
                    state,
                    path: path_text,
                    relay,
                    why_not_direct: why,
                    nat: nat_name(r.nat).to_string(),
                    last_handshake_secs: age.map(|a| a.as_secs()),
                    rtt_us: self.liveness.rtt(&r.node_key).map(|d| d.as_micros() as u64),
                    rx_bytes: peer.map_or(0, |p| p.rx_bytes),
                    tx_bytes: peer.map_or(0, |p| p.tx_bytes),
                    tags: r.tags.clone(),
                    ephemeral: r.ephemeral,
                    conflict: self.membership.conflict_of(&r.node_key).map(str::to_string),
                    routes: self
                        .routes
                        .plan
                        .outcomes_of(&r.node_key)
                        .map(|o| RouteStatus {
                            route: o.route.clone(),
                            state: o.verdict.as_str().to_string(),
                            reason: o.verdict.reason(),
                        })
                        .collect(),
                }
            })
            .collect();
        members.sort_by_key(|m| m.overlay_ip);
        let (sent, received) = self.gossip.transport.byte_counts();
        let stats = self.gossip.stats();
        let relay = self.relay.stats();
        Status {
            node: self.state.name.clone(),
            node_id: self.id.node_id(),
            network: self.network.cidr.to_string(),
            interface: self.cfg.interface.clone(),
            backend: self.wg.backend,
            listen_port: self.cfg.wg_port(),
            gossip_addr: SocketAddr::new(self.advertise, self.cfg.gossip_port).to_string(),
            gossip_bytes_sent: sent,
            gossip_bytes_received: received,
            gossip_rounds: stats.rounds_started,
            gossip_rounds_in_sync: stats.rounds_in_sync,
            gossip_connections: self.gossip.transport.connections() as u64,
            gossip_values_stored: stats.values_stored,
            gossip_values_rejected: stats.values_rejected,
            loop_wakeups: self.wakeups,
            loop_steps: self.steps,
            loop_step_ms: self.step_time.as_millis() as u64,
            nat: nat_name(self.traversal.nat.kind).to_string(),
            mapped_endpoints: self
                .traversal
                .nat
                .mapped
                .iter()
                .map(|e| e.to_string())
                .collect(),
            relaying: self.relays(),
            relay_allocations: relay.allocations,
            relay_forwarded: relay.forwarded,
            relay_dropped: relay.dropped,
            routes_installed: self.routes.installed.len(),
            myself: members
                .iter()
                .find(|m| m.state == MemberState::Myself)
                .cloned(),
            members,
        }
    }
}
