//! Time for Sluice: the engine's one injectable clock, durations as flags
//! and policies write them, and wall-clock milliseconds for the control
//! API.
//!
//! Layout:
//! - [`clock`]: [`Clock`], monotonic nanoseconds ([`Nanos`]) from quanta's
//!   TSC clock, or from a mock a test moves by hand, so that token buckets,
//!   queues and expiry are tested on simulated time;
//! - this file: [`parse_duration`] (the one duration syntax of every flag
//!   and policy field) and [`unix_ms`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod clock;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use clock::{Clock, MockTime, Nanos, nanos};

/// Parses a duration as flags and policy files write it: humantime's
/// syntax (`250ms`, `1m30s`), or fractional seconds (`0.5s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(d);
    }
    if let Some(secs) = s.strip_suffix('s').and_then(|n| n.parse::<f64>().ok())
        && secs.is_finite()
        && (0.0..1e12).contains(&secs)
    {
        return Ok(Duration::from_secs_f64(secs));
    }
    Err(format!(
        "invalid duration {s:?} (examples: \"250ms\", \"1s\", \"0.5s\", \"1m30s\")"
    ))
}

/// Milliseconds since the Unix epoch, as the control API's `valid_until`
/// counts them (0 if the system clock is before 1970).
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_flags_and_policies_write_them() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration(" 1m30s "), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
        for bad in ["", "fast", "-1s", "1e13s", "NaNs"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
