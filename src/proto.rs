//! Wire format primitives shared by tokens, credentials and records.
//!
//! Every signed object is `postcard`-encoded (postcard 1.x wire format, see
//! `proto/PROTOCOL.md`) and prefixed by a one-byte format version. Signatures
//! are ed25519 over a domain-separation string followed by the encoded body,
//! so a signature made for one kind of object never verifies as another.
//! Decoding never panics: every malformed input is a [`WireError`].

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Version byte of every encoded object in this revision of the protocol.
pub const WIRE_VERSION: u8 = 2;

/// Domain-separation prefixes for signatures (see proto/PROTOCOL.md).
pub mod domain {
    pub const TOKEN: &[u8] = b"meshpeer-v2 token delegation\0";
    pub const ADMISSION: &[u8] = b"meshpeer-v2 admission\0";
    pub const STAMP: &[u8] = b"meshpeer-v2 stamp\0";
    pub const RECORD: &[u8] = b"meshpeer-v2 record\0";
    pub const OBSERVATIONS: &[u8] = b"meshpeer-v2 observations\0";
    pub const ALIVE: &[u8] = b"meshpeer-v2 alive\0";
    pub const SUSPICIONS: &[u8] = b"meshpeer-v2 suspicions\0";
    pub const REVOCATIONS: &[u8] = b"meshpeer-v2 revocations\0";
    pub const PROBE_PROOF: &[u8] = b"meshpeer-v2 probe proof\0";
}

/// A subnet (site-to-site route, or a token's allowed routes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Route {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

/// An ed25519 public key as it travels on the wire.
pub type PublicKeyBytes = [u8; 32];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("empty input")]
    Empty,
    #[error("unsupported format version {0} (this build speaks version {WIRE_VERSION})")]
    Version(u8),
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("{0} bytes left over after decoding")]
    Trailing(usize),
    #[error("signature has {0} bytes, expected 64")]
    SignatureLength(usize),
    #[error("invalid public key")]
    PublicKey,
    #[error("bad signature on {0}")]
    BadSignature(&'static str),
}

/// Encodes `value` as `version byte || postcard(value)`.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![WIRE_VERSION];
    // postcard only fails to serialize on non-serializable types (e.g. maps with
    // non-string keys in some formats) or a full fixed buffer; our types and a
    // growable Vec cannot hit either, so an error here is a programming bug.
    #[allow(clippy::expect_used)]
    let body = postcard::to_stdvec(value).expect("postcard encoding of wire types is infallible");
    out.extend_from_slice(&body);
    out
}

/// Decodes `version byte || postcard(T)`, rejecting trailing bytes.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, WireError> {
    let (&version, body) = bytes.split_first().ok_or(WireError::Empty)?;
    if version != WIRE_VERSION {
        return Err(WireError::Version(version));
    }
    let (value, rest) = postcard::take_from_bytes::<T>(body).map_err(|e| WireError::Malformed {
        what,
        detail: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(WireError::Trailing(rest.len()));
    }
    Ok(value)
}

/// Signs `domain || message`.
pub fn sign(key: &SigningKey, domain: &[u8], message: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(domain.len() + message.len());
    buf.extend_from_slice(domain);
    buf.extend_from_slice(message);
    key.sign(&buf).to_bytes().to_vec()
}

/// Signatures already verified, by a hash of (key, domain, message,
/// signature): gossip carries the same signed values (and the same token
/// delegations inside every record) again and again, and a simulation holds
/// thousands of nodes' copies of one record. Process-wide and bounded.
fn verified_cache() -> &'static std::sync::Mutex<lru::LruCache<[u8; 32], ()>> {
    static CACHE: std::sync::OnceLock<std::sync::Mutex<lru::LruCache<[u8; 32], ()>>> =
        std::sync::OnceLock::new();
    CACHE.get_or_init(|| {
        std::sync::Mutex::new(lru::LruCache::new(
            std::num::NonZeroUsize::new(65_536).unwrap_or(std::num::NonZeroUsize::MIN),
        ))
    })
}

/// Holds up to `capacity` verified signatures (default 65,536; the
/// simulation of thousands of members needs more, or it verifies the same
/// signatures again and again).
pub fn set_verified_capacity(capacity: usize) {
    if let Some(n) = std::num::NonZeroUsize::new(capacity) {
        verified_cache()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resize(n);
    }
}

fn verify_key(key: &PublicKeyBytes, domain: &[u8], message: &[u8], signature: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(key);
    h.update((domain.len() as u32).to_le_bytes());
    h.update(domain);
    h.update((message.len() as u32).to_le_bytes());
    h.update(message);
    h.update(signature);
    h.finalize().into()
}

/// Verifies a signature made by [`sign`] (strict RFC 8032 verification;
/// successes are cached, see [`verified_cache`]).
pub fn verify(
    key: &PublicKeyBytes,
    domain: &[u8],
    message: &[u8],
    signature: &[u8],
    what: &'static str,
) -> Result<(), WireError> {
    let cache_key = verify_key(key, domain, message, signature);
    let lock = |c: &'static std::sync::Mutex<_>| c.lock().unwrap_or_else(|p| p.into_inner());
    if lock(verified_cache()).get(&cache_key).is_some() {
        return Ok(());
    }
    verify_uncached(key, domain, message, signature, what)?;
    lock(verified_cache()).put(cache_key, ());
    Ok(())
}

/// [`verify`] without the cache: what a first sight of a signature costs
/// (benches).
pub fn verify_uncached(
    key: &PublicKeyBytes,
    domain: &[u8],
    message: &[u8],
    signature: &[u8],
    what: &'static str,
) -> Result<(), WireError> {
    let key = VerifyingKey::from_bytes(key).map_err(|_| WireError::PublicKey)?;
    let sig: [u8; 64] = signature
        .try_into()
        .map_err(|_| WireError::SignatureLength(signature.len()))?;
    let mut buf = Vec::with_capacity(domain.len() + message.len());
    buf.extend_from_slice(domain);
    buf.extend_from_slice(message);
    key.verify_strict(&buf, &Signature::from_bytes(&sig))
        .map_err(|_| WireError::BadSignature(what))
}

/// A body together with its signature; the body stays as bytes so that the
/// signature is checked over exactly what was received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Short, human-friendly form of a key: the first 8 characters of its base64.
pub fn short_key(key: &[u8; 32]) -> String {
    use base64::Engine;
    let s = base64::engine::general_purpose::STANDARD.encode(key);
    s[..8].to_string()
}

/// Standard base64 of a 32-byte key (the form `wg` prints).
pub fn key_b64(key: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Node ids are the URL-safe, unpadded base64 of the node's ed25519 key.
pub fn node_id_string(key: &PublicKeyBytes) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key)
}

/// Signs `body` under `domain` and returns the standard base64 of the
/// encoded [`Signed`]: the text form of every signed gossip value.
pub fn signed_text<T: Serialize>(key: &SigningKey, domain: &[u8], body: &T) -> String {
    use base64::Engine;
    let body = encode(body);
    let signature = sign(key, domain, &body);
    base64::engine::general_purpose::STANDARD.encode(encode(&Signed { body, signature }))
}

/// Decodes the text form of a signed gossip value (at most `max` encoded
/// bytes) into its [`Signed`] and body, without checking the signature.
pub fn open_signed_text<T: DeserializeOwned>(
    what: &'static str,
    text: &str,
    max: usize,
) -> Result<(Signed, T), WireError> {
    use base64::Engine;
    if text.len() > max.div_ceil(3) * 4 + 4 {
        return Err(WireError::Malformed {
            what,
            detail: format!("{} characters, more than {max} bytes", text.len()),
        });
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| WireError::Malformed {
            what,
            detail: "not base64".into(),
        })?;
    let signed: Signed = decode(what, &bytes)?;
    let body: T = decode(what, &signed.body)?;
    Ok((signed, body))
}

/// Parses a node id string back into the key.
pub fn parse_node_id(s: &str) -> Option<PublicKeyBytes> {
    use base64::Engine;
    let v = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()?;
    v.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_rejects_garbage_without_panicking() {
        assert_eq!(decode::<Signed>("x", &[]), Err(WireError::Empty));
        assert_eq!(
            decode::<Signed>("x", &[9, 1, 2]),
            Err(WireError::Version(9))
        );
        assert!(matches!(
            decode::<Signed>("x", &[WIRE_VERSION, 200]),
            Err(WireError::Malformed { .. })
        ));
        let mut ok = encode(&Signed {
            body: vec![1],
            signature: vec![2],
        });
        ok.push(0);
        assert_eq!(decode::<Signed>("x", &ok), Err(WireError::Trailing(1)));
    }

    #[test]
    fn signature_domains_do_not_cross() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let pk = key.verifying_key().to_bytes();
        let sig = sign(&key, domain::RECORD, b"m");
        assert!(verify(&pk, domain::RECORD, b"m", &sig, "r").is_ok());
        assert!(verify(&pk, domain::ADMISSION, b"m", &sig, "r").is_err());
        assert!(verify(&pk, domain::RECORD, b"n", &sig, "r").is_err());
        assert_eq!(
            verify(&pk, domain::RECORD, b"m", &sig[..10], "r"),
            Err(WireError::SignatureLength(10))
        );
    }
}
