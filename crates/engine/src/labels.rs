//! Flow labels: how the engine names a request attribute and how it reads it.
//!
//! Policies name labels by string (`http.method`, `http.request.header.user_id`,
//! a baggage member, a classifier's output). Matching those strings on every
//! request would be wasteful, so a policy's label names are compiled once into
//! [`LabelRef`]s that say *where* the value lives; a [`LabelSource`] (the Envoy
//! adapter, or a map in tests) answers by looking there directly, borrowing
//! from the request instead of building a label map per flow.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use smallvec::SmallVec;

/// Prefix of the labels that expose request headers, as Aperture named them.
pub const HEADER_PREFIX: &str = "http.request.header.";

/// A label name, compiled: the name as written and where its value lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LabelRef {
    /// The name as the policy wrote it; classifier outputs are matched on it.
    pub name: Arc<str>,
    /// Where a request keeps this label's value.
    pub kind: LabelKind,
}

/// Where a label's value comes from. Everything that is not a well-known
/// request attribute or a header is looked up among the members of the W3C
/// `baggage` header (and, before that, among the classifier outputs).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LabelKind {
    /// `http.method`
    Method,
    /// `http.path`: the path without its query string.
    Path,
    /// `http.target`: the path with its query string.
    Target,
    /// `http.host`
    Host,
    /// `http.scheme`
    Scheme,
    /// `http.flavor`: `1.0`, `1.1`, `2.0` or `3.0`.
    Flavor,
    /// `source.address`: the downstream peer's IP address.
    SourceAddress,
    /// `destination.address`: the local address the request arrived on.
    DestinationAddress,
    /// `http.request.header.<name>`; holds `<name>` (lower case, `_` for `-`).
    Header(Box<str>),
    /// Any other name: a baggage member (or a classifier output).
    Baggage,
}

impl LabelRef {
    /// Compiles a label name.
    pub fn new(name: &str) -> Self {
        let kind = match name {
            "http.method" => LabelKind::Method,
            "http.path" => LabelKind::Path,
            "http.target" => LabelKind::Target,
            "http.host" => LabelKind::Host,
            "http.scheme" => LabelKind::Scheme,
            "http.flavor" => LabelKind::Flavor,
            "source.address" => LabelKind::SourceAddress,
            "destination.address" => LabelKind::DestinationAddress,
            _ => match name.strip_prefix(HEADER_PREFIX) {
                Some(header) => LabelKind::Header(normalize_header_name(header).into()),
                None => LabelKind::Baggage,
            },
        };
        LabelRef {
            name: name.into(),
            kind,
        }
    }

    /// The label for a header given by its wire name (`User-Agent` becomes
    /// `http.request.header.user_agent`).
    pub fn header(wire_name: &str) -> Self {
        LabelRef::new(&format!(
            "{HEADER_PREFIX}{}",
            normalize_header_name(wire_name)
        ))
    }
}

/// A header name as a label suffix: lower case, `-` written as `_`.
pub fn normalize_header_name(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'-' => '_',
            _ => b.to_ascii_lowercase() as char,
        })
        .collect()
}

/// True when the header called `wire` (as it arrived) is the one a label
/// names by `normalized`. Compares without allocating.
#[inline]
pub fn header_name_matches(wire: &[u8], normalized: &str) -> bool {
    wire.len() == normalized.len()
        && wire.iter().zip(normalized.as_bytes()).all(|(&w, &n)| {
            let w = if w == b'-' {
                b'_'
            } else {
                w.to_ascii_lowercase()
            };
            w == n
        })
}

/// What the engine needs from a request. Implementations borrow from the
/// request they wrap; values come back as `Cow` so that the rare value that
/// needs decoding (percent-encoded baggage, bytes that are not UTF-8) can be
/// owned while the common case is a borrow.
pub trait LabelSource {
    /// The value of a request label, if the request has it.
    fn label(&self, key: &LabelRef) -> Option<Cow<'_, str>>;
    /// The request body, when Envoy sent it (`with_request_body`).
    fn body(&self) -> Option<&[u8]>;
    /// Calls `f` with every label the request carries, by the name a
    /// policy would read it under: for preview (`crate::preview`), never on
    /// the decision path, which only looks labels up.
    fn each_label(&self, f: &mut dyn FnMut(&str, Cow<'_, str>));
}

/// A [`LabelSource`] over a plain map from label name to value; for tests,
/// benchmarks and callers that are not Envoy.
#[derive(Clone, Debug, Default)]
pub struct MapLabels {
    /// Label name to value, names as policies write them.
    pub labels: HashMap<String, String>,
    /// The request body, if any.
    pub body: Option<Vec<u8>>,
}

impl MapLabels {
    /// Labels from `(name, value)` pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        MapLabels {
            labels: pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            body: None,
        }
    }

    /// Sets a label.
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.labels.insert(name.to_owned(), value.to_owned());
        self
    }

    /// Sets the body.
    pub fn with_body(mut self, body: &[u8]) -> Self {
        self.body = Some(body.to_vec());
        self
    }
}

impl LabelSource for MapLabels {
    fn label(&self, key: &LabelRef) -> Option<Cow<'_, str>> {
        self.labels
            .get(&*key.name)
            .map(|v| Cow::Borrowed(v.as_str()))
    }

    fn body(&self) -> Option<&[u8]> {
        self.body.as_deref()
    }

    fn each_label(&self, f: &mut dyn FnMut(&str, Cow<'_, str>)) {
        let mut names: Vec<&String> = self.labels.keys().collect();
        names.sort();
        for name in names {
            f(name, Cow::Borrowed(&self.labels[name]));
        }
    }
}

/// The labels of one flow as the engine sees them: the request's labels
/// under the labels classifiers added (which win).
pub struct FlowLabels<'a> {
    /// The request.
    source: &'a dyn LabelSource,
    /// Classifier outputs so far, in the order they were added.
    classified: SmallVec<[(Arc<str>, Cow<'a, str>); 4]>,
}

impl<'a> FlowLabels<'a> {
    /// A flow with no classifier labels yet.
    pub fn new(source: &'a dyn LabelSource) -> Self {
        FlowLabels {
            source,
            classified: SmallVec::new(),
        }
    }

    /// The value of a label: a classifier's if one set it, else the request's.
    #[inline]
    pub fn get(&self, key: &LabelRef) -> Option<Cow<'_, str>> {
        if !self.classified.is_empty()
            && let Some((_, v)) = self.classified.iter().rev().find(|(k, _)| **k == *key.name)
        {
            return Some(Cow::Borrowed(v));
        }
        self.source.label(key)
    }

    /// Like [`FlowLabels::get`], but the value outlives this borrow: request
    /// values are borrowed from the request, classifier values (rarely read
    /// by later classifiers) are copied.
    pub fn get_detached(&self, key: &LabelRef) -> Option<Cow<'a, str>> {
        if let Some((_, v)) = self.classified.iter().rev().find(|(k, _)| **k == *key.name) {
            return Some(match v {
                Cow::Borrowed(b) => Cow::Borrowed(b),
                Cow::Owned(o) => Cow::Owned(o.clone()),
            });
        }
        self.source.label(key)
    }

    /// The request, under the classifier labels.
    pub fn source(&self) -> &'a dyn LabelSource {
        self.source
    }

    /// Adds (or overrides) a classifier label.
    pub fn set(&mut self, name: Arc<str>, value: Cow<'a, str>) {
        self.classified.push((name, value));
    }

    /// Classifier labels, oldest first; a name may repeat, the last wins.
    pub fn classified(&self) -> &[(Arc<str>, Cow<'a, str>)] {
        &self.classified
    }
}

/// Finds member `key` in a W3C `baggage` header value
/// (`k1=v1;prop,k2=v2`) and percent-decodes its value.
pub fn baggage_member<'a>(header: &'a str, key: &str) -> Option<Cow<'a, str>> {
    header.split(',').find_map(|member| {
        let member = member.split(';').next().unwrap_or_default();
        let (k, v) = member.split_once('=')?;
        (k.trim() == key).then(|| percent_decode(v.trim()))
    })
}

/// Decodes `%XX` escapes; returns the input borrowed when there are none.
/// Invalid escapes are kept as they are, and bytes that do not form UTF-8
/// are replaced, so any input gives a value.
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Characters a baggage value may carry unescaped (W3C baggage-octet).
fn is_baggage_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

/// Appends `value` to `out`, percent-encoding what baggage may not carry.
pub fn percent_encode_into(out: &mut String, value: &str) {
    for &b in value.as_bytes() {
        if is_baggage_octet(b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(
                char::from_digit(u32::from(b >> 4), 16)
                    .unwrap_or('0')
                    .to_ascii_uppercase(),
            );
            out.push(
                char::from_digit(u32::from(b & 0xF), 16)
                    .unwrap_or('0')
                    .to_ascii_uppercase(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_compile_to_where_the_value_lives() {
        assert_eq!(LabelRef::new("http.method").kind, LabelKind::Method);
        assert_eq!(LabelRef::new("http.path").kind, LabelKind::Path);
        assert_eq!(
            LabelRef::new("http.request.header.user_id").kind,
            LabelKind::Header("user_id".into())
        );
        assert_eq!(
            LabelRef::new("http.request.header.User-Id").kind,
            LabelKind::Header("user_id".into())
        );
        assert_eq!(LabelRef::new("tier").kind, LabelKind::Baggage);
        assert_eq!(
            LabelRef::header("X-Api-Key").name.as_ref(),
            "http.request.header.x_api_key"
        );
    }

    #[test]
    fn header_names_match_in_either_spelling() {
        assert!(header_name_matches(b"user-id", "user_id"));
        assert!(header_name_matches(b"User-Id", "user_id"));
        assert!(header_name_matches(b"user_id", "user_id"));
        assert!(!header_name_matches(b"user-ids", "user_id"));
        assert!(!header_name_matches(b"userxid", "user_id"));
    }

    #[test]
    fn baggage_members_are_found_and_decoded() {
        let h = "tier=gold;ttl=1, user = ann%20lee ,empty=,broken";
        assert_eq!(baggage_member(h, "tier").as_deref(), Some("gold"));
        assert_eq!(baggage_member(h, "user").as_deref(), Some("ann lee"));
        assert_eq!(baggage_member(h, "empty").as_deref(), Some(""));
        assert_eq!(baggage_member(h, "broken"), None);
        assert_eq!(baggage_member(h, "missing"), None);
    }

    #[test]
    fn percent_decoding_is_total() {
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("a%2Cb"), "a,b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%FF"), "\u{FFFD}");
    }

    #[test]
    fn encoding_round_trips_through_decoding() {
        for value in ["gold", "a b,c;d=e", "100%", "ünï", "\n\"x\""] {
            let mut encoded = String::new();
            percent_encode_into(&mut encoded, value);
            assert!(encoded.bytes().all(is_baggage_octet), "{encoded}");
            assert_eq!(percent_decode(&encoded), value);
        }
    }
}
