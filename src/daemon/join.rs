//! Joining (proto/PROTOCOL.md §6), both sides.
//!
//! * Client: a joiner asks its seeds to admit it (`Join`) and gets a stamp
//!   and what the seed holds; a member without an address asks `Hello`.
//!   Nothing answering at all fails within the no-answer wait; a seed that
//!   answers the handshake but is slow (hundreds of joiners at once) gets
//!   longer; a refusal (wrong network, expired or revoked token) fails at
//!   once with its reason.
//! * Server: [`Handler`] answers `Join` (checks the joiner's token against
//!   our clock and revocations, stamps it), `Hello`, and relay allocations.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use tokio::sync::watch;

use crate::gossip::transport::{
    AllocReply, HelloReply, JoinReply, ProbeError, QuicTransport, Refusal, Request,
};
use crate::gossip::RequestHandler;
use crate::proto::{self, Signed};
use crate::trust::{PeerIdentity, TrustState};

/// How a first contact went.
pub enum Outcome {
    /// We were admitted: our stamp, and what the seed holds.
    Admitted {
        stamp: Signed,
        hello: HelloReply,
        seed: SocketAddr,
    },
    /// (Already a member) what the seed holds.
    Hello { hello: HelloReply, seed: SocketAddr },
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("no seed to join through (pass one: `meshpeer join SEED`)")]
    NoSeed,
    #[error("cannot join: nothing answered at {seeds} within {waited:?} (is meshpeer running there, and UDP {port} open on it?)")]
    NoAnswer {
        seeds: String,
        waited: Duration,
        port: u16,
    },
    #[error("cannot join: the seed answered but did not admit us within {0:?} (it may be overloaded; try again)")]
    Slow(Duration),
    #[error("cannot join: {seed} refused us: {reason}")]
    Refused { seed: SocketAddr, reason: Refusal },
    #[error("cannot join: {0}")]
    Tls(ProbeError),
    #[error("cannot join: {seed} sent an answer we cannot read: {detail}")]
    BadReply { seed: SocketAddr, detail: String },
}

/// Asks the seeds, in turn, to admit us (`join`: not stamped yet) or for
/// what they hold. Gives up after `no_answer` if no seed completes a QUIC
/// handshake, after `slow` in all otherwise. With `progress`, a first join
/// also tells the user on stderr what it is doing.
pub async fn contact(
    transport: &QuicTransport,
    seeds: &[SocketAddr],
    name: &str,
    join: bool,
    progress: bool,
    no_answer: Duration,
    slow: Duration,
) -> Result<Outcome, JoinError> {
    if seeds.is_empty() {
        return Err(JoinError::NoSeed);
    }
    let start = tokio::time::Instant::now();
    let mut answered = false;
    let mut limit = Duration::from_secs(8);
    let mut pass = 0;
    let req = if join {
        Request::Join {
            name: name.to_string(),
        }
    } else {
        Request::Hello
    };
    loop {
        pass += 1;
        for seed in seeds {
            let deadline = if answered { slow } else { no_answer };
            let left = deadline.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(if answered {
                    JoinError::Slow(slow)
                } else {
                    JoinError::NoAnswer {
                        seeds: seeds
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                        waited: no_answer,
                        port: seed.port(),
                    }
                });
            }
            tracing::info!(%seed, pass, "contacting seed");
            if progress && pass == 1 {
                eprintln!("meshpeer: contacting seed {seed}");
            }
            // The handshake gets the growing per-pass limit: a seed not up
            // yet is tried again soon (a 30 s wait on one handshake was
            // 15 s late for a seed that came up 20 s after its joiner,
            // since QUIC backs off its resends). The answer, once a seed took the
            // request, gets everything that is left when it is the only
            // seed: asking again only makes a loaded seed do the same work
            // twice (at 250 mixed a starved seed admitted 160 joiners 1,171
            // times, each time sending its membership).
            let connect = limit.min(left).max(Duration::from_secs(1)) / 2;
            let wait = if seeds.len() == 1 {
                left
            } else {
                limit.min(left)
            };
            let bytes = match transport
                .request_within(*seed, &req, connect, wait.max(Duration::from_secs(1)))
                .await
            {
                Ok(b) => b,
                Err(e @ ProbeError::Refused { .. }) => return Err(JoinError::Tls(e)),
                Err(e) => {
                    if !e.is_timeout() || transport.connections() > 0 {
                        answered = true;
                    }
                    tracing::info!(%seed, error = %e, "seed did not answer yet");
                    if progress {
                        eprintln!(
                            "meshpeer: {seed}: {e} ({} s of {} s)",
                            start.elapsed().as_secs(),
                            deadline.as_secs()
                        );
                    }
                    continue;
                }
            };
            answered = true;
            let bad = |e: proto::WireError| JoinError::BadReply {
                seed: *seed,
                detail: e.to_string(),
            };
            if join {
                match proto::decode::<JoinReply>("join reply", &bytes).map_err(bad)? {
                    JoinReply::Admitted { stamp, hello } => {
                        tracing::info!(%seed, members = hello.records.len(), "admitted");
                        if progress {
                            eprintln!(
                                "meshpeer: admitted by {seed}; the mesh has {} member(s)",
                                hello.records.len()
                            );
                        }
                        return Ok(Outcome::Admitted {
                            stamp,
                            hello,
                            seed: *seed,
                        });
                    }
                    JoinReply::Refused {
                        reason: Refusal::Busy,
                    } => {
                        tracing::info!(%seed, "seed busy; trying again");
                    }
                    JoinReply::Refused { reason } => {
                        return Err(JoinError::Refused {
                            seed: *seed,
                            reason,
                        })
                    }
                }
            } else {
                match proto::decode::<Result<HelloReply, Refusal>>("hello reply", &bytes)
                    .map_err(bad)?
                {
                    Ok(hello) => return Ok(Outcome::Hello { hello, seed: *seed }),
                    Err(reason) => {
                        return Err(JoinError::Refused {
                            seed: *seed,
                            reason,
                        })
                    }
                }
            }
        }
        let wait = Duration::from_millis(500 * pass.min(10));
        tokio::time::sleep(wait).await;
        limit = (limit * 2).min(Duration::from_secs(32));
    }
}

/// Relay allocations (proto/PROTOCOL.md §7); the daemon's relay shell.
pub trait Allocator: Send + Sync + 'static {
    fn allocate(&self, from: SocketAddr, peer: &PeerIdentity, other: [u8; 32]) -> AllocReply;
    fn release(&self, peer: &PeerIdentity, other: [u8; 32]) -> AllocReply;
}

/// Answers requests: joins, hellos, relay allocations.
pub struct Handler {
    pub trust: Arc<TrustState>,
    pub signing: SigningKey,
    pub admission: Signed,
    pub hello: watch::Receiver<Arc<HelloReply>>,
    pub allocator: Option<Arc<dyn Allocator>>,
}

impl Handler {
    fn join(&self, peer: &PeerIdentity, name: &str) -> JoinReply {
        match crate::trust::admit_joiner(&self.trust, &self.signing, &self.admission, peer) {
            Ok(stamp) => {
                if peer.credential.stamp.is_some() {
                    tracing::info!(member = %proto::short_key(&peer.node_key), name,
                        "stamped again a member whose stamper was revoked");
                } else {
                    tracing::info!(joiner = %proto::short_key(&peer.node_key), name, "admitted a new member");
                }
                JoinReply::Admitted {
                    stamp,
                    hello: (**self.hello.borrow()).clone(),
                }
            }
            Err(reason) => JoinReply::Refused { reason },
        }
    }
}

impl RequestHandler for Handler {
    fn request(&self, from: SocketAddr, peer: &PeerIdentity, req: Request) -> Vec<u8> {
        match req {
            Request::Join { name } => proto::encode(&self.join(peer, &name)),
            Request::Hello => {
                let r: Result<HelloReply, Refusal> = if peer.stamped {
                    Ok((**self.hello.borrow()).clone())
                } else {
                    Err(Refusal::NotAJoiner)
                };
                proto::encode(&r)
            }
            Request::Allocate { peer: other } | Request::Release { peer: other }
                if !peer.stamped =>
            {
                let _ = other;
                proto::encode(&AllocReply::Refused {
                    reason: "not a member".into(),
                })
            }
            Request::Allocate { peer: other } => proto::encode(&match &self.allocator {
                Some(a) => a.allocate(from, peer, other),
                None => AllocReply::Refused {
                    reason: "this member does not relay".into(),
                },
            }),
            Request::Release { peer: other } => proto::encode(&match &self.allocator {
                Some(a) => a.release(peer, other),
                None => AllocReply::Released,
            }),
        }
    }
}
