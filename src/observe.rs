//! Endpoints that members observe: where a member's WireGuard packets
//! really come from, as its peers' devices see them (WireGuard moves a
//! peer's endpoint to the source of its latest authenticated packet).
//!
//! A node that cannot run STUN on its WireGuard socket (the kernel backend)
//! does not know its mapped endpoint; its public peers do. Each member
//! publishes, signed, the endpoints it observes for members whose NAT is
//! unknown (at most [`MAX_SEEN`]); such a member adds the endpoint its
//! observers agree on to its own record, so members behind other NATs can
//! punch to it. Sans-IO: the daemon feeds device readings and gossip in.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::proto::{self, domain, PublicKeyBytes, Signed, WireError};

/// The most observations one member publishes.
pub const MAX_SEEN: usize = 32;
const MAX_BYTES: usize = 4096;

/// One observation: `node_key`'s WireGuard packets arrive from `endpoint`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Seen {
    pub node_key: PublicKeyBytes,
    pub endpoint: SocketAddr,
}

/// What one member observes, signed by it (chitchat key `seen`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observations {
    pub network_key: PublicKeyBytes,
    pub observer: PublicKeyBytes,
    /// Unix milliseconds; only a newer value replaces an older one.
    pub issued_at: u64,
    pub seen: Vec<Seen>,
}

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("observations are not base64")]
    Base64,
    #[error("observations too large ({0} bytes)")]
    TooLarge(usize),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("observations are for another network")]
    WrongNetwork,
    #[error("observations published by {gossip_id} are signed by {signer}")]
    WrongNode { gossip_id: String, signer: String },
    #[error("more than {MAX_SEEN} observations")]
    TooMany,
}

impl Observations {
    pub fn sign(&self, key: &ed25519_dalek::SigningKey) -> String {
        let body = proto::encode(self);
        let signature = proto::sign(key, domain::OBSERVATIONS, &body);
        base64::engine::general_purpose::STANDARD.encode(proto::encode(&Signed { body, signature }))
    }
}

/// Decodes and checks observations published under `gossip_id`.
pub fn verify_observations(
    text: &str,
    network_key: &PublicKeyBytes,
    gossip_id: &PublicKeyBytes,
) -> Result<Observations, ObserveError> {
    if text.len() > MAX_BYTES * 4 / 3 + 4 {
        return Err(ObserveError::TooLarge(text.len() * 3 / 4));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| ObserveError::Base64)?;
    let signed: Signed = proto::decode("observations", &bytes)?;
    let body: Observations = proto::decode("observations body", &signed.body)?;
    if &body.network_key != network_key {
        return Err(ObserveError::WrongNetwork);
    }
    if &body.observer != gossip_id {
        return Err(ObserveError::WrongNode {
            gossip_id: proto::short_key(gossip_id),
            signer: proto::short_key(&body.observer),
        });
    }
    if body.seen.len() > MAX_SEEN {
        return Err(ObserveError::TooMany);
    }
    proto::verify(
        &body.observer,
        domain::OBSERVATIONS,
        &signed.body,
        &signed.signature,
        "observations",
    )?;
    Ok(body)
}

/// A member as the observer sees it.
pub struct Observed<'a> {
    pub node_key: PublicKeyBytes,
    /// Whether its record says its NAT is unknown (no STUN on its socket).
    pub nat_unknown: bool,
    /// The endpoints its record lists.
    pub candidates: &'a [SocketAddr],
    /// The endpoint our device has for it, when a direct session is up.
    pub device_endpoint: Option<SocketAddr>,
}

/// What this member should publish: the device endpoints of members with
/// an unknown NAT, when that endpoint is not one their record already
/// lists (their own address: nothing to learn), sorted, at most MAX_SEEN.
pub fn to_publish(members: &[Observed<'_>]) -> Vec<Seen> {
    let mut seen: Vec<Seen> = members
        .iter()
        .filter(|m| m.nat_unknown)
        .filter_map(|m| {
            let e = m.device_endpoint?;
            (!m.candidates.contains(&e)).then_some(Seen {
                node_key: m.node_key,
                endpoint: e,
            })
        })
        .collect();
    seen.sort();
    seen.truncate(MAX_SEEN);
    seen
}

/// Keeps the latest verified observations of each observer.
#[derive(Default)]
pub struct ObservationBook {
    by_observer: HashMap<PublicKeyBytes, (String, Observations)>,
}

impl ObservationBook {
    /// Takes one observer's published value; returns an error for a bad
    /// one (the caller logs it once). An older value than the one held is
    /// ignored (a replay).
    pub fn handle(
        &mut self,
        network_key: &PublicKeyBytes,
        observer: &PublicKeyBytes,
        text: &str,
    ) -> Result<(), ObserveError> {
        if self
            .by_observer
            .get(observer)
            .is_some_and(|(t, _)| t == text)
        {
            return Ok(());
        }
        let obs = verify_observations(text, network_key, observer)?;
        if self
            .by_observer
            .get(observer)
            .is_some_and(|(_, held)| held.issued_at >= obs.issued_at)
        {
            return Ok(());
        }
        self.by_observer.insert(*observer, (text.to_string(), obs));
        Ok(())
    }

    /// Forgets observers that are no longer live members.
    pub fn retain(&mut self, live: impl Fn(&PublicKeyBytes) -> bool) {
        self.by_observer.retain(|k, _| live(k));
    }

    /// Where the live observers see `me`, most often seen first, leaving
    /// out our own addresses (`local`: a LAN observer teaches nothing).
    pub fn endpoints_of(&self, me: &PublicKeyBytes, local: &[IpAddr]) -> Vec<SocketAddr> {
        let mut count: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        for (_, obs) in self.by_observer.values() {
            // One vote per observer and endpoint: listing an endpoint 32
            // times counts once.
            let mine: std::collections::BTreeSet<SocketAddr> = obs
                .seen
                .iter()
                .filter(|s| &s.node_key == me && !local.contains(&s.endpoint.ip()))
                .map(|s| s.endpoint)
                .collect();
            for e in mine {
                *count.entry(e).or_default() += 1;
            }
        }
        let mut v: Vec<(usize, SocketAddr)> = count.into_iter().map(|(e, n)| (n, e)).collect();
        v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        v.into_iter().map(|(_, e)| e).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    #[test]
    fn signed_observations_verify_and_forgeries_do_not() {
        let net = [9u8; 32];
        let y = key(1);
        let yk = y.verifying_key().to_bytes();
        let obs = Observations {
            network_key: net,
            observer: yk,
            issued_at: 5,
            seen: vec![Seen {
                node_key: [7; 32],
                endpoint: "198.18.0.9:40000".parse().unwrap(),
            }],
        };
        let text = obs.sign(&y);
        assert_eq!(verify_observations(&text, &net, &yk).unwrap(), obs);
        // Published under someone else's id, or for another network.
        let zk = key(2).verifying_key().to_bytes();
        assert!(matches!(
            verify_observations(&text, &net, &zk),
            Err(ObserveError::WrongNode { .. })
        ));
        assert!(matches!(
            verify_observations(&text, &[8; 32], &yk),
            Err(ObserveError::WrongNetwork)
        ));
        // Signed by a key other than the observer's.
        let forged = obs.sign(&key(2));
        assert!(verify_observations(&forged, &net, &yk).is_err());
        assert!(matches!(
            verify_observations("%%%", &net, &yk),
            Err(ObserveError::Base64)
        ));
    }

    #[test]
    fn the_book_keeps_the_newest_and_counts_agreement() {
        let net = [9u8; 32];
        let me = [7u8; 32];
        let e1: SocketAddr = "198.18.0.9:40000".parse().unwrap();
        let e2: SocketAddr = "198.18.0.9:40001".parse().unwrap();
        let lan: SocketAddr = "192.168.1.2:51820".parse().unwrap();
        let mut book = ObservationBook::default();
        let publish = |k: &SigningKey, at: u64, e: SocketAddr| {
            Observations {
                network_key: net,
                observer: k.verifying_key().to_bytes(),
                issued_at: at,
                seen: vec![Seen {
                    node_key: me,
                    endpoint: e,
                }],
            }
            .sign(k)
        };
        let (a, b, c) = (key(1), key(2), key(3));
        let ak = a.verifying_key().to_bytes();
        book.handle(&net, &ak, &publish(&a, 10, e1)).unwrap();
        book.handle(&net, &b.verifying_key().to_bytes(), &publish(&b, 10, e1))
            .unwrap();
        book.handle(&net, &c.verifying_key().to_bytes(), &publish(&c, 10, lan))
            .unwrap();
        let local = ["192.168.1.2".parse().unwrap()];
        assert_eq!(book.endpoints_of(&me, &local), vec![e1]);
        // An older value from `a` (a replay) changes nothing; a newer one does.
        book.handle(&net, &ak, &publish(&a, 9, e2)).unwrap();
        assert_eq!(book.endpoints_of(&me, &local), vec![e1]);
        book.handle(&net, &ak, &publish(&a, 11, e2)).unwrap();
        assert_eq!(book.endpoints_of(&me, &local), vec![e1, e2]);
        book.retain(|k| *k != ak);
        assert_eq!(book.endpoints_of(&me, &local), vec![e1]);
        // One observer listing an endpoint many times is one vote: `b` and
        // `c` agree on e1, a stuffing `a` cannot outvote them with e2.
        let stuffed = Observations {
            network_key: net,
            observer: ak,
            issued_at: 20,
            seen: vec![
                Seen {
                    node_key: me,
                    endpoint: e2
                };
                MAX_SEEN
            ],
        }
        .sign(&a);
        book.handle(&net, &ak, &stuffed).unwrap();
        book.handle(&net, &c.verifying_key().to_bytes(), &publish(&c, 11, e1))
            .unwrap();
        assert_eq!(book.endpoints_of(&me, &local), vec![e1, e2]);
    }

    #[test]
    fn only_unknown_nats_with_a_new_endpoint_are_published() {
        let e: SocketAddr = "198.18.0.9:40000".parse().unwrap();
        let host: SocketAddr = "198.18.0.9:51820".parse().unwrap();
        let list = [host];
        let m = |k: u8, unknown: bool, dev: Option<SocketAddr>| Observed {
            node_key: [k; 32],
            nat_unknown: unknown,
            candidates: &list,
            device_endpoint: dev,
        };
        let out = to_publish(&[
            m(1, true, Some(e)),
            m(2, false, Some(e)),
            m(3, true, Some(host)),
            m(4, true, None),
        ]);
        assert_eq!(
            out,
            vec![Seen {
                node_key: [1; 32],
                endpoint: e
            }]
        );
    }
}
