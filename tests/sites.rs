//! Site-to-site routes on this machine (tests/common/sites.rs): two LANs
//! behind two gateway members reach each other through the mesh, a plain
//! member reaches both, and a member whose token does not allow its routes
//! gets none installed. tests/vm_kernel.rs runs the same scenario with
//! kernel WireGuard.
//!
//! Needs root; skipped (passing, with a message) when not root, unless CI=true.

mod common;

#[test]
fn two_sites_route_through_their_gateways() {
    common::sites::two_sites_route_through_their_gateways(
        "two_sites_route_through_their_gateways",
        None,
    );
}
