//! Routes between sites (sans-IO): which subnets advertised by members this
//! node routes through the mesh, and why the others are refused.
//!
//! A member advertises subnets behind it (`routes` in its signed record,
//! `--advertise-route`). [`plan`] decides, for this node, which of them to
//! install: the subnet goes into the advertising member's WireGuard allowed
//! IPs and becomes a kernel route `CIDR dev <mesh interface>`. The shell
//! applies the plan; this module does no I/O and reads no clock.
//!
//! Rules, in the order they are checked (proto/PROTOCOL.md §3.2):
//!
//! 1. **Authorized**: the route lies inside one of the `allow_routes` of
//!    the token the member was admitted with (`invite --allow-route`), or
//!    the member was stamped by the network key (the `init` node), which
//!    may advertise any route. As nebula binds subnets into certificates,
//!    the authorization is signed by the network key, never the member's
//!    own word.
//! 2. **Not the overlay**: no route overlaps the overlay network (so none
//!    covers a member's overlay address).
//! 3. **Not special**: loopback, link-local, multicast, `0.0.0.0/8` and the
//!    reserved block are never routed through the mesh.
//! 4. **One winner per subnet**: of members advertising the identical
//!    subnet, the one admitted first (stamp time, then node key: the holder
//!    order of addresses, proto/PROTOCOL.md §3.1) wins, the others are
//!    refused. Only members that have a WireGuard peer here compete, so a
//!    second gateway for the same subnet takes over when the first one is
//!    gone. Different prefixes that overlap are just routing: the most
//!    specific one wins, in the kernel as in WireGuard's allowed IPs.
//! 5. **No loops**: no route covers a public address of its own member
//!    (a WireGuard endpoint or its gossip address): the tunnel to it would
//!    carry its own packets. A *private* address of its own is fine: a
//!    gateway standing on the LAN it advertises (one interface, behind the
//!    LAN's router) is reached through its NAT's public mapping or a
//!    relay, and no member ever uses a WireGuard endpoint that lies inside
//!    a subnet it routes through the mesh ([`Plan::usable_endpoint`]).
//! 6. **No capture** (local to this node): no route covers an address this
//!    host reaches *another* member at outside the mesh (the endpoints its
//!    WireGuard device uses, members' public endpoints and gossip
//!    addresses), overlaps one of this host's connected networks (its LAN
//!    stays its LAN), or replaces a route this host already has that
//!    meshpeer did not add. Other members' *private* host addresses do not
//!    count: every home is 192.168.1.0/24, and a site's LAN may well reuse
//!    a range some member has at home; only the addresses this host
//!    actually uses matter.
//!
//! So a member cannot capture a site's traffic or loop WireGuard by
//! advertising `0.0.0.0/0`, `10.0.0.0/8` or a LAN: such a route is refused
//! with a reason that `status` shows and the log names.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;

use crate::proto::{PublicKeyBytes, Route};

/// Most routes one member may advertise (as [`crate::record::MAX_ROUTES`]).
pub const MAX_ROUTES: usize = crate::record::MAX_ROUTES;

/// Why a route is not a valid IPv4 subnet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("{0} is an IPv6 route; the overlay is IPv4, so routes are IPv4 only")]
    Ipv6(String),
    #[error("{addr}/{prefix}: the prefix length must be 0 to 32")]
    BadPrefix { addr: String, prefix: u8 },
    #[error("{given} has host bits set; the subnet is {net}")]
    HostBits { given: String, net: Ipv4Net },
}

/// The subnet a [`Route`] names, if it is a valid IPv4 subnet (prefix
/// length at most 32, host bits zero).
pub fn to_net(r: &Route) -> Result<Ipv4Net, RouteError> {
    let addr = match r.addr {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => return Err(RouteError::Ipv6(format!("{a}/{}", r.prefix))),
    };
    let net = Ipv4Net::new(addr, r.prefix).map_err(|_| RouteError::BadPrefix {
        addr: addr.to_string(),
        prefix: r.prefix,
    })?;
    if net.network() != addr {
        return Err(RouteError::HostBits {
            given: format!("{addr}/{}", r.prefix),
            net: net.trunc(),
        });
    }
    Ok(net)
}

/// The wire form of a subnet.
pub fn from_net(n: Ipv4Net) -> Route {
    Route {
        addr: IpAddr::V4(n.network()),
        prefix: n.prefix_len(),
    }
}

/// Parses a route as a user gives it (`--advertise-route`, the config
/// file): an IPv4 subnet like `192.168.10.0/24`, host bits zero, not
/// special (see [`special`]).
pub fn parse_route(s: &str) -> Result<Ipv4Net, String> {
    let t = s.trim();
    if !t.contains('/') {
        return Err(format!(
            "{s:?} is not a subnet: give a prefix length, like 192.168.10.0/24"
        ));
    }
    let net: ipnet::IpNet = t
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 subnet like 192.168.10.0/24"))?;
    let net = match net {
        ipnet::IpNet::V4(n) => n,
        ipnet::IpNet::V6(_) => {
            return Err(format!(
                "{s:?} is an IPv6 subnet; the overlay is IPv4, so routes are IPv4 only"
            ))
        }
    };
    if net.network() != net.addr() {
        return Err(format!(
            "{s:?} has host bits set: did you mean {}?",
            net.trunc()
        ));
    }
    if net.prefix_len() == 0 {
        return Err(format!(
            "{s:?} is a default route: meshpeer routes subnets between sites, not all traffic (members refuse it)"
        ));
    }
    if let Some(what) = special(net) {
        return Err(format!("{s:?} overlaps {what}, which is never routed"));
    }
    Ok(net)
}

/// Checks a list of routes to advertise: each valid, at most
/// [`MAX_ROUTES`]; sorted and deduplicated.
pub fn check_routes(routes: &[Ipv4Net]) -> Result<Vec<Ipv4Net>, String> {
    let mut out: Vec<Ipv4Net> = routes.to_vec();
    out.sort();
    out.dedup();
    if out.len() > MAX_ROUTES {
        return Err(format!(
            "{} routes: a node advertises at most {MAX_ROUTES}",
            out.len()
        ));
    }
    Ok(out)
}

/// Address blocks never routed through the mesh, with their names.
const SPECIAL: [(&str, Ipv4Addr, u8); 5] = [
    ("\"this network\" 0.0.0.0/8", Ipv4Addr::new(0, 0, 0, 0), 8),
    ("loopback 127.0.0.0/8", Ipv4Addr::new(127, 0, 0, 0), 8),
    (
        "link-local 169.254.0.0/16",
        Ipv4Addr::new(169, 254, 0, 0),
        16,
    ),
    ("multicast 224.0.0.0/4", Ipv4Addr::new(224, 0, 0, 0), 4),
    ("reserved 240.0.0.0/4", Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// The special block `net` overlaps, if any.
pub fn special(net: Ipv4Net) -> Option<&'static str> {
    SPECIAL.iter().find_map(|(name, a, p)| {
        let s = Ipv4Net::new(*a, *p).ok()?;
        overlaps(net, s).then_some(*name)
    })
}

/// Whether two subnets share an address (one contains the other).
pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Whether `allowed` (a token's `allow_routes`) authorizes `net`.
pub fn allowed_by(net: Ipv4Net, allowed: &[Route]) -> bool {
    allowed
        .iter()
        .filter_map(|r| match r.addr {
            IpAddr::V4(a) => Ipv4Net::new(a, r.prefix).ok().map(|n| n.trunc()),
            IpAddr::V6(_) => None,
        })
        .any(|a| a.contains(&net))
}

/// A member that advertises routes (this node included).
#[derive(Debug, Clone)]
pub struct Advertiser<'a> {
    pub key: PublicKeyBytes,
    pub name: &'a str,
    pub routes: &'a [Route],
    /// Its token's allowed routes.
    pub allow_routes: &'a [Route],
    /// Stamped by the network key: may advertise any route.
    pub by_network: bool,
    /// Its stamp's time (unix s): the holder order of identical subnets.
    pub admitted_at: u64,
    /// Its underlay addresses (record endpoints and gossip address): none
    /// of its routes may cover a public one.
    pub underlay: &'a [IpAddr],
    /// It has a WireGuard peer here (live, or down within the grace, and
    /// holding its address); this node is always active for itself.
    pub active: bool,
}

/// What this node knows about itself for the local checks.
#[derive(Debug, Clone, Default)]
pub struct Host<'a> {
    pub self_key: PublicKeyBytes,
    /// The overlay network.
    pub overlay: Ipv4Net,
    /// This host's connected IPv4 networks (not the mesh interface's).
    pub connected: &'a [Ipv4Net],
    /// Addresses this host reaches members at outside the mesh, which no
    /// other member's route may cover: the endpoints its WireGuard device
    /// uses and members' public endpoints and gossip addresses (see
    /// [`reachable_endpoints`]).
    pub endpoints: &'a [Endpoint],
    /// Subnets this host already routes that meshpeer did not install.
    pub foreign: &'a [Ipv4Net],
}

/// Why a route is not installed here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a valid IPv4 subnet (records with one are refused whole; kept
    /// for completeness).
    Invalid(RouteError),
    /// Neither its token allows it nor was it stamped by the network key.
    NotAllowed { allowed: Vec<String> },
    /// It overlaps the overlay network.
    Overlay(Ipv4Net),
    /// It overlaps a block that is never routed.
    Special(&'static str),
    /// Another member advertises the identical subnet and holds it (it was
    /// admitted first).
    Taken { holder: String },
    /// It covers a public address of its own member (a loop), or one this
    /// host reaches another member at (a capture).
    Endpoint { member: String, addr: IpAddr },
    /// It overlaps one of this host's connected networks.
    Connected(Ipv4Net),
    /// This host already has a route to it that meshpeer did not add.
    Foreign,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Invalid(e) => write!(f, "{e}"),
            Refusal::NotAllowed { allowed } if allowed.is_empty() => write!(
                f,
                "not allowed by its token (which allows no routes; `meshpeer invite --allow-route`)"
            ),
            Refusal::NotAllowed { allowed } => {
                write!(
                    f,
                    "not allowed by its token (allowed: {})",
                    allowed.join(", ")
                )
            }
            Refusal::Overlay(o) => write!(f, "overlaps the overlay network {o}"),
            Refusal::Special(what) => write!(f, "overlaps {what}"),
            Refusal::Taken { holder } => write!(
                f,
                "{holder} advertises the same subnet and holds it (admitted first)"
            ),
            Refusal::Endpoint { member, addr } => write!(
                f,
                "covers {member}'s underlay address {addr} (WireGuard would loop or be captured)"
            ),
            Refusal::Connected(n) => {
                write!(f, "overlaps this host's connected network {n}")
            }
            Refusal::Foreign => write!(
                f,
                "this host already has a route to it that meshpeer did not add"
            ),
        }
    }
}

impl Refusal {
    /// A refusal every member makes alike (the route itself is at fault),
    /// as opposed to one of this host's local checks.
    pub fn mesh_wide(&self) -> bool {
        !matches!(self, Refusal::Connected(_) | Refusal::Foreign)
    }
}

/// What becomes of one advertised route here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Routed through the mesh to its member (allowed IPs and a kernel route).
    Installed,
    /// Our own route, authorized and held: members route it to us.
    Advertised,
    /// Its member has no WireGuard peer here (down, gone, or in conflict).
    Inactive,
    Refused(Refusal),
}

impl Verdict {
    /// `installed`, `advertised`, `inactive` or `refused`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Installed => "installed",
            Verdict::Advertised => "advertised",
            Verdict::Inactive => "inactive",
            Verdict::Refused(_) => "refused",
        }
    }

    /// The refusal's text, if refused.
    pub fn reason(&self) -> Option<String> {
        match self {
            Verdict::Refused(r) => Some(r.to_string()),
            Verdict::Inactive => Some("its member has no WireGuard peer here".into()),
            _ => None,
        }
    }
}

/// One advertised route and its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub node: PublicKeyBytes,
    pub name: String,
    /// The route as advertised (`a.b.c.d/n`, or its text if invalid).
    pub route: String,
    pub verdict: Verdict,
}

/// The plan: what to install, and every advertised route's verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Per member: the subnets to add to its allowed IPs and route through
    /// the mesh interface (sorted).
    pub installs: BTreeMap<PublicKeyBytes, Vec<Ipv4Net>>,
    /// Every route advertised by an [`Advertiser`], in member then route order.
    pub outcomes: Vec<Outcome>,
}

impl Plan {
    /// Every subnet to route through the mesh interface.
    pub fn routes(&self) -> BTreeSet<Ipv4Net> {
        self.installs.values().flatten().copied().collect()
    }

    /// The subnets routed to member `key`.
    pub fn installs_for(&self, key: &PublicKeyBytes) -> &[Ipv4Net] {
        self.installs.get(key).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether a WireGuard endpoint may be used: never one inside a subnet
    /// routed through the mesh (the tunnel would carry its own packets).
    pub fn usable_endpoint(&self, addr: &IpAddr) -> bool {
        !self.installs.values().flatten().any(|n| covers(*n, addr))
    }

    /// The outcomes of `key`'s routes.
    pub fn outcomes_of<'a>(
        &'a self,
        key: &'a PublicKeyBytes,
    ) -> impl Iterator<Item = &'a Outcome> + 'a {
        self.outcomes.iter().filter(move |o| &o.node == key)
    }
}

/// An address this host reaches a member at outside the mesh.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub node: PublicKeyBytes,
    pub name: String,
}

/// Whether `net` covers `a`.
fn covers(net: Ipv4Net, a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => net.contains(v4),
        IpAddr::V6(_) => false,
    }
}

/// Whether `a` is meaningful only on its own network: RFC 1918, shared
/// (carrier-grade NAT) 100.64.0.0/10, link-local, loopback.
pub fn is_private(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => {
            v4.is_private()
                || v4.is_link_local()
                || v4.is_loopback()
                || (v4.octets()[0] == 100 && v4.octets()[1] & 0xc0 == 64)
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// The addresses this host reaches members at outside the mesh (for
/// [`Host::endpoints`]): every endpoint in `used` (its WireGuard device's,
/// with the member's key and name), and every member's public (not
/// [`is_private`]) addresses in `members` (record endpoints and gossip
/// address). Deduplicated.
pub fn reachable_endpoints<'a>(
    used: impl IntoIterator<Item = (IpAddr, PublicKeyBytes, &'a str)>,
    members: impl IntoIterator<Item = (PublicKeyBytes, &'a str, &'a [IpAddr])>,
) -> Vec<Endpoint> {
    let mut out: BTreeSet<Endpoint> = BTreeSet::new();
    let mut add = |addr: IpAddr, node: PublicKeyBytes, name: &str| {
        out.insert(Endpoint {
            addr,
            node,
            name: name.to_string(),
        });
    };
    for (a, k, n) in used {
        add(a, k, n);
    }
    for (k, n, addrs) in members {
        for a in addrs.iter().filter(|a| !is_private(a)) {
            add(*a, k, n);
        }
    }
    out.into_iter().collect()
}

/// The holder order of identical subnets: admitted first, then the smaller
/// node key (as first claims of addresses, proto/PROTOCOL.md §3.1).
fn order(a: &Advertiser<'_>) -> (u64, PublicKeyBytes) {
    (a.admitted_at, a.key)
}

/// Decides which advertised routes this node installs (see the module
/// documentation for the rules). Deterministic: the same inputs give the
/// same plan, whatever the order of `members`.
pub fn plan(host: &Host<'_>, members: &[Advertiser<'_>]) -> Plan {
    let mut members: Vec<&Advertiser<'_>> = members.iter().collect();
    members.sort_by_key(|m| m.key);
    members.dedup_by_key(|m| m.key);

    // Mesh-wide checks first; what passes competes for its subnet.
    let mut verdicts: BTreeMap<(PublicKeyBytes, String), (Option<Ipv4Net>, Verdict)> =
        BTreeMap::new();
    let mut contest: BTreeMap<Ipv4Net, Vec<&Advertiser<'_>>> = BTreeMap::new();
    for m in &members {
        let routes: BTreeSet<&Route> = m.routes.iter().collect();
        for r in routes {
            let net = match to_net(r) {
                Ok(n) => n,
                Err(e) => {
                    let text = format!("{}/{}", r.addr, r.prefix);
                    verdicts.insert((m.key, text), (None, Verdict::Refused(Refusal::Invalid(e))));
                    continue;
                }
            };
            let refusal = if !m.by_network && !allowed_by(net, m.allow_routes) {
                Some(Refusal::NotAllowed {
                    allowed: m
                        .allow_routes
                        .iter()
                        .map(|a| format!("{}/{}", a.addr, a.prefix))
                        .collect(),
                })
            } else if overlaps(net, host.overlay) {
                Some(Refusal::Overlay(host.overlay))
            } else if let Some(what) = special(net) {
                Some(Refusal::Special(what))
            } else {
                m.underlay
                    .iter()
                    .find(|a| !is_private(a) && covers(net, a))
                    .map(|a| Refusal::Endpoint {
                        member: m.name.to_string(),
                        addr: *a,
                    })
            };
            let key = (m.key, net.to_string());
            match refusal {
                Some(r) => {
                    verdicts.insert(key, (Some(net), Verdict::Refused(r)));
                }
                None if !m.active && m.key != host.self_key => {
                    verdicts.insert(key, (Some(net), Verdict::Inactive));
                }
                None => contest.entry(net).or_default().push(m),
            }
        }
    }

    // One holder per identical subnet; then the local checks for the holder.
    let mut installs: BTreeMap<PublicKeyBytes, Vec<Ipv4Net>> = BTreeMap::new();
    for (net, mut contenders) in contest {
        contenders.sort_by_key(|m| order(m));
        let holder = contenders[0];
        for loser in &contenders[1..] {
            verdicts.insert(
                (loser.key, net.to_string()),
                (
                    Some(net),
                    Verdict::Refused(Refusal::Taken {
                        holder: holder.name.to_string(),
                    }),
                ),
            );
        }
        // Another member's address only: the holder's own private ones are
        // fine (see the module documentation), its public ones were refused.
        let covered = host
            .endpoints
            .iter()
            .find(|e| e.node != holder.key && covers(net, &e.addr));
        let verdict = if let Some(e) = covered {
            // Our own route too: members that use that address refuse it.
            Verdict::Refused(Refusal::Endpoint {
                member: e.name.clone(),
                addr: e.addr,
            })
        } else if holder.key == host.self_key {
            Verdict::Advertised
        } else if let Some(c) = host.connected.iter().find(|c| overlaps(net, **c)) {
            Verdict::Refused(Refusal::Connected(c.trunc()))
        } else if host.foreign.contains(&net) {
            Verdict::Refused(Refusal::Foreign)
        } else {
            installs.entry(holder.key).or_default().push(net);
            Verdict::Installed
        };
        verdicts.insert((holder.key, net.to_string()), (Some(net), verdict));
    }

    let names: BTreeMap<PublicKeyBytes, &str> = members.iter().map(|m| (m.key, m.name)).collect();
    let mut outcomes: Vec<(PublicKeyBytes, Option<Ipv4Net>, String, Verdict)> = verdicts
        .into_iter()
        .map(|((node, text), (net, v))| (node, net, text, v))
        .collect();
    outcomes.sort_by(|a, b| (a.0, a.1, &a.2).cmp(&(b.0, b.1, &b.2)));
    for v in installs.values_mut() {
        v.sort();
    }
    Plan {
        installs,
        outcomes: outcomes
            .into_iter()
            .map(|(node, _, route, verdict)| Outcome {
                node,
                name: names.get(&node).copied().unwrap_or_default().to_string(),
                route,
                verdict,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests;
