//! What this node trusts: its network, its clock and the revocations it
//! holds, shared by everything that checks input from other members (the
//! TLS verifier, the gossip validator, the join handler).
//!
//! [`TrustState`] is also chitchat's [`Validator`]: every value gossip
//! stores passes [`TrustState::validate_value`] first (signature, network,
//! owner, size, and a version equal to the one signed inside), so no member
//! can make others store what its owner did not sign (proto/PROTOCOL.md
//! §4.1). No I/O: the clock is a function given at construction (the
//! system clock in the daemon, a virtual one in tests and simulation).

use std::sync::{Arc, RwLock};

use chitchat::Validator;

use crate::admission::{
    self, AdmissionError, Credential, Network, RevocationList, Revocations, VerifiedAdmission,
};
use crate::liveness;
use crate::observe;
use crate::proto::{self, PublicKeyBytes};
use crate::record::{self, Trust};

/// The chitchat key under which a member publishes its record.
pub const RECORD_KEY: &str = "record";
/// The chitchat key of a member's signed observations ([`crate::observe`]).
pub const SEEN_KEY: &str = "seen";
/// The chitchat key of a member's refutations ([`liveness::Alive`]).
pub const ALIVE_KEY: &str = "alive";
/// The chitchat key of a member's accusations ([`liveness::Suspicions`]).
pub const SUSPECTS_KEY: &str = "suspects";
/// The node that holds the revocation list (owned by nobody: the list is
/// signed by the network key).
pub const AUTHORITY_NODE: &str = "authority";
/// The authority node's only key.
pub const REVOKED_KEY: &str = "revoked";

/// A clock: unix seconds.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(crate::clock::unix_secs)
}

/// The network, the clock and the revocations; cheap to share.
pub struct TrustState {
    pub network: Network,
    revoked: RwLock<Revocations>,
    clock: Clock,
}

/// Who a peer is, from its TLS certificate.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub node_key: PublicKeyBytes,
    pub credential: Credential,
    pub admission: VerifiedAdmission,
    /// Stamped (a member), or only a joiner (may only ask to join).
    pub stamped: bool,
}

impl TrustState {
    pub fn new(network: Network, clock: Clock) -> Self {
        TrustState {
            network,
            revoked: RwLock::new(Revocations::default()),
            clock,
        }
    }

    pub fn now_unix(&self) -> u64 {
        (self.clock)()
    }

    /// Runs `f` with the current [`Trust`] (network, clock, revocations).
    pub fn with_trust<R>(&self, f: impl FnOnce(&Trust<'_>) -> R) -> R {
        let revoked = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        f(&Trust {
            network_key: &self.network.key,
            now_unix: self.now_unix(),
            revoked: &revoked,
        })
    }

    /// A copy of the revocations held.
    pub fn revocations(&self) -> Revocations {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Takes a newer revocation list (already verified); true if it replaced
    /// the one held.
    pub fn update_revocations(&self, list: RevocationList, text: String) -> bool {
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .update(list, text)
    }

    /// Whether a peer that was admitted at its handshake has been revoked
    /// since (its node key or its token).
    pub fn peer_revoked(&self, peer: &PeerIdentity) -> bool {
        let r = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        r.node_revoked(&peer.node_key) || r.token_revoked(&peer.admission.token_id)
    }

    /// Checks a peer's credential: a member's (admission and stamp), or a
    /// joiner's (admission only, its token unexpired now).
    pub fn check_credential(
        &self,
        credential: &Credential,
        node_key: &PublicKeyBytes,
    ) -> Result<PeerIdentity, AdmissionError> {
        let revoked = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        let now = self.now_unix();
        let member = credential.stamp.as_ref().map(|stamp| {
            admission::verify_credential(
                &credential.admission,
                stamp,
                &self.network.key,
                node_key,
                now,
                &revoked,
            )
        });
        let (admission, stamped) = match member {
            Some(Ok(a)) => (a, true),
            Some(Err(e)) if !matches!(e, AdmissionError::StamperRevoked(_)) => return Err(e),
            // No stamp (a joiner), or one made by a member revoked since: a
            // joiner, who may ask for a (new) stamp while its token is good.
            _ => (
                admission::verify_joiner(
                    &credential.admission,
                    &self.network.key,
                    node_key,
                    now,
                    &revoked,
                )?,
                false,
            ),
        };
        Ok(PeerIdentity {
            node_key: *node_key,
            credential: credential.clone(),
            admission,
            stamped,
        })
    }

    /// Whether `value` may be stored as `key` of `node_id` at `version`
    /// (see the module documentation).
    pub fn validate_value(
        &self,
        node_id: &str,
        key: &str,
        value: &str,
        version: u64,
    ) -> Result<(), String> {
        if node_id == AUTHORITY_NODE {
            if key != REVOKED_KEY {
                return Err(format!("the authority node has no key {key:?}"));
            }
            let list = admission::verify_revocations(value, &self.network.key)
                .map_err(|e| e.to_string())?;
            return expect_version(list.issued_at_ms, version);
        }
        let owner = proto::parse_node_id(node_id)
            .ok_or_else(|| format!("node id {node_id:?} is not a meshpeer key"))?;
        if self
            .revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .node_revoked(&owner)
        {
            return Err("revoked".into());
        }
        let nk = &self.network.key;
        let signed = match key {
            RECORD_KEY => self
                .with_trust(|t| record::verify_record(value, t, Some(&owner)))
                .map(|r| r.body.version)
                .map_err(|e| e.to_string())?,
            SEEN_KEY => observe::verify_observations(value, nk, &owner)
                .map(|o| o.issued_at)
                .map_err(|e| e.to_string())?,
            ALIVE_KEY => liveness::verify_alive(value, nk, &owner)
                .map(|a| a.issued_at_ms)
                .map_err(|e| e.to_string())?,
            SUSPECTS_KEY => liveness::verify_suspicions(value, nk, &owner)
                .map(|s| s.issued_at_ms)
                .map_err(|e| e.to_string())?,
            other => return Err(format!("unknown key {other:?}")),
        };
        expect_version(signed, version)
    }
}

/// A seed's decision on a `Join` (proto/PROTOCOL.md §6): the joiner's
/// credential (admission only) checked against our clock and revocations,
/// then a stamp signed by us (`signing`, admitted by `our_admission`) at our
/// clock's time. Sans-IO: the daemon's join handler and the simulation call
/// it.
pub fn admit_joiner(
    trust: &TrustState,
    signing: &ed25519_dalek::SigningKey,
    our_admission: &crate::proto::Signed,
    joiner: &PeerIdentity,
) -> Result<crate::proto::Signed, crate::gossip::transport::Refusal> {
    use crate::gossip::transport::Refusal;
    // Checked at the handshake; again now (the token may have expired
    // since, or a revocation arrived: a member whose stamper was revoked
    // is a joiner again and gets a new stamp while its token is good).
    let admission = match trust.check_credential(&joiner.credential, &joiner.node_key) {
        Ok(p) if p.stamped => return Err(Refusal::NotAJoiner),
        Ok(p) => p.admission,
        Err(AdmissionError::Expired { expires_at, at }) => {
            return Err(Refusal::TokenExpired {
                expires_at,
                now: at,
            })
        }
        Err(AdmissionError::Revoked(_)) => return Err(Refusal::Revoked),
        Err(e) => return Err(Refusal::Other(e.to_string())),
    };
    Ok(admission::stamp(
        signing,
        admission::Stamper::Member {
            node_key: signing.verifying_key().to_bytes(),
            admission: our_admission.clone(),
        },
        trust.network.key,
        joiner.node_key,
        admission.token_id,
        trust.now_unix(),
    ))
}

fn expect_version(signed: u64, gossip: u64) -> Result<(), String> {
    if signed == gossip {
        Ok(())
    } else {
        Err(format!(
            "gossip version {gossip} differs from the signed version {signed}"
        ))
    }
}

impl Validator for TrustState {
    fn validate(&self, node_id: &str, key: &str, value: &str, version: u64) -> bool {
        match self.validate_value(node_id, key, value, version) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(node = node_id, key, version, error = %e, "refused a gossip value");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::sample;
    use ed25519_dalek::SigningKey;

    #[test]
    fn values_need_their_owners_signature_and_the_signed_version() {
        let net = SigningKey::from_bytes(&[1; 32]);
        let nk = net.verifying_key().to_bytes();
        let trust = TrustState::new(
            Network {
                key: nk,
                cidr: "10.77.0.0/16".parse().unwrap(),
            },
            Arc::new(|| 1000),
        );
        let (node, body) = sample(5, &net, "10.77.0.9".parse().unwrap());
        let id = proto::node_id_string(&body.node_key);
        let text = body.sign(&node);
        assert!(trust.validate(&id, RECORD_KEY, &text, body.version));
        // A relayed copy with a bumped gossip version: refused.
        assert!(!trust.validate(&id, RECORD_KEY, &text, body.version + 1));
        // Under another member's id, or an unknown key: refused.
        let other = proto::node_id_string(&[7; 32]);
        assert!(!trust.validate(&other, RECORD_KEY, &text, body.version));
        assert!(!trust.validate(&id, "heartbeat", &text, body.version));
        // The authority node takes only a list signed by the network key.
        let list = RevocationList {
            network_key: nk,
            issued_at_ms: 9,
            entries: vec![admission::Revoked::Node(body.node_key)],
        };
        let lt = list.sign(&net);
        assert!(!trust.validate(AUTHORITY_NODE, REVOKED_KEY, &list.sign(&node), 9));
        assert!(trust.validate(AUTHORITY_NODE, REVOKED_KEY, &lt, 9));
        // Once revoked, the member's values are refused.
        assert!(trust.update_revocations(list, lt));
        assert!(!trust.validate(&id, RECORD_KEY, &text, body.version));
    }
}
