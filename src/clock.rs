//! Wall-clock time as the protocol counts it: unix seconds and
//! milliseconds. The one place meshpeer reads the system clock for a
//! timestamp (versions, stamps, expiry, revocation lists); the sans-IO
//! cores take these values as arguments instead.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the unix epoch (0 if the clock is before it).
pub fn unix_secs() -> u64 {
    unix_ms() / 1000
}
