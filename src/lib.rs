//! meshpeer: a full-mesh WireGuard overlay that configures itself from
//! signed membership records gossiped over QUIC.
//!
//! The crate splits into a sans-IO core and a thin tokio shell:
//!
//! * core (no I/O, no clock reads; `now` is passed in): [`proto`] (wire
//!   formats), [`admission`] (network key, tokens, credentials), [`record`]
//!   (signed membership records), [`ipalloc`] (overlay address choice),
//!   [`membership`] (which members exist and in what state), [`reconcile`]
//!   (desired vs actual WireGuard peers).
//! * shell: [`gossip`] (chitchat over quinn), [`wg`] (WireGuard backends),
//!   [`daemon`] (the run loop), [`control`] (the local control socket),
//!   [`state`] (the state directory).
//!
//! See ARCHITECTURE.md for the data flow and the invariants.

pub mod admission;
pub mod control;
pub mod daemon;
pub mod gossip;
pub mod identity;
pub mod ipalloc;
pub mod membership;
pub mod nat;
pub mod net;
pub mod observe;
pub mod proto;
pub mod reconcile;
pub mod record;
pub mod state;
pub mod status;
pub mod wg;

/// Default UDP port of WireGuard, as users know it.
pub const DEFAULT_WG_PORT: u16 = 51820;
/// Default UDP port of the gossip (QUIC) endpoint.
pub const DEFAULT_GOSSIP_PORT: u16 = 51821;
/// Default WireGuard interface name.
pub const DEFAULT_INTERFACE: &str = "mp0";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshpeer";
