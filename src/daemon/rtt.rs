//! Round-trip times to members: an ICMP echo to each member's overlay
//! address (surge-ping), sent on the overlay interface, so the figure is the
//! path in use, direct or through a relay. Each member is probed a few
//! seconds after it appears, again whenever its path changes, and then every
//! [`PROBE_EVERY`]; `status` shows the last answer.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// How often each member is probed once known, in a mesh of up to
/// `PROBE_EVERY / PROBE_GAP` members; see [`probe_period`].
pub const PROBE_EVERY: Duration = Duration::from_secs(30);
/// The least mean gap between two probes of a node (at most two a second,
/// whatever the mesh size).
const PROBE_GAP: Duration = Duration::from_millis(500);
/// How often each of `members` members is probed: every [`PROBE_EVERY`],
/// or less often in a large mesh, so that a node's probing stays within
/// one echo per [`PROBE_GAP`] (each is a round trip through two data
/// planes; at hundreds of members a fixed period would make it a steady
/// cost that grows with the mesh). `status` then shows an older RTT.
pub fn probe_period(members: usize) -> Duration {
    PROBE_EVERY.max(PROBE_GAP * members as u32)
}

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
        let period = probe_period(members.len());
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
            let jitter = rand::random::<u64>() % (period.as_millis() as u64 / 5);
            *due = now + period - period / 10 + Duration::from_millis(jitter);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_stays_within_its_budget_at_any_mesh_size() {
        assert_eq!(probe_period(0), PROBE_EVERY);
        assert_eq!(probe_period(60), PROBE_EVERY);
        for n in [61usize, 250, 1000] {
            let per_sec = n as f64 / probe_period(n).as_secs_f64();
            assert!(
                per_sec <= 1.0 / PROBE_GAP.as_secs_f64() + 1e-9,
                "{n}: {per_sec}/s"
            );
        }
    }
}
