//! Where each peer's WireGuard endpoint points, and what gets checked: the
//! per-peer decision that follows the path choice ([`super::paths`]).
//!
//! Pure functions: the daemon (`daemon::traversal`) gathers a [`PeerView`]
//! per peer from the path selector, the relay allocations and the checks,
//! and applies the [`EndpointPlan`] (the endpoints to the desired peer, the
//! checks to [`super::checks::Checks`]). Nothing here does I/O or reads a
//! clock.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::proto::PublicKeyBytes;
use crate::record::NatKind;

/// A working path whose packets went unanswered this long is *suspect*: the
/// endpoint in use and the record's candidates get checked.
pub const SUSPECT: Duration = Duration::from_secs(2);

/// What the daemon knows about one peer when it decides its endpoint.
#[derive(Debug, Clone, Default)]
pub struct PeerView {
    /// The record's candidates, same-LAN first.
    pub candidates: Vec<SocketAddr>,
    /// The path choice made this peer relayed.
    pub relayed: bool,
    /// The relay's allocation port for this pair, once the relay answered.
    pub relay_endpoint: Option<SocketAddr>,
    /// The path selector holds the path working (fresh handshake, heard).
    pub working: bool,
    /// How long our packets to the peer went unanswered.
    pub unanswered: Duration,
    /// No punch can work for this pair ([`super::paths::punch_hopeless`]).
    pub hopeless: bool,
    /// The endpoint WireGuard uses now.
    pub current: Option<SocketAddr>,
    /// A candidate that answered a connectivity check lately.
    pub validated: Option<SocketAddr>,
    /// The peer is behind a NAT it measured, or a check of it is pending
    /// ([`super::checks::Checks::holds`]): it answers checks, so no
    /// handshake goes anywhere until one of its candidates does.
    pub answers_checks: bool,
}

/// What to do with one peer: its WireGuard endpoints and its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPlan {
    /// The endpoints the desired WireGuard peer gets (empty: none yet;
    /// the peer's own handshake towards us still sets one).
    pub endpoints: Vec<SocketAddr>,
    /// The path works and is heard: no checks for it.
    pub working: bool,
    /// Candidates to check (and punch), in order; empty: none.
    pub check: Vec<SocketAddr>,
    /// The path is suspect: the endpoint in use, checked first; moved only
    /// if another candidate answers.
    pub suspect: Option<SocketAddr>,
    /// Our own mapping may have changed: measure it now.
    pub hurry_discovery: bool,
    /// The endpoint in use must be replaced by `endpoints` even though the
    /// path works: it is another port of our relay (an allocation the relay
    /// ended and made anew with new ports, say), which forwards nothing,
    /// and WireGuard does not roam away from it on its own.
    pub repoint: bool,
}

/// Decides one peer's endpoints and checks.
///
/// `raw` is whether we can send checks at all (the userspace backend; the
/// kernel's WireGuard socket carries no STUN); `on_lan` tells a candidate
/// on one of our own subnets.
pub fn plan(view: &PeerView, raw: bool, on_lan: impl Fn(&SocketAddr) -> bool) -> EndpointPlan {
    let mut out = EndpointPlan {
        endpoints: view.candidates.clone(),
        working: false,
        check: Vec::new(),
        suspect: None,
        hurry_discovery: false,
        repoint: false,
    };
    let relay_ep = if view.relayed {
        view.relay_endpoint
    } else {
        None
    };
    if let Some(ep) = relay_ep {
        // Relayed: the one session goes through the relay's port for this
        // pair. A session still on another of the relay's ports (both ends
        // gave an allocation back while moving between relays, and the
        // relay made a new one) sends into a port that forwards nothing:
        // it moves to ours, working or not (a working path otherwise keeps
        // the endpoint WireGuard roamed to). Seen in a mixed 100 coming
        // up: pairs answered one way only, for 20-40 s, until unanswered
        // data broke the path.
        out.endpoints = vec![ep];
        out.repoint = view.current.is_some_and(|c| c.ip() == ep.ip() && c != ep);
    }
    let suspect = view.working && view.unanswered >= SUSPECT;
    if view.working && !suspect {
        out.working = true;
        if view.relayed && !view.hopeless {
            // Relayed and working: keep looking for a direct path.
            out.check = view.candidates.clone();
        }
        return out;
    }
    if relay_ep.is_some() {
        // A relayed session coming up: keep the relay's endpoint, and
        // punch on the side where a punch can work.
        if !view.hopeless {
            out.check = view.candidates.clone();
        }
        return out;
    }
    if view.hopeless {
        // No punch can work (a symmetric NAT on one side, no public address
        // on the other): only a candidate on our own LAN can carry a direct
        // path. Any other endpoint would only draw WireGuard initiations (a
        // persistent keepalive without a session starts one, then retries
        // every 5 s for 90 s), each costing X25519 work for nothing; at 250
        // members these were thousands per node.
        if raw {
            out.endpoints.retain(|e| on_lan(e));
        }
        return out;
    }
    if suspect {
        // Perhaps our own mapping changed: measure it now. Check the
        // endpoint in use first: if it answers, the path is fine (traffic
        // is one-way); if only another candidate does, the handshake goes
        // there. (Only WireGuard's passive keepalive would tell otherwise,
        // after 10 s and more.)
        out.hurry_discovery = true;
        let mut check = view.candidates.clone();
        if let Some(c) = view.current {
            check.retain(|x| *x != c);
            check.insert(0, c);
            out.suspect = Some(c);
        }
        out.check = check;
        return out;
    }
    out.check = view.candidates.clone();
    if let Some(v) = view.validated {
        // A candidate answered a check: it is the peer's only endpoint
        // until the path is direct (WireGuard then roams as it likes).
        out.endpoints = vec![v];
    } else if raw && view.answers_checks {
        // Until one of its candidates answers a check, no WireGuard
        // handshake goes anywhere: each costs X25519 work on both sides,
        // and it is lost when the NAT is not open yet or when the member
        // has no peer for us yet (membership spreads in seconds at hundreds
        // of members, and WireGuard retries every 5 s for 90 s). A member
        // behind a NAT it measured answers checks on its WireGuard port; so
        // does a public one, unless its WireGuard is the kernel's (it then
        // never answers, and after a grace its record's endpoint is used as
        // before).
        out.endpoints.clear();
    }
    out
}

/// Whether a member behind `their_nat` answers connectivity checks for sure
/// (it measured its NAT on its WireGuard port), so its endpoints are held
/// back until a check is answered. A public member may run kernel
/// WireGuard, which never answers: it is held back only while a check of it
/// is pending (`pending_check`).
pub fn answers_checks(their_nat: NatKind, pending_check: bool) -> bool {
    matches!(
        their_nat,
        NatKind::EndpointIndependent | NatKind::EndpointDependent
    ) || pending_check
}

/// Whether a punch to a member with these candidates is unlikely: it is
/// behind the same public address as us (`our_public`: our mapped
/// addresses) but not on our LAN (two homes behind one CGNAT). Only a NAT
/// that hairpins lets such a punch through, and most do not: such a pair is
/// relayed at once, and a check answered over a hairpin makes it direct.
pub fn punch_unlikely(
    our_public: &[IpAddr],
    candidates: &[SocketAddr],
    on_lan: impl Fn(&SocketAddr) -> bool,
) -> bool {
    let shares = candidates.iter().any(|e| our_public.contains(&e.ip()));
    let lan = candidates.iter().any(on_lan);
    shares && !lan
}

/// A member that may serve as a STUN server for us.
#[derive(Debug, Clone, Copy)]
pub struct StunCandidate {
    pub node_key: PublicKeyBytes,
    pub nat: NatKind,
    /// The first endpoint of its record.
    pub endpoint: SocketAddr,
}

/// The STUN servers to ask, in order: the outside ones (`--stun-server`)
/// first, then public members, then members whose NAT is not measured yet;
/// never one on our own LAN (it sees our host address, not the NAT's), and
/// no member behind a NAT it measured. Within a rank, in an order of our
/// own (a hash of our key and theirs): the same few servers for us round
/// after round, but not the same ones for every member (sorted by address,
/// every member asked the seed and the next two public members; at 150
/// members the seed answered 29 requests a second).
pub fn stun_targets(
    me: &PublicKeyBytes,
    outside: &[SocketAddr],
    members: impl IntoIterator<Item = StunCandidate>,
    on_lan: impl Fn(&SocketAddr) -> bool,
) -> Vec<SocketAddr> {
    let order = |k: &PublicKeyBytes| {
        // `DefaultHasher::new` has fixed keys: the same order on every run.
        let mut h = std::hash::DefaultHasher::new();
        (me, k).hash(&mut h);
        h.finish()
    };
    let mut ranked: Vec<(u8, u64, SocketAddr)> = members
        .into_iter()
        .filter(|c| &c.node_key != me && !on_lan(&c.endpoint))
        .filter_map(|c| {
            let rank = match c.nat {
                NatKind::Public => 0,
                NatKind::Unknown => 1,
                _ => return None,
            };
            Some((rank, order(&c.node_key), c.endpoint))
        })
        .collect();
    ranked.sort();
    outside
        .iter()
        .copied()
        .chain(ranked.into_iter().map(|(_, _, a)| a))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn no_lan(_: &SocketAddr) -> bool {
        false
    }

    fn view() -> PeerView {
        PeerView {
            candidates: vec![a("192.168.1.5:51820"), a("203.0.113.9:40000")],
            ..PeerView::default()
        }
    }

    #[test]
    fn a_working_direct_path_is_left_alone() {
        let v = PeerView {
            working: true,
            current: Some(a("203.0.113.9:40000")),
            ..view()
        };
        let p = plan(&v, true, no_lan);
        assert!(p.working);
        assert!(p.check.is_empty());
        assert_eq!(p.endpoints, v.candidates);
        assert!(!p.hurry_discovery);
    }

    #[test]
    fn a_working_relayed_path_goes_through_the_relay_and_keeps_punching() {
        let relay = a("198.51.100.1:61000");
        let v = PeerView {
            working: true,
            relayed: true,
            relay_endpoint: Some(relay),
            ..view()
        };
        let p = plan(&v, true, no_lan);
        assert_eq!(p.endpoints, vec![relay]);
        assert!(p.working);
        assert_eq!(p.check, v.candidates, "keeps looking for a direct path");
        // A hopeless pair stops punching.
        let p = plan(
            &PeerView {
                hopeless: true,
                ..v
            },
            true,
            no_lan,
        );
        assert_eq!(p.endpoints, vec![relay]);
        assert!(p.check.is_empty());
    }

    #[test]
    fn a_session_on_an_old_port_of_the_relay_moves_to_ours() {
        let ours = a("198.51.100.1:61000");
        let v = PeerView {
            working: true,
            relayed: true,
            relay_endpoint: Some(ours),
            current: Some(a("198.51.100.1:57000")),
            ..view()
        };
        let p = plan(&v, true, no_lan);
        assert_eq!(p.endpoints, vec![ours]);
        assert!(p.repoint);
        // On our port, or roamed to another relay's port (the other end's
        // choice, adopted by the path selector): left alone.
        for current in [ours, a("198.51.100.7:57000")] {
            let p = plan(
                &PeerView {
                    current: Some(current),
                    ..v.clone()
                },
                true,
                no_lan,
            );
            assert!(!p.repoint);
        }
    }

    #[test]
    fn a_relayed_path_coming_up_uses_the_relay_port() {
        let relay = a("198.51.100.1:61000");
        let v = PeerView {
            relayed: true,
            relay_endpoint: Some(relay),
            ..view()
        };
        let p = plan(&v, true, no_lan);
        assert_eq!(p.endpoints, vec![relay]);
        assert!(!p.working);
        assert_eq!(p.check, v.candidates);
        // Relayed but the relay has not answered yet: no relay endpoint.
        let p = plan(
            &PeerView {
                relay_endpoint: None,
                answers_checks: true,
                ..v
            },
            true,
            no_lan,
        );
        assert!(p.endpoints.is_empty(), "held back until a check answers");
    }

    #[test]
    fn a_suspect_path_checks_the_endpoint_in_use_first_and_hurries_discovery() {
        let current = a("203.0.113.9:40000");
        let v = PeerView {
            working: true,
            unanswered: SUSPECT,
            current: Some(current),
            ..view()
        };
        let p = plan(&v, true, no_lan);
        assert!(!p.working);
        assert_eq!(p.suspect, Some(current));
        assert_eq!(p.check[0], current);
        assert_eq!(p.check.len(), 2, "no duplicate of the endpoint in use");
        assert!(p.hurry_discovery);
        assert_eq!(p.endpoints, v.candidates, "moved only when another answers");
        // Just under the threshold it is still working.
        let p = plan(
            &PeerView {
                unanswered: SUSPECT - Duration::from_millis(1),
                ..v
            },
            true,
            no_lan,
        );
        assert!(p.working && p.suspect.is_none());
    }

    #[test]
    fn a_hopeless_pair_only_keeps_candidates_on_our_lan() {
        let v = PeerView {
            hopeless: true,
            ..view()
        };
        let lan = |e: &SocketAddr| e.ip().to_string().starts_with("192.168.");
        let p = plan(&v, true, lan);
        assert_eq!(p.endpoints, vec![a("192.168.1.5:51820")]);
        assert!(p.check.is_empty());
        // Without checks (kernel backend) nothing is filtered.
        let p = plan(&v, false, lan);
        assert_eq!(p.endpoints, v.candidates);
    }

    #[test]
    fn endpoints_are_held_back_until_a_check_answers() {
        let v = PeerView {
            answers_checks: true,
            ..view()
        };
        let p = plan(&v, true, no_lan);
        assert!(p.endpoints.is_empty());
        assert_eq!(p.check, v.candidates);
        let answered = a("203.0.113.9:40000");
        let p = plan(
            &PeerView {
                validated: Some(answered),
                ..v.clone()
            },
            true,
            no_lan,
        );
        assert_eq!(p.endpoints, vec![answered]);
        // The kernel backend cannot check: the record's endpoints as before.
        assert_eq!(plan(&v, false, no_lan).endpoints, v.candidates);
        // A member that may not answer checks (public, none pending) gets
        // its candidates at once.
        let p = plan(&view(), true, no_lan);
        assert_eq!(p.endpoints, view().candidates);
        assert!(!answers_checks(NatKind::Public, false));
        assert!(answers_checks(NatKind::Public, true));
        assert!(answers_checks(NatKind::EndpointDependent, false));
        assert!(!answers_checks(NatKind::Unknown, false));
    }

    #[test]
    fn two_homes_behind_one_public_address_are_unlikely_to_punch() {
        let ours = [a("100.64.0.1:1").ip()];
        let theirs = [a("100.64.0.1:40001"), a("10.1.0.2:51820")];
        assert!(punch_unlikely(&ours, &theirs, no_lan));
        // Same LAN: a direct path is likely.
        let lan = |e: &SocketAddr| e.ip().to_string().starts_with("10.1.");
        assert!(!punch_unlikely(&ours, &theirs, lan));
        // Another public address: a normal punch.
        assert!(!punch_unlikely(
            &[a("198.51.100.7:1").ip()],
            &theirs,
            no_lan
        ));
    }

    #[test]
    fn stun_targets_rank_outside_then_public_then_unknown_and_skip_the_lan() {
        let me = [0u8; 32];
        let m = |k: u8, nat, ep: &str| StunCandidate {
            node_key: [k; 32],
            nat,
            endpoint: a(ep),
        };
        let members = vec![
            m(1, NatKind::Unknown, "198.51.100.1:51820"),
            m(2, NatKind::Public, "198.51.100.2:51820"),
            m(3, NatKind::EndpointIndependent, "198.51.100.3:51820"),
            m(4, NatKind::Public, "192.168.1.4:51820"),
            m(0, NatKind::Public, "198.51.100.9:51820"),
            m(5, NatKind::Public, "198.51.100.5:51820"),
        ];
        let lan = |e: &SocketAddr| e.ip().to_string().starts_with("192.168.");
        let outside = [a("203.0.113.1:3478")];
        let t = stun_targets(&me, &outside, members.clone(), lan);
        assert_eq!(t[0], outside[0]);
        assert_eq!(t.len(), 4, "not us, not behind NAT, not on the LAN: {t:?}");
        assert_eq!(t[3], a("198.51.100.1:51820"), "unmeasured last");
        let publics: std::collections::HashSet<_> = t[1..3].iter().copied().collect();
        assert!(publics.contains(&a("198.51.100.2:51820")));
        assert!(publics.contains(&a("198.51.100.5:51820")));
        // The same order every time; another member may order them
        // differently, but always public before unknown.
        assert_eq!(t, stun_targets(&me, &outside, members.clone(), lan));
        let mut orders = std::collections::HashSet::new();
        for k in 10..40u8 {
            let t = stun_targets(&[k; 32], &[], members.clone(), lan);
            // Member 0 is not us now: three public servers, then the
            // unmeasured one.
            assert_eq!(t.len(), 4);
            assert_eq!(t[3], a("198.51.100.1:51820"));
            orders.insert(t[0]);
        }
        assert_eq!(orders.len(), 3, "members spread over the public servers");
    }
}
