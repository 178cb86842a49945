//! The daemon's step cadence (sans-IO, shared with the simulation): how often
//! a node runs its step (membership, paths, reconcile, what to publish).

use std::time::Duration;

/// The daemon's tick when the mesh is small; see [`tick_period`].
pub const TICK: Duration = Duration::from_millis(250);
/// The tick of a node at rest: nothing changed for [`SETTLE`], every path
/// settled, no gossip news. Events that need an answer at once (a value
/// arriving, a STUN or probe answer, a liveness timer) do not wait for it.
pub const QUIET_TICK: Duration = Duration::from_secs(1);
/// How long after the last change a node counts as at rest.
pub const SETTLE: Duration = Duration::from_secs(10);
/// Up to this many known members, the tick is [`TICK`]; above, it grows in
/// proportion, up to [`MAX_TICK`].
pub const TICK_MEMBERS: usize = 40;
pub const MAX_TICK: Duration = Duration::from_secs(2);

/// The daemon's tick for a mesh of `members` known members (not left). A
/// tick's work grows with the number of members, so at hundreds of members
/// a fixed tick makes every node's idle cost grow with N; stretching the
/// tick keeps it about flat, at the price of reacting a little later in
/// large meshes. Events that need an answer at once (a STUN answer, a probe
/// answer, a control request, a liveness timer) do not wait for the tick.
pub fn tick_period(members: usize, at_rest: bool) -> Duration {
    let busy = if members <= TICK_MEMBERS {
        TICK
    } else {
        (TICK * members as u32 / TICK_MEMBERS as u32).min(MAX_TICK)
    };
    if at_rest {
        busy.max(QUIET_TICK)
    } else {
        busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_stretches_with_the_mesh_and_at_rest() {
        assert_eq!(tick_period(0, false), TICK);
        assert_eq!(tick_period(TICK_MEMBERS, false), TICK);
        assert_eq!(tick_period(2 * TICK_MEMBERS, false), 2 * TICK);
        assert_eq!(tick_period(10_000, false), MAX_TICK);
        assert_eq!(tick_period(10, true), QUIET_TICK);
        assert_eq!(tick_period(10_000, true), MAX_TICK);
        let mut last = Duration::ZERO;
        for n in 0..1000 {
            let t = tick_period(n, false);
            assert!(t >= last, "tick for {n} members shrank");
            last = t;
        }
    }
}
