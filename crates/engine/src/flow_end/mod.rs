//! The end of a flow, as Envoy's access log tells it.
//!
//! - this file: [`FlowEnd`], the attributes of one access-log record;
//! - [`metadata`]: `sluice.flow`, what the Check's answer tells Envoy so
//!   that the access log can name the flow again;
//! - [`inflight`]: the concurrency slots of admitted flows, held until their
//!   access log arrives (`Engine::end_flow`) or their deadline passes.
//!
//! The shipped Envoy configs send these OTLP log attributes (keys as
//! Aperture's Istio integration used them):
//!
//! | attribute | Envoy operator |
//! | --- | --- |
//! | `sluice.flow` | `%DYNAMIC_METADATA(envoy.filters.http.ext_authz:sluice.flow)%` |
//! | `http.status_code` | `%RESPONSE_CODE%` |
//! | `authz_duration` | `%DYNAMIC_METADATA(envoy.filters.http.ext_authz:ext_authz_duration)%` |
//! | `DURATION`, `REQUEST_DURATION`, `REQUEST_TX_DURATION`, `RESPONSE_DURATION`, `RESPONSE_TX_DURATION`, `BYTES_RECEIVED`, `BYTES_SENT` | the `%…%` operator of the same name |
//!
//! Envoy writes `-` for a value it does not have. Durations are whole
//! milliseconds. From them Sluice derives:
//!
//! - `workload_duration_ms` = `RESPONSE_DURATION` − `authz_duration`: the
//!   time the upstream took. Negative differences (clock granularity) are
//!   dropped; zero is kept, because both operands are whole milliseconds and
//!   a sub-millisecond upstream legitimately yields 0. A flow Sluice
//!   rejected never reached the upstream: Envoy 1.40 logs neither
//!   `RESPONSE_DURATION` nor `authz_duration` for it, and its workload
//!   duration is 0 by definition.
//! - `flow_duration_ms` = `DURATION`.
//! - `response_received`: `RESPONSE_DURATION` is present.
//! - `flow_status`: `OK` for 1xx–3xx, else `Error`.
//!
//! **Bounds.** The record is untrusted input (docs/security.md). A value
//! that is present but out of bounds (a duration outside [0,
//! [`MAX_DURATION_MS`]], a byte count outside [0, [`MAX_BYTES`]], a status
//! code other than 0 or 100–599, or anything infinite or NaN) makes the
//! whole record invalid: its flow ends, but nothing observes it, so one
//! record cannot drive a histogram's sum to infinity. Text that is not a
//! number at all reads as absent, as Envoy's `-` does. Attributes outside
//! the contract that a flux meter observes count only when finite and
//! within ±[`MAX_EXTRA`].

pub mod ended;
pub mod inflight;
pub mod metadata;

use std::borrow::Cow;

/// Longest duration an access log may report: a day, in milliseconds.
pub const MAX_DURATION_MS: f64 = 86_400_000.0;
/// Most bytes an access log may report for one flow: 2^50 (1 PiB).
pub const MAX_BYTES: f64 = (1u64 << 50) as f64;
/// Largest magnitude of an attribute outside the contract.
pub const MAX_EXTRA: f64 = 1e15;

/// One attribute value as an adapter hands it over.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue<'a> {
    /// Text (Envoy's formatters produce text).
    Text(Cow<'a, str>),
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Double(f64),
    /// A boolean.
    Bool(bool),
}

impl AttrValue<'_> {
    /// The value as a number: text is parsed; `-`, empty text, garbage and
    /// non-finite numbers are `None`.
    pub fn number(&self) -> Option<f64> {
        self.any_number().filter(|n| n.is_finite())
    }

    /// The value as a number, infinities and NaN included.
    fn any_number(&self) -> Option<f64> {
        Some(match self {
            AttrValue::Text(t) => {
                let t = t.trim();
                if t.is_empty() || t == "-" {
                    return None;
                }
                t.parse::<f64>().ok()?
            }
            AttrValue::Int(i) => *i as f64,
            AttrValue::Double(d) => *d,
            AttrValue::Bool(_) => return None,
        })
    }
}

/// Looks up access-log attributes that are not part of the contract, for
/// flux meters with a custom `attribute_key`.
pub trait ExtraAttributes {
    /// The attribute's value as a number, if present and numeric.
    fn number(&self, key: &str) -> Option<f64>;
}

/// No extra attributes.
pub struct NoExtras;

impl ExtraAttributes for NoExtras {
    fn number(&self, _: &str) -> Option<f64> {
        None
    }
}

/// What a finished flow's access log says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FlowEnd<'a> {
    /// `sluice.flow`, when the flow went through Sluice.
    pub flow: Option<Cow<'a, str>>,
    /// `http.status_code`.
    pub status_code: Option<u16>,
    /// `authz_duration`, ms.
    pub authz_duration_ms: Option<f64>,
    /// `DURATION`, ms.
    pub duration_ms: Option<f64>,
    /// `REQUEST_DURATION`, ms.
    pub request_duration_ms: Option<f64>,
    /// `REQUEST_TX_DURATION`, ms.
    pub request_tx_duration_ms: Option<f64>,
    /// `RESPONSE_DURATION`, ms.
    pub response_duration_ms: Option<f64>,
    /// `RESPONSE_TX_DURATION`, ms.
    pub response_tx_duration_ms: Option<f64>,
    /// `BYTES_RECEIVED`.
    pub bytes_received: Option<f64>,
    /// `BYTES_SENT`.
    pub bytes_sent: Option<f64>,
    /// Some attribute was a number out of its bounds: the record is
    /// invalid.
    pub out_of_bounds: bool,
}

/// Attribute names a flux meter can observe without extra attributes:
/// those of the access-log contract (docs/envoy.md) and the values derived
/// from them. A flux meter naming another needs it added to Envoy's
/// access log.
pub const CONTRACT_ATTRIBUTES: [&str; 11] = [
    "workload_duration_ms",
    "flow_duration_ms",
    "DURATION",
    "authz_duration",
    "REQUEST_DURATION",
    "REQUEST_TX_DURATION",
    "RESPONSE_DURATION",
    "RESPONSE_TX_DURATION",
    "BYTES_RECEIVED",
    "BYTES_SENT",
    "http.status_code",
];

/// `flow_status` label values.
pub const FLOW_STATUS_OK: &str = "OK";
/// `flow_status` label values.
pub const FLOW_STATUS_ERROR: &str = "Error";

impl<'a> FlowEnd<'a> {
    /// Records one attribute; returns false when the key is not part of the
    /// contract (the caller may keep it for [`ExtraAttributes`]).
    pub fn set(&mut self, key: &str, value: AttrValue<'a>) -> bool {
        let slot = match key {
            "sluice.flow" => {
                self.flow = match value {
                    AttrValue::Text(t) if !t.trim().is_empty() && t.trim() != "-" => Some(t),
                    _ => None,
                };
                return true;
            }
            "http.status_code" => {
                self.status_code = match value.any_number() {
                    Some(n) if n == 0.0 || (n.fract() == 0.0 && (100.0..=599.0).contains(&n)) => {
                        Some(n as u16)
                    }
                    Some(_) => {
                        self.out_of_bounds = true;
                        None
                    }
                    None => None,
                };
                return true;
            }
            "authz_duration" => (&mut self.authz_duration_ms, MAX_DURATION_MS),
            "DURATION" => (&mut self.duration_ms, MAX_DURATION_MS),
            "REQUEST_DURATION" => (&mut self.request_duration_ms, MAX_DURATION_MS),
            "REQUEST_TX_DURATION" => (&mut self.request_tx_duration_ms, MAX_DURATION_MS),
            "RESPONSE_DURATION" => (&mut self.response_duration_ms, MAX_DURATION_MS),
            "RESPONSE_TX_DURATION" => (&mut self.response_tx_duration_ms, MAX_DURATION_MS),
            "BYTES_RECEIVED" => (&mut self.bytes_received, MAX_BYTES),
            "BYTES_SENT" => (&mut self.bytes_sent, MAX_BYTES),
            _ => return false,
        };
        let (slot, max) = slot;
        *slot = match value.any_number() {
            // NaN is in no range.
            Some(n) if (0.0..=max).contains(&n) => Some(n),
            Some(_) => {
                self.out_of_bounds = true;
                None
            }
            None => None,
        };
        true
    }

    /// `workload_duration_ms`; `accepted` is Sluice's decision for the flow.
    pub fn workload_duration_ms(&self, accepted: bool) -> Option<f64> {
        if !accepted && self.response_duration_ms.is_none() {
            return Some(0.0);
        }
        let workload = self.response_duration_ms? - self.authz_duration_ms.unwrap_or(0.0);
        (workload >= 0.0).then_some(workload)
    }

    /// `response_received`.
    pub fn response_received(&self) -> bool {
        self.response_duration_ms.is_some()
    }

    /// `flow_status`: `OK` for 1xx–3xx, else `Error`.
    pub fn flow_status(&self) -> &'static str {
        match self.status_code {
            Some(100..=399) => FLOW_STATUS_OK,
            _ => FLOW_STATUS_ERROR,
        }
    }

    /// The value a flux meter observes for `attribute_key`: a derived value,
    /// a contract attribute, or an extra numeric attribute.
    pub fn value(&self, key: &str, accepted: bool, extras: &dyn ExtraAttributes) -> Option<f64> {
        match key {
            "workload_duration_ms" => self.workload_duration_ms(accepted),
            "flow_duration_ms" | "DURATION" => self.duration_ms,
            "authz_duration" => self.authz_duration_ms,
            "REQUEST_DURATION" => self.request_duration_ms,
            "REQUEST_TX_DURATION" => self.request_tx_duration_ms,
            "RESPONSE_DURATION" => self.response_duration_ms,
            "RESPONSE_TX_DURATION" => self.response_tx_duration_ms,
            "BYTES_RECEIVED" => self.bytes_received,
            "BYTES_SENT" => self.bytes_sent,
            "http.status_code" => self.status_code.map(f64::from),
            other => extras
                .number(other)
                .filter(|n| n.is_finite() && n.abs() <= MAX_EXTRA),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> AttrValue<'_> {
        AttrValue::Text(Cow::Borrowed(s))
    }

    #[test]
    fn numbers_dashes_and_garbage() {
        assert_eq!(text("12").number(), Some(12.0));
        assert_eq!(text(" 12.5 ").number(), Some(12.5));
        assert_eq!(text("-").number(), None);
        assert_eq!(text("").number(), None);
        assert_eq!(text("12ms").number(), None);
        assert_eq!(text("NaN").number(), None);
        assert_eq!(text("inf").number(), None);
        assert_eq!(AttrValue::Int(7).number(), Some(7.0));
        assert_eq!(AttrValue::Double(f64::NAN).number(), None);
        assert_eq!(AttrValue::Bool(true).number(), None);
    }

    fn end(pairs: &[(&'static str, &'static str)]) -> FlowEnd<'static> {
        let mut end = FlowEnd::default();
        for (k, v) in pairs {
            assert!(end.set(k, text(v)), "{k} is part of the contract");
        }
        end
    }

    #[test]
    fn the_contract_is_read_and_derived() {
        let e = end(&[
            ("sluice.flow", "v=1;id=1;d=accepted"),
            ("http.status_code", "503"),
            ("authz_duration", "2"),
            ("DURATION", "40"),
            ("RESPONSE_DURATION", "35"),
            ("BYTES_SENT", "120"),
            ("REQUEST_TX_DURATION", "-"),
        ]);
        assert_eq!(e.flow.as_deref(), Some("v=1;id=1;d=accepted"));
        assert_eq!(e.status_code, Some(503));
        assert_eq!(e.workload_duration_ms(true), Some(33.0));
        assert_eq!(e.value("flow_duration_ms", true, &NoExtras), Some(40.0));
        assert_eq!(e.value("BYTES_SENT", true, &NoExtras), Some(120.0));
        assert_eq!(e.request_tx_duration_ms, None);
        assert!(e.response_received());
        assert_eq!(e.flow_status(), FLOW_STATUS_ERROR);
        assert_eq!(
            end(&[("http.status_code", "302")]).flow_status(),
            FLOW_STATUS_OK
        );
        assert_eq!(
            end(&[("http.status_code", "0")]).flow_status(),
            FLOW_STATUS_ERROR
        );
        assert_eq!(
            end(&[("http.status_code", "-")]).flow_status(),
            FLOW_STATUS_ERROR
        );
        assert_eq!(end(&[("http.status_code", "20x")]).status_code, None);
        let mut e = FlowEnd::default();
        assert!(!e.set("user_agent", text("curl")));
    }

    #[test]
    fn workload_duration_edge_cases() {
        // Sub-millisecond upstream: both operands round to the same value.
        let e = end(&[("RESPONSE_DURATION", "1"), ("authz_duration", "1")]);
        assert_eq!(e.workload_duration_ms(true), Some(0.0));
        // Granularity can make it negative: dropped.
        let e = end(&[("RESPONSE_DURATION", "1"), ("authz_duration", "2")]);
        assert_eq!(e.workload_duration_ms(true), None);
        // No response from upstream (reset, timeout) on an accepted flow: unknown.
        let e = end(&[("RESPONSE_DURATION", "-"), ("authz_duration", "1")]);
        assert_eq!(e.workload_duration_ms(true), None);
        assert!(!e.response_received());
        // Rejected by Sluice: the workload never ran.
        let e = end(&[("RESPONSE_DURATION", "-"), ("authz_duration", "-")]);
        assert_eq!(e.workload_duration_ms(false), Some(0.0));
        // No authz_duration on an accepted flow: the whole response time.
        let e = end(&[("RESPONSE_DURATION", "9")]);
        assert_eq!(e.workload_duration_ms(true), Some(9.0));
    }

    #[test]
    fn out_of_bounds_numbers_make_the_record_invalid() {
        for (key, value) in [
            ("RESPONSE_DURATION", "1e308"),
            ("authz_duration", "-1e308"),
            ("DURATION", "-1"),
            ("REQUEST_DURATION", "86400001"),
            ("RESPONSE_DURATION", "inf"),
            ("RESPONSE_TX_DURATION", "NaN"),
            ("BYTES_SENT", "1e300"),
            ("http.status_code", "999"),
            ("http.status_code", "42"),
            ("http.status_code", "200.5"),
        ] {
            let e = end(&[(key, value)]);
            assert!(e.out_of_bounds, "{key}={value}");
            assert_eq!(e.value(key, true, &NoExtras), None, "{key}={value}");
        }
        let mut e = FlowEnd::default();
        e.set("RESPONSE_DURATION", AttrValue::Double(f64::INFINITY));
        assert!(e.out_of_bounds);
        // In bounds, absent or not a number at all: valid.
        let e = end(&[
            ("RESPONSE_DURATION", "86400000"),
            ("DURATION", "0"),
            ("authz_duration", "-"),
            ("BYTES_SENT", "12ms"),
            ("http.status_code", "0"),
        ]);
        assert!(!e.out_of_bounds);
        assert_eq!(e.status_code, Some(0));
        struct Huge;
        impl ExtraAttributes for Huge {
            fn number(&self, _: &str) -> Option<f64> {
                Some(1e300)
            }
        }
        assert_eq!(e.value("custom", true, &Huge), None);
    }

    #[test]
    fn missing_flow_metadata_reads_as_none() {
        assert_eq!(end(&[("sluice.flow", "-")]).flow, None);
        assert_eq!(end(&[("sluice.flow", " ")]).flow, None);
        let mut e = FlowEnd::default();
        e.set("sluice.flow", AttrValue::Int(3));
        assert_eq!(e.flow, None);
    }
}
