//! One step of the daemon, and the event handlers: each reads what changed,
//! hands it to its core, and applies what the core decided.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use ipnet::Ipv4Net;

use super::{unix_ms, Node, KNOWN_MEMBERS_EVERY};
use crate::gossip::rounds::Target;
use crate::gossip::transport::{AllocReply, HelloReply};
use crate::liveness;
use crate::membership::{Event, GossipEntry, Membership};
use crate::nat::paths::Path;
use crate::proto;
use crate::reconcile::{reconcile, PeerChange, FRESH_HANDSHAKE};
use crate::trust::{self, ALIVE_KEY};

/// How often the host's addresses are read again.
const LOCAL_NETS_EVERY: Duration = Duration::from_secs(2);
/// How often every peer without a session is poked (the members' shared
/// beat, kernel backend only: the userspace device punches with checks).
const POKE_EVERY: Duration = Duration::from_secs(10);
/// How often a member whose stamper was revoked asks again for a stamp.
const RESTAMP_EVERY: Duration = Duration::from_secs(30);
/// A step this long is logged (the loop's other work waited for it).
const SLOW_STEP: Duration = Duration::from_millis(500);
/// How often `status` is rebuilt when nothing changed.
const STATUS_EVERY: Duration = Duration::from_secs(2);

impl Node {
    /// Asks for a step soon (an allocation answer needs acting on):
    /// answers within `tick::answer_step_gap` of the last step share one.
    pub(super) fn step_soon(&mut self) {
        let members = self.membership.members().count();
        self.step_due = Some(crate::tick::answer_step_at(
            self.last_step,
            self.step_due,
            members,
        ));
    }

    /// One step; a failed one is logged and retried at the next.
    pub(super) async fn step_or_warn(&mut self) {
        let t0 = Instant::now();
        self.step_due = None;
        if let Err(e) = self.step().await {
            tracing::warn!(error = %format!("{e:#}"), "reconcile step failed; retrying");
        }
        let took = t0.elapsed();
        self.steps += 1;
        self.step_time += took;
        if took >= SLOW_STEP {
            // Everything else this loop serves (probes, rounds, STUN)
            // waited as long: worth knowing on an overloaded machine.
            tracing::info!(ms = took.as_millis() as u64, "slow step");
        }
    }

    async fn step(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        self.last_step = now;
        self.take_revocations();
        self.restamp_if_due(now);
        self.states_at_step = self.gossip.summary().count;
        let entries = self.gossip.snapshot();
        let liveness = &self.liveness;
        let unix_ms_now = unix_ms();
        let events = self.trust.with_trust(|t| {
            self.membership
                .handle_snapshot(now, &entries, t, &|k| liveness.down_for(k, unix_ms_now))
        });
        for e in &events {
            log_event(e);
        }
        for id in self.membership.to_forget(&entries) {
            self.gossip.forget(id);
        }
        self.feed_liveness(now, &entries);
        if !events.is_empty() || self.hello_tx.borrow().records.is_empty() {
            self.refresh_hello(&entries);
        }
        self.keep_address().await?;

        let local = self.local_nets();
        let me = self.id.node_key();
        if self
            .traversal
            .discover(
                now,
                &self.membership,
                &me,
                &local,
                self.advertise,
                self.cfg.wg_port(),
            )
            .await
        {
            self.republish(false).await?;
        }
        let changes = self.reconcile_wireguard(now, &local).await?;
        self.exchange_allocations();
        self.feed_relay();

        // Liveness: who we can probe (a path exists), our summary.
        let paths = &self.traversal.paths;
        let traversal = &self.traversal;
        let views = self.membership.liveness_views(
            &|k| {
                matches!(
                    paths.get(k),
                    Some(Path::Direct) | Some(Path::Relayed { .. })
                )
            },
            &|k| traversal.working(k),
        );
        self.liveness.handle_members(now, &views);
        {
            let mut ips = self
                .probe_shared
                .members
                .write()
                .unwrap_or_else(|p| p.into_inner());
            ips.clear();
            ips.extend(views.iter().map(|v| v.overlay_ip));
        }
        let summary: liveness::Summary = self.gossip.summary().into();
        self.liveness.set_summary(summary);
        *self
            .probe_shared
            .summary
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = summary;
        self.bind_probes().await;

        self.publish_observations(now, &entries, &local).await;
        self.publish_liveness_values();
        self.start_rounds();

        if !events.is_empty() || changes > 0 || !self.traversal.changed.is_empty() {
            self.last_change = now;
        }
        if !events.is_empty() || changes > 0 || self.last_status.elapsed() >= STATUS_EVERY {
            let actual = self.wg.peers()?;
            let status = self.build_status(&actual);
            self.sync_hosts(&status);
            self.report_join_progress(&status);
            self.status.send_replace(Some(status));
            self.last_status = Instant::now();
        }
        // The members to find the mesh through after a restart: refreshed
        // on a timer of its own (forced saves after every WireGuard change
        // kept resetting the save timer in a busy mesh, and a node that
        // left and came back found an empty list: alone for good).
        if self.known_at.elapsed() > KNOWN_MEMBERS_EVERY {
            self.known_at = Instant::now();
            let live: Vec<SocketAddr> = self.round_targets().iter().map(|t| t.addr).collect();
            if !live.is_empty() && live != self.state.known_members {
                self.state.known_members = live;
                self.persist(true);
            }
        }
        if self.last_persist.elapsed() > Duration::from_secs(10) {
            self.persist(false);
        }
        // Quiet, not at rest: `at_rest` also waits for every path to
        // settle, which a member with relayed pairs behind NAT may never do.
        if crate::tick::trim_due(now, self.quiet(), self.trimmed_at) {
            self.trimmed_at = Some(now);
            release_free_memory();
        }
        Ok(())
    }

    /// A newer revocation list from gossip: trusted from now on, persisted.
    fn take_revocations(&mut self) {
        let Some((text, version)) = self.gossip.revocations() else {
            return;
        };
        if version <= self.trust.revocations().issued_at_ms() {
            return;
        }
        match crate::admission::verify_revocations(&text, &self.network.key) {
            Ok(list) => {
                let n = list.entries.len();
                if self.trust.update_revocations(list, text.to_string()) {
                    tracing::warn!(entries = n, "new revocation list");
                    self.state.revoked = Some(text.to_string());
                    self.persist(true);
                    self.check_own_credential();
                }
            }
            Err(e) => tracing::warn!(error = %e, "gossip holds a bad revocation list"),
        }
    }

    /// A first join: "k/n members connected" on stderr when it changes,
    /// until every member is reached or for a minute.
    fn report_join_progress(&mut self, status: &crate::status::Status) {
        use crate::status::MemberState;
        let Some(p) = &mut self.join_progress else {
            return;
        };
        let others: Vec<_> = status
            .members
            .iter()
            .filter(|m| m.state != MemberState::Myself)
            .collect();
        let n = others.len();
        let k = others
            .iter()
            .filter(|m| matches!(m.state, MemberState::Connected | MemberState::Idle))
            .count();
        let elapsed = p.since.elapsed();
        if (k, n) != p.last {
            p.last = (k, n);
            if n > 0 && k == n {
                eprintln!(
                    "meshpeer: joined: all {n} member(s) connected after {:.1} s",
                    elapsed.as_secs_f64()
                );
                self.join_progress = None;
                return;
            }
            eprintln!("meshpeer: {k}/{n} members connected");
        }
        if elapsed >= super::JOIN_PROGRESS_FOR {
            eprintln!(
                "meshpeer: {k}/{n} members connected after {} s; the others keep trying (see `meshpeer status`)",
                elapsed.as_secs()
            );
            self.join_progress = None;
        }
    }

    /// After a new revocation list: are we still a member? A revoked node
    /// stops; one whose stamper was revoked asks for a new stamp.
    fn check_own_credential(&mut self) {
        use crate::admission::AdmissionError;
        match super::own_credential(&self.trust, &self.id, &self.admission, &self.stamp) {
            Ok(()) => {}
            Err(AdmissionError::StamperRevoked(by)) => {
                tracing::warn!(stamper = %by,
                    "the member that admitted this node was revoked: its stamp is void; asking another member for a new one");
                self.restamp_at = Some(Instant::now());
            }
            Err(AdmissionError::Revoked(what)) => self.self_revoked = Some(what),
            Err(e) => tracing::warn!(error = %e, "our own credential does not verify"),
        }
    }

    /// Asks live members for a new stamp (as a joiner asks its seed), every
    /// [`RESTAMP_EVERY`] until one arrives.
    fn restamp_if_due(&mut self, now: Instant) {
        if self.restamp_at.is_none_or(|t| now < t) {
            return;
        }
        self.restamp_at = Some(now + RESTAMP_EVERY);
        let targets: Vec<SocketAddr> = self.round_targets().iter().map(|t| t.addr).collect();
        let seeds: Vec<SocketAddr> = if targets.is_empty() {
            self.seed_addrs.clone()
        } else {
            targets
        };
        let transport = self.gossip.transport.clone();
        let name = self.state.name.clone();
        let tx = self.restamp_tx.clone();
        tokio::spawn(async move {
            let wait = Duration::from_secs(20);
            match super::join::contact(&transport, &seeds, &name, true, false, wait, wait).await {
                Ok(super::join::Outcome::Admitted { stamp, seed, .. }) => {
                    tracing::info!(%seed, "stamped again");
                    let _ = tx.send(stamp).await;
                }
                Ok(super::join::Outcome::Hello { .. }) => {}
                Err(e) => tracing::error!(error = %e,
                    "cannot get a new stamp (a token that expired or was revoked cannot: join again with a new token); retrying"),
            }
        });
    }

    /// A new stamp (our stamper was revoked): check it, keep it, present it
    /// in TLS and in our record.
    pub(super) async fn on_new_stamp(&mut self, stamp: proto::Signed) {
        if let Err(e) = super::own_credential(&self.trust, &self.id, &self.admission, &stamp) {
            tracing::warn!(error = %e, "the new stamp does not verify; asking again");
            return;
        }
        if let Err(e) = super::save_stamp(&self.dir, &stamp) {
            tracing::warn!(error = %format!("{e:#}"), "cannot save the new stamp");
        }
        let credential = crate::admission::Credential {
            admission: self.admission.clone(),
            stamp: Some(stamp.clone()),
        };
        match crate::gossip::tls::NodeCert::new(&self.id.signing, &credential)
            .and_then(|cert| crate::gossip::tls::quic_configs(&cert, self.trust.clone()))
        {
            Ok((server, client)) => self.gossip.transport.reconfigure(server, client),
            Err(e) => {
                tracing::warn!(error = %e, "cannot build TLS configurations for the new stamp")
            }
        }
        self.stamp = stamp;
        self.restamp_at = None;
        if let Err(e) = self.republish(false).await {
            tracing::warn!(error = %format!("{e:#}"), "cannot publish our record with the new stamp");
        }
        tracing::info!("member again with a new stamp");
    }

    /// What a joiner's `Join` and a member's `Hello` are answered with.
    fn refresh_hello(&mut self, entries: &[GossipEntry]) {
        let h = self.membership.holders();
        let membership = &self.membership;
        let candidates = entries
            .iter()
            .filter_map(|e| Some((membership.is_public_node(&e.node_id), e.record.clone()?)));
        let reply = HelloReply {
            records: crate::gossip::transport::hello_records(
                candidates,
                crate::gossip::transport::HELLO_RECORDS_BUDGET,
            ),
            holders: h.ips(),
            names: h.names(),
            revoked: self.trust.revocations().text.clone(),
        };
        self.hello_tx.send_replace(Arc::new(reply));
    }

    /// Feeds members' signed liveness values (changed ones only) and record
    /// versions to the liveness core.
    fn feed_liveness(&mut self, now: Instant, entries: &[GossipEntry]) {
        self.fed.feed(
            now,
            &mut self.liveness,
            &self.membership,
            &self.network.key,
            entries,
        );
    }

    /// Our address: moved if another member holds it here (a lost race;
    /// only while our claim is provisional), probe socket rebound.
    async fn keep_address(&mut self) -> anyhow::Result<()> {
        let my_ip = self
            .state
            .overlay_ip
            .ok_or_else(|| anyhow!("no overlay address"))?;
        if !self.membership.must_move(&my_ip)
            || self.ip_since.elapsed() >= crate::membership::PROVISIONAL
        {
            return Ok(());
        }
        let taken = self.membership.taken_ips(&self.id.node_key());
        let ip = crate::ipalloc::choose(self.network.cidr, &self.id.node_key(), &taken)
            .ok_or_else(|| anyhow!("network {} is full", self.network.cidr))?;
        tracing::warn!(old = %my_ip, new = %ip, "another member claimed our overlay address at the same time and won; moving");
        self.state.overlay_ip = Some(ip);
        self.state.ip_claimed_at = unix_ms();
        self.ip_since = Instant::now();
        self.wg.set_address(ip, self.network.cidr)?;
        self.republish(false).await?;
        self.dir.save_state(&self.state)?;
        self.bind_probes().await;
        Ok(())
    }

    /// Desired peers → paths → reconcile → apply. Returns how many changes
    /// were applied.
    async fn reconcile_wireguard(
        &mut self,
        now: Instant,
        local: &[Ipv4Net],
    ) -> anyhow::Result<usize> {
        let me = self.id.node_key();
        // A member behind NAT keeps its mappings open with keepalives; a
        // public member sends none (its tunnels lapse when unused and come
        // back on the first packet: the peer behind NAT keeps the path open).
        let keepalive = crate::membership::keepalive_for(self.traversal.nat.kind);
        let traversal = &self.traversal;
        let mut desired =
            self.membership
                .desired_peers(now, local, &|k| traversal.hearing(now, k), keepalive);
        let actual = self.wg.peers()?;
        // Members' subnets: into their allowed IPs now, kernel routes below.
        let plan = self.plan_routes(now, local, &desired, &actual);
        self.route_allowed_ips(&plan, &mut desired);
        // A device endpoint inside a routed subnet is replaced, whatever
        // its handshake says.
        let unusable: HashSet<[u8; 32]> = actual
            .iter()
            .filter(|a| a.endpoint.is_some_and(|e| !plan.usable_endpoint(&e.ip())))
            .map(|a| a.public_key)
            .collect();
        let desired = self.traversal.select_paths(
            now,
            desired,
            &actual,
            &self.membership,
            &me,
            self.wg_public,
            local,
        );
        // The shared beat: both ends of a pair act in the same second.
        let rotation = (unix_ms() / POKE_EVERY.as_millis() as u64) as usize;
        let poke = rotation != self.last_rotation;
        self.last_rotation = rotation;
        // A working path (idle or not) keeps the endpoint WireGuard roamed
        // to; a broken one gets the record's candidates again, and a
        // relayed one on a stale port of its relay gets our port.
        let traversal = &self.traversal;
        let mut changes = reconcile(&desired, &actual, &self.owned, rotation, poke, &|k| {
            !traversal.working(k) || unusable.contains(k) || traversal.repoint(k)
        });
        // Pokes (keepalive off and on) only for peers without a session,
        // and only where WireGuard itself punches (the kernel backend; the
        // userspace device punches with connectivity checks): a working
        // session needs no traffic at rest.
        let sessions: HashSet<[u8; 32]> = actual
            .iter()
            .filter(|a| a.handshake_age.is_some_and(|age| age < FRESH_HANDSHAKE))
            .map(|a| a.public_key)
            .collect();
        let checks_punch = self.traversal.checks_punch();
        changes.retain(|c| match c {
            PeerChange::Poke { public_key, .. } => !checks_punch && !sessions.contains(public_key),
            _ => true,
        });
        let n = changes.len();
        if !changes.is_empty() {
            for c in &changes {
                log_change(c, &self.membership);
            }
            self.wg.apply(&changes)?;
            for c in &changes {
                match c {
                    PeerChange::Add { public_key, .. } => {
                        self.owned.insert(*public_key);
                    }
                    PeerChange::Remove { public_key } => {
                        self.owned.remove(public_key);
                    }
                    PeerChange::Update { .. } | PeerChange::Poke { .. } => {}
                }
            }
            self.persist(true);
        }
        self.traversal
            .set_wg_peers(desired.iter().map(|d| &d.public_key));
        self.traversal.force_handshakes(now).await;
        self.traversal.greet_grants().await;
        self.traversal.send_checks(now, poke).await;
        Ok(n + self.apply_routes(now, plan))
    }

    /// Asks relays for the allocations our relayed peers need, and gives
    /// back the ones no longer needed (requests over QUIC, in tasks; the
    /// answers come back to the loop).
    ///
    /// Requests for one (peer, relay) pair go out in the order they were
    /// planned, each after the previous one was answered: a relay that
    /// flaps (down, then up again a moment later) makes us release its
    /// allocation and ask for it again, and a release that overtook the
    /// new request would take away the allocation just handed to us (the
    /// relay answers a request for a pair it already serves with the same
    /// port), leaving the pair on a dead port for good.
    fn exchange_allocations(&mut self) {
        let lookup = |m: &Membership, wg: &[u8; 32]| {
            m.by_wg_key(wg)
                .map(|x| (x.record.node_key, x.record.gossip_addr))
        };
        for (peer, relay) in self.traversal.take_alloc_releases() {
            let (Some((peer_key, _)), Some((_, relay_addr))) = (
                lookup(&self.membership, &peer),
                lookup(&self.membership, &relay),
            ) else {
                continue;
            };
            let transport = self.gossip.transport.clone();
            self.alloc_chain.push((peer, relay), async move {
                let req = crate::gossip::transport::Request::Release { peer: peer_key };
                let _ = transport
                    .request(relay_addr, &req, Duration::from_secs(8))
                    .await;
            });
        }
        for (peer, relay) in self.traversal.take_alloc_requests() {
            let (Some((peer_key, _)), Some((_, relay_addr))) = (
                lookup(&self.membership, &peer),
                lookup(&self.membership, &relay),
            ) else {
                continue;
            };
            let transport = self.gossip.transport.clone();
            let tx = self.alloc_tx.clone();
            self.alloc_chain.push((peer, relay), async move {
                let req = crate::gossip::transport::Request::Allocate { peer: peer_key };
                let endpoint = match transport
                    .request_within(
                        relay_addr,
                        &req,
                        Duration::from_secs(4),
                        crate::nat::allocs::ALLOC_ANSWER_WAIT,
                    )
                    .await
                {
                    Ok(bytes) => match proto::decode::<AllocReply>("allocation reply", &bytes) {
                        Ok(AllocReply::Allocated { port, .. }) => {
                            Some(SocketAddr::new(relay_addr.ip(), port))
                        }
                        Ok(other) => {
                            tracing::info!(relay = %relay_addr, answer = ?other, "relay refused an allocation");
                            None
                        }
                        Err(e) => {
                            tracing::warn!(relay = %relay_addr, error = %e, "bad allocation reply");
                            None
                        }
                    },
                    Err(e) => {
                        if transport.report_due(relay_addr) {
                            tracing::info!(relay = %relay_addr, error = %e,
                                "cannot reach the relay (said once a minute per relay)");
                        } else {
                            tracing::debug!(relay = %relay_addr, error = %e, "cannot reach the relay");
                        }
                        None
                    }
                };
                let _ = tx.send((peer, relay, endpoint)).await;
            });
        }
    }

    /// Tells our relay (if we relay) who the members are and where their
    /// datagrams may come from.
    fn feed_relay(&mut self) {
        let enabled = self.relays();
        let now = Instant::now();
        let members = if enabled {
            // Members gone (left, or down past the grace) are not listed:
            // their allocations end (proto/PROTOCOL.md §7).
            self.membership
                .members()
                .filter(|m| !self.membership.gone(now, m))
                .map(|m| {
                    let mut ips: Vec<IpAddr> = m.record.endpoints.iter().map(|e| e.ip()).collect();
                    ips.push(m.record.gossip_addr.ip());
                    ips.sort();
                    ips.dedup();
                    (
                        m.record.node_key,
                        super::relay::MemberInfo {
                            wg_key: m.record.wg_public_key,
                            known_ips: ips,
                        },
                    )
                })
                .collect()
        } else {
            Default::default()
        };
        self.relay.set_members(enabled, members);
    }

    /// Observed endpoints: publish what we see of members whose NAT is
    /// unknown; learn what others see of us.
    async fn publish_observations(
        &mut self,
        now: Instant,
        entries: &[GossipEntry],
        local: &[Ipv4Net],
    ) {
        let me = self.id.node_key();
        let actual = match self.wg.peers() {
            Ok(a) => a,
            Err(_) => return,
        };
        let local_ips: Vec<IpAddr> = local.iter().map(|n| IpAddr::V4(n.addr())).collect();
        let obs = self.traversal.observe(
            now,
            entries,
            &self.membership,
            &me,
            &actual,
            &local_ips,
            &self.network.key,
        );
        if let Some(seen) = obs.publish {
            let version = self.next_version();
            let text = crate::observe::Observations {
                network_key: self.network.key,
                observer: me,
                issued_at: version,
                seen,
            }
            .sign(&self.id.signing);
            if let Err(e) = self.gossip.publish(trust::SEEN_KEY, text, version) {
                tracing::warn!(error = %e, "cannot publish our observations");
            }
        }
        if obs.changed {
            if let Err(e) = self.republish(false).await {
                tracing::warn!(error = %format!("{e:#}"), "cannot republish our record");
            }
        }
    }

    /// Accusations and refutations the liveness core wants published.
    fn publish_liveness_values(&mut self) {
        // Members that accuse us cannot reach us: a relayed pair asks its
        // relay again (our side's port may have changed).
        for k in self.liveness.take_new_accusers() {
            if let Some(m) = self.membership.member(&k) {
                self.traversal.refresh_allocation(&m.record.wg_public_key);
            }
        }
        let (state, gossip) = (&mut self.state, &self.gossip);
        let values = liveness::values_to_publish(&mut self.liveness, &self.id.signing, &mut || {
            super::next_version_of(state, gossip)
        });
        for (key, text, version) in values {
            if key == ALIVE_KEY {
                tracing::info!("members suspect us; refuting");
            } else {
                tracing::debug!(version, "publishing our accusations");
            }
            if let Err(e) = self.gossip.publish(key, text, version) {
                tracing::warn!(error = %e, key, "cannot publish our liveness value");
            }
        }
    }

    /// Members we can gossip with now, and the address to use: the gossip
    /// address of members that are reachable there (public, or on our
    /// LAN), else the overlay address when a WireGuard path works.
    pub(super) fn round_targets(&self) -> Vec<Target> {
        self.with_gossip_paths(|local, path| {
            crate::gossip::rounds::round_targets(&self.membership, &self.id.node_key(), local, path)
        })
    }

    /// Members called down lately that we can still gossip with
    /// (`gossip::rounds::down_targets`).
    fn down_targets(&self, now: Instant) -> Vec<Target> {
        self.with_gossip_paths(|local, path| {
            crate::gossip::rounds::down_targets(&self.membership, now, local, path)
        })
    }

    /// `f` with our local networks and whether a WireGuard path to a member
    /// (by WireGuard key) is chosen: what decides the gossip address.
    fn with_gossip_paths<R>(
        &self,
        f: impl FnOnce(&[Ipv4Net], &dyn Fn(&[u8; 32]) -> bool) -> R,
    ) -> R {
        let local = self
            .local_nets
            .as_ref()
            .map(|(_, n)| n.clone())
            .unwrap_or_default();
        let paths = &self.traversal.paths;
        f(&local, &|k| {
            matches!(
                paths.get(k),
                Some(Path::Direct) | Some(Path::Relayed { .. })
            )
        })
    }

    /// Starts the gossip rounds the planner wants now.
    pub(super) fn start_rounds(&mut self) {
        let now = Instant::now();
        self.planner.handle_changes(now, self.gossip.changes());
        let targets = self.round_targets();
        let expected: std::collections::HashSet<SocketAddr> = targets
            .iter()
            .filter(|t| !matches!(t.addr.ip(), IpAddr::V4(ip) if self.network.cidr.contains(&ip)))
            .map(|t| t.addr)
            .collect();
        self.gossip.transport.set_expected(expected);
        let mut targets = targets;
        let transport = &self.gossip.transport;
        let recent = |k: &crate::proto::PublicKeyBytes| {
            transport.recent_connection(k, crate::gossip::rounds::REUSE_WITHIN)
        };
        crate::gossip::rounds::prefer_underlay(&mut targets, self.network.cidr, &recent);
        let partner = crate::gossip::rounds::rest_partner(self.liveness.monitored(), &targets);
        let mut down = self.down_targets(now);
        crate::gossip::rounds::prefer_underlay(&mut down, self.network.cidr, &recent);
        self.planner.handle_down(down);
        // Seeds and last-known members: all of them while we are alone;
        // after, those no current member holds (the planner visits one now
        // and then: a mesh we may be cut off from).
        let held: std::collections::HashSet<SocketAddr> = self
            .membership
            .members()
            .flat_map(|m| {
                let r = &m.record;
                [
                    r.gossip_addr,
                    SocketAddr::new(IpAddr::V4(r.overlay_ip), r.gossip_addr.port()),
                ]
            })
            .collect();
        let mut bootstrap = self.seed_addrs.clone();
        bootstrap.extend(self.state.known_members.iter().copied());
        if !targets.is_empty() {
            bootstrap.retain(|a| !held.contains(a));
        }
        bootstrap.sort();
        bootstrap.dedup();
        let busy = self.planner.busy(now);
        for addr in self.planner.poll(now, &targets, partner, &bootstrap) {
            self.gossip.round_with(addr, busy);
        }
    }

    /// A probe answer arrived.
    pub(super) fn on_probe_ack(&mut self, (from, nonce, summary, at): super::probes::Ack) {
        self.liveness.handle_ack(at, from, nonce, summary);
        for k in self.liveness.take_mismatches() {
            self.planner.handle_mismatch(k);
        }
    }

    /// The liveness timer: run it, send its probes, act on its verdicts.
    pub(super) async fn run_liveness(&mut self) {
        for (key, at, from) in self.gossip.take_heard() {
            self.liveness.handle_heard(at, &key, from.ip());
        }
        let now = Instant::now();
        self.liveness.handle_timeout(now, unix_ms());
        if let Some(sock) = &self.probes {
            for (to, probe) in self.liveness.poll_transmit() {
                sock.send(to, &probe).await;
            }
        } else {
            self.liveness.poll_transmit();
        }
        let mut verdict = false;
        while let Some(e) = self.liveness.poll_event() {
            let name = self
                .membership
                .member(match &e {
                    liveness::Event::Down(k)
                    | liveness::Event::Up(k)
                    | liveness::Event::PathBroken(k) => k,
                })
                .map(|m| m.record.name.clone())
                .unwrap_or_default();
            match e {
                liveness::Event::Down(_) => {
                    verdict = true;
                    tracing::warn!(member = %name, "no answer to our probes and no refutation: down");
                }
                liveness::Event::Up(_) => {
                    verdict = true;
                    tracing::info!(member = %name, "answers again");
                }
                liveness::Event::PathBroken(k) => {
                    tracing::info!(member = %name, "alive, but our path to it is broken; trying another");
                    if let Some(m) = self.membership.member(&k) {
                        self.traversal.path_broken(&m.record.wg_public_key);
                    }
                }
            }
        }
        // Rounds the liveness asked for (members it needs to hear from).
        for k in self.liveness.take_mismatches() {
            self.planner.handle_mismatch(k);
        }
        self.publish_liveness_values();
        if verdict {
            self.step_or_warn().await;
        }
    }

    /// A STUN answer arrived on the WireGuard port: handshakes to checked
    /// candidates now, and a new NAT picture published now.
    pub(super) async fn on_stun_answer(&mut self) {
        self.traversal.force_handshakes(Instant::now()).await;
        if self.traversal.take_discovery_news() {
            let local = self.local_nets();
            if self
                .traversal
                .refresh_nat(&local, self.advertise, self.cfg.wg_port())
            {
                if let Err(e) = self.republish(false).await {
                    tracing::warn!(error = %format!("{e:#}"), "cannot republish our record");
                }
            }
        }
    }

    /// The host's IPv4 networks (not our overlay), read again every
    /// [`LOCAL_NETS_EVERY`].
    pub(super) fn local_nets(&mut self) -> Vec<Ipv4Net> {
        match &self.local_nets {
            Some((at, nets)) if at.elapsed() < LOCAL_NETS_EVERY => nets.clone(),
            _ => {
                let nets: Vec<Ipv4Net> = crate::net::local_ipv4_nets(&[&self.cfg.interface])
                    .into_iter()
                    .map(|(n, _)| n)
                    .collect();
                self.local_nets = Some((Instant::now(), nets.clone()));
                nets
            }
        }
    }
}

/// Hands the memory the allocator holds free back to the system
/// (`tick::trim_due` says when). glibc only; elsewhere nothing.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let rss = || {
            let status = std::fs::read_to_string("/proc/self/status").ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        };
        let before = rss();
        // SAFETY: malloc_trim only walks and releases the allocator's own
        // free memory; it takes the arena locks itself.
        unsafe {
            libc::malloc_trim(0);
        }
        tracing::debug!(rss_kib_before = ?before, rss_kib_after = ?rss(), "returned free memory to the system");
    }
}

pub(super) fn log_event(e: &Event) {
    match e {
        Event::Joined {
            name,
            node,
            overlay_ip,
        } => tracing::info!(member = %name, %node, %overlay_ip, "member joined"),
        Event::Updated { name, version } => {
            tracing::debug!(member = %name, version, "member updated its record")
        }
        Event::Left { name } => tracing::info!(member = %name, "member left"),
        Event::Down { name } => tracing::warn!(member = %name, "member is down"),
        Event::Up { name } => tracing::info!(member = %name, "member is back up"),
        Event::Forgotten { name } => tracing::info!(member = %name, "member forgotten"),
        Event::Rejected { node, reason } => {
            tracing::warn!(%node, %reason, "dropped a record")
        }
        Event::Replay { node, held, got } => {
            tracing::warn!(%node, held, got, "dropped a replayed (older) record")
        }
        Event::Conflict {
            what,
            claimant,
            holder,
        } => {
            tracing::warn!(%what, %claimant, %holder, "a member claims what another member holds; refused")
        }
    }
}

fn log_change(c: &PeerChange, m: &Membership) {
    let name = m
        .by_wg_key(c.public_key())
        .map(|x| x.record.name.clone())
        .unwrap_or_else(|| "(gone)".into());
    let peer = proto::short_key(c.public_key());
    match c {
        PeerChange::Add {
            allowed_ips,
            endpoint,
            ..
        } => {
            tracing::info!(%peer, member = %name, ?allowed_ips, ?endpoint, "adding WireGuard peer")
        }
        PeerChange::Update {
            endpoint,
            allowed_ips,
            ..
        } => {
            tracing::info!(%peer, member = %name, ?endpoint, ?allowed_ips, "updating WireGuard peer")
        }
        PeerChange::Remove { .. } => {
            tracing::info!(%peer, member = %name, "removing WireGuard peer")
        }
        PeerChange::Poke { .. } => {
            tracing::debug!(%peer, member = %name, "retrying the handshake (hole punch)")
        }
    }
}
