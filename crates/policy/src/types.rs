//! Value types of the policy language that validate themselves while the
//! YAML is read, so that a bad value is reported with the exact file, line
//! and field path by the loader (see `load.rs`) instead of by a later pass
//! that no longer knows where the value came from.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Deserialize, Deserializer};
use serde::{Serialize, Serializer};

/// `JsonSchema` for a value type read by a hand-written `Deserialize`: the
/// schema says what that `Deserialize` accepts (as far as JSON Schema can),
/// and is written inline where the type is used.
macro_rules! value_schema {
    ($ty:ty, $name:literal, $schema:tt) => {
        impl JsonSchema for $ty {
            fn inline_schema() -> bool {
                true
            }
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
            fn schema_id() -> Cow<'static, str> {
                Cow::Borrowed(concat!(module_path!(), "::", $name))
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!($schema)
            }
        }
    };
}

/// `Serialize` as the plain number a value type is read from, so that the
/// schema can state serde defaults of that type (schemars writes a field's
/// default only when its type is `Serialize`).
macro_rules! serialize_as_number {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.0.serialize(s)
            }
        }
    };
}

/// A name of a policy or component: it ends up in metric labels and in the
/// `x-sluice-rejected-by` header, so it is kept to `[A-Za-z0-9_.-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(pub String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() || s.len() > 128 {
            return Err(de::Error::custom("a name must have 1 to 128 characters"));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(de::Error::custom(format!(
                "invalid character {c:?} in name {s:?} (allowed: letters, digits, '_', '-', '.')"
            )));
        }
        Ok(Name(s))
    }
}

value_schema!(Name, "Name", {
    "type": "string",
    "minLength": 1,
    "maxLength": 128,
    "pattern": "^[A-Za-z0-9_.-]+$",
});

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A flow label name. Classifier outputs travel in the `baggage` header, so
/// a name is an HTTP token (RFC 9110): no spaces, commas, `;` or `=`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelName(pub String);

impl<'de> Deserialize<'de> for LabelName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Err(de::Error::custom("a label name must not be empty"));
        }
        let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if let Some(c) = s.chars().find(|&c| !is_tchar(c)) {
            return Err(de::Error::custom(format!(
                "invalid character {c:?} in label name {s:?}"
            )));
        }
        Ok(LabelName(s))
    }
}

value_schema!(LabelName, "LabelName", {
    "type": "string",
    "minLength": 1,
    "pattern": "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$",
});

impl fmt::Display for LabelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A finite number that is zero or more.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct NonNegative(pub f64);

impl<'de> Deserialize<'de> for NonNegative {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !v.is_finite() || v < 0.0 {
            return Err(de::Error::custom(format!(
                "must be a finite number >= 0, got {v}"
            )));
        }
        Ok(NonNegative(v))
    }
}

value_schema!(NonNegative, "NonNegative", { "type": "number", "minimum": 0 });
serialize_as_number!(NonNegative);

/// A finite number above zero.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Positive(pub f64);

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !v.is_finite() || v <= 0.0 {
            return Err(de::Error::custom(format!(
                "must be a finite number > 0, got {v}"
            )));
        }
        Ok(Positive(v))
    }
}

value_schema!(Positive, "Positive", { "type": "number", "exclusiveMinimum": 0 });
serialize_as_number!(Positive);

/// A percentage in `[0, 100]`.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Percentage(pub f64);

impl<'de> Deserialize<'de> for Percentage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !(0.0..=100.0).contains(&v) {
            return Err(de::Error::custom(format!(
                "must be a percentage between 0 and 100, got {v}"
            )));
        }
        Ok(Percentage(v))
    }
}

value_schema!(Percentage, "Percentage", { "type": "number", "minimum": 0, "maximum": 100 });
serialize_as_number!(Percentage);

/// The HTTP status Envoy answers a rejected request with: 400 to 599.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeniedStatus(pub u16);

impl DeniedStatus {
    /// Samplers' default, as in Aperture.
    pub fn forbidden() -> Self {
        DeniedStatus(403)
    }
    /// Limiters' default, as in Aperture.
    pub fn too_many_requests() -> Self {
        DeniedStatus(429)
    }
    /// Schedulers' default, as in Aperture.
    pub fn service_unavailable() -> Self {
        DeniedStatus(503)
    }
}

impl<'de> Deserialize<'de> for DeniedStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u64::deserialize(d)?;
        if !(400..=599).contains(&v) {
            return Err(de::Error::custom(format!(
                "must be an HTTP error status between 400 and 599, got {v}"
            )));
        }
        Ok(DeniedStatus(v as u16))
    }
}

value_schema!(DeniedStatus, "DeniedStatus", { "type": "integer", "minimum": 400, "maximum": 599 });
serialize_as_number!(DeniedStatus);

/// A duration written as text: `250ms`, `1s`, `1m30s`, `2h`, or fractional
/// seconds as Aperture wrote them (`0.5s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DurationSpec(pub Duration);

impl DurationSpec {
    /// Parses the text form (see [`sluice_time::parse_duration`], the one
    /// syntax of flags and policies).
    pub fn parse(s: &str) -> Result<Duration, String> {
        sluice_time::parse_duration(s)
    }
}

impl<'de> Deserialize<'de> for DurationSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DurationSpec::parse(&s)
            .map(DurationSpec)
            .map_err(de::Error::custom)
    }
}

value_schema!(DurationSpec, "Duration", { "type": "string" });

/// The text form, as `humantime` prints it (`2h`, `250ms`, `1m 30s`).
impl Serialize for DurationSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

/// A positive duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PositiveDuration(pub Duration);

impl<'de> Deserialize<'de> for PositiveDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let DurationSpec(v) = DurationSpec::deserialize(d)?;
        if v.is_zero() {
            return Err(de::Error::custom("must be longer than zero"));
        }
        Ok(PositiveDuration(v))
    }
}

value_schema!(PositiveDuration, "PositiveDuration", { "type": "string" });

impl Serialize for PositiveDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        DurationSpec(self.0).serialize(s)
    }
}

/// A regular expression, compiled when read so that a bad one is reported
/// where it is written.
#[derive(Clone, Debug)]
pub struct RegexSpec(pub regex::Regex);

impl PartialEq for RegexSpec {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl<'de> Deserialize<'de> for RegexSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        regex::RegexBuilder::new(&s)
            .size_limit(1 << 20)
            .build()
            .map(RegexSpec)
            .map_err(|e| de::Error::custom(format!("invalid regex: {e}")))
    }
}

// Not `"format": "regex"`: that is ECMA-262 syntax, not the `regex` crate's.
value_schema!(RegexSpec, "Regex", { "type": "string" });

/// Most values a [`LabelValues`] list holds.
pub const MAX_LABEL_VALUES: usize = 1_000;

/// A list of label values (at most [`MAX_LABEL_VALUES`]), each matched
/// exactly, byte for byte. Numbers and booleans are read as the text they
/// are written as.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelValues(pub Vec<String>);

impl<'de> Deserialize<'de> for LabelValues {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        if v.len() > MAX_LABEL_VALUES {
            return Err(de::Error::custom(format!(
                "at most {MAX_LABEL_VALUES} values, got {}",
                v.len()
            )));
        }
        Ok(LabelValues(v))
    }
}

value_schema!(LabelValues, "LabelValues", {
    "type": "array",
    "items": { "type": ["string", "number", "boolean"] },
    "maxItems": MAX_LABEL_VALUES,
});

/// A list that must not be empty.
#[derive(Clone, Debug, PartialEq)]
pub struct NonEmpty<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for NonEmpty<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Vec::<T>::deserialize(d)?;
        if v.is_empty() {
            return Err(de::Error::custom("must have at least one entry"));
        }
        Ok(NonEmpty(v))
    }
}

impl<T: JsonSchema> JsonSchema for NonEmpty<T> {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        Cow::Owned(format!("NonEmpty_Array_of_{}", T::schema_name()))
    }
    fn schema_id() -> Cow<'static, str> {
        Cow::Owned(format!("{}::NonEmpty<{}>", module_path!(), T::schema_id()))
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "array",
            "items": generator.subschema_for::<T>(),
            "minItems": 1,
        })
    }
}

impl<T> std::ops::Deref for NonEmpty<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_both_spellings() {
        assert_eq!(DurationSpec::parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(DurationSpec::parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(DurationSpec::parse("0.5s"), Ok(Duration::from_millis(500)));
        assert!(DurationSpec::parse("-1s").is_err());
        assert!(DurationSpec::parse("soon").is_err());
        assert!(DurationSpec::parse("NaNs").is_err());
    }
}
