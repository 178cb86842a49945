//! The pinger: one thread that owns one ICMP socket per node namespace and
//! pings every ordered pair of live nodes over the overlay (or the underlay,
//! for the floor measurement).
//!
//! Sockets are `SOCK_DGRAM`/`IPPROTO_ICMP` ("ping sockets", the kernel picks
//! the echo id and demultiplexes replies per socket); each is created after
//! `setns` into the node's namespace, so one process pings from everywhere.
//! The loop is rate-limited (`rate` echo requests per second in total) so the
//! measuring side stays a small, known load; pairs without a recent reply are
//! probed every `retry` seconds, pairs known good are re-probed every `keep`
//! seconds to keep the reachability time line honest (when the rate cap is
//! the limit, every pair is probed once per `pairs / rate` seconds).
//!
//! Per ordered pair (i → j) it records: the first reply since the pair's
//! `since` mark (reset when i or j (re)starts), the last reply and last send.
//! A pair is *reachable now* when it got a reply within `window` seconds.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::sys;

const MAGIC: u32 = 0x6d70_746e; // "mptn"
const NONE: f64 = -1.0;

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
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub t: f64,
    pub live: usize,
    pub expected: usize,
    pub reachable: usize,
}

pub struct State {
    pub t0: Instant,
    pub nodes: Vec<PNode>,
    pub pairs: Vec<PairStat>,
    pub samples: Vec<Sample>,
    pub rate: f64,
    pub retry: f64,
    pub keep: f64,
    pub sent: u64,
    pub received: u64,
    pub send_errors: u64,
    pub paused: bool,
    /// When the pinger last resumed after a pause: the time line waits one
    /// reach window after it (old replies would read as unreachable pairs).
    pub resumed_at: f64,
    /// The last `set_mark`: `first_since_mark` counts only replies to echo
    /// requests sent at or after it.
    pub mark: f64,
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
    /// How long a reply counts as "reachable now".
    pub fn window(&self) -> f64 {
        let live = self.live().len();
        let pairs = (live * live.saturating_sub(1)) as f64;
        (2.5 * self.keep.max(pairs / self.rate)).max(2.5)
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
            })
            .collect();
        let n = nodes.len();
        let state = Arc::new(Mutex::new(State {
            t0: Instant::now(),
            nodes,
            pairs: vec![PairStat::default(); n * n],
            samples: vec![],
            rate: rate.max(10.0),
            retry: 0.25,
            keep: 1.0,
            sent: 0,
            received: 0,
            send_errors: 0,
            paused: true,
            resumed_at: f64::NEG_INFINITY,
            mark: 0.0,
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
        }
        s.samples.clear();
        s.sent = 0;
        s.received = 0;
        s.send_errors = 0;
        s.paused = false;
        s.resumed_at = f64::NEG_INFINITY;
        s.mark = 0.0;
    }

    pub fn now(&self) -> f64 {
        self.state.lock().unwrap().now()
    }

    /// Node i (re)started: its pairs start over.
    pub fn node_started(&self, i: usize, addr: Option<Ipv4Addr>) {
        let mut s = self.state.lock().unwrap();
        let now = s.now();
        let n = s.n();
        s.nodes[i].active = true;
        s.nodes[i].addr = addr;
        s.nodes[i].target = true;
        for j in 0..n {
            for idx in [i * n + j, j * n + i] {
                s.pairs[idx] = PairStat {
                    since: now,
                    ..PairStat::default()
                };
            }
        }
    }

    /// Starts a new "replied since" period (after a disruptive step).
    pub fn set_mark(&self) -> f64 {
        let mut s = self.state.lock().unwrap();
        let now = s.now();
        for p in s.pairs.iter_mut() {
            p.first_since_mark = NONE;
        }
        s.mark = now;
        now
    }

    pub fn set_addr(&self, i: usize, addr: Ipv4Addr) {
        let mut s = self.state.lock().unwrap();
        s.nodes[i].addr = Some(addr);
    }

    pub fn node_stopped(&self, i: usize) {
        self.state.lock().unwrap().nodes[i].active = false;
    }

    pub fn with<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.lock().unwrap())
    }

    pub fn set_target(&self, i: usize, t: bool) {
        self.state.lock().unwrap().nodes[i].target = t;
    }

    pub fn set_paused(&self, p: bool) {
        let mut s = self.state.lock().unwrap();
        if s.paused && !p {
            s.resumed_at = s.now();
        }
        s.paused = p;
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

fn run_loop(state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) {
    sys::boost_this_thread();
    let mut cursor: usize = 0;
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
            } else {
                budget = (budget + dt * s.rate).min(s.rate * 0.05 + 1.0);
            }
            let now = s.now();
            let n = s.n();
            let window = s.window();
            // Scan a bounded slice of the pair matrix per turn (the cursor
            // persists), sending to pairs that are due while budget lasts.
            let mut scanned = 0;
            let limit = (n * n).min(4096);
            while budget >= 1.0 && scanned < limit && n > 1 {
                let idx = cursor % (n * n);
                cursor = cursor.wrapping_add(1);
                scanned += 1;
                let (i, j) = (idx / n, idx % n);
                if i == j || !s.nodes[i].active || !s.nodes[j].active || !s.nodes[j].target {
                    continue;
                }
                let Some(dst) = s.nodes[j].addr else { continue };
                if s.nodes[i].addr.is_none() {
                    continue;
                }
                let p = s.pairs[idx];
                let good =
                    p.last_reply >= p.since && p.last_reply >= 0.0 && now - p.last_reply <= window;
                let due = if good { s.keep } else { s.retry };
                if p.last_sent >= 0.0 && now - p.last_sent < due {
                    continue;
                }
                seq = seq.wrapping_add(1);
                let pkt = echo(seq, i as u32, j as u32, now);
                let sa = sockaddr(dst);
                let fd = s.nodes[i].fd.as_ref().unwrap().as_raw_fd();
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
                }
                s.pairs[idx].last_sent = now;
                budget -= 1.0;
            }
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
                if b.len() < 8 + 20 || b[0] != 0 {
                    continue;
                }
                let magic = u32::from_be_bytes(b[8..12].try_into().unwrap());
                let src = u32::from_be_bytes(b[12..16].try_into().unwrap()) as usize;
                let dst = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
                let sent_at = f64::from_be_bytes(b[20..28].try_into().unwrap());
                let n = s.n();
                if magic != MAGIC || src != i || dst >= n {
                    continue;
                }
                let from_ip = Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr));
                if s.nodes[dst].addr != Some(from_ip) {
                    continue;
                }
                s.received += 1;
                let mark = s.mark;
                let p = &mut s.pairs[src * n + dst];
                if sent_at < p.since {
                    continue; // a reply to a probe from before the pair's reset
                }
                if p.first_reply < 0.0 {
                    p.first_reply = now;
                }
                if p.first_since_mark < 0.0 && sent_at >= mark {
                    p.first_since_mark = now;
                }
                p.last_reply = now;
                p.rtt_sum += now - sent_at;
                p.replies += 1;
            }
        }
    }
    // SAFETY: our own epoll fd.
    unsafe { libc::close(ep) };
}

fn echo(seq: u16, src: u32, dst: u32, now: f64) -> [u8; 36] {
    let mut p = [0u8; 36];
    p[0] = 8; // echo request
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..12].copy_from_slice(&MAGIC.to_be_bytes());
    p[12..16].copy_from_slice(&src.to_be_bytes());
    p[16..20].copy_from_slice(&dst.to_be_bytes());
    p[20..28].copy_from_slice(&now.to_be_bytes());
    p
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
        std::thread::sleep(Duration::from_millis(100));
    }
}
