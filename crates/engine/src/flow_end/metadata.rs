//! `sluice.flow`: what a flow's access log needs to find the flow again.
//!
//! The Check answer carries it to Envoy as ext_authz dynamic metadata; the
//! shipped Envoy configs copy it into the access log with
//! `%DYNAMIC_METADATA(envoy.filters.http.ext_authz:sluice.flow)%`. It is a
//! short `key=value;...` string rather than a structure so that it survives
//! any access-log formatter unchanged and can be read by eye in a log line:
//!
//! ```text
//! v=1;id=9f2c01d4e5a6b7c8;d=rejected;by=users/per-user;fm=users/latency;t=5d0e9a2c41b7f318
//! ```
//!
//! `fm` lists the flux meters (`policy/name`) that observe the flow when
//! its access log arrives; `ws` the schedulers and workload indices
//! (`policy/name:index`) that admitted it.
//!
//! **Access logs are untrusted input** (docs/security.md): anyone who can
//! reach the OTLP listener could otherwise name a real flux meter with a
//! made-up latency and steer the controller, or free a live flow's
//! concurrency slot. So the value ends in `t`, a 64-bit SipHash-2-4 tag of
//! everything before it under a [`FlowKey`] only this sidecar knows, and a
//! record whose tag does not verify is ignored. The key is random per
//! process unless `--flow-key-file` gives one (so that logs of flows decided
//! before a restart still count).
//!
//! Unknown keys are ignored when reading, so newer sidecars can add keys
//! (before `t`, which is always last).

use std::fmt::Write as _;

use siphasher::sip::SipHasher24;

/// The secret `sluice.flow` values are signed with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FlowKey([u8; 16]);

impl std::fmt::Debug for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlowKey(..)")
    }
}

/// What separates the signed part of a value from its tag.
const TAG: &str = ";t=";

impl FlowKey {
    /// A key from the operating system's random source. Should that fail
    /// (it does not on Linux), from `fastrand`, whose seed also comes from
    /// the OS through std's hasher keys: weaker, but never a fixed key.
    pub fn random() -> FlowKey {
        let mut key = [0; 16];
        if getrandom::fill(&mut key).is_err() {
            key = fastrand::u128(..).to_le_bytes();
        }
        FlowKey(key)
    }

    /// The key derived from a shared secret (the contents of
    /// `--flow-key-file`): the first 16 bytes of its SHA-256.
    pub fn from_secret(secret: &[u8]) -> FlowKey {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(secret);
        let mut key = [0; 16];
        key.copy_from_slice(&digest[..16]);
        FlowKey(key)
    }

    fn tag(&self, signed: &str) -> u64 {
        SipHasher24::new_with_key(&self.0).hash(signed.as_bytes())
    }

    /// Appends the tag of `out[start..]` to `out`.
    fn sign_from(&self, out: &mut String, start: usize) {
        let tag = self.tag(&out[start..]);
        let _ = write!(out, "{TAG}{tag:016x}");
    }

    /// `unsigned` with its tag appended: what the engine sends, for tests
    /// and tools that build access logs of flows by hand.
    pub fn sign(&self, unsigned: &str) -> String {
        let mut out = unsigned.to_owned();
        self.sign_from(&mut out, 0);
        out
    }

    /// The signed part of `value`, if its tag is this key's.
    fn verify<'a>(&self, value: &'a str) -> Option<&'a str> {
        let (signed, tag) = value.rsplit_once(TAG)?;
        let tag = u64::from_str_radix(tag, 16)
            .ok()
            .filter(|_| tag.len() == 16)?;
        // Comparing two u64s takes the same time whatever bits differ.
        (self.tag(signed) == tag).then_some(signed)
    }
}

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
    key: &FlowKey,
    id: u64,
    accepted: bool,
    rejected_by: Option<&str>,
    flux_meters: impl IntoIterator<Item = &'m str>,
    workloads: impl IntoIterator<Item = (&'m str, usize)>,
) {
    let start = out.len();
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
    key.sign_from(out, start);
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
    /// No tag, or not this sidecar's: a flow it did not decide (or decided
    /// under another key, before a restart).
    #[error("sluice.flow is not signed by this sidecar")]
    Unsigned,
}

impl<'a> FlowMeta<'a> {
    /// Appends the encoded form, signed with `key`, to `out`.
    pub fn encode_into(&self, out: &mut String, key: &FlowKey) {
        encode(
            out,
            key,
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

    /// Reads a value signed with `key`.
    pub fn decode(s: &'a str, key: &FlowKey) -> Result<Self, MetaError> {
        let s = key.verify(s.trim()).ok_or(MetaError::Unsigned)?;
        Self::decode_signed(s)
    }

    /// Reads the part of a value under its tag.
    fn decode_signed(s: &'a str) -> Result<Self, MetaError> {
        let (mut version, mut id, mut accepted, mut rejected_by) = (false, None, None, None);
        let mut flux_meters = "";
        let mut workloads = "";
        for field in s.split(';') {
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
        let key = FlowKey::random();
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
            meta.encode_into(&mut s, &key);
            assert_eq!(FlowMeta::decode(&s, &key), Ok(meta));
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let key = FlowKey::random();
        let decode = |s: &str| FlowMeta::decode(&key.sign(s), &key).map(|m| (m.id, m.accepted));
        assert_eq!(decode(""), Err(MetaError::Version));
        assert_eq!(decode("-"), Err(MetaError::Version));
        assert_eq!(decode("v=1;id=zz;d=accepted"), Err(MetaError::Id));
        assert_eq!(decode("v=1;id=10;d=maybe"), Err(MetaError::Decision));
        assert_eq!(decode("v=1;id=10;d=accepted;future=x;;="), Ok((16, true)));
        let signed = key.sign("v=1;id=1;d=accepted;ws=p/s:1,bad,q/t:x,r/u:0");
        let meta = FlowMeta::decode(&signed, &key).expect("valid");
        assert_eq!(
            meta.workloads().collect::<Vec<_>>(),
            [("p/s", 1), ("r/u", 0)]
        );
        let signed = key.sign("v=1;id=1;d=accepted;fm=p/a,,q/b");
        let meta = FlowMeta::decode(&signed, &key).expect("valid");
        assert_eq!(meta.flux_meters().collect::<Vec<_>>(), ["p/a", "q/b"]);
    }

    #[test]
    fn only_this_keys_untouched_values_are_read() {
        let key = FlowKey::random();
        let mut value = String::new();
        encode(&mut value, &key, 7, true, None, ["p/latency"], []);
        assert!(FlowMeta::decode(&value, &key).is_ok());
        // Unsigned, as a forger who never saw a Check answer writes it.
        let unsigned = value.rsplit_once(TAG).expect("tagged").0;
        assert_eq!(FlowMeta::decode(unsigned, &key), Err(MetaError::Unsigned));
        // Another sidecar's (or this one's before a restart).
        assert_eq!(
            FlowMeta::decode(&value, &FlowKey::random()),
            Err(MetaError::Unsigned)
        );
        // Any edit of the signed part: another meter, another id, a
        // duplicated field, a tag that is cut short or padded.
        for edited in [
            value.replace("p/latency", "p/other"),
            value.replace("id=0000000000000007", "id=0000000000000008"),
            value.replacen(";t=", ";fm=p/x;t=", 1),
            value[..value.len() - 1].to_owned(),
            format!("{value}0"),
            format!("{unsigned};t=;t={}", &value[value.len() - 16..]),
        ] {
            assert_eq!(
                FlowMeta::decode(&edited, &key),
                Err(MetaError::Unsigned),
                "{edited}"
            );
        }
        // A shared secret gives every sidecar holding it the same key.
        assert_eq!(
            FlowKey::from_secret(b"s3cret"),
            FlowKey::from_secret(b"s3cret")
        );
        assert_ne!(
            FlowKey::from_secret(b"s3cret"),
            FlowKey::from_secret(b"other")
        );
        assert_eq!(format!("{key:?}"), "FlowKey(..)");
    }
}
