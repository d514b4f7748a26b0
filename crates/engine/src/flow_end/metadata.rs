//! `sluice.flow`: what a flow's access log needs to find the flow again.
//!
//! The Check answer carries it to Envoy as ext_authz dynamic metadata; the
//! shipped Envoy configs copy it into the access log with
//! `%DYNAMIC_METADATA(envoy.filters.http.ext_authz:sluice.flow)%`. It is a
//! short `key=value;...` string rather than a structure so that it survives
//! any access-log formatter unchanged and can be read by eye in a log line:
//!
//! ```text
//! v=1;id=9f2c01d4e5a6b7c8;d=rejected;by=users/per-user;fm=users/latency
//! ```
//!
//! `fm` lists the flux meters (`policy/name`) that observe the flow when
//! its access log arrives; `ws` the schedulers and workload indices
//! (`policy/name:index`) that admitted it.
//!
//! Unknown keys are ignored when reading, so newer sidecars can add keys.

use std::fmt::Write as _;

/// The decoded form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowMeta<'a> {
    /// The flow id.
    pub id: u64,
    /// Whether the flow was accepted.
    pub accepted: bool,
    /// `policy/component` that rejected it, if it was rejected.
    pub rejected_by: Option<&'a str>,
    /// Comma-separated `policy/name` of the flux meters observing it.
    pub flux_meters: &'a str,
    /// Comma-separated `policy/name:workload` of the schedulers that
    /// admitted it, which learn their workloads' latency from its log.
    pub workloads: &'a str,
}

/// Appends a `sluice.flow` value to `out`. The one encoder: the engine
/// calls it with its flux meters and workloads where they live, so that an
/// accepted flow's metadata costs one string, not a join per list.
pub fn encode<'m>(
    out: &mut String,
    id: u64,
    accepted: bool,
    rejected_by: Option<&str>,
    flux_meters: impl IntoIterator<Item = &'m str>,
    workloads: impl IntoIterator<Item = (&'m str, usize)>,
) {
    let decision = if accepted { "accepted" } else { "rejected" };
    let _ = write!(out, "v=1;id={id:016x};d={decision}");
    if let Some(by) = rejected_by {
        let _ = write!(out, ";by={by}");
    }
    for (i, meter) in flux_meters.into_iter().enumerate() {
        out.push_str(if i == 0 { ";fm=" } else { "," });
        out.push_str(meter);
    }
    for (i, (scheduler, workload)) in workloads.into_iter().enumerate() {
        out.push_str(if i == 0 { ";ws=" } else { "," });
        let _ = write!(out, "{scheduler}:{workload}");
    }
}

/// Why a `sluice.flow` value could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// No `v=1`.
    #[error("unsupported sluice.flow version")]
    Version,
    /// No valid `id=`.
    #[error("sluice.flow has no valid id")]
    Id,
    /// No valid `d=`.
    #[error("sluice.flow has no valid decision")]
    Decision,
}

impl<'a> FlowMeta<'a> {
    /// Appends the encoded form to `out`.
    pub fn encode_into(&self, out: &mut String) {
        encode(
            out,
            self.id,
            self.accepted,
            self.rejected_by,
            self.flux_meters(),
            self.workloads(),
        );
    }

    /// The schedulers and workloads that admitted the flow.
    pub fn workloads(&self) -> impl Iterator<Item = (&'a str, usize)> {
        self.workloads.split(',').filter_map(|w| {
            let (key, index) = w.rsplit_once(':')?;
            Some((key, index.parse().ok()?))
        })
    }

    /// The flux meters observing the flow.
    pub fn flux_meters(&self) -> impl Iterator<Item = &'a str> {
        self.flux_meters.split(',').filter(|m| !m.is_empty())
    }

    /// Reads an encoded value.
    pub fn decode(s: &'a str) -> Result<Self, MetaError> {
        let (mut version, mut id, mut accepted, mut rejected_by) = (false, None, None, None);
        let mut flux_meters = "";
        let mut workloads = "";
        for field in s.trim().split(';') {
            let Some((k, v)) = field.split_once('=') else {
                continue;
            };
            match k {
                "v" => version = v == "1",
                "id" => id = u64::from_str_radix(v, 16).ok(),
                "d" => {
                    accepted = match v {
                        "accepted" => Some(true),
                        "rejected" => Some(false),
                        _ => None,
                    }
                }
                "by" => rejected_by = Some(v),
                "fm" => flux_meters = v,
                "ws" => workloads = v,
                _ => {}
            }
        }
        if !version {
            return Err(MetaError::Version);
        }
        Ok(FlowMeta {
            id: id.ok_or(MetaError::Id)?,
            accepted: accepted.ok_or(MetaError::Decision)?,
            rejected_by,
            flux_meters,
            workloads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for meta in [
            FlowMeta {
                id: 1,
                accepted: true,
                rejected_by: None,
                flux_meters: "",
                workloads: "",
            },
            FlowMeta {
                id: u64::MAX,
                accepted: false,
                rejected_by: Some("p/c"),
                flux_meters: "p/a,q/b",
                workloads: "p/s:1,q/t:0",
            },
        ] {
            let mut s = String::new();
            meta.encode_into(&mut s);
            assert_eq!(FlowMeta::decode(&s), Ok(meta));
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(FlowMeta::decode(""), Err(MetaError::Version));
        assert_eq!(FlowMeta::decode("-"), Err(MetaError::Version));
        assert_eq!(FlowMeta::decode("v=1;id=zz;d=accepted"), Err(MetaError::Id));
        assert_eq!(
            FlowMeta::decode("v=1;id=10;d=maybe"),
            Err(MetaError::Decision)
        );
        assert_eq!(
            FlowMeta::decode("v=1;id=10;d=accepted;future=x;;="),
            Ok(FlowMeta {
                id: 16,
                accepted: true,
                rejected_by: None,
                flux_meters: "",
                workloads: "",
            })
        );
        let meta = FlowMeta::decode("v=1;id=1;d=accepted;ws=p/s:1,bad,q/t:x,r/u:0").expect("valid");
        assert_eq!(
            meta.workloads().collect::<Vec<_>>(),
            [("p/s", 1), ("r/u", 0)]
        );
        let meta = FlowMeta::decode("v=1;id=1;d=accepted;fm=p/a,,q/b").expect("valid");
        assert_eq!(meta.flux_meters().collect::<Vec<_>>(), ["p/a", "q/b"]);
    }
}
