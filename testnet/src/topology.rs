//! Topology planning and building: the routed "internet", home NAT routers,
//! carrier-grade NAT, symmetric NAT.
//!
//! ```text
//!                        core router (<p>core)
//!              /31 links  /        |         \   (one per ISP)
//!          ISP <p>i0     ISP <p>i1   ...   ISP <p>iK        198.18.0.0/15, one /22 per ISP
//!         /31 |  \ ...      |                               (a /31 point-to-point link per host)
//!      public   home NAT   CGNAT <p>cK (WAN 198.18.x.y)
//!      node     <p>hK       | bridge "lan" 100.64.K.0/24
//!      <p>nI    | bridge     home NAT <p>hM (WAN 100.64.K.z)
//!               | "lan"        | bridge "lan" 192.168.M.0/24
//!             nodes          nodes
//! ```
//!
//! The internet is routed, not bridged: every host (public node or NAT
//! router) has its own /31 link to an ISP router, and ISP routers meet at one
//! core router. So there is no 1024-port bridge limit, each host has exactly
//! one underlay neighbour (the neighbour table grows linearly, not N²), and a
//! partition is one nftables rule on the core router. There are always at
//! least two ISPs; a partition cuts the ISPs in two halves.
//!
//! Node 0 is the seed (and nebula's lighthouse) and is always public.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Public,
    Nat,
    Cgnat,
    Symmetric,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Public, Kind::Nat, Kind::Cgnat, Kind::Symmetric];
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Public => "public",
            Kind::Nat => "nat",
            Kind::Cgnat => "cgnat",
            Kind::Symmetric => "symmetric",
        }
    }
}

/// Percentages of each kind (need not sum to 100: they are weights).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Mix {
    pub public: u32,
    pub nat: u32,
    pub cgnat: u32,
    pub symmetric: u32,
}

impl Mix {
    /// A mix of one kind only, with this weight.
    pub fn only(kind: Kind, weight: u32) -> Mix {
        let mut m = Mix::default();
        match kind {
            Kind::Public => m.public = weight,
            Kind::Nat => m.nat = weight,
            Kind::Cgnat => m.cgnat = weight,
            Kind::Symmetric => m.symmetric = weight,
        }
        m
    }

    pub fn parse(s: &str) -> Result<Mix> {
        let mut m = Mix::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .with_context(|| format!("mix entry {part:?}: want kind=weight"))?;
            let v: u32 = v
                .trim()
                .parse()
                .with_context(|| format!("mix weight {v:?}"))?;
            match k.trim() {
                "public" | "flat" => m.public = v,
                "nat" => m.nat = v,
                "cgnat" => m.cgnat = v,
                "symmetric" | "sym" => m.symmetric = v,
                other => bail!("unknown kind {other:?} in mix (public, nat, cgnat, symmetric)"),
            }
        }
        if m.public + m.nat + m.cgnat + m.symmetric == 0 {
            bail!("mix {s:?} has no weight");
        }
        Ok(m)
    }
    fn weights(&self) -> [(Kind, u32); 4] {
        [
            (Kind::Public, self.public),
            (Kind::Nat, self.nat),
            (Kind::Cgnat, self.cgnat),
            (Kind::Symmetric, self.symmetric),
        ]
    }
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "public={},nat={},cgnat={},symmetric={}",
            self.public, self.nat, self.cgnat, self.symmetric
        )
    }
}

/// Options that shape a topology.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopoOptions {
    /// flat | nat | cgnat | symmetric | mixed
    pub kind: String,
    pub mix: Mix,
    /// Node slots to plan (initial nodes plus later joiners).
    pub slots: usize,
    /// Most nodes behind one home router (each home gets 1..=this).
    pub nodes_per_home: usize,
    /// Homes behind one CGNAT router.
    pub homes_per_cgnat: usize,
    /// Hosts (public nodes and routers) per ISP router.
    pub hosts_per_isp: usize,
    /// nf_conntrack_udp_timeout in NAT routers (seconds), None = kernel default (30).
    pub udp_timeout_secs: Option<u32>,
    /// nf_conntrack_udp_timeout_stream in NAT routers, None = kernel default (120).
    pub udp_stream_timeout_secs: Option<u32>,
    pub seed: u64,
    /// Every home gets exactly `nodes_per_home` nodes (the NAT probe).
    #[serde(default)]
    pub home_size_exact: bool,
    /// Explicit home sizes per kind (consecutive homes, cycled); a kind
    /// without a list uses `nodes_per_home`.
    #[serde(default)]
    pub home_sizes: HomeSizes,
    /// Add a STUN server host (`<p>stun`) on the internet.
    #[serde(default)]
    pub stun_server: bool,
    /// Sites: a gateway node's home LAN, with hosts that are not members.
    #[serde(default)]
    pub sites: Vec<SiteTopo>,
}

/// A site (site-to-site routes): the home LAN of node `gateway` (behind a
/// NAT router), with `hosts` LAN hosts that are not members. The LAN's
/// router routes the other sites' LANs and `overlay` (the mesh's network,
/// so that LAN hosts answer members) via the gateway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SiteTopo {
    pub gateway: usize,
    pub hosts: usize,
    pub overlay: String,
}

/// A site as built: its LAN, the LAN's router, the gateway's address on it
/// and the LAN hosts (namespace, address). Each host's default route is the
/// LAN's router, which routes the other sites' LANs and the overlay via the
/// gateway (as seed 003's default gateways do).
#[derive(Debug, Clone, Serialize)]
pub struct SitePlan {
    pub gateway: usize,
    /// `192.168.K.0/24`.
    pub lan: String,
    pub router: String,
    pub gateway_ip: Ipv4Addr,
    pub hosts: Vec<(String, Ipv4Addr)>,
}

/// Sizes of consecutive homes, per kind: `nat = [2, 2]` puts the first two
/// home-NAT nodes in one home, the next two in another, then again 2, 2, ...
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HomeSizes {
    #[serde(default)]
    pub nat: Vec<usize>,
    #[serde(default)]
    pub cgnat: Vec<usize>,
    #[serde(default)]
    pub symmetric: Vec<usize>,
}

impl HomeSizes {
    fn of(&self, k: Kind) -> &[usize] {
        match k {
            Kind::Nat => &self.nat,
            Kind::Cgnat => &self.cgnat,
            Kind::Symmetric => &self.symmetric,
            Kind::Public => &[],
        }
    }
}

impl TopoOptions {
    pub fn mix_for_kind(&self) -> Result<Mix> {
        let one = |k: Kind| Mix::only(k, 1);
        Ok(match self.kind.as_str() {
            "flat" | "public" => one(Kind::Public),
            "nat" => one(Kind::Nat),
            "cgnat" => one(Kind::Cgnat),
            "symmetric" => one(Kind::Symmetric),
            "mixed" => self.mix,
            k => bail!("unknown topology {k:?} (flat, nat, cgnat, symmetric, mixed)"),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeSpec {
    pub index: usize,
    pub kind: Kind,
    pub ns: String,
    pub underlay: Ipv4Addr,
    /// The address the internet sees (own, home router's or CGNAT's WAN).
    pub public_ip: Ipv4Addr,
    /// Namespace of the NAT router in front of it (nearest first).
    pub routers: Vec<String>,
    pub isp: usize,
}

impl NodeSpec {
    /// The home (or symmetric) router's namespace, for a node behind NAT.
    pub fn home(&self) -> Option<&str> {
        self.routers.first().map(String::as_str)
    }
    /// The CGNAT router's namespace, for a node behind CGNAT.
    pub fn cgnat(&self) -> Option<&str> {
        if self.kind == Kind::Cgnat {
            self.routers.get(1).map(String::as_str)
        } else {
            None
        }
    }
    /// The router whose WAN address is this node's public address.
    pub fn outer_router(&self) -> Option<&str> {
        self.routers.last().map(String::as_str)
    }
}

/// A host's /31 link to its ISP router.
#[derive(Debug, Clone, Serialize)]
pub struct HostLink {
    pub ns: String,
    pub ifname: String,
    pub isp: usize,
    /// Interface on the ISP router (`h<slot>`).
    pub isp_if: String,
    pub addr: Ipv4Addr,
    pub gw: Ipv4Addr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouterKind {
    Core,
    Isp,
    Home,
    Symmetric,
    Cgnat,
}

#[derive(Debug, Clone, Serialize)]
pub struct NsSpec {
    pub name: String,
    pub router: Option<RouterKind>,
    #[serde(skip)]
    pub ip_cmds: String,
    #[serde(skip)]
    pub sysctls: Vec<(String, String)>,
    #[serde(skip)]
    pub nft: Option<String>,
    /// sysctls written after nft (conntrack must exist first)
    #[serde(skip)]
    pub post_sysctls: Vec<(String, String)>,
}

/// A veth pair whose two ends are created directly in their namespaces.
#[derive(Debug, Clone)]
pub struct Link {
    pub a_ns: String,
    pub a: String,
    pub b_ns: String,
    pub b: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub prefix: String,
    pub opts: TopoOptions,
    pub nodes: Vec<NodeSpec>,
    pub namespaces: Vec<NsSpec>,
    #[serde(skip)]
    pub links: Vec<Link>,
    pub isps: usize,
    pub core_ns: String,
    pub counts: Counts,
    /// Every internet host's link (public nodes, NAT routers, STUN server).
    pub hosts: Vec<HostLink>,
    /// Host slots used per ISP at build time (renumbering takes the next).
    pub slots_used: Vec<usize>,
    /// The STUN server host: (namespace, address).
    pub stun: Option<(String, Ipv4Addr)>,
    /// Sites (site-to-site routes), in the order of the options.
    pub sites: Vec<SitePlan>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    pub public: usize,
    pub nat: usize,
    pub cgnat: usize,
    pub symmetric: usize,
    pub home_routers: usize,
    pub symmetric_routers: usize,
    pub cgnat_routers: usize,
    pub isp_routers: usize,
    pub namespaces: usize,
    pub veth_pairs: usize,
}

fn add(ip: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip) + n)
}

const INTERNET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
const CORE_LINKS: Ipv4Addr = Ipv4Addr::new(198, 19, 248, 0);
const MAX_ISPS: usize = 126;
const HOSTS_PER_ISP_MAX: usize = 512;

/// The /22 of ISP `s`.
pub fn isp_net(s: usize) -> String {
    format!("{}/22", add(INTERNET, (s * 1024) as u32))
}

/// (ISP side, host side) of host link `j` on ISP `s`.
fn isp_host(s: usize, j: usize) -> (Ipv4Addr, Ipv4Addr) {
    let base = add(INTERNET, (s * 1024 + 2 * j) as u32);
    (base, add(base, 1))
}

/// One host on the internet, waiting for its ISP.
struct InternetHost {
    ns: String,
    /// interface name inside `ns`
    ifname: String,
}

impl Plan {
    pub fn new(prefix: &str, opts: &TopoOptions) -> Result<Plan> {
        if opts.slots == 0 {
            bail!("a topology needs at least one node");
        }
        let mix = opts.mix_for_kind()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
        // Kinds: node 0 public, the rest by largest remainder over the weights.
        let rest = opts.slots - 1;
        let total_w: u32 = mix.weights().iter().map(|w| w.1).sum();
        let mut quota: Vec<(Kind, usize, f64)> = mix
            .weights()
            .iter()
            .map(|(k, w)| {
                let exact = rest as f64 * *w as f64 / total_w as f64;
                (*k, exact.floor() as usize, exact - exact.floor())
            })
            .collect();
        let mut assigned: usize = quota.iter().map(|q| q.1).sum();
        let mut order: Vec<usize> = (0..4).collect();
        order.sort_by(|a, b| quota[*b].2.partial_cmp(&quota[*a].2).unwrap());
        for i in order.iter().cycle() {
            if assigned >= rest {
                break;
            }
            if mix.weights()[*i].1 > 0 {
                quota[*i].1 += 1;
                assigned += 1;
            }
        }
        let mut kinds: Vec<Kind> = vec![];
        for (k, n, _) in &quota {
            kinds.extend(std::iter::repeat_n(*k, *n));
        }
        kinds.shuffle(&mut rng);
        kinds.insert(0, Kind::Public);

        let p = prefix.to_string();
        let mut namespaces: Vec<NsSpec> = vec![];
        let mut links: Vec<Link> = vec![];
        let mut counts = Counts::default();
        let mut internet: Vec<InternetHost> = vec![];
        let ns = |name: String, router: Option<RouterKind>| NsSpec {
            name,
            router,
            ip_cmds: "link set lo up\n".into(),
            sysctls: vec![],
            nft: None,
            post_sysctls: vec![],
        };
        let nat_timeouts = {
            let mut v = vec![];
            if let Some(t) = opts.udp_timeout_secs {
                v.push((
                    "net.netfilter.nf_conntrack_udp_timeout".to_string(),
                    t.to_string(),
                ));
            }
            if let Some(t) = opts.udp_stream_timeout_secs {
                v.push((
                    "net.netfilter.nf_conntrack_udp_timeout_stream".to_string(),
                    t.to_string(),
                ));
            }
            v
        };
        let node_sysctls = vec![(
            "net.ipv4.ping_group_range".to_string(),
            "0 2147483647".to_string(),
        )];

        // Node namespaces first (index i = node i).
        let mut nodes: Vec<NodeSpec> = vec![];
        for (i, k) in kinds.iter().enumerate() {
            let mut n = ns(format!("{p}n{i}"), None);
            n.sysctls = node_sysctls.clone();
            namespaces.push(n);
            nodes.push(NodeSpec {
                index: i,
                kind: *k,
                ns: format!("{p}n{i}"),
                underlay: Ipv4Addr::UNSPECIFIED,
                public_ip: Ipv4Addr::UNSPECIFIED,
                routers: vec![],
                isp: 0,
            });
            match k {
                Kind::Public => counts.public += 1,
                Kind::Nat => counts.nat += 1,
                Kind::Cgnat => counts.cgnat += 1,
                Kind::Symmetric => counts.symmetric += 1,
            }
        }
        // Public nodes are internet hosts with interface eth0.
        let mut host_of_node: Vec<Option<usize>> = vec![None; nodes.len()];
        for n in nodes.iter().filter(|n| n.kind == Kind::Public) {
            host_of_node[n.index] = Some(internet.len());
            internet.push(InternetHost {
                ns: n.ns.clone(),
                ifname: "eth0".into(),
            });
        }
        // Group NATed nodes into homes.
        let per_home = opts.nodes_per_home.max(1);
        let mut homes: Vec<(Kind, Vec<usize>)> = vec![];
        for kind in [Kind::Nat, Kind::Symmetric, Kind::Cgnat] {
            let members: Vec<usize> = nodes
                .iter()
                .filter(|n| n.kind == kind)
                .map(|n| n.index)
                .collect();
            let mut it = members.into_iter().peekable();
            let sizes = opts.home_sizes.of(kind);
            let mut nth = 0;
            while it.peek().is_some() {
                let size = if !sizes.is_empty() {
                    sizes[nth % sizes.len()].max(1)
                } else if opts.home_size_exact {
                    per_home
                } else {
                    rng.gen_range(1..=per_home)
                };
                nth += 1;
                let home: Vec<usize> = it.by_ref().take(size).collect();
                homes.push((kind, home));
            }
        }
        // Home routers (and their LANs); CGNAT homes collected per CGNAT.
        // Each NATed node's home: (router namespace, LAN number).
        let mut home_of: Vec<Option<(String, u8)>> = vec![None; nodes.len()];
        let mut cgnat_homes: Vec<usize> = vec![]; // home router ns index into namespaces
        let mut home_wan_of_cgnat_home: Vec<(String, usize)> = vec![]; // (home ns, home no)
        for (h, (kind, members)) in homes.iter().enumerate() {
            let rname = format!("{p}h{h}");
            let rk = if *kind == Kind::Symmetric {
                RouterKind::Symmetric
            } else {
                RouterKind::Home
            };
            let mut r = ns(rname.clone(), Some(rk));
            let lan_net = h % 256;
            let gw = Ipv4Addr::new(192, 168, lan_net as u8, 1);
            let _ = writeln!(
                r.ip_cmds,
                "link add lan type bridge\nlink set lan up\naddr add {gw}/24 dev lan"
            );
            for (j, idx) in members.iter().enumerate() {
                let ip = Ipv4Addr::new(192, 168, lan_net as u8, (j + 2) as u8);
                links.push(Link {
                    a_ns: rname.clone(),
                    a: format!("l{j}"),
                    b_ns: nodes[*idx].ns.clone(),
                    b: "eth0".into(),
                });
                let _ = writeln!(r.ip_cmds, "link set l{j} master lan\nlink set l{j} up");
                let nsi = *idx; // node namespace index == node index
                let _ = writeln!(
                    namespaces[nsi].ip_cmds,
                    "addr add {ip}/24 dev eth0\nlink set eth0 up\nroute add default via {gw}"
                );
                nodes[*idx].underlay = ip;
                nodes[*idx].routers.push(rname.clone());
                home_of[*idx] = Some((rname.clone(), lan_net as u8));
            }
            r.sysctls = vec![("net.ipv4.ip_forward".into(), "1".into())];
            r.nft = Some(nat_ruleset(*kind == Kind::Symmetric));
            r.post_sysctls = nat_timeouts.clone();
            match rk {
                RouterKind::Symmetric => counts.symmetric_routers += 1,
                _ => counts.home_routers += 1,
            }
            namespaces.push(r);
            if *kind == Kind::Cgnat {
                cgnat_homes.push(h);
                home_wan_of_cgnat_home.push((rname, h));
            } else {
                internet.push(InternetHost {
                    ns: rname.clone(),
                    ifname: "wan".into(),
                });
                for idx in members {
                    host_of_node[*idx] = Some(internet.len() - 1);
                }
            }
        }
        // Sites: LAN hosts on a gateway's home LAN; the LAN's router routes
        // the other sites' LANs via the gateway.
        let mut sites: Vec<SitePlan> = vec![];
        for (si, st) in opts.sites.iter().enumerate() {
            let Some(Some((router, lan_net))) = home_of.get(st.gateway).cloned() else {
                bail!(
                    "site {si}: its gateway n{} must be a node behind a home router (not public, and within the topology's nodes)",
                    st.gateway
                );
            };
            if sites.iter().any(|s: &SitePlan| s.router == router) {
                bail!("site {si}: two sites in one home ({router}); give each gateway a home of its own");
            }
            let mut hosts = vec![];
            for j in 0..st.hosts.min(50) {
                let hname = format!("{p}s{si}h{j}");
                let ip = Ipv4Addr::new(192, 168, lan_net, (200 + j) as u8);
                let port = format!("s{si}h{j}");
                links.push(Link {
                    a_ns: router.clone(),
                    a: port.clone(),
                    b_ns: hname.clone(),
                    b: "eth0".into(),
                });
                let r = namespaces.iter_mut().find(|n| n.name == router).unwrap();
                let _ = writeln!(r.ip_cmds, "link set {port} master lan\nlink set {port} up");
                let mut h = ns(hname.clone(), None);
                let _ = writeln!(
                    h.ip_cmds,
                    "addr add {ip}/24 dev eth0\nlink set eth0 up\nroute add default via 192.168.{lan_net}.1"
                );
                namespaces.push(h);
                hosts.push((hname, ip));
            }
            sites.push(SitePlan {
                gateway: st.gateway,
                lan: format!("192.168.{lan_net}.0/24"),
                router,
                gateway_ip: nodes[st.gateway].underlay,
                hosts,
            });
        }
        for (a, st) in sites.iter().zip(&opts.sites) {
            let r = namespaces.iter_mut().find(|n| n.name == a.router).unwrap();
            for b in sites.iter().filter(|b| b.router != a.router) {
                let _ = writeln!(r.ip_cmds, "route add {} via {}", b.lan, a.gateway_ip);
            }
            let _ = writeln!(r.ip_cmds, "route add {} via {}", st.overlay, a.gateway_ip);
        }
        // CGNAT routers, each with several homes behind it.
        let per_cg = opts.homes_per_cgnat.max(1);
        for (c, chunk) in home_wan_of_cgnat_home.chunks(per_cg).enumerate() {
            let cname = format!("{p}c{c}");
            let mut r = ns(cname.clone(), Some(RouterKind::Cgnat));
            let base = add(Ipv4Addr::new(100, 64, 0, 0), (c * 256) as u32);
            let gw = add(base, 1);
            let _ = writeln!(
                r.ip_cmds,
                "link add lan type bridge\nlink set lan up\naddr add {gw}/24 dev lan"
            );
            for (j, (hname, h)) in chunk.iter().enumerate() {
                let wan = add(base, (j + 2) as u32);
                links.push(Link {
                    a_ns: cname.clone(),
                    a: format!("l{j}"),
                    b_ns: hname.clone(),
                    b: "wan".into(),
                });
                let _ = writeln!(r.ip_cmds, "link set l{j} master lan\nlink set l{j} up");
                let hr = namespaces.iter_mut().find(|n| &n.name == hname).unwrap();
                let _ = writeln!(
                    hr.ip_cmds,
                    "addr add {wan}/24 dev wan\nlink set wan up\nroute add default via {gw}"
                );
                for idx in &homes[*h].1 {
                    nodes[*idx].routers.push(cname.clone());
                    nodes[*idx].public_ip = Ipv4Addr::UNSPECIFIED;
                }
            }
            r.sysctls = vec![("net.ipv4.ip_forward".into(), "1".into())];
            r.nft = Some(nat_ruleset(false));
            r.post_sysctls = nat_timeouts.clone();
            counts.cgnat_routers += 1;
            namespaces.push(r);
            internet.push(InternetHost {
                ns: cname.clone(),
                ifname: "wan".into(),
            });
            for (_, h) in chunk {
                for idx in &homes[*h].1 {
                    host_of_node[*idx] = Some(internet.len() - 1);
                }
            }
        }
        // The STUN server: one more host on the internet.
        let stun_ns = format!("{p}stun");
        if opts.stun_server {
            namespaces.push(ns(stun_ns.clone(), None));
            internet.push(InternetHost {
                ns: stun_ns.clone(),
                ifname: "eth0".into(),
            });
        }
        // ISPs and the core.
        let hosts_per_isp = opts.hosts_per_isp.clamp(1, HOSTS_PER_ISP_MAX);
        let isps = internet.len().div_ceil(hosts_per_isp).max(2);
        if isps > MAX_ISPS {
            bail!(
                "{} internet hosts need {isps} ISPs; at most {MAX_ISPS}",
                internet.len()
            );
        }
        let core = format!("{p}core");
        let mut core_ns = ns(core.clone(), Some(RouterKind::Core));
        core_ns.sysctls = vec![("net.ipv4.ip_forward".into(), "1".into())];
        let mut isp_ns: Vec<NsSpec> = (0..isps)
            .map(|s| {
                let mut n = ns(format!("{p}i{s}"), Some(RouterKind::Isp));
                n.sysctls = vec![("net.ipv4.ip_forward".into(), "1".into())];
                let c_ip = add(CORE_LINKS, (2 * s) as u32);
                let i_ip = add(c_ip, 1);
                links.push(Link {
                    a_ns: core.clone(),
                    a: format!("i{s}"),
                    b_ns: n.name.clone(),
                    b: "core".into(),
                });
                let _ = writeln!(
                    core_ns.ip_cmds,
                    "addr add {c_ip}/31 dev i{s}\nlink set i{s} up\nroute add {} via {i_ip}",
                    isp_net(s)
                );
                let _ = writeln!(
                    n.ip_cmds,
                    "addr add {i_ip}/31 dev core\nlink set core up\nroute add default via {c_ip}"
                );
                n
            })
            .collect();
        // Spread hosts over ISPs round-robin so both halves of a partition get
        // a share of every kind.
        let mut host_addr: Vec<(usize, Ipv4Addr)> = vec![];
        let mut hosts: Vec<HostLink> = vec![];
        let mut used = vec![0usize; isps];
        for (hidx, h) in internet.iter().enumerate() {
            let s = hidx % isps;
            let j = used[s];
            used[s] += 1;
            let (r_ip, h_ip) = isp_host(s, j);
            links.push(Link {
                a_ns: isp_ns[s].name.clone(),
                a: format!("h{j}"),
                b_ns: h.ns.clone(),
                b: h.ifname.clone(),
            });
            let _ = writeln!(
                isp_ns[s].ip_cmds,
                "addr add {r_ip}/31 dev h{j}\nlink set h{j} up"
            );
            let target = namespaces.iter_mut().find(|n| n.name == h.ns).unwrap();
            let _ = writeln!(
                target.ip_cmds,
                "addr add {h_ip}/31 dev {if_}\nlink set {if_} up\nroute add default via {r_ip}",
                if_ = h.ifname
            );
            host_addr.push((s, h_ip));
            hosts.push(HostLink {
                ns: h.ns.clone(),
                ifname: h.ifname.clone(),
                isp: s,
                isp_if: format!("h{j}"),
                addr: h_ip,
                gw: r_ip,
            });
        }
        let stun = opts.stun_server.then(|| {
            let a = hosts.iter().find(|h| h.ns == stun_ns).unwrap().addr;
            (stun_ns.clone(), a)
        });
        for n in nodes.iter_mut() {
            let (s, ip) = host_addr[host_of_node[n.index].unwrap()];
            n.isp = s;
            n.public_ip = ip;
            if n.kind == Kind::Public {
                n.underlay = ip;
            }
        }
        counts.isp_routers = isps;
        namespaces.push(core_ns);
        namespaces.append(&mut isp_ns);
        counts.namespaces = namespaces.len();
        counts.veth_pairs = links.len();
        Ok(Plan {
            prefix: p,
            opts: opts.clone(),
            nodes,
            namespaces,
            links,
            isps,
            core_ns: core,
            counts,
            hosts,
            slots_used: used,
            stun,
            sites,
        })
    }

    /// Creates everything. Returns seconds taken.
    pub fn build(&self) -> Result<f64> {
        let t = Instant::now();
        let names: Vec<String> = self.namespaces.iter().map(|n| n.name.clone()).collect();
        sys::add_namespaces(&names).context("creating namespaces")?;
        let b: String = self
            .links
            .iter()
            .map(|l| sys::veth_cmd(&l.a, &l.a_ns, &l.b, &l.b_ns))
            .collect();
        sys::ip_batch(None, &b).context("creating veth pairs")?;
        sys::par_for(&self.namespaces, 4, |n| {
            if crate::cleanup::stopping() {
                bail!("stopping");
            }
            sys::ip_batch(Some(&n.name), &n.ip_cmds)
                .with_context(|| format!("configuring {}", n.name))?;
            sys::sysctls_in(&n.name, &n.sysctls)?;
            if let Some(rs) = &n.nft {
                sys::nft_in(&n.name, rs).with_context(|| format!("nftables in {}", n.name))?;
            }
            sys::sysctls_in(&n.name, &n.post_sysctls)?;
            Ok(())
        })?;
        let secs = t.elapsed().as_secs_f64();
        // The kernel's linkwatch turns a new veth's carrier on (and swaps its
        // noop qdisc for a real one) up to a second after `link set up`;
        // packets sent before that are dropped (a lost first ARP costs a
        // 1 s retransmit). Let it settle so no measurement pays for it.
        std::thread::sleep(std::time::Duration::from_millis(1200));
        Ok(secs)
    }

    /// Deletes every namespace (and so every link) of the plan.
    pub fn destroy(&self) -> f64 {
        let t = Instant::now();
        let names: Vec<String> = self.namespaces.iter().map(|n| n.name.clone()).collect();
        sys::kill_in_namespaces(&names);
        let _ = sys::del_namespaces(&names);
        t.elapsed().as_secs_f64()
    }

    /// Cuts the internet in two halves (ISPs below / above isps/2).
    pub fn partition(&self) -> Result<()> {
        let half = self.isps / 2;
        let a: Vec<String> = (0..half).map(isp_net).collect();
        let b: Vec<String> = (half..self.isps).map(isp_net).collect();
        let rs = format!(
            "table ip tnpart {{\n chain fw {{\n  type filter hook forward priority 0; policy accept;\n  ip saddr {{ {a} }} ip daddr {{ {b} }} drop\n  ip saddr {{ {b} }} ip daddr {{ {a} }} drop\n }}\n}}\n",
            a = a.join(", "),
            b = b.join(", ")
        );
        sys::nft_in(&self.core_ns, &rs)
    }

    pub fn heal(&self) -> Result<()> {
        sys::nft_in(&self.core_ns, "delete table ip tnpart\n")
    }

    /// Which half of a partition node `i` is in (0 or 1).
    pub fn half_of(&self, i: usize) -> usize {
        usize::from(self.nodes[i].isp >= self.isps / 2)
    }

    /// Gives the internet host `ns` (a NAT router) a new address on its ISP
    /// link, as when a home router reconnects and gets a new public address:
    /// the ISP router gets the new /31 beside the old one, the host moves its
    /// address and default route over, both drop the old address, and the
    /// host's conntrack table (its NAT mappings) is flushed. `extra` picks a
    /// fresh slot past the ones used at build time (the caller counts).
    /// Returns (old address, new address).
    pub fn renumber(&self, ns: &str, extra: usize) -> Result<(Ipv4Addr, Ipv4Addr)> {
        let h = self
            .hosts
            .iter()
            .find(|h| h.ns == ns)
            .with_context(|| format!("{ns} is not an internet host"))?;
        let slot = self.slots_used[h.isp] + extra;
        if slot >= HOSTS_PER_ISP_MAX {
            bail!("ISP {} has no free address left for renumbering", h.isp);
        }
        let (r_new, h_new) = isp_host(h.isp, slot);
        // The current address may differ from the planned one after an
        // earlier renumbering: read it.
        let cur = sys::run_in(ns, "ip", &["-4", "-o", "addr", "show", "dev", &h.ifname])?;
        let (h_old, r_old) = parse_p2p_addr(&cur).unwrap_or((h.addr, h.gw));
        let isp_ns = format!("{}i{}", self.prefix, h.isp);
        sys::ip_batch(
            Some(&isp_ns),
            &format!(
                "addr add {r_new}/31 dev {}
",
                h.isp_if
            ),
        )?;
        sys::ip_batch(
            Some(ns),
            &format!(
                "addr add {h_new}/31 dev {if_}
route replace default via {r_new}
addr del {h_old}/31 dev {if_}
",
                if_ = h.ifname
            ),
        )?;
        sys::ip_batch(
            Some(&isp_ns),
            &format!(
                "addr del {r_old}/31 dev {}
",
                h.isp_if
            ),
        )?;
        sys::run_in(ns, "conntrack", &["-F"])?;
        Ok((h_old, h_new))
    }

    /// `conntrack -F` in every NAT router: all mappings are forgotten.
    pub fn flush_nat(&self) -> Result<usize> {
        let routers: Vec<&NsSpec> = self
            .namespaces
            .iter()
            .filter(|n| {
                matches!(
                    n.router,
                    Some(RouterKind::Home | RouterKind::Symmetric | RouterKind::Cgnat)
                )
            })
            .collect();
        sys::par_for(&routers, 4, |n| {
            // conntrack -F prints a summary on stderr and exits 0.
            sys::run_in(&n.name, "conntrack", &["-F"]).map(|_| ())
        })?;
        Ok(routers.len())
    }
}

/// (own address, peer address) from `ip -4 -o addr show dev X` of a /31.
fn parse_p2p_addr(out: &str) -> Option<(Ipv4Addr, Ipv4Addr)> {
    for l in out.lines() {
        let mut it = l.split_whitespace();
        while let Some(w) = it.next() {
            if w == "inet" {
                let (a, len) = it.next()?.split_once('/')?;
                if len != "31" {
                    continue;
                }
                let a: Ipv4Addr = a.parse().ok()?;
                let peer = Ipv4Addr::from(u32::from(a) ^ 1);
                return Some((a, peer));
            }
        }
    }
    None
}

/// nftables for a NAT router: masquerade out of "wan" (fully-random port
/// mapping for a symmetric NAT, else endpoint-independent), and drop every
/// unsolicited packet arriving on "wan" (forwarded or to the router itself).
/// No hairpinning: a LAN packet to the router's WAN address is delivered to
/// the router itself, which does not answer.
pub fn nat_ruleset(symmetric: bool) -> String {
    let masq = if symmetric {
        "masquerade fully-random"
    } else {
        "masquerade"
    };
    format!(
        "table ip tnnat {{
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan\" {masq}
  }}
  chain fw {{
    type filter hook forward priority filter; policy accept;
    iifname \"wan\" ct state established,related accept
    iifname \"wan\" drop
  }}
  chain inp {{
    type filter hook input priority filter; policy accept;
    iifname \"wan\" ct state established,related accept
    iifname \"wan\" drop
  }}
}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kind: &str, slots: usize) -> TopoOptions {
        TopoOptions {
            kind: kind.into(),
            mix: Mix::parse("public=20,nat=50,cgnat=20,symmetric=10").unwrap(),
            slots,
            nodes_per_home: 3,
            homes_per_cgnat: 4,
            hosts_per_isp: 128,
            udp_timeout_secs: None,
            udp_stream_timeout_secs: None,
            seed: 1,
            home_size_exact: false,
            home_sizes: HomeSizes::default(),
            stun_server: false,
            sites: vec![],
        }
    }

    #[test]
    fn home_sizes_and_stun_host() {
        let mut o = opts("mixed", 14);
        o.mix = Mix::parse("public=2,nat=4,cgnat=5,symmetric=2").unwrap();
        o.homes_per_cgnat = 2;
        o.home_sizes = HomeSizes {
            nat: vec![2],
            cgnat: vec![2, 1, 1, 1],
            symmetric: vec![1],
        };
        o.stun_server = true;
        let p = Plan::new("tn0000-", &o).unwrap();
        let c = &p.counts;
        assert_eq!((c.public, c.nat, c.cgnat, c.symmetric), (3, 4, 5, 2));
        let homes = |k: Kind| {
            let mut m: std::collections::BTreeMap<&str, usize> = Default::default();
            for n in p.nodes.iter().filter(|n| n.kind == k) {
                *m.entry(n.home().unwrap()).or_default() += 1;
            }
            m.into_values().collect::<Vec<_>>()
        };
        assert_eq!(homes(Kind::Nat), [2, 2]);
        assert_eq!(homes(Kind::Symmetric), [1, 1]);
        let mut cg: Vec<usize> = homes(Kind::Cgnat);
        cg.sort();
        assert_eq!(cg, [1, 1, 1, 2]);
        assert_eq!(c.cgnat_routers, 2);
        let (ns, ip) = p.stun.clone().unwrap();
        assert_eq!(ns, "tn0000-stun");
        assert!(p.hosts.iter().any(|h| h.ns == ns && h.addr == ip));
        assert_eq!(
            parse_p2p_addr("5: wan    inet 198.18.0.7/31 scope global wan\n"),
            Some(("198.18.0.7".parse().unwrap(), "198.18.0.6".parse().unwrap()))
        );
    }

    #[test]
    fn mixed_plan_has_every_kind_and_public_seed() {
        let p = Plan::new("tn0000-", &opts("mixed", 100)).unwrap();
        assert_eq!(p.nodes.len(), 100);
        assert_eq!(p.nodes[0].kind, Kind::Public);
        let c = &p.counts;
        assert_eq!(c.public + c.nat + c.cgnat + c.symmetric, 100);
        assert!(c.nat >= 45 && c.cgnat >= 18 && c.symmetric >= 9, "{c:?}");
        for n in &p.nodes {
            assert_ne!(
                n.underlay,
                Ipv4Addr::UNSPECIFIED,
                "node {} has no address",
                n.index
            );
            assert!(n.ns.len() <= 15 + 10);
            match n.kind {
                Kind::Public => assert!(n.routers.is_empty()),
                Kind::Cgnat => assert_eq!(n.routers.len(), 2),
                _ => assert_eq!(n.routers.len(), 1),
            }
        }
        // unique public host addresses
        let mut ips: Vec<_> = p
            .nodes
            .iter()
            .filter(|n| n.kind == Kind::Public)
            .map(|n| n.underlay)
            .collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), c.public);
    }

    #[test]
    fn large_plans_scale_past_one_bridge() {
        let p = Plan::new("tn0000-", &opts("flat", 2000)).unwrap();
        assert!(p.isps >= 16);
        assert!(p.links.len() >= 2000);
    }

    #[test]
    fn mix_parses() {
        let m = Mix::parse("public=20, nat=50,cgnat=20,symmetric=10").unwrap();
        assert_eq!(m.nat, 50);
        assert!(Mix::parse("foo=1").is_err());
    }
}
