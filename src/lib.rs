//! meshpeer: a full-mesh WireGuard overlay that configures itself from
//! signed membership records gossiped over QUIC.
//!
//! The crate splits into a sans-IO core and a thin tokio shell:
//!
//! * core (no I/O, no clock reads; `now` is passed in): [`proto`] (wire
//!   formats), [`admission`] (network key, tokens, credentials), [`record`]
//!   (signed membership records), [`ipalloc`] (overlay address choice),
//!   [`membership`] (which members exist and in what state), [`routes`]
//!   (which advertised subnets to route where), [`reconcile`] (desired vs
//!   actual WireGuard peers).
//! * shell: [`gossip`] (chitchat over quinn), [`wg`] (WireGuard backends),
//!   [`daemon`] (the run loop), [`control`] (the local control socket),
//!   [`state`] (the state directory), [`metrics`] (the Prometheus endpoint).
//! * operations: [`config`] (the typed config file and option layering),
//!   [`export`] (hosts, Ansible, MPI, Slurm, ssh_config renderings of
//!   `status`), [`hosts`] (the members' names in /etc/hosts).
//!
//! See ARCHITECTURE.md for the data flow and the invariants.

pub mod admission;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod export;
pub mod gossip;
pub mod hosts;
pub mod identity;
pub mod ipalloc;
pub mod liveness;
pub mod membership;
pub mod metrics;
pub mod nat;
pub mod net;
pub mod observe;
pub mod proto;
pub mod reconcile;
pub mod record;
pub mod relay;
pub mod routes;
pub mod sim;
pub mod state;
pub mod status;
#[doc(hidden)]
pub mod testing;
pub mod tick;
pub mod trust;
pub mod wg;

/// Default UDP port of WireGuard, as users know it.
pub const DEFAULT_WG_PORT: u16 = 51820;

/// The WireGuard port when none is configured: [`DEFAULT_WG_PORT`] on a
/// member with a public address (the port to open in a VPS firewall), and a
/// port in 51822–52821 derived from the WireGuard key on a member behind
/// NAT. Two members behind one NAT on the same source port make a Linux NAT
/// (most home routers) keep that port for whichever of them reaches a given
/// destination first and give the other a random one *for that destination
/// only*; after a router restart or a mapping flush this differs per
/// destination, so peers cannot punch through to either. Distinct ports
/// keep each member's mapping the same for every destination.
pub fn default_wg_port(public: bool, wg_public_key: &[u8; 32]) -> u16 {
    if public {
        DEFAULT_WG_PORT
    } else {
        let h = u16::from_le_bytes([wg_public_key[0], wg_public_key[1]]);
        DEFAULT_WG_PORT + 2 + h % 1000
    }
}
/// Default UDP port of the gossip (QUIC) endpoint.
pub const DEFAULT_GOSSIP_PORT: u16 = 51821;
/// Default WireGuard interface name.
pub const DEFAULT_INTERFACE: &str = "mp0";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshpeer";
/// Default state directory of an ephemeral node (`--ephemeral`): a tmpfs,
/// gone at reboot.
pub const DEFAULT_EPHEMERAL_STATE_DIR: &str = "/run/meshpeer";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_wg_port_public_is_51820_behind_nat_spread_and_clear_of_gossip() {
        assert_eq!(default_wg_port(true, &[7; 32]), 51820);
        let mut seen = std::collections::HashSet::new();
        for i in 0..=255u8 {
            let p = default_wg_port(false, &[i; 32]);
            assert!((51822..=52821).contains(&p), "{p}");
            assert_ne!(p, DEFAULT_GOSSIP_PORT);
            seen.insert(p);
        }
        assert!(seen.len() > 200, "ports spread: {}", seen.len());
    }
}
