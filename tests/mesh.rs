//! The seed scenario (tests/common/scenario.rs) on this machine: three
//! meshpeer daemons in network namespaces form a full WireGuard mesh, then
//! one leaves. Whatever WireGuard backend meshpeer picks here is accepted,
//! unless MESHPEER_EXPECT_BACKEND says which (tests/vm_kernel.rs runs the same
//! scenario in a VM with kernel WireGuard).
//!
//! Needs root; skipped (passing, with a message) when not root, unless CI=true.

mod common;

#[test]
fn three_nodes_form_a_full_mesh_and_one_leaves() {
    common::scenario::three_nodes_form_a_full_mesh_and_one_leaves(
        "three_nodes_form_a_full_mesh_and_one_leaves",
        None,
    );
}
