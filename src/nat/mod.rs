//! NAT traversal, sans-IO: STUN codec ([`stun`]), endpoint discovery
//! ([`discovery`]), and the choice between a direct path and a relay
//! ([`paths`]). The daemon moves the datagrams (on the WireGuard socket of the
//! userspace device) and applies the results; nothing here does I/O or reads
//! a clock.

pub mod allocs;
pub mod checks;
pub mod discovery;
pub mod endpoints;
pub mod paths;
pub mod stun;
