//! Routes between sites, the shell side: feeds [`crate::routes::plan`]
//! with what this host knows, applies the plan (the subnets go into the
//! members' allowed IPs through reconcile, and become kernel routes `CIDR
//! dev <interface>` here), turns IPv4 forwarding on while this node
//! advertises routes (a gateway), and logs each verdict when it changes.
//!
//! Only routes meshpeer added are ever removed: the ones it installed are
//! remembered (and persisted, for a crash with the kernel backend, whose
//! interface and routes outlive the process); a route to the same subnet
//! that someone else made is left alone and the subnet refused here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use super::Node;
use crate::membership::DesiredPeer;
use crate::proto::PublicKeyBytes;
use crate::reconcile::ActualPeer;
use crate::routes::{self, Advertiser, Host, Plan, Verdict};
use crate::wg::RouteAdd;

/// A subnet found routed by someone else is tried again after this long.
const FOREIGN_RETRY: Duration = Duration::from_secs(30);

/// The routes side of [`Node`].
#[derive(Default)]
pub(super) struct RouteState {
    /// The latest plan (for `status`).
    pub plan: Plan,
    /// Kernel routes this node added through its interface.
    pub installed: BTreeSet<Ipv4Net>,
    /// Subnets this host already routes elsewhere (found when adding), and
    /// when they were found.
    foreign: BTreeMap<Ipv4Net, Instant>,
    /// Verdicts already logged, per (member, route).
    logged: BTreeMap<(PublicKeyBytes, String), Verdict>,
    /// Forwarding could not be turned on (logged once).
    forwarding_failed: bool,
}

impl RouteState {
    pub fn new(installed: &[Ipv4Net]) -> Self {
        RouteState {
            installed: installed.iter().copied().collect(),
            ..Default::default()
        }
    }
}

impl Node {
    /// The plan for this step: who advertises what, which members have a
    /// WireGuard peer here (`desired`), what this host is connected to and
    /// which addresses it uses (`actual`: the device's endpoints).
    pub(super) fn plan_routes(
        &mut self,
        now: Instant,
        local: &[Ipv4Net],
        desired: &[DesiredPeer],
        actual: &[ActualPeer],
    ) -> Plan {
        let me = self.id.node_key();
        let active: BTreeSet<[u8; 32]> = desired.iter().map(|d| d.public_key).collect();
        let members: Vec<&crate::membership::Member> = self.membership.members().collect();
        // Nobody advertises anything (the common case): nothing to read.
        if members.iter().all(|m| m.record.routes.is_empty()) && self.routes.installed.is_empty() {
            return Plan::default();
        }
        let underlay: Vec<Vec<IpAddr>> = members
            .iter()
            .map(|m| {
                let mut a: Vec<IpAddr> = m.record.endpoints.iter().map(|e| e.ip()).collect();
                a.push(m.record.gossip_addr.ip());
                a.sort();
                a.dedup();
                a
            })
            .collect();
        let used = actual.iter().filter_map(|p| {
            let ep = p.endpoint?;
            let m = self.membership.by_wg_key(&p.public_key)?;
            Some((ep.ip(), m.record.node_key, m.record.name.as_str()))
        });
        let endpoints = routes::reachable_endpoints(
            used,
            members
                .iter()
                .zip(&underlay)
                .map(|(m, u)| (m.record.node_key, m.record.name.as_str(), u.as_slice())),
        );
        self.routes
            .foreign
            .retain(|_, at| now.saturating_duration_since(*at) < FOREIGN_RETRY);
        let foreign: Vec<Ipv4Net> = self.routes.foreign.keys().copied().collect();
        let advertisers: Vec<Advertiser<'_>> = members
            .iter()
            .zip(&underlay)
            .filter(|(m, _)| !m.record.routes.is_empty())
            .map(|(m, u)| Advertiser {
                key: m.record.node_key,
                name: &m.record.name,
                routes: &m.record.routes,
                allow_routes: &m.allow_routes,
                by_network: m.by_network,
                admitted_at: m.admitted_at,
                underlay: u,
                active: m.record.node_key == me || active.contains(&m.record.wg_public_key),
            })
            .collect();
        routes::plan(
            &Host {
                self_key: me,
                overlay: self.network.cidr,
                connected: local,
                endpoints: &endpoints,
                foreign: &foreign,
            },
            &advertisers,
        )
    }

    /// Adds the planned subnets to their members' allowed IPs, and drops
    /// the endpoint candidates that lie inside a subnet routed through the
    /// mesh (a gateway's own address on the LAN it advertises): WireGuard
    /// must never send its packets into its own tunnel.
    pub(super) fn route_allowed_ips(&self, plan: &Plan, desired: &mut [DesiredPeer]) {
        if plan.installs.is_empty() {
            return;
        }
        for d in desired.iter_mut() {
            if let Some(m) = self.membership.by_wg_key(&d.public_key) {
                d.allowed_ips
                    .extend_from_slice(plan.installs_for(&m.record.node_key));
            }
            d.endpoints.retain(|e| plan.usable_endpoint(&e.ip()));
        }
    }

    /// Makes the kernel routes through our interface what `plan` says
    /// (after the allowed IPs are in place), logs verdicts that changed,
    /// and keeps it as the current plan. Returns how many routes changed.
    pub(super) fn apply_routes(&mut self, now: Instant, plan: Plan) -> usize {
        self.log_verdicts(&plan);
        let want = plan.routes();
        let mut changed = 0;
        let stale: Vec<Ipv4Net> = self.routes.installed.difference(&want).copied().collect();
        for net in stale {
            match self.wg.del_route(net) {
                Ok(()) => {
                    tracing::info!(route = %net, interface = %self.cfg.interface, "removed the route through the mesh");
                    self.routes.installed.remove(&net);
                    changed += 1;
                }
                Err(e) => tracing::warn!(route = %net, error = %e, "cannot remove a route"),
            }
        }
        for net in want.difference(&self.routes.installed.clone()) {
            let via = plan
                .installs
                .iter()
                .find(|(_, v)| v.contains(net))
                .and_then(|(k, _)| self.membership.member(k))
                .map(|m| m.record.name.clone())
                .unwrap_or_default();
            match self.wg.add_route(*net) {
                Ok(RouteAdd::Added) => {
                    tracing::info!(route = %net, member = %via, interface = %self.cfg.interface, "routing a member's subnet through the mesh");
                    self.routes.installed.insert(*net);
                    changed += 1;
                }
                Ok(RouteAdd::Exists { via_us: true }) if self.routes.installed.contains(net) => {}
                Ok(RouteAdd::Exists { .. }) => {
                    tracing::warn!(route = %net, member = %via,
                        "this host already has a route to that subnet that meshpeer did not add; left alone, not routed through the mesh");
                    self.routes.foreign.insert(*net, now);
                }
                Err(e) => {
                    tracing::warn!(route = %net, member = %via, error = %e, "cannot add a route")
                }
            }
        }
        if changed > 0 {
            self.state.installed_routes = self.routes.installed.iter().copied().collect();
            self.persist(true);
        }
        self.routes.plan = plan;
        self.keep_forwarding();
        changed
    }

    /// A gateway forwards between its subnets and the mesh: IPv4
    /// forwarding on while members route one of this node's subnets to it
    /// (an advertised route, authorized and held), and back off when none
    /// is any more, if meshpeer turned it on.
    fn keep_forwarding(&mut self) {
        let me = self.id.node_key();
        let want = self
            .routes
            .plan
            .outcomes_of(&me)
            .any(|o| o.verdict == Verdict::Advertised);
        if !want && !self.state.forwarding_turned_on {
            return;
        }
        let on = crate::net::ip_forward();
        match (want, on) {
            (true, Ok(false)) => match crate::net::set_ip_forward(true) {
                Ok(()) => {
                    tracing::info!("turned IPv4 forwarding on (this node advertises routes: it forwards between them and the mesh)");
                    self.state.forwarding_turned_on = true;
                    self.routes.forwarding_failed = false;
                    self.persist(true);
                }
                Err(e) if !self.routes.forwarding_failed => {
                    self.routes.forwarding_failed = true;
                    tracing::error!(error = %e,
                        "cannot turn IPv4 forwarding on: hosts behind this gateway are not reachable from the mesh; set net.ipv4.ip_forward=1 (sysctl, or /etc/sysctl.d)");
                }
                Err(_) => {}
            },
            (false, Ok(true)) if self.state.forwarding_turned_on => self.forwarding_off(),
            (_, Err(e)) if want && !self.routes.forwarding_failed => {
                self.routes.forwarding_failed = true;
                tracing::error!(error = %e, "cannot read net.ipv4.ip_forward");
            }
            _ => {}
        }
    }

    /// Turns IPv4 forwarding off again if meshpeer turned it on.
    pub(super) fn forwarding_off(&mut self) {
        if !self.state.forwarding_turned_on {
            return;
        }
        match crate::net::set_ip_forward(false) {
            Ok(()) => {
                tracing::info!("turned IPv4 forwarding off again (meshpeer had turned it on)")
            }
            Err(e) => tracing::warn!(error = %e, "cannot turn IPv4 forwarding off again"),
        }
        self.state.forwarding_turned_on = false;
        self.persist(true);
    }

    /// The daemon stops: its routes go with the interface; forwarding is
    /// turned off again if meshpeer turned it on.
    pub(super) fn routes_down(&mut self) {
        self.routes.installed.clear();
        self.state.installed_routes.clear();
        self.forwarding_off();
    }

    /// Logs each route's verdict once, and again when it changes.
    fn log_verdicts(&mut self, plan: &Plan) {
        let me = self.id.node_key();
        let mut seen = BTreeSet::new();
        for o in &plan.outcomes {
            let key = (o.node, o.route.clone());
            seen.insert(key.clone());
            if self.routes.logged.get(&key) == Some(&o.verdict) {
                continue;
            }
            match &o.verdict {
                Verdict::Refused(r) if o.node == me => {
                    tracing::warn!(route = %o.route, reason = %r, "members will not route our advertised subnet to us")
                }
                Verdict::Refused(r) => {
                    tracing::warn!(member = %o.name, route = %o.route, reason = %r, "refused a member's route")
                }
                Verdict::Advertised => {
                    tracing::info!(route = %o.route, "advertising a subnet behind this node")
                }
                Verdict::Inactive => {
                    tracing::debug!(member = %o.name, route = %o.route, "route of a member without a WireGuard peer here")
                }
                Verdict::Installed => {}
            }
            self.routes.logged.insert(key, o.verdict.clone());
        }
        self.routes.logged.retain(|k, _| seen.contains(k));
    }
}
