//! Liveness (sans-IO): who is down, decided so that no member can make
//! another look dead, or a dead one look alive (proto/PROTOCOL.md §5).
//!
//! * Members sit on a **ring** (ordered by a hash of the network and node
//!   keys). Each member **monitors** the next [`MONITORS`] reachable, live
//!   members after itself and probes each every [`PROBE_EVERY`]; every
//!   [`SPOT_EVERY`] it also probes one other member at random.
//! * A **probe** is a UDP datagram on the overlay: it travels inside the
//!   pair's WireGuard session, so an answer from the target's overlay
//!   address is the target speaking. Probes and answers carry the sender's
//!   gossip [`Summary`]: a different one makes the prober start a gossip
//!   round (divergence at rest is found here, not by rounds).
//! * Two unanswered probes make a node **accuse** the target: it publishes
//!   the accusation (gossip key `suspects`, signed). An accusation is only a
//!   request to look: every member that sees one **checks** the target
//!   itself (two probes).
//! * A suspected member **refutes** by publishing a signed `alive` naming
//!   the accusations it saw.
//! * A member's verdict is **down** iff its own probes went unanswered
//!   **and** no refutation of the accusation arrived within
//!   [`REFUTE_WAIT`]. Probes that fail while a refutation arrives mean our
//!   path is broken, not the member ([`Event::PathBroken`]).
//! * Monitors skip members they cannot probe (no working path), so a
//!   member whose paths went **silent** is checked by each node that once
//!   reached it, after [`SILENT_CHECK`] without a sign of life.
//! * A down member is probed every [`DOWN_RECHECK`]; an answer, or a newer
//!   signed value of it, brings it back.
//! * **Heard from itself**: a gossip message on the member's own QUIC
//!   connection (authenticated by its key, so nobody else can send it) is
//!   as good as an answer for liveness ([`Liveness::handle_heard`]). A
//!   monitor about to accuse, and a checker whose probes failed, ask the
//!   member for a gossip round ([`Liveness::take_mismatches`]): a member too
//!   busy to answer probes through its tunnel in time, or whose tunnel with
//!   us is what fails, is not called down for it.
//!
//! Driving contract (quinn-proto style): feed inputs with `handle_*` (the
//! member list every step, probe answers as they arrive, gossip values as
//! they change), call [`Liveness::handle_timeout`] when
//! [`Liveness::poll_timeout`] says, then drain [`Liveness::poll_transmit`]
//! (probes to send), [`Liveness::poll_event`], and the values to publish
//! ([`Liveness::take_accusations`], [`Liveness::take_refutations`]). Time is
//! passed in (`now` for timers, `unix_ms` for what is signed); nothing here
//! reads a clock or does I/O.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::proto::{self, domain, PublicKeyBytes, Signed, WireError};

/// Members each member monitors.
pub const MONITORS: usize = 2;
/// How often a monitor probes each of its targets.
pub const PROBE_EVERY: Duration = Duration::from_secs(4);
/// How long a probe waits for its answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive unanswered monitor probes (each retried at once on its
/// timeout) before a monitor accuses. Three, not two: with 1 % datagram
/// loss two misses in a row happen often enough that false accusations
/// (each a mesh-wide burst of busy gossip, then a refutation) were 85 % of
/// the bytes at rest in a simulated mesh of 100; three cost one probe
/// timeout more on detection (sim/RESULTS.md).
pub const MISSES_TO_ACCUSE: u8 = 3;
/// The gap between the two probes of a check.
pub const CHECK_GAP: Duration = Duration::from_millis(500);
/// How long after a check starts a refutation may still arrive.
pub const REFUTE_WAIT: Duration = Duration::from_secs(2);
/// A member we have held this long without ever reaching it (no path, no
/// answer) is checked by us once, as if our path to it had gone silent: a
/// dead member is found down even when no accusation of it stands any
/// more (we joined or restarted long after it died), a live one refutes.
///
/// The check is spread over a further [`NEVER_REACHED_SPREAD`] (each node
/// and member its own moment: the first accusation makes the others check
/// on it instead of accusing too), and it waits until the member's newest
/// signed value (record, `alive`) is this old as well: a member that
/// signed something lately was alive then, and if it died since, its
/// monitors accuse it. In a mesh still coming up (pairs relayed or punching
/// after two minutes on a loaded machine) the checks all fell due together
/// and each cost an accusation and a refutation gossiped to everyone.
pub const NEVER_REACHED_CHECK: Duration = Duration::from_secs(120);
pub const NEVER_REACHED_SPREAD: Duration = Duration::from_secs(60);
/// A check asked by someone else's accusation starts no sooner than this
/// after we learned of the member (or of its return after a leave): a
/// member that has just (re)started needs a moment to learn of standing
/// accusations and refute them (found by `soak_short`: a member back from
/// a leave was called down 3 s after its return on an accusation made
/// while it was away).
pub const NEW_MEMBER_GRACE: Duration = Duration::from_secs(10);
/// A member we hold down that nobody accuses any more (its accuser
/// restarted, withdrew or left) is accused by us, unless someone else did
/// first, after [`HANDOFF_STEP`] times our rank (the live members between
/// it and us on the ring, at most [`HANDOFF_MAX_RANK`]) plus a random delay
/// below this: an accusation of a down member stands as long as someone
/// holds it down, so a member that learns of it later (it restarted, or
/// joined) checks it instead of waiting for a path (found by `soak_short`:
/// the accuser itself restarted, and only it did not know the member was
/// dead).
pub const HANDOFF_JITTER: Duration = Duration::from_secs(1);
pub const HANDOFF_STEP: Duration = Duration::from_secs(1);
pub const HANDOFF_MAX_RANK: usize = 30;
/// After our path to a member was found broken (it refuted our accusation),
/// our own failed probes do not accuse it again for this long, doubling up
/// to [`BROKEN_BACKOFF_MAX`] while it stays broken; an answer resets it. A
/// path that stays broken (the path logic keeps trying) otherwise made an
/// accusation and a refutation, each gossiped to every member, every few
/// seconds for as long as it lasted (soak_short). Others' accusations are
/// still checked, so a death meanwhile is still seen.
pub const BROKEN_BACKOFF_MIN: Duration = Duration::from_secs(30);
pub const BROKEN_BACKOFF_MAX: Duration = Duration::from_secs(600);
/// A member we reached once whose path stopped working (no WireGuard
/// session we can probe it through) and that showed no life since (no
/// answer, no gossip message of its own, no newer signed value) is checked
/// by us after this long plus a random share of [`SILENT_SPREAD`]: nobody
/// monitors a member whose every path went silent (monitors skip members
/// they cannot probe), so a death after that, or one that broke the paths,
/// was found by nobody (soak_short in CI: a member killed while
/// partitioned off was shown `connected` 82 s later). A live member
/// refutes; the broken-path backoff ([`BROKEN_BACKOFF_MIN`]) then spaces
/// the next checks. Our path breaks after 12-40 s of silence
/// (`nat::paths`), and this waits longer than a relay takes to come up, so
/// a path being re-established is not accused.
pub const SILENT_CHECK: Duration = Duration::from_secs(10);
pub const SILENT_SPREAD: Duration = Duration::from_secs(5);
/// As [`SILENT_CHECK`], for a member we have no path chosen to at all (the
/// path logic is trying one again): checks made sooner, while paths were
/// re-established in a loaded come-up, were most of the accusations there
/// and called live members down (simulation, 100 members at a CPU share of
/// 0.005: 4 accusations and 13 false downs became 60 and 91).
pub const SILENT_NO_PATH: Duration = Duration::from_secs(30);
/// How often a down member is probed again.
pub const DOWN_RECHECK: Duration = Duration::from_secs(10);
/// How often a node probes one member it does not monitor, at random (so a
/// member whose monitors fail or lie is still watched).
pub const SPOT_EVERY: Duration = Duration::from_secs(30);
/// An accusation is kept (and acted on) this long.
pub const ACCUSATION_TTL: Duration = Duration::from_secs(60);
/// Most accusations (and refutations) in one published value.
pub const MAX_LISTED: usize = 32;
/// Highest local-health score: timeouts stretch to at most
/// `1 + MAX_HEALTH` times their base.
pub const MAX_HEALTH: u8 = 8;
/// Our timers running later than this is a sign of our own overload.
pub const LAG_TOLERANCE: Duration = Duration::from_millis(300);
/// Probes that timed out are remembered this long: an answer that comes
/// late still proves the member alive (and says someone is slow).
pub const LATE_ANSWER_WINDOW: Duration = Duration::from_secs(15);
/// Default UDP port of probes, on the overlay address only.
pub const DEFAULT_PROBE_PORT: u16 = 51819;

/// A node's gossip summary, as probes carry it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u32,
    pub hash: u64,
}

impl From<chitchat::Summary> for Summary {
    fn from(s: chitchat::Summary) -> Self {
        Summary {
            count: s.count,
            hash: s.hash,
        }
    }
}

/// A probe datagram (`version byte || postcard`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Probe {
    Ping {
        nonce: u64,
        summary: Summary,
        /// Reserved: ask for a signed [`ProbeProof`] for this requester.
        proof_for: Option<PublicKeyBytes>,
    },
    Ack {
        nonce: u64,
        summary: Summary,
        proof: Option<Signed>,
    },
}

/// Reserved: a member's signed answer to a probe made on someone's behalf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeProof {
    pub network_key: PublicKeyBytes,
    pub node_key: PublicKeyBytes,
    pub requester: PublicKeyBytes,
    pub nonce: u64,
}

/// Largest probe datagram accepted.
pub const MAX_PROBE_BYTES: usize = 512;

impl Probe {
    pub fn encode(&self) -> Vec<u8> {
        proto::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Probe, WireError> {
        if bytes.len() > MAX_PROBE_BYTES {
            return Err(WireError::Malformed {
                what: "probe",
                detail: format!("{} bytes", bytes.len()),
            });
        }
        proto::decode("probe", bytes)
    }
}

/// One accusation as the accused names it when refuting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Accusation {
    pub accuser: PublicKeyBytes,
    pub since_ms: u64,
}

/// Gossip key `alive`: "I am alive, and I saw these accusations".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alive {
    pub network_key: PublicKeyBytes,
    pub node_key: PublicKeyBytes,
    pub issued_at_ms: u64,
    pub refutes: Vec<Accusation>,
}

/// One member a node accuses, since when (the accuser's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Suspect {
    pub node_key: PublicKeyBytes,
    pub since_ms: u64,
}

/// Gossip key `suspects`: whom a node accuses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspicions {
    pub network_key: PublicKeyBytes,
    pub accuser: PublicKeyBytes,
    pub issued_at_ms: u64,
    pub targets: Vec<Suspect>,
}

pub const MAX_ALIVE_BYTES: usize = 2048;
pub const MAX_SUSPICIONS_BYTES: usize = 2048;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LivenessValueError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("value is for another network")]
    WrongNetwork,
    #[error("value published under node {gossip_id} is signed by {signer}")]
    WrongNode { gossip_id: String, signer: String },
    #[error("more than {MAX_LISTED} entries")]
    TooMany,
}

impl Alive {
    pub fn sign(&self, key: &ed25519_dalek::SigningKey) -> String {
        proto::signed_text(key, domain::ALIVE, self)
    }
}

impl Suspicions {
    pub fn sign(&self, key: &ed25519_dalek::SigningKey) -> String {
        proto::signed_text(key, domain::SUSPICIONS, self)
    }
}

fn owner_check(
    network: &PublicKeyBytes,
    expected_network: &PublicKeyBytes,
    signer: &PublicKeyBytes,
    gossip_id: &PublicKeyBytes,
) -> Result<(), LivenessValueError> {
    if network != expected_network {
        return Err(LivenessValueError::WrongNetwork);
    }
    if signer != gossip_id {
        return Err(LivenessValueError::WrongNode {
            gossip_id: proto::short_key(gossip_id),
            signer: proto::short_key(signer),
        });
    }
    Ok(())
}

/// Decodes and checks an `alive` value published under `gossip_id`.
pub fn verify_alive(
    text: &str,
    network_key: &PublicKeyBytes,
    gossip_id: &PublicKeyBytes,
) -> Result<Alive, LivenessValueError> {
    let (signed, a): (Signed, Alive) = proto::open_signed_text("alive", text, MAX_ALIVE_BYTES)?;
    owner_check(&a.network_key, network_key, &a.node_key, gossip_id)?;
    if a.refutes.len() > MAX_LISTED {
        return Err(LivenessValueError::TooMany);
    }
    proto::verify(
        &a.node_key,
        domain::ALIVE,
        &signed.body,
        &signed.signature,
        "alive",
    )?;
    Ok(a)
}

/// Decodes and checks a `suspects` value published under `gossip_id`.
pub fn verify_suspicions(
    text: &str,
    network_key: &PublicKeyBytes,
    gossip_id: &PublicKeyBytes,
) -> Result<Suspicions, LivenessValueError> {
    let (signed, s): (Signed, Suspicions) =
        proto::open_signed_text("suspicions", text, MAX_SUSPICIONS_BYTES)?;
    owner_check(&s.network_key, network_key, &s.accuser, gossip_id)?;
    if s.targets.len() > MAX_LISTED {
        return Err(LivenessValueError::TooMany);
    }
    proto::verify(
        &s.accuser,
        domain::SUSPICIONS,
        &signed.body,
        &signed.signature,
        "suspicions",
    )?;
    Ok(s)
}

/// A member as liveness needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberView {
    pub key: PublicKeyBytes,
    pub overlay_ip: Ipv4Addr,
    /// A WireGuard path to it exists (direct or relayed) that probes can
    /// take; members still connecting are neither monitored nor checked.
    pub reachable: bool,
    /// A WireGuard session with it was established (a handshake
    /// completed, and the path was not found broken since; idle or not): a
    /// sign of life. A path merely chosen, e.g. through a relay, is none.
    pub heard: bool,
}

/// What liveness decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Down(PublicKeyBytes),
    Up(PublicKeyBytes),
    /// Our probes fail but the member proved it is alive: our path to it is
    /// broken.
    PathBroken(PublicKeyBytes),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Monitor,
    Spot,
    Check,
    Recheck,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    target: PublicKeyBytes,
    sent: Instant,
    purpose: Purpose,
}

/// Why a check runs: someone's accusation, or our own failed probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Check {
    started: Instant,
    probes_sent: u8,
    next_probe: Instant,
    failed: bool,
    accusation: Accusation,
    /// Started because our path went silent ([`SILENT_CHECK`]): the path
    /// is already known not to work and the path logic is already at it,
    /// so a refutation only backs off; it reports no
    /// [`Event::PathBroken`], which would reset the path once more (in a
    /// mixed mesh of 100 at rest, each such reset made the next silence:
    /// 10-30 resets a minute for 25 minutes).
    silence: bool,
}

impl Check {
    /// A check of our own suspicion (our path went silent, or we never
    /// reached the member), starting now.
    fn ours(now: Instant, me: PublicKeyBytes, unix_ms: u64, silence: bool) -> Check {
        Check {
            started: now,
            probes_sent: 0,
            next_probe: now,
            failed: false,
            accusation: Accusation {
                accuser: me,
                since_ms: unix_ms,
            },
            silence,
        }
    }
}

#[derive(Debug, Clone)]
struct Target {
    overlay_ip: Ipv4Addr,
    reachable: bool,
    /// Our WireGuard session with it works ([`MemberView::heard`]): only
    /// then is it monitored or spot-probed (probes on a path still coming
    /// up, a relay allocation or a punch, only fail, and each failure was
    /// an accusation and a refutation gossiped to every member).
    heard: bool,
    ring: u64,
    monitored: bool,
    next_probe: Option<Instant>,
    misses: u8,
    check: Option<Check>,
    down_since: Option<Instant>,
    /// While down: since when (unix ms) the mesh has held it suspect, the
    /// oldest accusation of it we know (so a node that (re)started long
    /// after the death forgets it when everyone else does, and a take-over
    /// keeps the original time).
    down_since_ms: Option<u64>,
    next_recheck: Option<Instant>,
    last_ack: Option<Instant>,
    /// The last gossip message from it on its own connection
    /// ([`Liveness::handle_heard`]).
    last_heard: Option<Instant>,
    /// Whether that message came through our tunnel with it.
    heard_through_tunnel: bool,
    /// When the first probe of the current run of misses was sent.
    misses_since: Option<Instant>,
    /// Accusations against it that stand: accuser -> (since, when we
    /// learned it), for as long as the accuser's published list names it
    /// and the accuser is a member.
    accused: BTreeMap<PublicKeyBytes, (u64, Instant)>,
    /// Down in our view and nobody accuses it any more: when we take the
    /// accusation over (see [`HANDOFF_JITTER`]).
    handoff_at: Option<Instant>,
    /// The newest accusation of each accuser it refuted.
    refuted: BTreeMap<PublicKeyBytes, u64>,
    /// The highest signed version of any of its values we saw, and that
    /// version when it went down (a newer one means it lived after).
    version: u64,
    version_at_down: u64,
    /// When we learned of it, whether it ever showed life to us (an answer
    /// to a probe, or a working WireGuard session: a path we chose, e.g.
    /// through a relay, is not enough), and whether the never-reached
    /// check ran.
    seen_at: Option<Instant>,
    ever_reached: bool,
    unreached_checked: bool,
    /// When the never-reached check falls due (see [`NEVER_REACHED_CHECK`]).
    unreached_due: Option<Instant>,
    /// Our path to it was found broken (it refuted our accusation): our
    /// own misses do not accuse it again before this, and the wait doubles
    /// each time (see [`BROKEN_BACKOFF_MIN`]).
    quiet_until: Option<Instant>,
    broken_backoff: Duration,
    /// The last sign of life we had of it: its path working, an answer, a
    /// gossip message of its own, a newer signed value (see
    /// [`SILENT_CHECK`]).
    alive_at: Option<Instant>,
    /// This target's share of [`SILENT_SPREAD`].
    silent_spread: Duration,
    /// Refuted silence checks: the next waits until this, doubling from
    /// [`BROKEN_BACKOFF_MIN`] to [`BROKEN_BACKOFF_MAX`] (not reset).
    silence_quiet_until: Option<Instant>,
    silence_backoff: Duration,
    /// Its published list accuses us: it holds us down or checks us, and
    /// removes (or will remove) its WireGuard peer for us, which explains
    /// our path to it breaking; no silence check of it meanwhile (under
    /// load, each false verdict made its victim accuse the judge in turn).
    accuses_us: bool,
}

impl Target {
    fn new(v: &MemberView, ring: u64, silent_spread: Duration) -> Self {
        Target {
            overlay_ip: v.overlay_ip,
            reachable: v.reachable,
            heard: v.heard,
            ring,
            monitored: false,
            next_probe: None,
            misses: 0,
            check: None,
            down_since: None,
            down_since_ms: None,
            next_recheck: None,
            last_ack: None,
            last_heard: None,
            heard_through_tunnel: false,
            misses_since: None,
            accused: BTreeMap::new(),
            handoff_at: None,
            refuted: BTreeMap::new(),
            version: 0,
            version_at_down: 0,
            seen_at: None,
            ever_reached: v.heard,
            unreached_checked: false,
            unreached_due: None,
            quiet_until: None,
            broken_backoff: Duration::ZERO,
            alive_at: None,
            silent_spread,
            silence_quiet_until: None,
            silence_backoff: Duration::ZERO,
            accuses_us: false,
        }
    }

    /// Showed life at `at`.
    fn lives(&mut self, at: Instant) {
        if self.alive_at.is_none_or(|a| at > a) {
            self.alive_at = Some(at);
        }
    }

    /// When it falls due for a check of ours because our path to it went
    /// silent (see [`SILENT_CHECK`]), if it can.
    fn silent_due(&self) -> Option<Instant> {
        if !self.ever_reached
            || self.probeable()
            || self.accuses_us
            || self.check.is_some()
            || self.down_since.is_some()
        {
            return None;
        }
        // A path being tried again (no path chosen: the punch grace, a
        // relay being picked) is given longer than one chosen that does
        // not work.
        let wait = if self.reachable {
            SILENT_CHECK
        } else {
            SILENT_NO_PATH
        };
        let due = self.alive_at? + wait + self.silent_spread;
        let due = self.quiet_until.map_or(due, |q| q.max(due));
        Some(self.silence_quiet_until.map_or(due, |q| q.max(due)))
    }

    /// Whether our path to it works, so a probe that goes unanswered says
    /// something about the member rather than about a path still coming up.
    fn probeable(&self) -> bool {
        self.reachable && self.heard
    }

    /// Our path to it is broken (it is alive): no accusation of ours for
    /// a while, longer each time in a row.
    fn path_broken(&mut self, now: Instant) {
        self.broken_backoff =
            (self.broken_backoff * 2).clamp(BROKEN_BACKOFF_MIN, BROKEN_BACKOFF_MAX);
        self.quiet_until = Some(now + self.broken_backoff);
    }

    /// A check of ours refuted: the broken-path backoff, and for a silence
    /// check its own backoff, which an answer does not reset (a path that
    /// comes back and goes silent again, as relayed paths at rest do, was
    /// otherwise checked at each silence: 10 accusations a minute in an
    /// idle mixed mesh of 100).
    fn refuted_check(&mut self, now: Instant, silence: bool) {
        self.path_broken(now);
        if silence {
            self.silence_backoff =
                (self.silence_backoff * 2).clamp(BROKEN_BACKOFF_MIN, BROKEN_BACKOFF_MAX);
            self.silence_quiet_until = Some(now + self.silence_backoff);
        }
    }

    /// The accusations of it by others that stand and that it has not
    /// refuted.
    fn standing(&self) -> impl Iterator<Item = Accusation> + '_ {
        self.accused
            .iter()
            .map(|(accuser, (since_ms, _))| Accusation {
                accuser: *accuser,
                since_ms: *since_ms,
            })
            .filter(|a| !self.refutes(a))
    }

    fn refutes(&self, a: &Accusation) -> bool {
        self.refuted
            .get(&a.accuser)
            .is_some_and(|s| *s >= a.since_ms)
    }
}

/// The liveness state machine of one node.
pub struct Liveness {
    me: PublicKeyBytes,
    my_ring: u64,
    network_key: PublicKeyBytes,
    targets: BTreeMap<PublicKeyBytes, Target>,
    /// Probes in flight by nonce (ordered: timers run in a reproducible
    /// order, so a seeded run is deterministic).
    pending: BTreeMap<u64, Pending>,
    /// Whom we accuse, since when (unix ms), and when (Instant).
    accusing: BTreeMap<PublicKeyBytes, (u64, Instant)>,
    accusing_changed: bool,
    /// Accusations of us we have seen (to refute).
    against_me: BTreeMap<PublicKeyBytes, u64>,
    /// Members that newly accused us (they cannot reach us: the caller may
    /// repair its side of the path), until taken.
    new_accusers: Vec<PublicKeyBytes>,
    refutations_changed: bool,
    transmits: Vec<(Ipv4Addr, Probe)>,
    events: VecDeque<Event>,
    mismatches: Vec<PublicKeyBytes>,
    next_spot: Option<Instant>,
    summary: Summary,
    /// The last round trip of a probe to each member.
    rtts: HashMap<PublicKeyBytes, Duration>,
    rng: SmallRng,
    misses_to_accuse: u8,
    /// The members in ring order after us (rebuilt when the members
    /// change; the timers only walk it).
    ring: Vec<(u64, PublicKeyBytes)>,
    /// Local health (Lifeguard's "local health multiplier"): 0 when this
    /// node keeps its deadlines; each sign that it does not (its timers run
    /// late, an answer came after its timeout, it had to refute an
    /// accusation) adds one, each answer in time takes one off. Probe
    /// timeouts and the refutation wait are multiplied by `1 + health`, so
    /// an overloaded node accuses and condemns slowly instead of calling
    /// members down because it (or the whole machine) is slow.
    health: u8,
    /// When health last rose for late timers (at most once a second).
    last_lag: Option<Instant>,
    /// Probes that timed out, by nonce, until [`LATE_ANSWER_WINDOW`] after
    /// they were sent.
    late: BTreeMap<u64, Pending>,
    /// Local health on (the default); off, timeouts never stretch and late
    /// answers do not count (the simulation compares both).
    local_health: bool,
}

/// A member's position on the ring.
pub fn ring_position(network_key: &PublicKeyBytes, node_key: &PublicKeyBytes) -> u64 {
    let mut h = Sha256::new();
    h.update(network_key);
    h.update(node_key);
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().unwrap_or([0; 8]))
}

impl Liveness {
    pub fn new(network_key: PublicKeyBytes, me: PublicKeyBytes, seed: u64) -> Self {
        Liveness {
            me,
            my_ring: ring_position(&network_key, &me),
            network_key,
            targets: BTreeMap::new(),
            pending: BTreeMap::new(),
            accusing: BTreeMap::new(),
            accusing_changed: false,
            against_me: BTreeMap::new(),
            new_accusers: Vec::new(),
            refutations_changed: false,
            transmits: Vec::new(),
            events: VecDeque::new(),
            mismatches: Vec::new(),
            next_spot: None,
            summary: Summary::default(),
            rtts: HashMap::new(),
            rng: SmallRng::seed_from_u64(seed),
            misses_to_accuse: MISSES_TO_ACCUSE,
            ring: Vec::new(),
            health: 0,
            last_lag: None,
            late: BTreeMap::new(),
            local_health: true,
        }
    }

    /// Turns local health (and late answers) on or off (default on).
    pub fn set_local_health(&mut self, on: bool) {
        self.local_health = on;
        if !on {
            self.health = 0;
            self.late.clear();
        }
    }

    /// The local-health score (0 = healthy, up to [`MAX_HEALTH`]).
    pub fn health(&self) -> u8 {
        self.health
    }

    fn probe_timeout(&self) -> Duration {
        PROBE_TIMEOUT * (1 + self.health as u32)
    }

    fn refute_wait(&self) -> Duration {
        REFUTE_WAIT * (1 + self.health as u32)
    }

    fn sicker(&mut self) {
        if self.local_health {
            self.health = (self.health + 1).min(MAX_HEALTH);
        }
    }

    /// Sets how many consecutive monitor probes must go unanswered before
    /// we accuse (default [`MISSES_TO_ACCUSE`]; at least 1).
    pub fn set_misses_to_accuse(&mut self, n: u8) {
        self.misses_to_accuse = n.max(1);
    }

    /// Whether `key` is a member we watch (its record is known).
    pub fn knows(&self, key: &PublicKeyBytes) -> bool {
        self.targets.contains_key(key)
    }

    /// How long `key` has been known down, if our verdict is down: since
    /// the oldest accusation of it we know (zero when none), as of
    /// `unix_ms`.
    pub fn down_for(&self, key: &PublicKeyBytes, unix_ms: u64) -> Option<Duration> {
        let t = self.targets.get(key)?;
        t.down_since?;
        let since = t.down_since_ms.unwrap_or(unix_ms);
        Some(Duration::from_millis(unix_ms.saturating_sub(since)))
    }

    /// Whether our verdict on `key` is down.
    pub fn is_down(&self, key: &PublicKeyBytes) -> bool {
        self.targets
            .get(key)
            .is_some_and(|t| t.down_since.is_some())
    }

    /// The members we monitor now.
    pub fn monitored(&self) -> impl Iterator<Item = &PublicKeyBytes> {
        self.targets
            .iter()
            .filter(|(_, t)| t.monitored)
            .map(|(k, _)| k)
    }

    /// Whether `key` has an accusation or a check running here.
    pub fn suspected(&self, key: &PublicKeyBytes) -> bool {
        self.targets
            .get(key)
            .is_some_and(|t| t.check.is_some() || self.accusing.contains_key(key))
    }

    /// The round trip of the last answered probe to `key`, and when.
    pub fn rtt(&self, key: &PublicKeyBytes) -> Option<Duration> {
        self.rtts.get(key).copied()
    }

    /// When `key` last answered a probe.
    pub fn last_ack(&self, key: &PublicKeyBytes) -> Option<Instant> {
        self.targets.get(key).and_then(|t| t.last_ack)
    }

    /// Our own gossip summary (carried by our probes and answers).
    pub fn set_summary(&mut self, s: Summary) {
        self.summary = s;
    }

    /// The current members (everyone not left, except us). Members missing
    /// from the list are dropped.
    pub fn handle_members(&mut self, now: Instant, members: &[MemberView]) {
        let listed: std::collections::BTreeSet<PublicKeyBytes> =
            members.iter().map(|m| m.key).collect();
        self.targets.retain(|k, _| listed.contains(k));
        self.rtts.retain(|k, _| listed.contains(k));
        let before = self.accusing.len();
        self.accusing.retain(|k, _| listed.contains(k));
        if self.accusing.len() != before {
            self.accusing_changed = true;
        }
        for m in members {
            if m.key == self.me {
                continue;
            }
            let ring = ring_position(&self.network_key, &m.key);
            let t = match self.targets.entry(m.key) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let spread = self.rng.gen_range(0..SILENT_SPREAD.as_millis() as u64);
                    e.insert(Target::new(m, ring, Duration::from_millis(spread)))
                }
            };
            t.overlay_ip = m.overlay_ip;
            t.reachable = m.reachable;
            t.heard = m.heard;
            t.ever_reached |= m.heard;
            if m.heard {
                t.lives(now);
            }
            if t.seen_at.is_none() {
                t.seen_at = Some(now);
                let spread = self
                    .rng
                    .gen_range(0..NEVER_REACHED_SPREAD.as_millis() as u64);
                t.unreached_due = Some(now + NEVER_REACHED_CHECK + Duration::from_millis(spread));
            }
        }
        for t in self.targets.values_mut() {
            t.accused.retain(|a, _| listed.contains(a));
        }
        self.schedule_handoffs(now);
        let mine = self.my_ring;
        self.ring.clear();
        self.ring.extend(
            self.targets
                .iter()
                .map(|(k, t)| (t.ring.wrapping_sub(mine), *k)),
        );
        self.ring.sort_unstable();
        self.choose_monitored(now);
    }

    /// Picks the next [`MONITORS`] live members after us on the ring whose
    /// path works (see [`Target::heard`]).
    fn choose_monitored(&mut self, now: Instant) {
        let mut chosen = Vec::new();
        for (_, k) in &self.ring {
            let k = *k;
            if chosen.len() == MONITORS {
                break;
            }
            let t = &self.targets[&k];
            if t.probeable() && t.down_since.is_none() {
                chosen.push(k);
            }
        }
        for (k, t) in self.targets.iter_mut() {
            let now_monitored = chosen.contains(k);
            if now_monitored && !t.monitored {
                // Spread first probes over the period.
                let jitter = self.rng.gen_range(0..PROBE_EVERY.as_millis() as u64);
                t.next_probe = Some(now + Duration::from_millis(jitter));
                t.misses = 0;
            }
            if !now_monitored {
                t.next_probe = None;
            }
            t.monitored = now_monitored;
        }
        if self.next_spot.is_none() {
            let jitter = self.rng.gen_range(0..SPOT_EVERY.as_millis() as u64);
            self.next_spot = Some(now + Duration::from_millis(jitter));
        }
    }

    /// A signed version of one of `key`'s values (record, alive): a version
    /// newer than the one it had when it went down brings it back.
    /// A version newer than any we saw is a sign of life (it signed it
    /// after what we knew).
    pub fn handle_version(&mut self, now: Instant, key: &PublicKeyBytes, version: u64) {
        let Some(t) = self.targets.get_mut(key) else {
            return;
        };
        if version > t.version {
            t.version = version;
            t.lives(now);
        }
        if t.down_since.is_some() && t.version > t.version_at_down {
            self.back_up(key);
        }
    }

    /// A down member showed life: up again, no check, our accusation
    /// withdrawn.
    fn back_up(&mut self, key: &PublicKeyBytes) {
        if let Some(t) = self.targets.get_mut(key) {
            t.down_since = None;
            t.next_recheck = None;
            t.check = None;
            t.misses = 0;
        }
        self.events.push_back(Event::Up(*key));
        if self.accusing.remove(key).is_some() {
            self.accusing_changed = true;
        }
    }

    /// A member's accusations (its `suspects` value, already verified).
    pub fn handle_suspicions(&mut self, now: Instant, s: &Suspicions) {
        // The accuser's list is whole: whom it no longer names, it no
        // longer accuses.
        for (k, t) in self.targets.iter_mut() {
            if !s.targets.iter().any(|sus| sus.node_key == *k) {
                t.accused.remove(&s.accuser);
                // A check on its word ends with it, unless another standing
                // accusation carries it on: the accuser got an answer (or a
                // newer value) and withdrew, often before the accused, busy,
                // ever saw the accusation to refute it (mixed 100: a relay
                // accused for 0.5 s was called down by 55 members that way).
                if let Some(c) = t.check {
                    if c.accusation.accuser == s.accuser && s.accuser != self.me {
                        let other = t.standing().next();
                        match other {
                            Some(a) => {
                                if let Some(c) = &mut t.check {
                                    c.accusation = a;
                                }
                            }
                            None => t.check = None,
                        }
                    }
                }
            }
        }
        let me = self.me;
        if let Some(t) = self.targets.get_mut(&s.accuser) {
            t.accuses_us = s.targets.iter().any(|sus| sus.node_key == me);
        }
        for sus in &s.targets {
            if sus.node_key == self.me {
                let e = self.against_me.entry(s.accuser).or_insert(0);
                if sus.since_ms > *e {
                    tracing::debug!(accuser = %proto::short_key(&s.accuser), since_ms = sus.since_ms, "accused; refuting");
                    *e = sus.since_ms;
                    self.refutations_changed = true;
                    if !self.new_accusers.contains(&s.accuser) {
                        self.new_accusers.push(s.accuser);
                    }
                    // Someone could not hear us in time.
                    self.sicker();
                }
                continue;
            }
            if s.accuser == self.me {
                continue;
            }
            let Some(t) = self.targets.get_mut(&sus.node_key) else {
                continue;
            };
            let known = t.accused.get(&s.accuser).map(|(since, _)| *since);
            if known.is_some_and(|k| k >= sus.since_ms) {
                continue;
            }
            t.accused.insert(s.accuser, (sus.since_ms, now));
            let a = Accusation {
                accuser: s.accuser,
                since_ms: sus.since_ms,
            };
            if t.refutes(&a) || t.down_since.is_some() || t.check.is_some() {
                tracing::debug!(target_key = %proto::short_key(&sus.node_key), accuser = %proto::short_key(&s.accuser), refuted = t.refutes(&a), down = t.down_since.is_some(), checking = t.check.is_some(), "accusation: no new check");
                continue;
            }
            tracing::debug!(target_key = %proto::short_key(&sus.node_key), accuser = %proto::short_key(&s.accuser), "accusation: checking");
            // Answered us since the accusation reached us? Nothing to check
            // (our last answer is older than the accusation, so check).
            let start = t.seen_at.map_or(now, |at| now.max(at + NEW_MEMBER_GRACE));
            t.check = Some(Check {
                started: start,
                probes_sent: 0,
                next_probe: start,
                failed: false,
                accusation: a,
                silence: false,
            });
        }
        self.schedule_handoffs(now);
    }

    /// A member's refutations (its `alive` value, already verified).
    pub fn handle_alive(&mut self, now: Instant, a: &Alive) {
        let Some(t) = self.targets.get_mut(&a.node_key) else {
            return;
        };
        for r in &a.refutes {
            let e = t.refuted.entry(r.accuser).or_insert(0);
            *e = (*e).max(r.since_ms);
        }
        let key = a.node_key;
        let version = a.issued_at_ms;
        if let Some(c) = t.check {
            if t.refutes(&c.accusation) {
                t.check = None;
                if c.failed {
                    t.refuted_check(now, c.silence);
                    if !c.silence {
                        self.events.push_back(Event::PathBroken(key));
                    }
                }
                if c.accusation.accuser == self.me {
                    self.accusing.remove(&key);
                    self.accusing_changed = true;
                }
            }
        }
        self.handle_version(now, &key, version);
    }

    /// A gossip message from `key` itself arrived at `at`, from address
    /// `from` (a message on the member's own QUIC connection: its key
    /// authenticated it, so nobody else can make it up, and a relay of its
    /// values by others does not count). It is alive: a check of it ends (a
    /// failed one with [`Event::PathBroken`], unless the message came
    /// through our tunnel with it, which then works), our accusation is
    /// withdrawn, a down member is back.
    pub fn handle_heard(&mut self, at: Instant, key: &PublicKeyBytes, from: std::net::IpAddr) {
        let me = self.me;
        let Some(t) = self.targets.get_mut(key) else {
            return;
        };
        let through_tunnel = from == std::net::IpAddr::V4(t.overlay_ip);
        if t.last_heard.is_none_or(|h| at >= h) {
            t.last_heard = Some(at);
            t.heard_through_tunnel = through_tunnel;
        }
        t.ever_reached = true;
        t.lives(at);
        if let Some(c) = t.check {
            if at >= c.started {
                tracing::debug!(target_key = %proto::short_key(key), failed = c.failed, through_tunnel, "heard from the member itself: check ends");
                t.check = None;
                if c.failed && !through_tunnel {
                    t.refuted_check(at, c.silence);
                    if !c.silence {
                        self.events.push_back(Event::PathBroken(*key));
                    }
                }
                if c.accusation.accuser == me && self.accusing.remove(key).is_some() {
                    self.accusing_changed = true;
                }
            }
        }
        if t.down_since.is_some_and(|d| at >= d) {
            self.back_up(key);
        }
    }

    /// A probe answer from overlay address `from`.
    pub fn handle_ack(&mut self, now: Instant, from: Ipv4Addr, nonce: u64, summary: Summary) {
        let (p, in_time) = match self.pending.get(&nonce) {
            Some(p) => (*p, true),
            None => match self.late.get(&nonce) {
                Some(p) => (*p, false),
                None => return,
            },
        };
        let Some(ip) = self.targets.get(&p.target).map(|t| t.overlay_ip) else {
            self.pending.remove(&nonce);
            self.late.remove(&nonce);
            return;
        };
        if ip != from {
            // Someone else's address: not the target speaking.
            return;
        }
        self.pending.remove(&nonce);
        self.late.remove(&nonce);
        if in_time {
            self.health = self.health.saturating_sub(1);
        } else {
            // Alive, but slower than our timeout: we (or it) are loaded.
            self.sicker();
        }
        let Some(t) = self.targets.get_mut(&p.target) else {
            return;
        };
        t.ever_reached = true;
        t.lives(now);
        t.last_ack = Some(now);
        t.misses = 0;
        if in_time {
            t.broken_backoff = Duration::ZERO;
            t.quiet_until = None;
        }
        self.rtts
            .insert(p.target, now.saturating_duration_since(p.sent));
        let was_down = t.down_since.take().is_some();
        t.check = None;
        // It answered us: we accuse it no more, whatever state our
        // accusation was in (an entry left standing would keep its old
        // time, which the member's refutation covers: its next death would
        // look refuted to everyone who learns of it later).
        if self.accusing.remove(&p.target).is_some() {
            self.accusing_changed = true;
        }
        if was_down {
            t.next_recheck = None;
            self.events.push_back(Event::Up(p.target));
        }
        if summary != self.summary && !self.mismatches.contains(&p.target) {
            self.mismatches.push(p.target);
        }
    }

    fn send(&mut self, now: Instant, target: PublicKeyBytes, purpose: Purpose) {
        let Some(t) = self.targets.get(&target) else {
            return;
        };
        let nonce: u64 = self.rng.gen();
        self.pending.insert(
            nonce,
            Pending {
                target,
                sent: now,
                purpose,
            },
        );
        self.transmits.push((
            t.overlay_ip,
            Probe::Ping {
                nonce,
                summary: self.summary,
                proof_for: None,
            },
        ));
    }

    fn accuse(&mut self, now: Instant, unix_ms: u64, target: PublicKeyBytes) {
        tracing::debug!(target_key = %proto::short_key(&target), "monitor probes unanswered: accusing");
        if let std::collections::btree_map::Entry::Vacant(e) = self.accusing.entry(target) {
            e.insert((unix_ms, now));
            self.accusing_changed = true;
        }
        let since_ms = self.accusing[&target].0;
        let me = self.me;
        if let Some(t) = self.targets.get_mut(&target) {
            // Our own probes already failed: only the refutation window is left.
            t.check = Some(Check {
                started: now,
                probes_sent: 2,
                next_probe: now,
                failed: true,
                accusation: Accusation {
                    accuser: me,
                    since_ms,
                },
                silence: false,
            });
        }
    }

    /// Runs the timers: probes due, probes timed out, checks decided.
    pub fn handle_timeout(&mut self, now: Instant, unix_ms: u64) {
        // Our own timers running late: this node is overloaded.
        if let Some(due) = self.poll_timeout() {
            if now.saturating_duration_since(due) > LAG_TOLERANCE
                && self
                    .last_lag
                    .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1))
            {
                self.last_lag = Some(now);
                self.sicker();
            }
        }
        self.late
            .retain(|_, p| now.saturating_duration_since(p.sent) < LATE_ANSWER_WINDOW);
        // Probes that went unanswered.
        let timeout = self.probe_timeout();
        let expired: Vec<(u64, Pending)> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.sent) >= timeout)
            .map(|(n, p)| (*n, *p))
            .collect();
        for (nonce, p) in expired {
            self.pending.remove(&nonce);
            if self.local_health {
                self.late.insert(nonce, p);
            }
            let Some(t) = self.targets.get_mut(&p.target) else {
                continue;
            };
            match p.purpose {
                Purpose::Monitor | Purpose::Spot => {
                    if t.check.is_some() || t.down_since.is_some() {
                        continue;
                    }
                    if t.misses == 0 {
                        t.misses_since = Some(p.sent);
                    }
                    t.misses += 1;
                    if t.misses >= self.misses_to_accuse {
                        t.misses = 0;
                        if t.quiet_until.is_some_and(|u| now < u) {
                            // Known broken path to a live member: not again yet.
                            continue;
                        }
                        if t.last_heard.is_some_and(|h| Some(h) >= t.misses_since) {
                            // It spoke to us over gossip meanwhile: alive.
                            // Through our tunnel with it, only slow to
                            // answer; from elsewhere, the tunnel is what
                            // fails (as when it refutes an accusation).
                            tracing::debug!(target_key = %proto::short_key(&p.target), through_tunnel = t.heard_through_tunnel, "probes unanswered but heard from it: no accusation");
                            if !t.heard_through_tunnel {
                                t.path_broken(now);
                                self.events.push_back(Event::PathBroken(p.target));
                            }
                            continue;
                        }
                        self.accuse(now, unix_ms, p.target);
                    } else {
                        if t.misses + 1 == self.misses_to_accuse
                            && !self.mismatches.contains(&p.target)
                        {
                            // One miss from accusing: ask it for a round,
                            // whose answer (over its own connection) shows
                            // whether it is alive.
                            self.mismatches.push(p.target);
                        }
                        self.send(now, p.target, p.purpose);
                    }
                }
                Purpose::Check => {
                    let still_waiting = self
                        .pending
                        .values()
                        .any(|q| q.target == p.target && q.purpose == Purpose::Check);
                    let me = self.me;
                    let mut publish = None;
                    if let Some(c) = &mut t.check {
                        // Both probes sent and none left in flight, and no
                        // answer since the check began: it failed.
                        if c.probes_sent >= 2 && !c.failed && !still_waiting {
                            c.failed = t.last_ack.is_none_or(|a| a < c.started);
                            if c.failed && !self.mismatches.contains(&p.target) {
                                // Our probes failed: ask it for a gossip
                                // round too (its answer proves it alive,
                                // whatever our tunnel with it does).
                                self.mismatches.push(p.target);
                            }
                            if c.failed && c.accusation.accuser == me {
                                // Our own suspicion (our path went silent):
                                // published, so the member can refute it;
                                // the refutation window starts now.
                                c.started = now;
                                publish = Some(c.accusation.since_ms);
                            }
                        }
                    }
                    if let Some(since) = publish {
                        if let std::collections::btree_map::Entry::Vacant(e) =
                            self.accusing.entry(p.target)
                        {
                            e.insert((since, now));
                            self.accusing_changed = true;
                        }
                    }
                }
                Purpose::Recheck => {}
            }
        }
        // Members whose path went silent: checked (see SILENT_CHECK).
        let me = self.me;
        for (k, t) in self.targets.iter_mut() {
            if t.silent_due().is_some_and(|at| now >= at) {
                tracing::debug!(target_key = %proto::short_key(k), silent_ms = t.alive_at.map(|a| now.saturating_duration_since(a).as_millis() as u64), "our path to it went silent: checking");
                t.check = Some(Check::ours(now, me, unix_ms, true));
            }
        }
        // Members held long without ever being reached, and silent as
        // long: checked once.
        let quiet_ms = NEVER_REACHED_CHECK.as_millis() as u64;
        for t in self.targets.values_mut() {
            if !t.ever_reached
                && !t.unreached_checked
                && t.check.is_none()
                && t.down_since.is_none()
                && t.unreached_due.is_some_and(|at| now >= at)
            {
                let silent_ms = unix_ms.saturating_sub(t.version);
                if silent_ms < quiet_ms {
                    // It signed something lately: not before that is old.
                    t.unreached_due = Some(now + Duration::from_millis(quiet_ms - silent_ms));
                    continue;
                }
                t.unreached_checked = true;
                t.check = Some(Check::ours(now, me, unix_ms, false));
            }
        }
        // Checks: send their probes, decide the failed ones.
        let refute_wait = self.refute_wait();
        let keys: Vec<PublicKeyBytes> = self.targets.keys().copied().collect();
        for k in keys {
            let Some(t) = self.targets.get_mut(&k) else {
                continue;
            };
            let Some(c) = t.check else { continue };
            if !c.failed {
                if c.probes_sent < 2 && now >= c.next_probe {
                    if let Some(c) = &mut t.check {
                        c.probes_sent += 1;
                        c.next_probe = now + CHECK_GAP;
                    }
                    self.send(now, k, Purpose::Check);
                }
                continue;
            }
            if now.saturating_duration_since(c.started) < refute_wait {
                continue;
            }
            t.check = None;
            if t.refutes(&c.accusation) {
                t.refuted_check(now, c.silence);
                if !c.silence {
                    self.events.push_back(Event::PathBroken(k));
                }
                if c.accusation.accuser == self.me && self.accusing.remove(&k).is_some() {
                    self.accusing_changed = true;
                }
                continue;
            }
            if t.down_since.is_none() {
                tracing::debug!(
                    target_key = %proto::short_key(&k),
                    accuser = %proto::short_key(&c.accusation.accuser),
                    probeable = t.probeable(),
                    ever_reached = t.ever_reached,
                    last_ack_ago_ms = t.last_ack.map(|a| now.saturating_duration_since(a).as_millis() as u64),
                    check_ms = now.saturating_duration_since(c.started).as_millis() as u64,
                    health = self.health,
                    "check failed, no refutation: down"
                );
                let by_others = t.standing().map(|a| a.since_ms).min();
                let oldest = match by_others {
                    Some(o) => o.min(c.accusation.since_ms),
                    // Nobody accuses it and it never answered us: a member
                    // every other node has forgotten (long dead) whose
                    // state came back through gossip. Its last sign of life
                    // is its newest signed value (soak: one such member
                    // went around for 20 minutes, re-added and re-accused
                    // with a fresh time each round).
                    None if t.last_ack.is_none() && t.version > 0 => {
                        t.version.min(c.accusation.since_ms)
                    }
                    None => c.accusation.since_ms,
                };
                let since = oldest.min(unix_ms);
                t.down_since_ms = Some(since);
                t.down_since = Some(now);
                // Our own standing accusation carries the oldest time we
                // know: a member that learns of this death later (it joined
                // or restarted) counts its forget time from the same
                // moment as everyone else (with our fresh time it held the
                // member 10 minutes longer).
                if let Some(mine) = self.accusing.get_mut(&k) {
                    if mine.0 > since {
                        mine.0 = since;
                        self.accusing_changed = true;
                    }
                }
                t.version_at_down = t.version;
                t.next_recheck = Some(now + DOWN_RECHECK);
                t.monitored = false;
                t.next_probe = None;
                self.events.push_back(Event::Down(k));
            }
        }
        // Monitoring, rechecks of the down.
        let due: Vec<(PublicKeyBytes, Purpose)> = self
            .targets
            .iter()
            .filter_map(|(k, t)| {
                if t.down_since.is_some() {
                    return t
                        .next_recheck
                        .filter(|at| now >= *at)
                        .map(|_| (*k, Purpose::Recheck));
                }
                if t.monitored && t.check.is_none() && t.next_probe.is_some_and(|at| now >= at) {
                    let waiting = self.pending.values().any(|p| p.target == *k);
                    return (!waiting).then_some((*k, Purpose::Monitor));
                }
                None
            })
            .collect();
        for (k, purpose) in due {
            if let Some(t) = self.targets.get_mut(&k) {
                match purpose {
                    Purpose::Recheck => t.next_recheck = Some(now + DOWN_RECHECK),
                    _ => {
                        let j = self.rng.gen_range(900..=1100u64);
                        t.next_probe = Some(now + PROBE_EVERY * j as u32 / 1000);
                    }
                }
            }
            self.send(now, k, purpose);
        }
        // A spot check of someone we do not monitor.
        if self.next_spot.is_some_and(|at| now >= at) {
            self.next_spot = Some(now + SPOT_EVERY);
            let candidates: Vec<PublicKeyBytes> = self
                .targets
                .iter()
                .filter(|(_, t)| {
                    t.probeable() && !t.monitored && t.down_since.is_none() && t.check.is_none()
                })
                .map(|(k, _)| *k)
                .collect();
            if !candidates.is_empty() {
                let k = candidates[self.rng.gen_range(0..candidates.len())];
                self.send(now, k, Purpose::Spot);
            }
        }
        // Old accusations (ours and others') are dropped; ours stand while
        // our check runs and while our verdict is down, so a member that
        // learns of the target later (it restarted, or joined) checks it
        // too instead of waiting for a path that never comes.
        let before = self.accusing.len();
        let targets = &self.targets;
        self.accusing.retain(|k, (_, at)| {
            now.saturating_duration_since(*at) < ACCUSATION_TTL
                || targets
                    .get(k)
                    .is_some_and(|t| t.check.is_some() || t.down_since.is_some())
        });
        if self.accusing.len() != before {
            self.accusing_changed = true;
        }
        // Down members nobody accuses any more: taken over when due.
        self.schedule_handoffs(now);
        let due: Vec<PublicKeyBytes> = self
            .targets
            .iter()
            .filter(|(_, t)| t.handoff_at.is_some_and(|at| now >= at))
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            if let Some(t) = self.targets.get_mut(&k) {
                t.handoff_at = None;
            }
            tracing::debug!(target_key = %proto::short_key(&k), "down and accused by nobody: accusing");
            // The original time: the member has been down since then.
            let since = self
                .targets
                .get(&k)
                .and_then(|t| t.down_since_ms)
                .unwrap_or(unix_ms);
            self.accusing.insert(k, (since, now));
            self.accusing_changed = true;
        }
        // Down members stop being monitored; pick others.
        self.choose_monitored(now);
    }

    /// Down members that nobody accuses (not us, no member's standing list)
    /// get a take-over time within [`HANDOFF_JITTER`]; others lose theirs.
    fn schedule_handoffs(&mut self, now: Instant) {
        let mut newly = Vec::new();
        let accusing = &self.accusing;
        for (k, t) in self.targets.iter_mut() {
            let accused = t.standing().next().is_some();
            let orphan = t.down_since.is_some() && !accused && !accusing.contains_key(k);
            if !orphan {
                t.handoff_at = None;
            } else if t.handoff_at.is_none() {
                newly.push((*k, t.ring));
            }
        }
        for (k, ring) in newly {
            // Our rank: the live members between the target and us on the
            // ring. Its nearest successors act first; the others, later,
            // usually see their accusation first and do nothing (all of
            // them at once made a burst of accusations in a large mesh).
            let mine = self.my_ring.wrapping_sub(ring);
            let rank = self
                .targets
                .values()
                .filter(|o| {
                    let d = o.ring.wrapping_sub(ring);
                    o.down_since.is_none() && d != 0 && d < mine
                })
                .count();
            let jitter = self.rng.gen_range(0..HANDOFF_JITTER.as_millis() as u64);
            let delay =
                HANDOFF_STEP * rank.min(HANDOFF_MAX_RANK) as u32 + Duration::from_millis(jitter);
            if let Some(t) = self.targets.get_mut(&k) {
                t.handoff_at = Some(now + delay);
            }
        }
    }

    /// Our previous run's accusations (gossip may still hold them) are
    /// withdrawn: the next [`Liveness::take_accusations`] returns our list
    /// even if empty. A restarted daemon calls this once; members holding
    /// a target down on our old word then take the accusation over.
    pub fn withdraw_previous(&mut self) {
        self.accusing_changed = true;
    }

    /// When [`Liveness::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = self.next_spot;
        let mut take = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        let mut waiting = std::collections::BTreeSet::new();
        let (timeout, refute_wait) = (self.probe_timeout(), self.refute_wait());
        for p in self.pending.values() {
            take(p.sent + timeout);
            waiting.insert(p.target);
        }
        for (k, t) in &self.targets {
            if let Some(c) = t.check {
                if c.failed {
                    take(c.started + refute_wait);
                } else if c.probes_sent < 2 {
                    take(c.next_probe);
                }
            }
            if let Some(at) = t.next_recheck {
                take(at);
            }
            if let Some(at) = t.handoff_at {
                take(at);
            }
            if let Some(at) = t.silent_due() {
                take(at);
            }
            if !t.ever_reached
                && !t.unreached_checked
                && t.check.is_none()
                && t.down_since.is_none()
            {
                if let Some(at) = t.unreached_due {
                    take(at);
                }
            }
            // A monitor probe comes due only once the one in flight is
            // answered or timed out (`handle_timeout` skips it meanwhile;
            // reporting it made a caller spin until then).
            if t.monitored && t.check.is_none() && !waiting.contains(k) {
                if let Some(at) = t.next_probe {
                    take(at);
                }
            }
        }
        next
    }

    /// Probes to send: (target overlay address, probe).
    pub fn poll_transmit(&mut self) -> Vec<(Ipv4Addr, Probe)> {
        std::mem::take(&mut self.transmits)
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Members that accused us since the last call (each once): they could
    /// not reach us, so our side of the path to them may need repair.
    pub fn take_new_accusers(&mut self) -> Vec<PublicKeyBytes> {
        std::mem::take(&mut self.new_accusers)
    }

    /// Members to start a gossip round with now: their probe answers
    /// carried a gossip summary other than ours, or we need to hear from
    /// them (see [`Liveness::handle_heard`]).
    pub fn take_mismatches(&mut self) -> Vec<PublicKeyBytes> {
        std::mem::take(&mut self.mismatches)
    }

    /// Our accusations, when they changed since the last call (publish them
    /// as `suspects`).
    pub fn take_accusations(&mut self) -> Option<Vec<Suspect>> {
        if !std::mem::take(&mut self.accusing_changed) {
            return None;
        }
        let mut v: Vec<Suspect> = self
            .accusing
            .iter()
            .map(|(k, (since, _))| Suspect {
                node_key: *k,
                since_ms: *since,
            })
            .collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.since_ms));
        v.truncate(MAX_LISTED);
        Some(v)
    }

    /// The accusations of us to refute, when new ones arrived (publish them
    /// as `alive`).
    pub fn take_refutations(&mut self) -> Option<Vec<Accusation>> {
        if !std::mem::take(&mut self.refutations_changed) {
            return None;
        }
        let mut v: Vec<Accusation> = self
            .against_me
            .iter()
            .map(|(k, s)| Accusation {
                accuser: *k,
                since_ms: *s,
            })
            .collect();
        v.sort_by_key(|a| std::cmp::Reverse(a.since_ms));
        v.truncate(MAX_LISTED);
        Some(v)
    }
}

/// Feeds members' signed liveness values to a [`Liveness`] as they change
/// (each `alive` and `suspects` text once), and their record versions (a
/// newer one brings a down member back).
#[derive(Default)]
pub struct ValueFeed {
    /// Values already fed: (node id, key) -> text.
    fed: HashMap<(std::sync::Arc<str>, &'static str), std::sync::Arc<str>>,
    /// Verified values naming a member whose record we did not hold yet
    /// (gossip delivers each member's state on its own, so an accusation
    /// can come before its target's record): fed again on each call until
    /// every member they name is known, or their text changes.
    parked: HashMap<(std::sync::Arc<str>, &'static str), Parked>,
}

enum Parked {
    Alive(Alive),
    Suspicions(Suspicions),
}

impl Parked {
    /// Whether every member it names is known (or is us).
    fn resolved(&self, liveness: &Liveness) -> bool {
        match self {
            Parked::Alive(a) => liveness.knows(&a.node_key),
            Parked::Suspicions(s) => s
                .targets
                .iter()
                .all(|t| t.node_key == liveness.me || liveness.knows(&t.node_key)),
        }
    }

    fn deliver(&self, now: Instant, liveness: &mut Liveness) {
        match self {
            Parked::Alive(a) => liveness.handle_alive(now, a),
            Parked::Suspicions(s) => liveness.handle_suspicions(now, s),
        }
    }
}

impl ValueFeed {
    pub fn feed(
        &mut self,
        now: Instant,
        liveness: &mut Liveness,
        membership: &crate::membership::Membership,
        network_key: &PublicKeyBytes,
        entries: &[crate::membership::GossipEntry],
    ) {
        use crate::trust::{ALIVE_KEY, SUSPECTS_KEY};
        for e in entries {
            let Some(owner) = proto::parse_node_id(&e.node_id) else {
                continue;
            };
            if let Some(m) = membership.member(&owner) {
                liveness.handle_version(now, &owner, m.record.version);
            }
            for (key, value) in [(ALIVE_KEY, &e.alive), (SUSPECTS_KEY, &e.suspects)] {
                let Some(text) = value else { continue };
                let slot = (e.node_id.clone(), key);
                if self
                    .fed
                    .get(&slot)
                    .is_some_and(|t| std::sync::Arc::ptr_eq(t, text) || t == text)
                {
                    continue;
                }
                self.fed.insert(slot.clone(), text.clone());
                self.parked.remove(&slot);
                let value = if key == ALIVE_KEY {
                    verify_alive(text, network_key, &owner).map(Parked::Alive)
                } else {
                    verify_suspicions(text, network_key, &owner).map(Parked::Suspicions)
                };
                let value = match value {
                    Ok(v) => Some(v),
                    Err(e) => {
                        tracing::debug!(node = %proto::short_key(&owner), key, error = %e, "liveness value refused");
                        None
                    }
                };
                if let Some(v) = value {
                    v.deliver(now, liveness);
                    if !v.resolved(liveness) {
                        self.parked.insert(slot, v);
                    }
                }
            }
        }
        // Parked values whose members are known now (their records
        // arrived since): delivered, and no longer parked. Delivering one
        // again is harmless (what liveness already knows is skipped).
        self.parked.retain(|_, v| {
            if v.resolved(liveness) {
                v.deliver(now, liveness);
                false
            } else {
                true
            }
        });
        if self.fed.len() > 4 * entries.len() + 64 {
            let ids: std::collections::HashSet<&str> =
                entries.iter().map(|e| &*e.node_id).collect();
            self.fed.retain(|(id, _), _| ids.contains(&**id));
            self.parked.retain(|(id, _), _| ids.contains(&**id));
        }
    }
}

/// A value the liveness core wants published: (gossip key, signed text,
/// version).
pub type Publish = (&'static str, String, u64);

/// Our accusations and refutations, when they changed, signed and ready to
/// publish (`suspects`, `alive`), each at a version from `next_version`.
pub fn values_to_publish(
    liveness: &mut Liveness,
    signing: &ed25519_dalek::SigningKey,
    next_version: &mut dyn FnMut() -> u64,
) -> Vec<Publish> {
    let mut out = Vec::new();
    let node_key = signing.verifying_key().to_bytes();
    if let Some(targets) = liveness.take_accusations() {
        let version = next_version();
        let text = Suspicions {
            network_key: liveness.network_key,
            accuser: node_key,
            issued_at_ms: version,
            targets,
        }
        .sign(signing);
        out.push((crate::trust::SUSPECTS_KEY, text, version));
    }
    if let Some(refutes) = liveness.take_refutations() {
        let version = next_version();
        let text = Alive {
            network_key: liveness.network_key,
            node_key,
            issued_at_ms: version,
            refutes,
        }
        .sign(signing);
        out.push((crate::trust::ALIVE_KEY, text, version));
    }
    out
}

#[cfg(test)]
mod tests;
