//! STUN binding requests and responses (RFC 8489) over `stun_codec`.
//!
//! Pure functions: encoding, and decoding that never panics. The shell sends
//! and receives the datagrams on the WireGuard socket itself, so the mapping
//! learned is the one WireGuard's packets get.

use std::net::SocketAddr;

use bytecodec::{DecodeExt, EncodeExt};
use stun_codec::rfc5389::attributes::{ErrorCode, Username, XorMappedAddress};
use stun_codec::rfc5389::{methods::BINDING, Attribute};
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};

/// A STUN message meshpeer understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StunMessage {
    Request {
        txid: [u8; 12],
        /// For a connectivity check, the member it is meant for
        /// ([`check_request`]); `None` for a plain binding request.
        for_key: Option<[u8; 8]>,
        /// For a connectivity check, the member that sent it.
        from_key: Option<[u8; 8]>,
    },
    Response {
        txid: [u8; 12],
        mapped: SocketAddr,
    },
    /// The member a check was meant for is there, but has no WireGuard
    /// peer for the sender yet ([`refusal`]): a handshake now would be
    /// dropped.
    Refused {
        txid: [u8; 12],
    },
    /// An RFC 3489 ("classic") binding request, without the magic cookie,
    /// as old clients such as Debian's `stun` send: answered with
    /// [`classic_binding_response`].
    ClassicRequest {
        txid: [u8; 16],
    },
}

/// The magic cookie at bytes 4..8 of every RFC 5389+ message.
const MAGIC: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// Cheap pre-check: could this datagram be STUN?
pub fn looks_like_stun(b: &[u8]) -> bool {
    b.len() >= 20 && b[0] & 0xC0 == 0 && b[4..8] == MAGIC
}

fn encode(msg: Message<Attribute>) -> Vec<u8> {
    // Encoding a well-formed message into a Vec only fails on internal bugs.
    MessageEncoder::new()
        .encode_into_bytes(msg)
        .unwrap_or_default()
}

pub fn binding_request(txid: [u8; 12]) -> Vec<u8> {
    encode(Message::new(
        MessageClass::Request,
        BINDING,
        TransactionId::new(txid),
    ))
}

/// The `USERNAME` prefix that marks a connectivity check: the rest is the
/// first 8 bytes of the WireGuard public key of the member it is meant for,
/// in hex, then `:` and the same of the member that sends it.
const CHECK_PREFIX: &str = "meshpeer-check:";
/// The error code of a [`refusal`] (403 Forbidden).
const REFUSED: u16 = 403;

/// A binding request from the member with WireGuard key `from`, meant for
/// the member whose WireGuard public key is `to`: any other host that
/// shares the address (two members behind one NAT, after their mappings
/// changed) leaves it unanswered, so an answer shows the right member is
/// there; and that member answers only once it has a WireGuard peer for
/// `from`, so an answer also means a handshake will be accepted.
pub fn check_request(txid: [u8; 12], to: &[u8; 32], from: &[u8; 32]) -> Vec<u8> {
    let mut m = Message::new(MessageClass::Request, BINDING, TransactionId::new(txid));
    let name = format!(
        "{CHECK_PREFIX}{}:{}",
        hex::encode(&to[..8]),
        hex::encode(&from[..8])
    );
    if let Ok(u) = Username::new(name) {
        m.add_attribute(Attribute::Username(u));
    }
    encode(m)
}

/// How the member with WireGuard key `ours` treats a binding request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A success response with the mapped address.
    Answer,
    /// A [`refusal`]: the check is for us, but we have no peer for its sender.
    Refuse,
    /// Silence: the check is for another member.
    Ignore,
}

/// Plain requests are always answered; checks only by the member they are
/// meant for, and only when `is_peer` knows the sender (a check without a
/// sender, from an older member, is answered as before).
pub fn answer_request(
    for_key: Option<[u8; 8]>,
    from_key: Option<[u8; 8]>,
    ours: &[u8; 32],
    is_peer: impl Fn(&[u8; 8]) -> bool,
) -> Answer {
    match for_key {
        None => Answer::Answer,
        Some(k) if ours[..8] != k => Answer::Ignore,
        Some(_) => match from_key {
            Some(f) if !is_peer(&f) => Answer::Refuse,
            _ => Answer::Answer,
        },
    }
}

/// The answer to a check from a member we have no WireGuard peer for (yet).
pub fn refusal(txid: [u8; 12]) -> Vec<u8> {
    let mut m = Message::new(
        MessageClass::ErrorResponse,
        BINDING,
        TransactionId::new(txid),
    );
    if let Ok(e) = ErrorCode::new(REFUSED, "not a peer yet".into()) {
        m.add_attribute(Attribute::ErrorCode(e));
    }
    encode(m)
}

pub fn binding_response(txid: [u8; 12], observed: SocketAddr) -> Vec<u8> {
    let mut m = Message::new(
        MessageClass::SuccessResponse,
        BINDING,
        TransactionId::new(txid),
    );
    m.add_attribute(Attribute::XorMappedAddress(XorMappedAddress::new(observed)));
    encode(m)
}

/// Answers an RFC 3489 binding request with `MAPPED-ADDRESS` (IPv4 only, as
/// RFC 3489 has no IPv6). `stun_codec` speaks RFC 5389+ only, whose 12-byte
/// transaction ids cannot echo a classic 16-byte one; this 32-byte answer is
/// the whole of the legacy format meshpeer writes.
pub fn classic_binding_response(txid: [u8; 16], observed: SocketAddr) -> Option<Vec<u8>> {
    let SocketAddr::V4(v4) = observed else {
        return None;
    };
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(&[0x01, 0x01, 0x00, 0x0C]); // Binding Response, 12 bytes of attributes
    out.extend_from_slice(&txid);
    out.extend_from_slice(&[0x00, 0x01, 0x00, 0x08, 0x00, 0x01]); // MAPPED-ADDRESS, IPv4
    out.extend_from_slice(&v4.port().to_be_bytes());
    out.extend_from_slice(&v4.ip().octets());
    Some(out)
}

/// Decodes a binding request or success response; anything else is `None`.
pub fn parse(bytes: &[u8]) -> Option<StunMessage> {
    if bytes.len() >= 20 && bytes[0..2] == [0x00, 0x01] && bytes[4..8] != MAGIC {
        let len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
        if bytes.len() == 20 + len && len % 4 == 0 {
            let mut txid = [0u8; 16];
            txid.copy_from_slice(&bytes[4..20]);
            return Some(StunMessage::ClassicRequest { txid });
        }
        return None;
    }
    if !looks_like_stun(bytes) {
        return None;
    }
    let msg = MessageDecoder::<Attribute>::new()
        .decode_from_bytes(bytes)
        .ok()?
        .ok()?;
    if msg.method() != BINDING {
        return None;
    }
    let txid = *msg.transaction_id().as_bytes();
    match msg.class() {
        MessageClass::Request => {
            let name = msg
                .get_attribute::<Username>()
                .and_then(|u| u.name().strip_prefix(CHECK_PREFIX));
            let key = |h: &str| {
                hex::decode(h)
                    .ok()
                    .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            };
            let (for_key, from_key) = match name.map(|n| n.split_once(':').unwrap_or((n, ""))) {
                Some((to, "")) => (key(to), None),
                Some((to, from)) => (key(to), key(from)),
                None => (None, None),
            };
            Some(StunMessage::Request {
                txid,
                for_key,
                from_key,
            })
        }
        MessageClass::SuccessResponse => {
            let mapped = msg.get_attribute::<XorMappedAddress>()?.address();
            Some(StunMessage::Response { txid, mapped })
        }
        MessageClass::ErrorResponse => {
            let code = msg.get_attribute::<ErrorCode>()?.code();
            (code == REFUSED).then_some(StunMessage::Refused { txid })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_response_round_trip() {
        let req = binding_request([7; 12]);
        assert!(looks_like_stun(&req));
        assert_eq!(
            parse(&req),
            Some(StunMessage::Request {
                txid: [7; 12],
                for_key: None,
                from_key: None
            })
        );
        let a: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let resp = binding_response([7; 12], a);
        assert_eq!(
            parse(&resp),
            Some(StunMessage::Response {
                txid: [7; 12],
                mapped: a
            })
        );
        let v6: SocketAddr = "[2001:db8::5]:1".parse().unwrap();
        assert_eq!(
            parse(&binding_response([1; 12], v6)),
            Some(StunMessage::Response {
                txid: [1; 12],
                mapped: v6
            })
        );
    }

    #[test]
    fn classic_clients_get_a_mapped_address() {
        // What Debian's `stun` (0.97) sends: a binding request with a
        // CHANGE-REQUEST attribute and no magic cookie.
        let req = hex::decode("000100080190c158b722f5762a9f5142cdf9ec0a0003000400000000").unwrap();
        let Some(StunMessage::ClassicRequest { txid }) = parse(&req) else {
            panic!("not recognised")
        };
        let resp = classic_binding_response(txid, "198.51.100.7:4000".parse().unwrap()).unwrap();
        assert_eq!(resp.len(), 32);
        assert_eq!(&resp[4..20], &req[4..20]);
        assert_eq!(&resp[26..28], &4000u16.to_be_bytes());
        assert_eq!(&resp[28..32], &[198, 51, 100, 7]);
        assert_eq!(
            classic_binding_response(txid, "[::1]:1".parse().unwrap()),
            None
        );
    }

    #[test]
    fn garbage_is_not_stun_and_never_panics() {
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[1, 0, 0, 0]), None); // a WireGuard handshake initiation
        let mut req = binding_request([3; 12]);
        for i in 0..req.len() {
            req[i] ^= 0xFF;
            let _ = parse(&req);
            req[i] ^= 0xFF;
        }
        for len in 0..req.len() {
            let _ = parse(&req[..len]);
        }
    }

    #[test]
    fn checks_name_the_member_they_are_for_and_the_sender() {
        let key = [0xab; 32];
        let sender = [0x12; 32];
        let req = check_request([3; 12], &key, &sender);
        let Some(StunMessage::Request {
            txid,
            for_key,
            from_key,
        }) = parse(&req)
        else {
            panic!("not a request");
        };
        assert_eq!(txid, [3; 12]);
        assert_eq!(for_key, Some([0xab; 8]));
        assert_eq!(from_key, Some([0x12; 8]));
        let knows = |k: &[u8; 8]| k == &[0x12; 8];
        let stranger = |_: &[u8; 8]| false;
        assert_eq!(
            answer_request(for_key, from_key, &key, knows),
            Answer::Answer
        );
        assert_eq!(
            answer_request(for_key, from_key, &key, stranger),
            Answer::Refuse,
            "no peer for the sender yet: refused, not silent"
        );
        assert_eq!(
            answer_request(for_key, from_key, &[0xcd; 32], knows),
            Answer::Ignore,
            "another member stays silent"
        );
        assert_eq!(
            answer_request(None, None, &[0xcd; 32], stranger),
            Answer::Answer,
            "plain requests are answered"
        );
        assert_eq!(
            answer_request(for_key, None, &key, stranger),
            Answer::Answer,
            "a check without a sender (an older member) is answered"
        );
    }

    #[test]
    fn a_check_of_an_older_member_names_only_the_target() {
        let mut m = Message::new(MessageClass::Request, BINDING, TransactionId::new([4; 12]));
        m.add_attribute(Attribute::Username(
            Username::new(format!("{CHECK_PREFIX}{}", hex::encode([0xab; 8]))).unwrap(),
        ));
        assert_eq!(
            parse(&encode(m)),
            Some(StunMessage::Request {
                txid: [4; 12],
                for_key: Some([0xab; 8]),
                from_key: None
            })
        );
    }

    #[test]
    fn refusals_round_trip() {
        assert_eq!(
            parse(&refusal([9; 12])),
            Some(StunMessage::Refused { txid: [9; 12] })
        );
        let mut other = Message::new(
            MessageClass::ErrorResponse,
            BINDING,
            TransactionId::new([9; 12]),
        );
        other.add_attribute(Attribute::ErrorCode(
            ErrorCode::new(400, "bad".into()).unwrap(),
        ));
        assert_eq!(parse(&encode(other)), None, "other errors are not refusals");
    }
}
