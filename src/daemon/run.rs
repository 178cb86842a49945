//! The daemon's loop: each event source goes to the handler of the core
//! it belongs to (see the module doc of `daemon`), until shutdown, a
//! `leave` request or our own revocation; then the node is taken down.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use tokio::sync::{mpsc, watch};

use super::start::Inbox;
use super::{ops, DaemonConfig, Node};
use crate::control::{Command, Incoming, Pending, Reply};
use crate::tick::{join_spell_over, news_step_gap, tick_period, TICK};

/// Why the loop ended.
enum Exit {
    /// Shutdown (SIGTERM, SIGINT): `on_stop` did what the configuration
    /// says (leave or stay a member).
    Stopped,
    /// A `leave` request, answered once the node is down.
    Left(Pending),
    /// A revocation names this node or its token.
    Revoked(String),
}

impl Node {
    /// Runs the loop until shutdown, leave or revocation, then takes the
    /// node down: routes, state, probes, gossip, interface.
    pub(super) async fn run(
        mut self,
        mut inbox: Inbox,
        mut control: mpsc::Receiver<Incoming>,
        shutdown: impl Future<Output = ()>,
        mut reload: Option<watch::Receiver<DaemonConfig>>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let answered = self.traversal.answered();
        let exit = loop {
            if let Some(why) = self.self_revoked.take() {
                break Exit::Revoked(why);
            }
            self.wakeups += 1;
            // News from gossip runs a step soon in a small mesh and at
            // rest, else it waits for the tick (tick::news_step_gap).
            let news_gap = news_step_gap(self.membership.members().count(), self.at_rest());
            let news_ready = news_gap.is_some_and(|g| self.last_step.elapsed() >= g);
            // A large busy mesh waits for its tick, but the first join
            // after a spell without one gets a step soon (tick::JOIN_SPELL).
            let join_watch =
                news_gap.is_none() && join_spell_over(self.last_join_step, Instant::now());
            let liveness_at = self
                .liveness
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            let rounds_at = self.planner.poll_timeout(Instant::now());
            tokio::select! {
                // A value arrived: in a small mesh or at rest, act on it now
                // rather than at the next tick (a gossip hop is 250 ms; the
                // tick would add up to one more to every join, and at rest
                // up to 2 s to a join, a kill or a leave).
                _ = self.gossip.changed(), if news_ready || join_watch => {
                    if news_ready {
                        self.step_or_warn().await;
                    } else if self.gossip.summary().count > self.states_at_step {
                        self.last_join_step = Some(Instant::now());
                        self.step_soon();
                    }
                }
                _ = answered.notified() => self.on_stun_answer().await,
                Some(stamp) = inbox.restamps.recv() => self.on_new_stamp(stamp).await,
                Some((peer, relay, endpoint)) = inbox.allocs.recv() => {
                    self.traversal.handle_allocation(&peer, &relay, endpoint);
                    self.step_soon();
                }
                _ = tokio::time::sleep_until(self.step_due.unwrap_or(rounds_at).into()), if self.step_due.is_some() => {
                    self.step_or_warn().await;
                }
                Some(ack) = inbox.acks.recv() => {
                    self.on_probe_ack(ack);
                    while let Ok(ack) = inbox.acks.try_recv() {
                        self.on_probe_ack(ack);
                    }
                }
                _ = tokio::time::sleep_until(liveness_at.into()) => {
                    // Answers that arrived while the loop was busy (a long
                    // step on a loaded machine) count before the timeouts
                    // do: otherwise probes answered in time expire unread
                    // and make accusations and down verdicts.
                    while let Ok(ack) = inbox.acks.try_recv() {
                        self.on_probe_ack(ack);
                    }
                    self.run_liveness().await
                }
                _ = tokio::time::sleep_until(rounds_at.into()) => self.start_rounds(),
                _ = &mut shutdown => {
                    self.on_stop().await;
                    break Exit::Stopped;
                }
                new = ops::next_reload(&mut reload) => self.reload(new).await,
                _ = tick.tick() => {
                    self.step_or_warn().await;
                    let period = tick_period(self.membership.members().count(), self.at_rest());
                    if period != tick.period() {
                        tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
                Some((cmd, reply)) = control.recv() => match cmd {
                    Command::Leave => {
                        self.leave().await;
                        break Exit::Left(reply);
                    }
                    Command::Revoke { list } => {
                        let r = self.revoke(&list).await;
                        reply.answer(r).await;
                    }
                    Command::Ping { member, timeout_ms } => self.ping(member, timeout_ms, reply),
                    Command::Netcheck => {
                        let r = Reply::Netcheck(Box::new(self.netcheck()));
                        reply.answer(r).await;
                    }
                }
            }
        };
        self.take_down().await;
        match exit {
            Exit::Stopped => Ok(()),
            Exit::Left(reply) => {
                reply.answer(Reply::Left).await;
                Ok(())
            }
            Exit::Revoked(why) => {
                tracing::error!(%why, "this node was revoked: it is no longer a member; stopping");
                Err(anyhow!(
                    "this node was revoked ({why}); it is no longer a member of the mesh"
                ))
            }
        }
    }

    /// Routes removed, state saved, probes, gossip and the interface
    /// closed; an ephemeral node that left forgets its identity.
    async fn take_down(mut self) {
        self.routes_down();
        self.persist(true);
        self.probes = None;
        self.gossip.shutdown().await;
        self.wg.destroy().await;
        if self.cfg.ephemeral && self.left {
            // An ephemeral node that left is done with its identity: the
            // next start joins afresh (a crash keeps it, for a restart in
            // place).
            let _ = std::fs::remove_file(self.dir.control_socket());
            self.dir.forget_identity();
            tracing::info!(state_dir = %self.cfg.state_dir.display(), "ephemeral node: identity deleted");
        }
    }
}
