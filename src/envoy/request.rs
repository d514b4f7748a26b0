//! A CheckRequest seen as flow labels.
//!
//! [`CheckView`] answers the engine's label lookups straight from the decoded
//! request: no label map is built, and values are borrowed unless they need
//! decoding (percent-encoded baggage, bytes that are not UTF-8, which are
//! replaced with U+FFFD rather than failing the request).

use std::borrow::Cow;

use bytes::Bytes;

use super::wire::{AttributeContext, CheckRequest, HttpRequest, SocketAddress};
use sluice_engine::labels::{
    HEADER_PREFIX, LabelKind, LabelRef, LabelSource, baggage_member, header_name_matches,
    normalize_header_name, percent_decode,
};

/// The text of a bytes field. Invalid UTF-8 is replaced, not refused.
#[inline]
pub fn text(b: &Bytes) -> Cow<'_, str> {
    String::from_utf8_lossy(b)
}

fn non_empty(b: &Bytes) -> Option<Cow<'_, str>> {
    (!b.is_empty()).then(|| text(b))
}

/// The labels of one CheckRequest.
pub struct CheckView<'a> {
    /// The HTTP attributes, if Envoy sent any.
    http: Option<&'a HttpRequest>,
    /// Downstream peer address.
    source: Option<&'a SocketAddress>,
    /// Local address the request arrived on.
    destination: Option<&'a SocketAddress>,
}

fn socket(peer: Option<&super::wire::Peer>) -> Option<&SocketAddress> {
    peer?.address.as_ref()?.socket_address.as_ref()
}

impl<'a> CheckView<'a> {
    /// A view of `request`; an empty request gives a flow without labels.
    pub fn new(request: &'a CheckRequest) -> Self {
        let attrs: Option<&AttributeContext> = request.attributes.as_ref();
        CheckView {
            http: attrs
                .and_then(|a| a.request.as_ref())
                .and_then(|r| r.http.as_ref()),
            source: attrs.and_then(|a| socket(a.source.as_ref())),
            destination: attrs.and_then(|a| socket(a.destination.as_ref())),
        }
    }

    /// A request header by its normalized name (lower case, `_` for `-`).
    /// Envoy sends either the `headers` map or, with `encode_raw_headers`,
    /// the `header_map` list; both are searched.
    pub fn header(&self, normalized: &str) -> Option<&'a Bytes> {
        let http = self.http?;
        if let Some(h) = http
            .headers
            .iter()
            .find(|h| header_name_matches(&h.key, normalized))
        {
            return Some(&h.value);
        }
        let map = http.header_map.as_ref()?;
        map.headers
            .iter()
            .find(|h| header_name_matches(&h.key, normalized))
            .map(|h| {
                if h.raw_value.is_empty() {
                    &h.value
                } else {
                    &h.raw_value
                }
            })
    }

    /// The path with its query string, as Envoy sent it.
    fn target(&self) -> Option<&'a Bytes> {
        self.http.map(|h| &h.path).filter(|p| !p.is_empty())
    }
}

/// The name policies read a request attribute under.
fn attribute_name(kind: &LabelKind) -> &'static str {
    match kind {
        LabelKind::Method => "http.method",
        LabelKind::Path => "http.path",
        LabelKind::Target => "http.target",
        LabelKind::Host => "http.host",
        LabelKind::Scheme => "http.scheme",
        LabelKind::Flavor => "http.flavor",
        LabelKind::SourceAddress => "source.address",
        LabelKind::DestinationAddress => "destination.address",
        LabelKind::Header(_) | LabelKind::Baggage => "",
    }
}

/// `http.flavor` in OpenTelemetry's spelling, from Envoy's protocol name.
fn flavor(protocol: &Bytes) -> Option<Cow<'_, str>> {
    Some(Cow::Borrowed(match &protocol[..] {
        b"HTTP/1.0" => "1.0",
        b"HTTP/1.1" => "1.1",
        b"HTTP/2" | b"HTTP/2.0" => "2.0",
        b"HTTP/3" | b"HTTP/3.0" => "3.0",
        b"" => return None,
        other => return Some(String::from_utf8_lossy(other)),
    }))
}

impl LabelSource for CheckView<'_> {
    fn label(&self, key: &LabelRef) -> Option<Cow<'_, str>> {
        match &key.kind {
            LabelKind::Method => self.http.and_then(|h| non_empty(&h.method)),
            LabelKind::Target => self.target().map(text),
            LabelKind::Path => {
                let target = self.target()?;
                let end = target
                    .iter()
                    .position(|&b| b == b'?')
                    .unwrap_or(target.len());
                Some(String::from_utf8_lossy(&target[..end]))
            }
            LabelKind::Host => self.http.and_then(|h| non_empty(&h.host)),
            LabelKind::Scheme => self.http.and_then(|h| non_empty(&h.scheme)),
            LabelKind::Flavor => self.http.and_then(|h| flavor(&h.protocol)),
            LabelKind::SourceAddress => self.source.and_then(|s| non_empty(&s.address)),
            LabelKind::DestinationAddress => self.destination.and_then(|s| non_empty(&s.address)),
            LabelKind::Header(name) => self.header(name).map(text),
            LabelKind::Baggage => {
                let raw = self.header("baggage")?;
                // Borrow when the header is valid UTF-8, as it should be.
                match std::str::from_utf8(raw) {
                    Ok(header) => baggage_member(header, &key.name),
                    Err(_) => baggage_member(&String::from_utf8_lossy(raw), &key.name)
                        .map(|v| Cow::Owned(v.into_owned())),
                }
            }
        }
    }

    fn each_label(&self, f: &mut dyn FnMut(&str, Cow<'_, str>)) {
        for kind in [
            LabelKind::Method,
            LabelKind::Path,
            LabelKind::Target,
            LabelKind::Host,
            LabelKind::Scheme,
            LabelKind::Flavor,
            LabelKind::SourceAddress,
            LabelKind::DestinationAddress,
        ] {
            let name = attribute_name(&kind);
            let key = LabelRef {
                name: name.into(),
                kind,
            };
            if let Some(v) = self.label(&key) {
                f(name, v);
            }
        }
        let Some(http) = self.http else { return };
        let mut name = String::from(HEADER_PREFIX);
        let mut header = |key: &Bytes, value: &Bytes| {
            // Pseudo-headers (`:path`, `:authority`...) are listed above as
            // the attributes they are.
            if key.starts_with(b":") {
                return;
            }
            name.truncate(HEADER_PREFIX.len());
            name.push_str(&normalize_header_name(&text(key)));
            f(&name, text(value));
        };
        for h in &http.headers {
            header(&h.key, &h.value);
        }
        for h in http.header_map.iter().flat_map(|m| &m.headers) {
            let value = if h.raw_value.is_empty() {
                &h.value
            } else {
                &h.raw_value
            };
            header(&h.key, value);
        }
        if let Some(raw) = self.header("baggage") {
            for member in text(raw).split(',') {
                let member = member.split(';').next().unwrap_or_default();
                if let Some((k, v)) = member.split_once('=') {
                    f(k.trim(), percent_decode(v.trim()));
                }
            }
        }
    }

    fn body(&self) -> Option<&[u8]> {
        let http = self.http?;
        if !http.raw_body.is_empty() {
            Some(&http.raw_body)
        } else if !http.body.is_empty() {
            Some(&http.body)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::wire::{Address, HeaderMap, HeaderValue, Peer, Request, StringEntry};

    fn entry(k: &str, v: &[u8]) -> StringEntry {
        StringEntry {
            key: Bytes::copy_from_slice(k.as_bytes()),
            value: Bytes::copy_from_slice(v),
        }
    }

    fn request(http: HttpRequest) -> CheckRequest {
        let peer = |ip: &str| Peer {
            address: Some(Address {
                socket_address: Some(SocketAddress {
                    address: Bytes::copy_from_slice(ip.as_bytes()),
                    port_value: 1234,
                }),
            }),
        };
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(peer("10.0.0.1")),
                destination: Some(peer("10.0.0.2")),
                request: Some(Request { http: Some(http) }),
                context_extensions: vec![],
            }),
        }
    }

    fn get(view: &CheckView<'_>, name: &str) -> Option<String> {
        view.label(&LabelRef::new(name)).map(Cow::into_owned)
    }

    #[test]
    fn reads_aperture_labels() {
        let req = request(HttpRequest {
            method: "POST".into(),
            path: "/api/users?id=7".into(),
            host: "shop.local".into(),
            scheme: "https".into(),
            protocol: "HTTP/2".into(),
            headers: vec![
                entry("user-id", b"42"),
                entry("baggage", b"tier=gold,team=a%20b"),
            ],
            body: "{}".into(),
            ..Default::default()
        });
        let v = CheckView::new(&req);
        assert_eq!(get(&v, "http.method").as_deref(), Some("POST"));
        assert_eq!(get(&v, "http.path").as_deref(), Some("/api/users"));
        assert_eq!(get(&v, "http.target").as_deref(), Some("/api/users?id=7"));
        assert_eq!(get(&v, "http.host").as_deref(), Some("shop.local"));
        assert_eq!(get(&v, "http.scheme").as_deref(), Some("https"));
        assert_eq!(get(&v, "http.flavor").as_deref(), Some("2.0"));
        assert_eq!(
            get(&v, "http.request.header.user_id").as_deref(),
            Some("42")
        );
        assert_eq!(get(&v, "tier").as_deref(), Some("gold"));
        assert_eq!(get(&v, "team").as_deref(), Some("a b"));
        assert_eq!(get(&v, "source.address").as_deref(), Some("10.0.0.1"));
        assert_eq!(get(&v, "destination.address").as_deref(), Some("10.0.0.2"));
        assert_eq!(get(&v, "missing"), None);
        assert_eq!(v.body(), Some(&b"{}"[..]));
    }

    #[test]
    fn raw_header_maps_and_invalid_utf8_are_read() {
        let req = request(HttpRequest {
            header_map: Some(HeaderMap {
                headers: vec![HeaderValue {
                    key: "x-name".into(),
                    value: Bytes::new(),
                    raw_value: Bytes::from_static(b"caf\xe9"),
                }],
            }),
            ..Default::default()
        });
        let v = CheckView::new(&req);
        assert_eq!(
            get(&v, "http.request.header.x_name").as_deref(),
            Some("caf\u{FFFD}")
        );
        assert_eq!(get(&v, "http.method"), None);
    }

    #[test]
    fn every_label_is_listed_under_the_name_a_policy_reads() {
        let req = request(HttpRequest {
            method: "POST".into(),
            path: "/a?b=1".into(),
            protocol: "HTTP/1.1".into(),
            headers: vec![
                entry(":path", b"/a?b=1"),
                entry("User-Id", b"42"),
                entry("baggage", b"tier=gold;p, team=a%20b"),
            ],
            header_map: Some(HeaderMap {
                headers: vec![HeaderValue {
                    key: "x-raw".into(),
                    value: Bytes::new(),
                    raw_value: Bytes::from_static(b"r"),
                }],
            }),
            ..Default::default()
        });
        let v = CheckView::new(&req);
        let mut all = Vec::new();
        v.each_label(&mut |name, value| all.push((name.to_owned(), value.into_owned())));
        let all: Vec<(&str, &str)> = all.iter().map(|(n, v)| (&**n, &**v)).collect();
        assert_eq!(
            all,
            [
                ("http.method", "POST"),
                ("http.path", "/a"),
                ("http.target", "/a?b=1"),
                ("http.flavor", "1.1"),
                ("source.address", "10.0.0.1"),
                ("destination.address", "10.0.0.2"),
                ("http.request.header.user_id", "42"),
                ("http.request.header.baggage", "tier=gold;p, team=a%20b"),
                ("http.request.header.x_raw", "r"),
                ("tier", "gold"),
                ("team", "a b"),
            ]
        );
        // Each listed label reads back the same through the lookup.
        for (name, value) in all {
            assert_eq!(get(&v, name).as_deref(), Some(value), "{name}");
        }
    }

    #[test]
    fn an_empty_request_has_no_labels() {
        let req = CheckRequest::default();
        let v = CheckView::new(&req);
        for name in [
            "http.method",
            "http.path",
            "source.address",
            "http.request.header.a",
            "b",
        ] {
            assert_eq!(get(&v, name), None);
        }
        assert_eq!(v.body(), None);
    }
}
