//! Desired versus actual WireGuard peers, as pure data.
//!
//! [`reconcile`] compares what membership wants with what the device holds and
//! returns the minimal list of [`PeerChange`]s; the shell ([`crate::wg`])
//! applies them. Peers meshpeer did not add (not in `owned`) are never
//! changed or removed.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::membership::DesiredPeer;

/// A handshake younger than this means the pair has a session now (the
/// device keeps one for 180 s after its handshake). A path may work with an
/// older one: an idle tunnel lapses and comes back on the next packet.
pub const FRESH_HANDSHAKE: Duration = Duration::from_secs(180);

/// A peer as the WireGuard device reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActualPeer {
    pub public_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<(IpAddr, u8)>,
    pub keepalive: Option<u16>,
    /// Age of the last handshake, if any.
    pub handshake_age: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// One change to apply to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    Add {
        public_key: [u8; 32],
        allowed_ips: Vec<Ipv4Net>,
        endpoint: Option<SocketAddr>,
        keepalive: u16,
    },
    Update {
        public_key: [u8; 32],
        /// New endpoint, if it changes.
        endpoint: Option<SocketAddr>,
        /// Replacement allowed IPs, if they change.
        allowed_ips: Option<Vec<Ipv4Net>>,
        keepalive: Option<u16>,
    },
    /// Turn keepalive off and on again: WireGuard then sends a keepalive at
    /// once, which starts a handshake (the periodic hole-punch retry for a
    /// peer without a session).
    Poke {
        public_key: [u8; 32],
        keepalive: u16,
    },
    Remove {
        public_key: [u8; 32],
    },
}

impl PeerChange {
    pub fn public_key(&self) -> &[u8; 32] {
        match self {
            PeerChange::Add { public_key, .. }
            | PeerChange::Update { public_key, .. }
            | PeerChange::Poke { public_key, .. }
            | PeerChange::Remove { public_key } => public_key,
        }
    }
}

/// Computes the changes that turn `actual` into `desired`.
///
/// `silent` says which peers' paths do not work (never established, or
/// broken since: see `nat::paths`); `rotation` picks which candidate
/// endpoint to try for such a peer (the shell passes a slowly increasing
/// counter, so an unreachable candidate is eventually replaced by the next
/// one); `poke`
/// (set by the shell when the counter advanced) makes every peer send a
/// keepalive now: that retries the hole punch of peers without a session,
/// and gives peers with one a packet in each direction every poke period,
/// which is what path liveness ([`crate::nat::paths::RX_SILENCE`]) watches
/// (WireGuard's own persistent keepalive goes quiet on the side that keeps
/// receiving).
pub fn reconcile(
    desired: &[DesiredPeer],
    actual: &[ActualPeer],
    owned: &BTreeSet<[u8; 32]>,
    rotation: usize,
    poke: bool,
    silent: &dyn Fn(&[u8; 32]) -> bool,
) -> Vec<PeerChange> {
    let mut changes = Vec::new();
    // Indexes by key: a linear search per peer made this quadratic (10^8
    // comparisons per step at 10,000 members).
    let by_key: std::collections::HashMap<&[u8; 32], &ActualPeer> =
        actual.iter().map(|a| (&a.public_key, a)).collect();
    let wanted: std::collections::HashSet<&[u8; 32]> =
        desired.iter().map(|d| &d.public_key).collect();
    for d in desired {
        let pick = |rot: usize| -> Option<SocketAddr> {
            if d.endpoints.is_empty() {
                None
            } else {
                Some(d.endpoints[rot % d.endpoints.len()])
            }
        };
        match by_key.get(&d.public_key).copied() {
            None => changes.push(PeerChange::Add {
                public_key: d.public_key,
                allowed_ips: d.allowed_ips.clone(),
                endpoint: pick(0),
                keepalive: d.keepalive,
            }),
            Some(a) if !owned.contains(&a.public_key) => {
                // Someone else's peer with a member's key: not ours to touch.
            }
            Some(a) => {
                // A path that works keeps the endpoint WireGuard roamed
                // to, however old its last handshake: an idle tunnel's
                // session lapses after 180 s (boringtun renews a session
                // only when data is sent, keepalives do not count) and
                // comes back with the next packet, to that endpoint.
                // Rotating through the record's candidates once the
                // handshake was 180 s old sent idle direct paths to other
                // homes' LAN addresses, which broke them: in an idle
                // mixed mesh of 100 that was most path changes at rest,
                // each an accusation and a refutation gossiped to all.
                // Only a path that went silent (a NAT dropped the
                // mapping, a router got a new address) tries the record's
                // candidates again.
                let keep = a.handshake_age.is_some() && !silent(&d.public_key);
                let endpoint = match a.endpoint {
                    None => pick(0),
                    Some(_) if keep => None,
                    Some(cur) => {
                        let want = pick(rotation);
                        (want != Some(cur) && want.is_some())
                            .then_some(want)
                            .flatten()
                    }
                };
                let mut have = a.allowed_ips.clone();
                have.sort();
                let mut want: Vec<(IpAddr, u8)> = d
                    .allowed_ips
                    .iter()
                    .map(|n| (IpAddr::V4(n.network()), n.prefix_len()))
                    .collect();
                want.sort();
                let allowed_ips = (have != want).then(|| d.allowed_ips.clone());
                // The device reports no keepalive as None (or 0): both mean off.
                let keepalive = (a.keepalive.unwrap_or(0) != d.keepalive).then_some(d.keepalive);
                if endpoint.is_some() || allowed_ips.is_some() || keepalive.is_some() {
                    changes.push(PeerChange::Update {
                        public_key: d.public_key,
                        endpoint,
                        allowed_ips,
                        keepalive,
                    });
                } else if poke && d.keepalive != 0 {
                    changes.push(PeerChange::Poke {
                        public_key: d.public_key,
                        keepalive: d.keepalive,
                    });
                }
            }
        }
    }
    for a in actual {
        if owned.contains(&a.public_key) && !wanted.contains(&a.public_key) {
            changes.push(PeerChange::Remove {
                public_key: a.public_key,
            });
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn talking(_: &[u8; 32]) -> bool {
        false
    }

    fn desired(k: u8, ip: &str, eps: &[&str]) -> DesiredPeer {
        DesiredPeer {
            public_key: [k; 32],
            allowed_ips: vec![Ipv4Net::from(ip.parse::<std::net::Ipv4Addr>().unwrap())],
            endpoints: eps.iter().map(|e| e.parse().unwrap()).collect(),
            keepalive: 25,
        }
    }

    fn actual(k: u8, ip: &str, ep: Option<&str>, age: Option<u64>) -> ActualPeer {
        ActualPeer {
            public_key: [k; 32],
            endpoint: ep.map(|e| e.parse().unwrap()),
            allowed_ips: vec![(ip.parse().unwrap(), 32)],
            keepalive: Some(25),
            handshake_age: age.map(Duration::from_secs),
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    #[test]
    fn adds_missing_removes_owned_extras_and_spares_foreign_peers() {
        let d = vec![desired(1, "10.0.0.1", &["192.0.2.1:51820"])];
        let a = vec![
            actual(2, "10.0.0.2", None, None),
            actual(3, "10.9.9.9", None, None),
        ];
        let owned: BTreeSet<_> = [[2u8; 32]].into();
        let c = reconcile(&d, &a, &owned, 0, false, &talking);
        assert_eq!(
            c,
            vec![
                PeerChange::Add {
                    public_key: [1; 32],
                    allowed_ips: vec!["10.0.0.1/32".parse().unwrap()],
                    endpoint: Some("192.0.2.1:51820".parse().unwrap()),
                    keepalive: 25
                },
                PeerChange::Remove {
                    public_key: [2; 32]
                },
            ]
        );
    }

    #[test]
    fn in_sync_means_no_changes() {
        let d = vec![desired(1, "10.0.0.1", &["192.0.2.1:51820"])];
        let a = vec![actual(1, "10.0.0.1", Some("192.0.2.1:51820"), Some(5))];
        let owned: BTreeSet<_> = [[1u8; 32]].into();
        assert!(reconcile(&d, &a, &owned, 7, false, &talking).is_empty());
    }

    #[test]
    fn keepalive_off_is_in_sync_with_a_device_that_reports_none() {
        // A public member sets no keepalive (0); the device reports it as
        // absent. Counting that as a difference re-applied the peer every
        // step (four UAPI writes a second per peer at rest).
        let mut d = desired(1, "10.0.0.1", &["192.0.2.1:51820"]);
        d.keepalive = 0;
        let mut a = actual(1, "10.0.0.1", Some("192.0.2.1:51820"), Some(5));
        a.keepalive = None;
        let owned: BTreeSet<_> = [[1u8; 32]].into();
        assert!(reconcile(&[d.clone()], &[a.clone()], &owned, 7, true, &talking).is_empty());
        a.keepalive = Some(0);
        assert!(reconcile(&[d], &[a], &owned, 7, true, &talking).is_empty());
    }

    #[test]
    fn endpoint_changes_update_in_place_unless_a_working_path_roamed() {
        let d = vec![desired(1, "10.0.0.1", &["192.0.2.7:51820"])];
        let owned: BTreeSet<_> = [[1u8; 32]].into();
        // Stale endpoint, no handshake: moved to the new candidate.
        let a = vec![actual(1, "10.0.0.1", Some("192.0.2.1:51820"), None)];
        assert_eq!(
            reconcile(&d, &a, &owned, 0, false, &talking),
            vec![PeerChange::Update {
                public_key: [1; 32],
                endpoint: Some("192.0.2.7:51820".parse().unwrap()),
                allowed_ips: None,
                keepalive: None
            }]
        );
        // Fresh handshake on a roamed endpoint: left alone.
        let a = vec![actual(1, "10.0.0.1", Some("198.51.100.1:4000"), Some(10))];
        assert!(reconcile(&d, &a, &owned, 0, false, &talking).is_empty());
        // So is a working path whose session lapsed while idle (the last
        // handshake long ago): its next packet goes where the last went.
        let a_idle = vec![actual(1, "10.0.0.1", Some("198.51.100.1:4000"), Some(600))];
        for rotation in 0..4 {
            assert!(reconcile(&d, &a_idle, &owned, rotation, false, &talking).is_empty());
        }
        // ... unless that path went silent (e.g. the peer's router got a new
        // address): the record's candidates are tried again.
        let silent = |_: &[u8; 32]| true;
        assert!(matches!(
            reconcile(&d, &a, &owned, 0, false, &silent)[0],
            PeerChange::Update { endpoint: Some(e), .. } if e.to_string() == "192.0.2.7:51820"
        ));
        // Allowed IP changed (the member moved address after a conflict).
        let a = vec![actual(1, "10.0.0.9", Some("192.0.2.7:51820"), Some(10))];
        assert!(matches!(
            reconcile(&d, &a, &owned, 0, false, &talking)[0],
            PeerChange::Update {
                allowed_ips: Some(_),
                endpoint: None,
                ..
            }
        ));
    }

    #[test]
    fn pokes_reach_every_peer() {
        let d = vec![
            desired(1, "10.0.0.1", &["192.0.2.1:1"]),
            desired(2, "10.0.0.2", &["192.0.2.2:1"]),
        ];
        let owned: BTreeSet<_> = [[1u8; 32], [2u8; 32]].into();
        let a = vec![
            actual(1, "10.0.0.1", Some("192.0.2.1:1"), Some(3)),
            actual(2, "10.0.0.2", Some("192.0.2.2:1"), None),
        ];
        assert!(reconcile(&d, &a, &owned, 0, false, &talking).is_empty());
        let pokes = reconcile(&d, &a, &owned, 0, true, &talking);
        assert_eq!(
            pokes,
            vec![
                PeerChange::Poke {
                    public_key: [1; 32],
                    keepalive: 25
                },
                PeerChange::Poke {
                    public_key: [2; 32],
                    keepalive: 25
                }
            ]
        );
    }

    #[test]
    fn relayed_addresses_move_between_peers() {
        let mut relay = desired(1, "10.0.0.1", &["192.0.2.1:1"]);
        relay.allowed_ips.push("10.0.0.2/32".parse().unwrap());
        let mut relayed = desired(2, "10.0.0.2", &["192.0.2.2:1"]);
        relayed.allowed_ips.clear();
        let owned: BTreeSet<_> = [[1u8; 32], [2u8; 32]].into();
        let a = vec![
            actual(1, "10.0.0.1", Some("192.0.2.1:1"), Some(3)),
            actual(2, "10.0.0.2", Some("192.0.2.2:1"), None),
        ];
        let c = reconcile(&[relay, relayed], &a, &owned, 0, false, &talking);
        assert_eq!(c.len(), 2);
        assert!(
            matches!(&c[0], PeerChange::Update { allowed_ips: Some(ips), .. } if ips.len() == 2)
        );
        assert!(
            matches!(&c[1], PeerChange::Update { allowed_ips: Some(ips), .. } if ips.is_empty())
        );
    }

    #[test]
    fn rotation_walks_the_candidates_without_a_handshake() {
        let d = vec![desired(1, "10.0.0.1", &["192.0.2.1:1", "192.0.2.2:1"])];
        let owned: BTreeSet<_> = [[1u8; 32]].into();
        let a = vec![actual(1, "10.0.0.1", Some("192.0.2.1:1"), None)];
        assert!(reconcile(&d, &a, &owned, 0, false, &talking).is_empty());
        assert!(matches!(
            reconcile(&d, &a, &owned, 1, false, &talking)[0],
            PeerChange::Update { endpoint: Some(e), .. } if e.to_string() == "192.0.2.2:1"
        ));
    }
}
