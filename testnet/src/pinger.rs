//! The pinger: one thread that owns one ICMP socket per node namespace and
//! pings every ordered pair of live nodes over the overlay (or the underlay,
//! for the floor measurement).
//!
//! Sockets are `SOCK_DGRAM`/`IPPROTO_ICMP` ("ping sockets", the kernel picks
//! the echo id and demultiplexes replies per socket); each is created after
//! `setns` into the node's namespace, so one process pings from everywhere.
//!
//! Scheduling: the loop sends at most `rate` echo requests per second in
//! total (a token bucket), so the measuring side stays a bounded load; its
//! own CPU time is measured (`cpu_secs`). Each ordered pair is in one of
//! three classes, served in this order:
//!
//! * **unanswered** (`P0`): no reply yet since the pair (re)started, or its
//!   last probe went unanswered. Probed every `retry` seconds (0.1 s).
//! * **stale** (`P1`): it answers, but not yet to a probe sent after the last
//!   `set_mark` (a disruptive step); one fresh reply moves it on. Probed
//!   every `retry` seconds.
//! * **good** (`P2`): answered since the mark. Re-probed every `keep`
//!   seconds (1 s), or every `pairs / (good_share × rate)` seconds when that
//!   is longer, only to keep the reachability time line honest.
//!
//! When the budget is the limit, unanswered pairs go first, but the two
//! lower classes keep `good_share` (20 %) of the budget whenever they have a
//! pair due, so answered pairs stay inside the reach window. Each class is a
//! FIFO ordered by last send (a pair sent goes to the back), so within a
//! class the budget is shared round robin. The interval between two probes
//! of an unanswered pair is measured (`gaps`: a histogram since the last
//! mark), and each echo carries that interval, so the first reply of a pair
//! comes with its own uncertainty (`first_gap`): the resolution is measured,
//! not assumed.
//!
//! Per ordered pair (i → j) it records: the first reply since the pair's
//! `since` mark (reset when i or j (re)starts), the first reply since the
//! last `set_mark`, the last reply and last send.
//! A pair is *reachable now* when it got a reply within `window` seconds.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::sys;

const MAGIC: u32 = 0x6d70_746e; // "mptn"
const NONE: f64 = -1.0;

/// Pair classes (see the module doc).
pub const UNANSWERED: u8 = 0;
pub const STALE: u8 = 1;
pub const GOOD: u8 = 2;

/// Default cap on echo requests per second (all pairs together): at 100
/// nodes it keeps unanswered pairs at a 0.1-0.2 s resolution while the pinger
/// thread stays around a fifth of one core at full rate (measured by the
/// floor's calibration, about 20 us per echo).
pub const DEFAULT_RATE: f64 = 10000.0;
/// Default probe period of unanswered and stale pairs.
pub const RETRY_SECS: f64 = 0.1;
/// Least re-probe period of good pairs.
pub const KEEP_SECS: f64 = 1.0;
/// Share of the budget kept for answered pairs when they have one due.
pub const GOOD_SHARE: f64 = 0.2;

#[derive(Clone, Copy)]
pub struct PairStat {
    pub since: f64,
    pub first_reply: f64,
    pub last_reply: f64,
    pub last_sent: f64,
    pub rtt_sum: f64,
    pub replies: u32,
    /// First reply since the last `set_mark` (the last disruptive step).
    pub first_since_mark: f64,
    /// The probe interval carried by the echo that got the first reply since
    /// the mark: how long before it the pair had last been probed while
    /// unanswered (the uncertainty of `first_since_mark`); `NONE` when that
    /// echo was the pair's first unanswered-class probe.
    pub first_gap: f64,
    /// First send since the last `set_mark` (every pair probed by when?).
    pub first_sent_since_mark: f64,
    /// Send time of the latest echo that was answered.
    pub last_reply_sent: f64,
    /// Scheduling: class, queue generation, queued or not, and whether the
    /// last send was an unanswered-class probe.
    class: u8,
    gen: u32,
    queued: bool,
    last_p0: bool,
}

impl Default for PairStat {
    fn default() -> Self {
        PairStat {
            since: 0.0,
            first_reply: NONE,
            last_reply: NONE,
            last_sent: NONE,
            rtt_sum: 0.0,
            replies: 0,
            first_since_mark: NONE,
            first_gap: NONE,
            first_sent_since_mark: NONE,
            last_reply_sent: NONE,
            class: UNANSWERED,
            gen: 0,
            queued: false,
            last_p0: false,
        }
    }
}

pub struct PNode {
    fd: Option<OwnedFd>,
    pub active: bool,
    pub addr: Option<Ipv4Addr>,
    /// Others ping this node (false: it only pings, e.g. a NATed node in the
    /// underlay floor measurement).
    pub target: bool,
    /// When it was last started, and when its address became known since.
    pub started_at: f64,
    pub addr_at: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub t: f64,
    pub live: usize,
    pub expected: usize,
    pub reachable: usize,
}

/// A log-scale histogram of intervals (1 ms .. 1000 s, 5 % wide buckets).
#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    pub n: u64,
    pub sum: f64,
    pub max: f64,
}

const H_MIN: f64 = 1e-3;
const H_RATIO: f64 = 1.05;

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; 290],
            n: 0,
            sum: 0.0,
            max: 0.0,
        }
    }
}

impl Hist {
    pub fn add(&mut self, x: f64) {
        let k = if x <= H_MIN {
            0
        } else {
            ((x / H_MIN).ln() / H_RATIO.ln()).ceil() as usize
        };
        let k = k.min(self.counts.len() - 1);
        self.counts[k] += 1;
        self.n += 1;
        self.sum += x;
        self.max = self.max.max(x);
    }
    /// The upper edge of the bucket holding quantile `q` (0..=1).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let want = ((self.n as f64) * q).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (k, c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= want {
                return Some((H_MIN * H_RATIO.powi(k as i32)).min(self.max));
            }
        }
        Some(self.max)
    }
    pub fn to_json(&self) -> Value {
        if self.n == 0 {
            return Value::Null;
        }
        json!({"n": self.n, "mean": self.sum / self.n as f64, "p50": self.quantile(0.5),
               "p99": self.quantile(0.99), "max": self.max})
    }
}

pub struct State {
    pub t0: Instant,
    pub nodes: Vec<PNode>,
    pub pairs: Vec<PairStat>,
    pub samples: Vec<Sample>,
    pub rate: f64,
    pub retry: f64,
    pub keep: f64,
    pub good_share: f64,
    pub sent: u64,
    /// Echo requests sent per class (unanswered, stale, good).
    pub sent_by_class: [u64; 3],
    pub received: u64,
    pub send_errors: u64,
    pub paused: bool,
    /// The loop saw `paused` and sends nothing more until resumed.
    pub pause_acked: bool,
    /// When the pinger last resumed after a pause: the time line waits one
    /// reach window after it (old replies would read as unreachable pairs).
    pub resumed_at: f64,
    /// The last `set_mark`: `first_since_mark` counts only replies to echo
    /// requests sent at or after it.
    pub mark: f64,
    /// Intervals between two probes of an unanswered pair, since the mark.
    pub gaps: Hist,
    /// Time of the last echo request sent, and the largest round trip seen.
    pub last_send_at: f64,
    pub rtt_max: f64,
    /// The pinger thread's kernel id (its CPU time: `sys::thread_cpu_secs`).
    pub tid: i32,
    queues: [VecDeque<(u32, u32)>; 3],
    counts: [usize; 3],
}

impl State {
    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
    fn n(&self) -> usize {
        self.nodes.len()
    }
    pub fn pair(&self, i: usize, j: usize) -> &PairStat {
        &self.pairs[i * self.n() + j]
    }
    /// Live nodes (active, whether or not their address is known yet).
    pub fn live(&self) -> Vec<usize> {
        (0..self.n()).filter(|i| self.nodes[*i].active).collect()
    }
    /// Pairs queued per class now (unanswered, stale, good).
    pub fn class_counts(&self) -> [usize; 3] {
        self.counts
    }
    /// The re-probe period of good pairs now: `keep`, or longer when their
    /// share of the budget cannot probe them all that often.
    pub fn keep_effective(&self) -> f64 {
        let live = self.live().len();
        let pairs = (live * live.saturating_sub(1)) as f64;
        self.keep.max(pairs / (self.rate * self.good_share))
    }
    /// How long a reply counts as "reachable now".
    pub fn window(&self) -> f64 {
        (2.5 * self.keep_effective()).max(2.5)
    }
    pub fn reachable_now(&self, i: usize, j: usize, now: f64, window: f64) -> bool {
        let p = self.pair(i, j);
        p.last_reply >= 0.0 && p.last_reply >= p.since && now - p.last_reply <= window
    }
    /// (live pairs with a reply since the mark, all live pairs, time of the
    /// latest of those first replies).
    pub fn replied_since_mark(&self) -> (usize, usize, f64) {
        let live = self.live();
        let mut done = 0;
        let mut total = 0;
        let mut latest: f64 = 0.0;
        for &i in &live {
            for &j in &live {
                if i == j {
                    continue;
                }
                total += 1;
                let p = self.pair(i, j);
                if p.first_since_mark >= 0.0 {
                    done += 1;
                    latest = latest.max(p.first_since_mark);
                }
            }
        }
        (done, total, latest)
    }
    /// Ordered live pairs without a reply since the mark.
    pub fn missing_since_mark(&self) -> Vec<(usize, usize)> {
        let live = self.live();
        let mut v = vec![];
        for &i in &live {
            for &j in &live {
                if i != j && self.pair(i, j).first_since_mark < 0.0 {
                    v.push((i, j));
                }
            }
        }
        v
    }
    fn sample(&mut self) {
        let now = self.now();
        let live = self.live();
        let window = self.window();
        let mut reach = 0;
        for &i in &live {
            for &j in &live {
                if i != j && self.reachable_now(i, j, now, window) {
                    reach += 1;
                }
            }
        }
        let l = live.len();
        self.samples.push(Sample {
            t: now,
            live: l,
            expected: l * l.saturating_sub(1),
            reachable: reach,
        });
    }
    /// Can pair `idx` be probed now (both ends live with an address, the
    /// destination a target)?
    fn eligible(&self, idx: usize) -> bool {
        let n = self.n();
        let (i, j) = (idx / n, idx % n);
        i != j
            && self.nodes[i].active
            && self.nodes[j].active
            && self.nodes[j].target
            && self.nodes[i].addr.is_some()
            && self.nodes[j].addr.is_some()
    }
    /// Puts pair `idx` at the back of class `c`'s queue (leaving any other
    /// queue: its old entry goes stale).
    fn enqueue(&mut self, idx: usize, c: u8) {
        let p = &mut self.pairs[idx];
        if p.queued {
            self.counts[p.class as usize] -= 1;
        }
        p.gen = p.gen.wrapping_add(1);
        p.class = c;
        p.queued = true;
        let gen = p.gen;
        self.counts[c as usize] += 1;
        self.queues[c as usize].push_back((idx as u32, gen));
    }
    /// Queues every eligible, not yet queued pair of node i (both directions).
    fn enqueue_node(&mut self, i: usize) {
        let n = self.n();
        for j in 0..n {
            for idx in [i * n + j, j * n + i] {
                if !self.pairs[idx].queued && self.eligible(idx) {
                    let c = self.pairs[idx].class;
                    self.enqueue(idx, c);
                }
            }
        }
    }
    /// Re-probe period of class `c`.
    fn period(&self, c: u8, keep_eff: f64) -> f64 {
        if c == GOOD {
            keep_eff
        } else {
            self.retry
        }
    }
}

pub struct Pinger {
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Opens a ping socket in each namespace (one thread visiting them all).
fn open_sockets(namespaces: &[String]) -> Result<Vec<OwnedFd>> {
    let names = namespaces.to_vec();
    std::thread::spawn(move || -> Result<Vec<OwnedFd>> {
        let home = sys::current_netns()?;
        let mut out = vec![];
        for ns in &names {
            let f = sys::open_netns(ns)?;
            sys::setns_fd(&f)?;
            // SAFETY: plain socket(2).
            let fd = unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_ICMP,
                )
            };
            let err = std::io::Error::last_os_error();
            sys::setns_fd(&home)?;
            if fd < 0 {
                bail!("ping socket in {ns}: {err} (is net.ipv4.ping_group_range set there?)");
            }
            // SAFETY: fd is a fresh socket we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let big: libc::c_int = 1 << 20;
            // SAFETY: valid fd and option pointer.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    &big as *const _ as *const libc::c_void,
                    4,
                );
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    &big as *const _ as *const libc::c_void,
                    4,
                );
            }
            out.push(fd);
        }
        Ok(out)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("socket thread panicked"))?
}

impl Pinger {
    /// `namespaces[i]` is node i's namespace.
    pub fn start(namespaces: &[String], rate: f64) -> Result<Pinger> {
        let fds = open_sockets(namespaces)?;
        let nodes: Vec<PNode> = fds
            .into_iter()
            .map(|fd| PNode {
                fd: Some(fd),
                active: false,
                addr: None,
                target: true,
                started_at: NONE,
                addr_at: NONE,
            })
            .collect();
        let n = nodes.len();
        let state = Arc::new(Mutex::new(State {
            t0: Instant::now(),
            nodes,
            pairs: vec![PairStat::default(); n * n],
            samples: vec![],
            rate: rate.max(10.0),
            retry: RETRY_SECS,
            keep: KEEP_SECS,
            good_share: GOOD_SHARE,
            sent: 0,
            sent_by_class: [0; 3],
            received: 0,
            send_errors: 0,
            paused: true,
            pause_acked: false,
            resumed_at: f64::NEG_INFINITY,
            mark: 0.0,
            gaps: Hist::default(),
            last_send_at: NONE,
            rtt_max: 0.0,
            tid: 0,
            queues: Default::default(),
            counts: [0; 3],
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (state.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("pinger".into())
            .spawn(move || run_loop(s2, st2))?;
        Ok(Pinger {
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// Forgets everything and restarts the clock (a new engine run).
    pub fn reset(&self) {
        let mut s = self.state.lock().unwrap();
        s.t0 = Instant::now();
        for p in s.pairs.iter_mut() {
            *p = PairStat::default();
        }
        for n in s.nodes.iter_mut() {
            n.active = false;
            n.addr = None;
            n.started_at = NONE;
            n.addr_at = NONE;
        }
        s.samples.clear();
        s.sent = 0;
        s.sent_by_class = [0; 3];
        s.received = 0;
        s.send_errors = 0;
        s.paused = false;
        s.pause_acked = false;
        s.resumed_at = f64::NEG_INFINITY;
        s.mark = 0.0;
        s.gaps = Hist::default();
        s.last_send_at = NONE;
        s.rtt_max = 0.0;
        for q in s.queues.iter_mut() {
            q.clear();
        }
        s.counts = [0; 3];
    }

    pub fn now(&self) -> f64 {
        self.state.lock().unwrap().now()
    }

    /// Node i (re)started: its pairs start over (unanswered).
    pub fn node_started(&self, i: usize, addr: Option<Ipv4Addr>) {
        let mut s = self.state.lock().unwrap();
        let now = s.now();
        let n = s.n();
        s.nodes[i].active = true;
        s.nodes[i].addr = addr;
        s.nodes[i].target = true;
        s.nodes[i].started_at = now;
        s.nodes[i].addr_at = if addr.is_some() { now } else { NONE };
        for j in 0..n {
            for idx in [i * n + j, j * n + i] {
                let (queued, class) = (s.pairs[idx].queued, s.pairs[idx].class);
                if queued {
                    s.counts[class as usize] -= 1;
                }
                let gen = s.pairs[idx].gen.wrapping_add(1);
                s.pairs[idx] = PairStat {
                    since: now,
                    gen,
                    ..PairStat::default()
                };
            }
        }
        s.enqueue_node(i);
    }

    /// Starts a new "replied since" period (after a disruptive step): good
    /// pairs become stale (each needs one fresh reply), the resolution
    /// statistics start over.
    pub fn set_mark(&self) -> f64 {
        let mut s = self.state.lock().unwrap();
        let now = s.now();
        for p in s.pairs.iter_mut() {
            p.first_since_mark = NONE;
            p.first_gap = NONE;
            p.first_sent_since_mark = NONE;
        }
        let good: Vec<(u32, u32)> = s.queues[GOOD as usize].drain(..).collect();
        for (idx, gen) in good {
            let idx = idx as usize;
            let p = &s.pairs[idx];
            if p.queued && p.gen == gen && p.class == GOOD {
                s.enqueue(idx, STALE);
            }
        }
        // good pairs that were not queued (an end without address) follow
        for p in s.pairs.iter_mut() {
            if !p.queued && p.class == GOOD {
                p.class = STALE;
            }
        }
        s.gaps = Hist::default();
        s.mark = now;
        now
    }

    pub fn set_addr(&self, i: usize, addr: Ipv4Addr) {
        learn_addr(&self.state, i, addr);
    }

    pub fn node_stopped(&self, i: usize) {
        self.state.lock().unwrap().nodes[i].active = false;
    }

    pub fn with<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.lock().unwrap())
    }

    pub fn set_target(&self, i: usize, t: bool) {
        let mut s = self.state.lock().unwrap();
        s.nodes[i].target = t;
        if t {
            s.enqueue_node(i);
        }
    }

    pub fn set_paused(&self, p: bool) {
        let mut s = self.state.lock().unwrap();
        if s.paused && !p {
            s.resumed_at = s.now();
        }
        if p && !s.paused {
            s.pause_acked = false;
        }
        s.paused = p;
    }

    /// Pauses and returns once the loop has stopped sending and the echoes in
    /// flight have had time to come back: the last request is older than
    /// twice the largest round trip seen (at least 20 ms, at most 2 s).
    /// Returns how long that took.
    pub fn pause_and_drain(&self) -> f64 {
        let start = Instant::now();
        self.set_paused(true);
        wait_for(self, Duration::from_secs(2), |s| {
            let quiet = (2.0 * s.rtt_max).clamp(0.02, 2.0);
            s.pause_acked && (s.last_send_at < 0.0 || s.now() - s.last_send_at >= quiet)
        });
        start.elapsed().as_secs_f64()
    }

    /// CPU seconds the pinger thread has used so far.
    pub fn cpu_secs(&self) -> f64 {
        let tid = self.with(|s| s.tid);
        if tid == 0 {
            return 0.0;
        }
        sys::thread_cpu_secs(tid).unwrap_or(0.0)
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Node i's overlay address is `addr` (from the status poller): its pairs
/// can be probed from now on. A no-op for a stopped node or a known address.
pub fn learn_addr(state: &Mutex<State>, i: usize, addr: Ipv4Addr) {
    let mut s = state.lock().unwrap();
    if !s.nodes[i].active || s.nodes[i].addr == Some(addr) {
        return;
    }
    let now = s.now();
    s.nodes[i].addr = Some(addr);
    s.nodes[i].addr_at = now;
    s.enqueue_node(i);
}

/// Sends due probes of class `c` while `budget` allows and fewer than `limit`
/// were sent; returns how many were sent.
fn serve(s: &mut State, c: u8, limit: f64, budget: &mut f64, seq: &mut u16, keep_eff: f64) -> f64 {
    let now = s.now();
    let due = s.period(c, keep_eff);
    let mut used = 0.0;
    while *budget >= 1.0 && used < limit {
        let Some(&(idx, gen)) = s.queues[c as usize].front() else {
            break;
        };
        let idx = idx as usize;
        {
            let p = &s.pairs[idx];
            if !p.queued || p.gen != gen || p.class != c {
                s.queues[c as usize].pop_front();
                continue;
            }
        }
        if !s.eligible(idx) {
            s.queues[c as usize].pop_front();
            s.pairs[idx].queued = false;
            s.counts[c as usize] -= 1;
            continue;
        }
        let p = s.pairs[idx];
        if p.last_sent >= 0.0 && now - p.last_sent < due {
            break;
        }
        s.queues[c as usize].pop_front();
        // A pair whose previous probe went unanswered is unanswered again.
        let class = if c != UNANSWERED && p.last_sent >= 0.0 && p.last_reply_sent < p.last_sent {
            UNANSWERED
        } else {
            c
        };
        // The interval since this pair's previous unanswered-class probe
        // (not counting a pause): the resolution of its first reply.
        // Only when nothing came back since that probe (not even a late
        // reply to an older one): the pair was silent the whole interval.
        let gap = if class == UNANSWERED
            && p.last_p0
            && p.last_reply < p.last_sent
            && p.last_sent >= s.resumed_at
        {
            now - p.last_sent
        } else {
            NONE
        };
        if gap >= 0.0 {
            s.gaps.add(gap);
        }
        let n = s.n();
        let (i, j) = (idx / n, idx % n);
        *seq = seq.wrapping_add(1);
        let pkt = echo(*seq, i as u32, j as u32, now, gap);
        let sa = sockaddr(s.nodes[j].addr.unwrap());
        let fd = s.nodes[i].fd.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
        // SAFETY: valid buffer and sockaddr.
        let r = unsafe {
            libc::sendto(
                fd,
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &sa as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if r < 0 {
            s.send_errors += 1;
        } else {
            s.sent += 1;
            s.sent_by_class[class as usize] += 1;
        }
        s.last_send_at = now;
        let p = &mut s.pairs[idx];
        p.last_sent = now;
        p.last_p0 = class == UNANSWERED;
        if p.first_sent_since_mark < 0.0 {
            p.first_sent_since_mark = now;
        }
        s.enqueue(idx, class);
        *budget -= 1.0;
        used += 1.0;
    }
    used
}

/// Is the front of class `c`'s queue due (a cheap "has work" test)?
fn front_due(s: &State, c: u8, keep_eff: f64) -> bool {
    let now = s.now();
    let due = s.period(c, keep_eff);
    s.queues[c as usize].iter().take(8).any(|&(idx, gen)| {
        let p = &s.pairs[idx as usize];
        p.queued && p.gen == gen && p.class == c && (p.last_sent < 0.0 || now - p.last_sent >= due)
    })
}

fn run_loop(state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) {
    sys::boost_this_thread();
    state.lock().unwrap().tid = sys::gettid();
    let mut budget: f64 = 0.0;
    let mut last = Instant::now();
    let mut next_sample = 0.0;
    let mut buf = [0u8; 256];
    let mut seq: u16 = 0;
    // One epoll set over every node's socket (data = node index).
    // SAFETY: plain epoll syscalls on fds we own for the loop's lifetime.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    {
        let s = state.lock().unwrap();
        for (i, nd) in s.nodes.iter().enumerate() {
            if let Some(fd) = &nd.fd {
                let mut ev = libc::epoll_event {
                    events: libc::EPOLLIN as u32,
                    u64: i as u64,
                };
                unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) };
            }
        }
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut fds_snapshot: Vec<i32>;
    while !stop.load(Ordering::Relaxed) {
        {
            let mut s = state.lock().unwrap();
            let dt = last.elapsed().as_secs_f64();
            last = Instant::now();
            if s.paused {
                budget = 0.0;
                s.pause_acked = true;
            } else {
                budget = (budget + dt * s.rate).min(s.rate * 0.05 + 1.0);
                let keep_eff = s.keep_effective();
                // Unanswered pairs first, but answered ones keep their share
                // when one of them is due.
                let lower_due = front_due(&s, STALE, keep_eff) || front_due(&s, GOOD, keep_eff);
                let reserve = if lower_due {
                    (budget * s.good_share).floor()
                } else {
                    0.0
                };
                let first = (budget - reserve).max(0.0);
                serve(&mut s, UNANSWERED, first, &mut budget, &mut seq, keep_eff);
                serve(
                    &mut s,
                    STALE,
                    f64::INFINITY,
                    &mut budget,
                    &mut seq,
                    keep_eff,
                );
                serve(&mut s, GOOD, f64::INFINITY, &mut budget, &mut seq, keep_eff);
                serve(
                    &mut s,
                    UNANSWERED,
                    f64::INFINITY,
                    &mut budget,
                    &mut seq,
                    keep_eff,
                );
            }
            let now = s.now();
            let window = s.window();
            if next_sample > now + 1.0 {
                next_sample = now; // the clock was reset (a new engine run)
            }
            if now >= next_sample && !s.paused && now - s.resumed_at >= window {
                s.sample();
                next_sample = now + 0.5;
            }
            fds_snapshot = s
                .nodes
                .iter()
                .map(|nd| nd.fd.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1))
                .collect();
        }
        // SAFETY: valid epoll fd and event buffer.
        let r = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 5) };
        if r <= 0 {
            continue;
        }
        let ready: Vec<usize> = events[..r as usize]
            .iter()
            .map(|e| e.u64 as usize)
            .collect();
        let mut s = state.lock().unwrap();
        let now = s.now();
        for &i in &ready {
            let fd = fds_snapshot[i];
            loop {
                let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                let mut fl = std::mem::size_of::<libc::sockaddr_in>() as u32;
                // SAFETY: valid buffer and sockaddr storage.
                let len = unsafe {
                    libc::recvfrom(
                        fd,
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        0,
                        &mut from as *mut libc::sockaddr_in as *mut libc::sockaddr,
                        &mut fl,
                    )
                };
                if len <= 0 {
                    break;
                }
                let b = &buf[..len as usize];
                let Some((src, dst, sent_at, gap)) = parse_reply(b) else {
                    continue;
                };
                let n = s.n();
                if src != i || dst >= n {
                    continue;
                }
                let from_ip = Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr));
                if s.nodes[dst].addr != Some(from_ip) {
                    continue;
                }
                s.received += 1;
                let mark = s.mark;
                let idx = src * n + dst;
                let p = &mut s.pairs[idx];
                if sent_at < p.since {
                    continue; // a reply to a probe from before the pair's reset
                }
                if p.first_reply < 0.0 {
                    p.first_reply = now;
                }
                let fresh = sent_at >= mark;
                if p.first_since_mark < 0.0 && fresh {
                    p.first_since_mark = now;
                    p.first_gap = gap;
                }
                p.last_reply = now;
                p.last_reply_sent = p.last_reply_sent.max(sent_at);
                p.rtt_sum += now - sent_at;
                p.replies += 1;
                let rtt = now - sent_at;
                let (queued, class) = (p.queued, p.class);
                let want = if p.first_since_mark >= 0.0 {
                    GOOD
                } else {
                    STALE
                };
                s.rtt_max = s.rtt_max.max(rtt);
                if class != want {
                    if queued {
                        s.enqueue(idx, want);
                    } else {
                        s.pairs[idx].class = want;
                    }
                }
            }
        }
    }
    // SAFETY: our own epoll fd.
    unsafe { libc::close(ep) };
}

fn echo(seq: u16, src: u32, dst: u32, now: f64, gap: f64) -> [u8; 36] {
    let mut p = [0u8; 36];
    p[0] = 8; // echo request
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..12].copy_from_slice(&MAGIC.to_be_bytes());
    p[12..16].copy_from_slice(&src.to_be_bytes());
    p[16..20].copy_from_slice(&dst.to_be_bytes());
    p[20..28].copy_from_slice(&now.to_be_bytes());
    p[28..36].copy_from_slice(&gap.to_be_bytes());
    p
}

/// (src, dst, sent_at, gap) of one of our echo replies.
fn parse_reply(b: &[u8]) -> Option<(usize, usize, f64, f64)> {
    if b.len() < 36 || b[0] != 0 {
        return None;
    }
    let magic = u32::from_be_bytes(b[8..12].try_into().ok()?);
    if magic != MAGIC {
        return None;
    }
    let src = u32::from_be_bytes(b[12..16].try_into().ok()?) as usize;
    let dst = u32::from_be_bytes(b[16..20].try_into().ok()?) as usize;
    let sent_at = f64::from_be_bytes(b[20..28].try_into().ok()?);
    let gap = f64::from_be_bytes(b[28..36].try_into().ok()?);
    Some((src, dst, sent_at, gap))
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr_in {
    // SAFETY: zeroed sockaddr_in is valid.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as u16;
    sa.sin_addr.s_addr = u32::from(ip).to_be();
    sa
}

/// Waits until `cond` holds on the pinger state, or `timeout`.
pub fn wait_for(p: &Pinger, timeout: Duration, mut cond: impl FnMut(&State) -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if p.with(&mut cond) {
            return true;
        }
        if Instant::now() >= end || crate::cleanup::stopping() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_round_trips() {
        let mut p = echo(7, 3, 9, 12.5, 0.25);
        p[0] = 0; // as the reply comes back
        assert_eq!(parse_reply(&p), Some((3, 9, 12.5, 0.25)));
        p[8] ^= 1;
        assert_eq!(parse_reply(&p), None);
    }

    #[test]
    fn hist_quantiles_are_close() {
        let mut h = Hist::default();
        for k in 1..=1000 {
            h.add(k as f64 / 1000.0); // 1 ms .. 1 s
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((p50 - 0.5).abs() / 0.5 < 0.06, "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((p99 - 0.99).abs() / 0.99 < 0.06, "{p99}");
        assert_eq!(h.quantile(1.0).unwrap(), 1.0);
        assert_eq!(h.n, 1000);
    }

    /// The scheduler on a fake state: with the budget the limit, unanswered
    /// pairs get the budget first and good pairs keep their share.
    #[test]
    fn unanswered_pairs_go_first() {
        let n = 20;
        let mut s = State {
            t0: Instant::now(),
            nodes: (0..n)
                .map(|k| PNode {
                    fd: None,
                    active: true,
                    addr: Some(Ipv4Addr::new(10, 0, 0, k as u8 + 1)),
                    target: true,
                    started_at: 0.0,
                    addr_at: 0.0,
                })
                .collect(),
            pairs: vec![PairStat::default(); n * n],
            samples: vec![],
            rate: 1000.0,
            retry: RETRY_SECS,
            keep: KEEP_SECS,
            good_share: GOOD_SHARE,
            sent: 0,
            sent_by_class: [0; 3],
            received: 0,
            send_errors: 0,
            paused: false,
            pause_acked: false,
            resumed_at: f64::NEG_INFINITY,
            mark: 0.0,
            gaps: Hist::default(),
            last_send_at: NONE,
            rtt_max: 0.0,
            tid: 0,
            queues: Default::default(),
            counts: [0; 3],
        };
        for i in 0..n {
            s.enqueue_node(i);
        }
        assert_eq!(s.class_counts(), [n * (n - 1), 0, 0]);
        // Make half the pairs good (answered long ago, due again).
        let good: Vec<usize> = (0..n * n)
            .filter(|x| x % n != x / n && x % 2 == 0)
            .collect();
        for &idx in &good {
            s.pairs[idx].first_since_mark = 0.0;
            s.pairs[idx].last_sent = -100.0 + 0.5;
            s.pairs[idx].last_reply_sent = -100.0 + 0.5;
            s.enqueue(idx, GOOD);
        }
        assert_eq!(s.class_counts()[GOOD as usize], good.len());
        assert!(front_due(&s, GOOD, 1.0));
        // No sockets: sends fail (counted as errors), the scheduling is what we test.
        let mut budget = 100.0;
        let mut seq = 0;
        let reserve = (budget * s.good_share).floor();
        let a = serve(
            &mut s,
            UNANSWERED,
            budget - reserve,
            &mut budget,
            &mut seq,
            1.0,
        );
        let b = serve(&mut s, STALE, f64::INFINITY, &mut budget, &mut seq, 1.0);
        let c = serve(&mut s, GOOD, f64::INFINITY, &mut budget, &mut seq, 1.0);
        assert_eq!((a, b, c), (80.0, 0.0, 20.0));
        assert_eq!(s.send_errors, 100);
    }
}
