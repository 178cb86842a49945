//! The daemon's step cadence (sans-IO, shared with the simulation): how often
//! a node runs its step (membership, paths, reconcile, what to publish).

use std::time::{Duration, Instant};

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
/// The least time between two steps that gossip news runs in a small mesh.
pub const MIN_STEP_GAP: Duration = Duration::from_millis(50);

/// How long after its last step a node may run a step for news from gossip
/// (a value stored), instead of waiting for its next tick; `None`: it
/// waits for the tick.
///
/// * In a small mesh (up to [`TICK_MEMBERS`] members, not at rest): after
///   [`MIN_STEP_GAP`], so a record reaches WireGuard within a gossip hop.
/// * At rest, at any size: after [`TICK`]. News to a quiet mesh is a join,
///   an accusation, a refutation or a leave, and every member should act on
///   it within a hop, not a stretched tick later (up to [`MAX_TICK`] at
///   hundreds of members); news is rare at rest, so this costs little, and
///   the gap bounds it when it is not.
/// * A large mesh that is not at rest (coming up, or churning) waits for
///   its tick: news arrives every few milliseconds there and each step
///   costs work in proportion to the members.
pub fn news_step_gap(members: usize, at_rest: bool) -> Option<Duration> {
    if at_rest {
        Some(TICK)
    } else if members <= TICK_MEMBERS {
        Some(MIN_STEP_GAP)
    } else {
        None
    }
}

/// A large mesh that is not at rest waits for its tick on news (see
/// [`news_step_gap`]), except for the first join after this long without
/// one: a node state we did not hold at our last step runs a step as an
/// allocation answer does ([`answer_step_gap`]). A node joining a mesh
/// that has just converged (busy, so each member's tick is stretched: 625
/// ms at 100 members) waited for every member's tick; in a come-up, where
/// joins arrive every few milliseconds, this adds one step per spell.
pub const JOIN_SPELL: Duration = Duration::from_secs(10);

/// Whether news that may be a join is watched for: no join step ran for
/// [`JOIN_SPELL`].
pub fn join_spell_over(last_join_step: Option<Instant>, now: Instant) -> bool {
    last_join_step.is_none_or(|t| now.saturating_duration_since(t) >= JOIN_SPELL)
}

/// How long after its last step a node runs the step that a relay's
/// allocation answer asks for, rather than running one per answer: in the
/// come-up a member with dozens of relayed peers gets dozens of
/// allocation answers within a second, and each step
/// costs work in proportion to the members (testnet, mixed 100: 39 steps
/// for allocation answers in the first 40 s beside 77 ticks, each longer
/// than a tick's step on the loaded machine). Answers that arrive within
/// the gap share one step.
///
/// * Up to [`TICK_MEMBERS`] members: [`MIN_STEP_GAP`], as for news, so a
///   small mesh acts on an answer within a few milliseconds.
/// * Above: [`TICK`], still well before the stretched tick.
pub fn answer_step_gap(members: usize) -> Duration {
    if members <= TICK_MEMBERS {
        MIN_STEP_GAP
    } else {
        TICK
    }
}

/// When to run the step an answer asks for, given the last step and a step
/// already pending (the earlier stands): never before `last_step + gap`.
pub fn answer_step_at(last_step: Instant, pending: Option<Instant>, members: usize) -> Instant {
    let at = last_step + answer_step_gap(members);
    pending.map_or(at, |p| p.min(at))
}

/// How often a quiet node hands freed memory back to the system.
pub const TRIM_EVERY: Duration = Duration::from_secs(60);

/// Whether a quiet node (nothing changed for [`SETTLE`]) should hand freed
/// memory back to the system now (`trimmed_at`: when it last did). glibc
/// keeps what a busy period freed (the come-up's QUIC connections to every
/// member, which idle out after
/// 180 s; gossip messages; device buffers) in its arenas: in mixed 100,
/// `malloc_trim` at rest returned 3.4-5 MB of a daemon's 10-18 MB of
/// anonymous memory. Once quiet, and then every [`TRIM_EVERY`] while quiet
/// (a trim with nothing to return costs a walk of the free lists).
pub fn trim_due(now: Instant, quiet: bool, trimmed_at: Option<Instant>) -> bool {
    quiet && trimmed_at.is_none_or(|t| now.saturating_duration_since(t) >= TRIM_EVERY)
}

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
    fn a_join_is_watched_for_once_a_spell() {
        let t0 = Instant::now();
        assert!(join_spell_over(None, t0));
        assert!(!join_spell_over(Some(t0), t0 + JOIN_SPELL / 2));
        assert!(join_spell_over(Some(t0), t0 + JOIN_SPELL));
    }

    #[test]
    fn memory_is_trimmed_when_quiet_once_a_minute() {
        let t0 = Instant::now();
        assert!(!trim_due(t0, false, None));
        assert!(trim_due(t0, true, None));
        assert!(!trim_due(t0 + Duration::from_secs(59), true, Some(t0)));
        assert!(trim_due(t0 + TRIM_EVERY, true, Some(t0)));
        assert!(!trim_due(t0 + TRIM_EVERY, false, Some(t0)));
    }

    #[test]
    fn answers_share_a_step_after_the_gap() {
        let t0 = Instant::now();
        // Small mesh: 50 ms after the last step; a pending earlier step
        // stands.
        assert_eq!(answer_step_at(t0, None, 10), t0 + MIN_STEP_GAP);
        let earlier = t0 + Duration::from_millis(10);
        assert_eq!(answer_step_at(t0, Some(earlier), 10), earlier);
        // Large mesh: a tick after the last step, however many answers.
        let at = answer_step_at(t0, None, 100);
        assert_eq!(at, t0 + TICK);
        assert_eq!(answer_step_at(t0, Some(at), 100), at);
        // A step long ago: due at once (in the past).
        let later = t0 + Duration::from_secs(5);
        assert!(answer_step_at(t0, None, 100) < later);
    }

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

    #[test]
    fn news_runs_a_step_soon_in_small_meshes_and_at_rest() {
        for n in 0..1000 {
            let busy = news_step_gap(n, false);
            if n <= TICK_MEMBERS {
                assert_eq!(busy, Some(MIN_STEP_GAP), "{n} members, busy");
            } else {
                assert_eq!(busy, None, "{n} members, busy: waits for the tick");
            }
            // At rest news runs a step within a busy tick, at any size,
            // and no sooner than a small busy mesh's tick.
            let rest = news_step_gap(n, true).expect("at rest news runs a step");
            assert!(rest <= tick_period(n, false), "{n} members at rest");
            assert!(rest >= TICK);
        }
    }
}
