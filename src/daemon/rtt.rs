//! Round-trip times to members: an ICMP echo to each member's overlay
//! address (surge-ping), sent on the overlay interface, so the figure is the
//! path in use, direct or through a relay. Each member is probed a few
//! seconds after it appears, again whenever its path changes, and then every
//! [`PROBE_EVERY`]; `status` shows the last answer.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// How often each member is probed once known.
pub const PROBE_EVERY: Duration = Duration::from_secs(30);
/// How long a probe waits for its echo reply.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

type Key = [u8; 32];

pub struct Prober {
    client: Option<surge_ping::Client>,
    tx: mpsc::UnboundedSender<(Key, Option<Duration>)>,
    rx: mpsc::UnboundedReceiver<(Key, Option<Duration>)>,
    next: HashMap<Key, Instant>,
    in_flight: HashMap<Key, Instant>,
    /// The last probe's result per member (None: no echo within the timeout).
    pub rtt: HashMap<Key, Option<Duration>>,
}

impl Prober {
    /// An ICMP socket bound to the overlay interface. Without one (no
    /// CAP_NET_RAW and no ping group), RTTs are not measured; said once.
    pub fn new(interface: &str) -> Self {
        let config = surge_ping::Config::builder().interface(interface).build();
        let client = match surge_ping::Client::new(&config) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open an ICMP socket; status will show no round-trip times");
                None
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            client,
            tx,
            rx,
            next: HashMap::new(),
            in_flight: HashMap::new(),
            rtt: HashMap::new(),
        }
    }

    /// Takes finished probes in, and starts the ones due. `members` are the
    /// members to measure (WireGuard key, overlay address); `changed` are
    /// those whose path just changed (probed again now).
    pub fn poll(&mut self, now: Instant, members: &[(Key, Ipv4Addr)], changed: &[Key]) {
        while let Ok((k, r)) = self.rx.try_recv() {
            self.in_flight.remove(&k);
            if self.next.contains_key(&k) {
                self.rtt.insert(k, r);
            }
        }
        self.next.retain(|k, _| members.iter().any(|(m, _)| m == k));
        self.rtt.retain(|k, _| self.next.contains_key(k));
        let Some(client) = &self.client else { return };
        for (k, ip) in members {
            let due = self.next.entry(*k).or_insert_with(|| {
                // New member: measure soon, spread so that a node learning
                // hundreds of members does not probe them all at once.
                now + Duration::from_millis(2_000 + rand::random::<u64>() % 3_000)
            });
            if changed.contains(k) {
                *due = now;
            }
            if *due > now || self.in_flight.contains_key(k) {
                continue;
            }
            // Next regular probe, jittered by up to a tenth either way.
            let jitter = rand::random::<u64>() % (PROBE_EVERY.as_millis() as u64 / 5);
            *due = now + PROBE_EVERY - PROBE_EVERY / 10 + Duration::from_millis(jitter);
            self.in_flight.insert(*k, now);
            let client = client.clone();
            let tx = self.tx.clone();
            let (k, ip) = (*k, *ip);
            tokio::spawn(async move {
                let mut pinger = client
                    .pinger(IpAddr::V4(ip), surge_ping::PingIdentifier(rand::random()))
                    .await;
                pinger.timeout(PROBE_TIMEOUT);
                let r = pinger
                    .ping(surge_ping::PingSequence(0), b"meshpeer rtt")
                    .await
                    .ok()
                    .map(|(_, d)| d);
                let _ = tx.send((k, r));
            });
        }
        // A probe task that vanished (runtime shutting down) must not block
        // the member for good.
        self.in_flight
            .retain(|_, t| now.saturating_duration_since(*t) < PROBE_TIMEOUT * 3);
    }
}
