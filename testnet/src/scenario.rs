//! Scenario files (TOML): a topology, how nodes start, and a list of steps.
//! See README.md ("Scenario files") for the format; every field but
//! `name` and `topology.nodes` has a default.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::topology::{HomeSizes, Kind, Mix, SiteTopo, TopoOptions};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub topology: TopoSection,
    #[serde(default)]
    pub nodes: NodesSection,
    #[serde(default)]
    pub measure: MeasureSection,
    #[serde(default, rename = "step")]
    pub steps: Vec<Step>,
    /// Sites (site-to-site routes through gateway members).
    #[serde(default, rename = "site")]
    pub sites: Vec<SiteSection>,
}

/// A site: the home LAN of a gateway node, hosts on it that are not
/// members, and members that advertise it without being allowed to.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSection {
    /// The gateway: a node behind a home router. It joins with a token from
    /// `meshpeer invite --allow-route <its LAN>` and advertises its LAN.
    pub gateway: usize,
    /// LAN hosts that are not members (default 1).
    #[serde(default = "d_1usize")]
    pub hosts: usize,
    /// Nodes that advertise this site's LAN with a plain token: every
    /// member must refuse it.
    #[serde(default)]
    pub intruders: Vec<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopoSection {
    /// flat | nat | cgnat | symmetric | mixed
    #[serde(default = "d_flat")]
    pub kind: String,
    /// Nodes started at the beginning (joiners come on top).
    pub nodes: usize,
    /// For `mixed`: weights, e.g. "public=20,nat=50,cgnat=20,symmetric=10".
    #[serde(default)]
    pub mix: Option<String>,
    #[serde(default = "d_3")]
    pub nodes_per_home: usize,
    #[serde(default = "d_4")]
    pub homes_per_cgnat: usize,
    #[serde(default = "d_128")]
    pub hosts_per_isp: usize,
    #[serde(default)]
    pub udp_timeout_secs: Option<u32>,
    #[serde(default)]
    pub udp_stream_timeout_secs: Option<u32>,
    #[serde(default = "d_1")]
    pub seed: u64,
    /// Every home gets exactly `nodes_per_home` nodes.
    #[serde(default)]
    pub home_size_exact: bool,
    /// Explicit home sizes per kind, e.g. `{ nat = [2], cgnat = [2, 1] }`.
    #[serde(default)]
    pub home_sizes: HomeSizes,
    /// "coturn": run Debian's coturn (`turnserver`, STUN only) on its own
    /// internet host and give every meshpeer node `--stun-server ADDR:3478`.
    #[serde(default)]
    pub stun_server: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodesSection {
    /// "all" (every node at once) or "staggered" (one every stagger_ms).
    #[serde(default = "d_all")]
    pub start: String,
    #[serde(default = "d_200")]
    pub stagger_ms: u64,
    #[serde(default = "d_network")]
    pub network: String,
    #[serde(default)]
    pub down_grace_secs: Option<u64>,
    /// More flags for `meshpeer up/join`.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// More flags for `meshpeer join` only (e.g. ["--join-timeout-secs", "120"]).
    #[serde(default)]
    pub join_args: Vec<String>,
    /// RUST_LOG for the daemons.
    #[serde(default = "d_log")]
    pub log: String,
}

impl Default for NodesSection {
    fn default() -> Self {
        toml::from_str("").unwrap()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeasureSection {
    /// Cap on echo requests per second, all pairs together.
    #[serde(default = "d_rate")]
    pub ping_rate: f64,
    /// Measure the pinger on the bare underlay first.
    #[serde(default = "d_true")]
    pub floor: bool,
    /// Least time between two status sweeps over all nodes.
    #[serde(default = "d_1000")]
    pub poll_interval_ms: u64,
    /// Length of the floor's idle window (underlay bytes with no engine
    /// running); default: as long as the longest `measure_steady` window.
    #[serde(default)]
    pub floor_idle_secs: Option<f64>,
}

impl Default for MeasureSection {
    fn default() -> Self {
        toml::from_str("").unwrap()
    }
}

/// Which nodes a step acts on. Empty = one random eligible node.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Select {
    /// Explicit node indices.
    #[serde(default)]
    pub nodes: Vec<usize>,
    /// This many random eligible nodes (never the seed unless `seed`).
    #[serde(default)]
    pub count: Option<usize>,
    /// The seed (node 0).
    #[serde(default)]
    pub seed: bool,
    /// Only nodes of this kind.
    #[serde(default)]
    pub kind: Option<Kind>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Step {
    /// Wait until every ordered pair of live nodes got a ping reply since the
    /// last disruptive step (and, with `membership`, every node lists every
    /// other). `required`: the run fails when the deadline passes.
    WaitConverged {
        deadline_secs: f64,
        #[serde(default)]
        required: bool,
        #[serde(default = "d_true")]
        membership: bool,
        /// Count from this step instead of the last disruptive one: "is the
        /// mesh (still) whole now?"
        #[serde(default)]
        fresh: bool,
    },
    Sleep {
        secs: f64,
    },
    /// SIGKILL.
    Kill {
        #[serde(flatten)]
        select: Select,
    },
    /// Graceful leave (`meshpeer leave`).
    Leave {
        #[serde(flatten)]
        select: Select,
    },
    /// Restart killed/left nodes with their state (`meshpeer up`).
    Restart {
        #[serde(flatten)]
        select: Select,
    },
    /// Start new nodes (they join through the seed).
    Join {
        count: usize,
        #[serde(default)]
        stagger_ms: u64,
    },
    /// Cut the internet in two halves.
    Partition,
    Heal,
    /// Forget every NAT mapping (conntrack -F in every NAT router).
    FlushNat,
    /// Wait until every kill/leave so far is seen (down or gone) by every
    /// live node and its WireGuard peer is removed everywhere.
    WaitDetected {
        deadline_secs: f64,
        #[serde(default)]
        required: bool,
        /// Also wait for WireGuard peer removal (after --down-grace-secs for a kill).
        #[serde(default = "d_true")]
        peer_removal: bool,
    },
    /// Measure underlay bytes (each node's eth0), gossip bytes, CPU and RSS
    /// over a quiet window. The pinger pauses (so its echo traffic does not
    /// count as the daemons' own load) unless `with_pings`.
    #[serde(alias = "measure_idle")]
    MeasureSteady {
        secs: f64,
        #[serde(default)]
        with_pings: bool,
    },
    /// For `secs`: every `every_secs` kill one random node and join a new one.
    Churn {
        secs: f64,
        every_secs: f64,
    },
    /// Give the router in front of the selected nodes (the outermost one:
    /// the home router, or the CGNAT for a node behind CGNAT) a new public
    /// address, drop the old one and flush its conntrack table. The next
    /// `wait_converged` reports how long the affected pairs took to reply.
    #[serde(alias = "renumber")]
    ChangePublicAddress {
        #[serde(flatten)]
        select: Select,
    },
    /// Wait until every ordered pair's path in `meshpeer status` is the
    /// expected one for its pair type (direct or relayed) and has stayed so
    /// for `stable_secs`, or `deadline_secs` pass; every pair whose path
    /// differs is flagged. `required`: the run fails on any mismatch.
    ExpectPaths {
        #[serde(default = "d_30f")]
        deadline_secs: f64,
        #[serde(default = "d_3f")]
        stable_secs: f64,
        #[serde(default = "d_true")]
        required: bool,
    },
    /// Check that relaying is sealed: no WireGuard peer on any node holds an
    /// overlay address other than its own member's (read from each node's
    /// device over UAPI and its status), and, when some pair is relayed,
    /// that relays forwarded sealed datagrams (`relay_forwarded`).
    CheckSealed {
        #[serde(default = "d_true")]
        required: bool,
    },
    /// Wait until every node's `status` shows the NAT kind and public
    /// address the topology gives it (`self`/`nat`/`mapped_endpoints`).
    CheckNat {
        #[serde(default = "d_30f")]
        deadline_secs: f64,
        #[serde(default = "d_true")]
        required: bool,
    },
    /// Run Debian's RFC 3489 `stun` client in the namespace of a node behind
    /// NAT (selection; default: one random `nat` node) against node `server`'s
    /// WireGuard port, and check the mapped address it prints is the NAT's
    /// public address.
    StunClient {
        #[serde(flatten)]
        select: Select,
        #[serde(default)]
        server: usize,
        #[serde(default = "d_true")]
        required: bool,
    },
    /// Site-to-site: wait until every member judges the sites' routes as
    /// expected (a gateway's LAN installed everywhere but on its own LAN,
    /// every intruder's refused) and the sites' LAN hosts ping each other
    /// and are pinged by every member outside the sites.
    CheckSites {
        #[serde(default = "d_30f")]
        deadline_secs: f64,
        #[serde(default = "d_true")]
        required: bool,
    },
    /// Faults over time: for `secs`, every `every_secs` one fault drawn
    /// with a seeded RNG (kill -9, leave, restart, join, seed loss), plus
    /// partitions at fixed times; see `crate::runner::soak`.
    Soak(Box<SoakSpec>),
    /// The soak's end checks: no lost member, no duplicate address, memory
    /// and descriptors within bounds (see `crate::runner::soak`).
    SoakCheck(SoakCheckSpec),
}

/// Weights of the faults a soak draws from (0 = never).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SoakWeights {
    #[serde(default = "d_3f")]
    pub kill: f64,
    #[serde(default = "d_2f")]
    pub leave: f64,
    #[serde(default = "d_3f")]
    pub restart: f64,
    #[serde(default = "d_2f")]
    pub join: f64,
    #[serde(default = "d_1f")]
    pub seed_loss: f64,
}

impl Default for SoakWeights {
    fn default() -> Self {
        toml::from_str("").unwrap()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SoakSpec {
    /// How long faults go on.
    pub secs: f64,
    /// One fault every this many seconds.
    pub every_secs: f64,
    /// The RNG seed of the fault sequence (default: the topology's seed).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Never fewer live nodes than this (kills and leaves wait).
    pub min_live: usize,
    /// Never more live nodes than this (joins and restarts wait); default
    /// the initial nodes.
    #[serde(default)]
    pub max_live: Option<usize>,
    /// Brand-new nodes at most (the topology gets this many extra slots).
    pub max_joins: usize,
    #[serde(default)]
    pub weights: SoakWeights,
    /// When partitions start, as fractions of `secs`.
    #[serde(default = "d_thirds")]
    pub partitions: Vec<f64>,
    /// How long each partition lasts before the heal.
    #[serde(default = "d_60f")]
    pub partition_secs: f64,
    /// How long the seed stays down after a seed loss before it restarts.
    #[serde(default = "d_60f")]
    pub seed_down_secs: f64,
    /// Least time between two seed losses (from the seed's restart).
    #[serde(default = "d_120f")]
    pub seed_loss_gap_secs: f64,
    /// A seed loss is forced at this fraction of `secs` if none happened.
    #[serde(default = "d_half")]
    pub seed_loss_by: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SoakCheckSpec {
    /// How long the membership checks may take to hold (status views are
    /// eventually consistent); memory and descriptors are read once.
    #[serde(default = "d_60f")]
    pub deadline_secs: f64,
    #[serde(default = "d_true")]
    pub required: bool,
    /// Final RSS of a node that ran through the whole soak: at most this
    /// many times its RSS at the soak's start ...
    #[serde(default = "d_2f")]
    pub rss_factor: f64,
    /// ... and every live node's final RSS (and every sampled RSS) at most
    /// this many MiB.
    #[serde(default = "d_64f")]
    pub rss_max_mib: f64,
    /// Open descriptors of a node that ran through the whole soak: at most
    /// this many more at the end than at the soak's start, plus two per
    /// relay allocation it holds at the end.
    #[serde(default = "d_16")]
    pub fd_growth: usize,
    /// meshpeer's forget times (membership::FORGET_DOWN_AFTER and
    /// FORGET_LEFT_AFTER): a node stopped longer ago than this plus
    /// `forget_slack_secs` must not be listed at all.
    #[serde(default = "d_600f")]
    pub forget_down_secs: f64,
    #[serde(default = "d_60f")]
    pub forget_left_secs: f64,
    #[serde(default = "d_60f")]
    pub forget_slack_secs: f64,
}

impl Step {
    pub fn name(&self) -> &'static str {
        match self {
            Step::WaitConverged { .. } => "wait_converged",
            Step::Sleep { .. } => "sleep",
            Step::Kill { .. } => "kill",
            Step::Leave { .. } => "leave",
            Step::Restart { .. } => "restart",
            Step::Join { .. } => "join",
            Step::Partition => "partition",
            Step::Heal => "heal",
            Step::FlushNat => "flush_nat",
            Step::WaitDetected { .. } => "wait_detected",
            Step::MeasureSteady { .. } => "measure_steady",
            Step::Churn { .. } => "churn",
            Step::ChangePublicAddress { .. } => "change_public_address",
            Step::ExpectPaths { .. } => "expect_paths",
            Step::CheckNat { .. } => "check_nat",
            Step::CheckSealed { .. } => "check_sealed",
            Step::StunClient { .. } => "stun_client",
            Step::CheckSites { .. } => "check_sites",
            Step::Soak(_) => "soak",
            Step::SoakCheck(_) => "soak_check",
        }
    }
    /// Does this step change the mesh (and so reset the convergence mark)?
    pub fn disruptive(&self) -> bool {
        !matches!(
            self,
            Step::WaitConverged { .. }
                | Step::Sleep { .. }
                | Step::WaitDetected { .. }
                | Step::MeasureSteady { .. }
                | Step::ExpectPaths { .. }
                | Step::CheckNat { .. }
                | Step::CheckSealed { .. }
                | Step::StunClient { .. }
                | Step::CheckSites { .. }
                | Step::SoakCheck(_)
        )
    }
}

fn d_flat() -> String {
    "flat".into()
}
fn d_all() -> String {
    "all".into()
}
fn d_network() -> String {
    "10.77.0.0/16".into()
}
fn d_log() -> String {
    "info".into()
}
fn d_1() -> u64 {
    1
}
fn d_1usize() -> usize {
    1
}
fn d_3() -> usize {
    3
}
fn d_4() -> usize {
    4
}
fn d_128() -> usize {
    128
}
fn d_200() -> u64 {
    200
}
fn d_1000() -> u64 {
    1000
}
fn d_rate() -> f64 {
    crate::pinger::DEFAULT_RATE
}
fn d_30f() -> f64 {
    30.0
}
fn d_3f() -> f64 {
    3.0
}
fn d_1f() -> f64 {
    1.0
}
fn d_2f() -> f64 {
    2.0
}
fn d_60f() -> f64 {
    60.0
}
fn d_64f() -> f64 {
    64.0
}
fn d_120f() -> f64 {
    120.0
}
fn d_600f() -> f64 {
    600.0
}
fn d_half() -> f64 {
    0.5
}
fn d_16() -> usize {
    16
}
fn d_thirds() -> Vec<f64> {
    vec![1.0 / 3.0, 2.0 / 3.0]
}
fn d_true() -> bool {
    true
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let s: Scenario =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<()> {
        if self.topology.nodes < 2 {
            bail!("topology.nodes must be at least 2");
        }
        if !matches!(self.nodes.start.as_str(), "all" | "staggered") {
            bail!("nodes.start must be \"all\" or \"staggered\"");
        }
        self.topo_options()?.mix_for_kind()?;
        for (i, s) in self.sites.iter().enumerate() {
            if s.gateway == 0 || s.gateway >= self.topology.nodes {
                bail!(
                    "site {i}: gateway {} must be one of the initial nodes, not the seed",
                    s.gateway
                );
            }
            if let Some(x) = s
                .intruders
                .iter()
                .find(|x| **x >= self.topology.nodes || **x == s.gateway)
            {
                bail!("site {i}: intruder {x} must be one of the initial nodes, not the gateway");
            }
        }
        if !self.sites.is_empty()
            && self
                .steps
                .iter()
                .any(|s| matches!(s, Step::Join { .. } | Step::Churn { .. }))
        {
            bail!("sites cannot be combined with join or churn steps (gateways and intruders are initial nodes)");
        }
        for st in &self.steps {
            if let Step::Soak(k) = st {
                if k.every_secs <= 0.0 || k.secs <= 0.0 {
                    bail!("soak: secs and every_secs must be positive");
                }
                if k.min_live < 2 || k.min_live > self.topology.nodes {
                    bail!(
                        "soak: min_live must be between 2 and topology.nodes ({})",
                        self.topology.nodes
                    );
                }
                if k.max_live.is_some_and(|m| m < k.min_live) {
                    bail!("soak: max_live must be at least min_live");
                }
                if k.partitions.iter().any(|f| !(0.0..1.0).contains(f)) {
                    bail!("soak: partitions are fractions of secs in [0, 1)");
                }
                let w = &k.weights;
                if [w.kill, w.leave, w.restart, w.join, w.seed_loss]
                    .iter()
                    .any(|x| *x < 0.0 || !x.is_finite())
                {
                    bail!("soak: weights must be finite and not negative");
                }
            }
        }
        if let Some(s) = &self.topology.stun_server {
            if s != "coturn" {
                bail!("topology.stun_server must be \"coturn\" (got {s:?})");
            }
        }
        Ok(())
    }

    /// The longest `measure_steady` window (None: the scenario has none).
    pub fn idle_secs(&self) -> Option<f64> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::MeasureSteady { secs, .. } => Some(*secs),
                _ => None,
            })
            .reduce(f64::max)
    }

    /// Sets every `measure_steady` window to `secs` (`--idle-secs`).
    pub fn set_idle_secs(&mut self, v: f64) {
        for s in self.steps.iter_mut() {
            if let Step::MeasureSteady { secs, .. } = s {
                *secs = v;
            }
        }
    }

    /// Node slots the run needs: initial nodes plus every joiner.
    pub fn slots(&self) -> usize {
        let mut n = self.topology.nodes;
        for s in &self.steps {
            match s {
                Step::Join { count, .. } => n += count,
                Step::Churn { secs, every_secs } => {
                    n += (secs / every_secs.max(0.1)).ceil() as usize + 1
                }
                Step::Soak(s) => n += s.max_joins,
                _ => {}
            }
        }
        n
    }

    pub fn topo_options(&self) -> Result<TopoOptions> {
        let t = &self.topology;
        let mix = match &t.mix {
            Some(m) => Mix::parse(m)?,
            None => Mix::parse("public=20,nat=50,cgnat=20,symmetric=10")?,
        };
        Ok(TopoOptions {
            kind: t.kind.clone(),
            mix,
            slots: self.slots(),
            nodes_per_home: t.nodes_per_home,
            homes_per_cgnat: t.homes_per_cgnat,
            hosts_per_isp: t.hosts_per_isp,
            udp_timeout_secs: t.udp_timeout_secs,
            udp_stream_timeout_secs: t.udp_stream_timeout_secs,
            seed: t.seed,
            home_size_exact: t.home_size_exact,
            home_sizes: t.home_sizes.clone(),
            stun_server: t.stun_server.is_some(),
            sites: self
                .sites
                .iter()
                .map(|s| SiteTopo {
                    gateway: s.gateway,
                    hosts: s.hosts,
                    overlay: self.nodes.network.clone(),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().map(|x| x == "toml").unwrap_or(false) {
                Scenario::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                n += 1;
            }
        }
        assert!(
            n >= 6,
            "expected the shipped scenarios in {}",
            dir.display()
        );
    }

    #[test]
    fn steps_parse() {
        let s: Scenario = toml::from_str(
            r#"
name = "x"
[topology]
nodes = 5
[[step]]
action = "wait_converged"
deadline_secs = 10
[[step]]
action = "kill"
count = 2
[[step]]
action = "join"
count = 3
[[step]]
action = "partition"
"#,
        )
        .unwrap();
        assert_eq!(s.steps.len(), 4);
        assert_eq!(s.idle_secs(), None);
        assert_eq!(s.slots(), 8);
        assert!(matches!(s.steps[1], Step::Kill { ref select } if select.count == Some(2)));
    }

    #[test]
    fn idle_window_alias_and_override() {
        let mut s: Scenario = toml::from_str(
            r#"
name = "x"
[topology]
nodes = 5
[[step]]
action = "measure_idle"
secs = 1800
[[step]]
action = "measure_steady"
secs = 30
"#,
        )
        .unwrap();
        assert_eq!(s.idle_secs(), Some(1800.0));
        s.set_idle_secs(60.0);
        assert_eq!(s.idle_secs(), Some(60.0));
        assert!(s.steps.iter().all(|x| x.name() == "measure_steady"));
    }
}
