//! Bounds on the repeated fields of untrusted requests, checked on the
//! wire before anything is decoded.
//!
//! A message's byte size bounds little on its own: an empty header entry is
//! two bytes on the wire and a 64-byte `StringEntry` once decoded, so a
//! 1 MiB Check of empty entries became 32 MiB, and a 16 MiB Export of empty
//! attributes more than half a gigabyte. Before the message is decoded,
//! [`count`] walks its wire form (tags and lengths only: nothing is
//! allocated, and only the fields on the way to a counted one are entered)
//! and counts the entries of the repeated fields that the decoder would
//! allocate. A message with more than its type allows
//! ([`Bounded::max_entries`]) is refused with `RESOURCE_EXHAUSTED`, so decoding memory stays within a
//! small multiple of what a legitimate message needs. A message too short
//! to hold that many is not walked at all ([`check`]).
//!
//! [`BoundedCodec`] is the codec of the generated ext_authz and OTLP
//! servers (`codec_path` in `build.rs`); [`decode`] serves other edges,
//! such as OTLP over HTTP.

use std::marker::PhantomData;

use bytes::Buf;
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// A message whose repeated fields are counted before it is decoded.
pub trait Bounded: Message + Default {
    /// Entries a message of `len` bytes may hold.
    fn max_entries(len: usize) -> usize;
    /// What the entries are, for the refusal.
    const ENTRIES: &'static str;
    /// The fields on the way to the counted ones.
    const SHAPE: Fields;
}

/// Fields of a message that matter to the count, by field number.
pub type Fields = &'static [(u32, Field)];

/// What a field is to the count.
#[derive(Debug)]
pub enum Field {
    /// Each occurrence is one entry; its content is not entered.
    Entry,
    /// Each occurrence is one entry, and its content is walked too.
    EntryOf(Fields),
    /// A message on the way to entries: walked, not counted.
    Into(Fields),
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// More entries than its type allows: not decoded at all.
    TooMany {
        /// The bound it went over.
        limit: usize,
        /// What was counted.
        entries: &'static str,
    },
    /// Not a well-formed message (groups, which these protocols never
    /// use, count as malformed: the count cannot see into them).
    Malformed(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::TooMany { limit, entries } => {
                write!(f, "more than {limit} {entries} in one message")
            }
            Refused::Malformed(why) => write!(f, "malformed message: {why}"),
        }
    }
}

impl std::error::Error for Refused {}

impl From<Refused> for Status {
    fn from(e: Refused) -> Status {
        match e {
            Refused::TooMany { .. } => Status::resource_exhausted(e.to_string()),
            Refused::Malformed(_) => Status::invalid_argument(e.to_string()),
        }
    }
}

/// Counts `M`'s entries in `wire`, stopping as soon as there are more than
/// [`Bounded::max_entries`]. Wire data the count cannot walk is refused
/// too: were it left to the decoder, what follows it would go uncounted.
pub fn count<M: Bounded>(wire: &[u8]) -> Result<usize, Refused> {
    let mut entries = 0;
    let limit = M::max_entries(wire.len());
    match walk(wire, M::SHAPE, &mut entries, limit) {
        Ok(()) => Ok(entries),
        Err(Stop::Malformed) => Err(Refused::Malformed("broken field or length".to_owned())),
        Err(Stop::Over) => Err(Refused::TooMany {
            limit,
            entries: M::ENTRIES,
        }),
    }
}

/// Whether `wire` may be decoded as `M`: within its bound of entries.
/// An entry takes two bytes at least (a tag and a length), so a message of
/// at most twice [`Bounded::max_entries`] bytes cannot go over and is not
/// walked: a Check of 8 KiB or less (Envoy's are one or two) costs nothing
/// here.
#[inline]
pub fn check<M: Bounded>(wire: &[u8]) -> Result<(), Refused> {
    if wire.len() / 2 <= M::max_entries(wire.len()) {
        return Ok(());
    }
    count::<M>(wire).map(drop)
}

/// Decodes `wire` as `M` once its entries are within bounds (its byte
/// fields then slices of `wire`).
pub fn decode<M: Bounded>(wire: bytes::Bytes) -> Result<M, Refused> {
    check::<M>(&wire)?;
    M::decode(wire).map_err(|e| Refused::Malformed(e.to_string()))
}

enum Stop {
    Over,
    Malformed,
}

fn varint(buf: &mut &[u8]) -> Result<u64, Stop> {
    prost::encoding::decode_varint(buf).map_err(|_| Stop::Malformed)
}

fn skip(buf: &mut &[u8], n: u64) -> Result<(), Stop> {
    let n = usize::try_from(n).map_err(|_| Stop::Malformed)?;
    if n > buf.len() {
        return Err(Stop::Malformed);
    }
    buf.advance(n);
    Ok(())
}

/// Walks one message's fields. Recursion is as deep as the static shape,
/// never as deep as the input.
fn walk(mut buf: &[u8], shape: Fields, entries: &mut usize, limit: usize) -> Result<(), Stop> {
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let number = u32::try_from(key >> 3).map_err(|_| Stop::Malformed)?;
        match key & 7 {
            0 => {
                varint(&mut buf)?;
            }
            1 => skip(&mut buf, 8)?,
            5 => skip(&mut buf, 4)?,
            2 => {
                let len = varint(&mut buf)?;
                let len = usize::try_from(len).map_err(|_| Stop::Malformed)?;
                if len > buf.len() {
                    return Err(Stop::Malformed);
                }
                let (content, rest) = buf.split_at(len);
                buf = rest;
                let Some((_, field)) = shape.iter().find(|(n, _)| *n == number) else {
                    continue;
                };
                let (counted, inner) = match field {
                    Field::Entry => (true, None),
                    Field::EntryOf(inner) => (true, Some(inner)),
                    Field::Into(inner) => (false, Some(inner)),
                };
                if counted {
                    *entries += 1;
                    if *entries > limit {
                        return Err(Stop::Over);
                    }
                }
                if let Some(inner) = inner {
                    walk(content, inner, entries, limit)?;
                }
            }
            // Groups (3, 4) are not in these protocols.
            _ => return Err(Stop::Malformed),
        }
    }
    Ok(())
}

/// The codec of the edge servers: prost's, with the entries of each
/// request counted before it is decoded.
pub struct BoundedCodec<T, U> {
    prost: ProstCodec<T, U>,
}

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        BoundedCodec {
            prost: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Bounded + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> ProstEncoder<T> {
        self.prost.encoder()
    }

    fn decoder(&mut self) -> BoundedDecoder<U> {
        BoundedDecoder {
            prost: self.prost.decoder(),
            _message: PhantomData,
        }
    }
}

/// [`BoundedCodec`]'s decoder.
pub struct BoundedDecoder<U> {
    prost: ProstDecoder<U>,
    _message: PhantomData<fn() -> U>,
}

impl<U: Bounded> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // tonic hands over the whole message in one contiguous buffer;
        // should that ever change, the walk would stop at the end of the
        // first chunk and refuse the message as malformed: never let
        // entries through uncounted.
        check::<U>(buf.chunk())?;
        self.prost.decode(buf)
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.prost.buffer_settings()
    }
}

use crate::ext_authz::CheckRequest;
use crate::otlp_logs::ExportLogsServiceRequest;

/// Header entries (`headers` and `header_map`) and context extensions of a
/// Check: Envoy sends at most its `max_headers_count` (100 by default).
impl Bounded for CheckRequest {
    fn max_entries(_: usize) -> usize {
        4096
    }
    const ENTRIES: &'static str = "header entries and context extensions";
    const SHAPE: Fields = &[(
        1, // attributes
        Field::Into(&[
            (
                4, // request
                Field::Into(&[(
                    2, // http
                    Field::Into(&[
                        (3, Field::Entry), // headers
                        (
                            13, // header_map
                            Field::Into(&[(1, Field::Entry)]),
                        ),
                    ]),
                )]),
            ),
            (10, Field::Entry), // context_extensions
        ]),
    )];
}

/// Resource, scope, record and attribute entries of an Export: one per 16
/// bytes of the message, and 4,096 more. A real attribute takes twenty
/// bytes or more on the wire, so any batch Envoy sends fits, however large
/// its `buffer_size_bytes`; an empty one takes two and 72 decoded, so an
/// Export decodes to at most some 4.5 times its size.
impl Bounded for ExportLogsServiceRequest {
    fn max_entries(len: usize) -> usize {
        len / 16 + 4096
    }
    const ENTRIES: &'static str = "resource, scope, record and attribute entries";
    const SHAPE: Fields = &[(
        1, // resource_logs
        Field::EntryOf(&[(
            2, // scope_logs
            Field::EntryOf(&[(
                2,                                    // log_records
                Field::EntryOf(&[(6, Field::Entry)]), // attributes
            )]),
        )]),
    )];
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ext_authz::{AttributeContext, HttpRequest, Request, StringEntry};
    use crate::otlp_logs::{KeyValue, LogRecord, ResourceLogs, ScopeLogs};

    fn check(headers: usize, extensions: usize) -> Vec<u8> {
        let entry = || StringEntry {
            key: "k".into(),
            value: "v".into(),
        };
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "GET".into(),
                        headers: (0..headers).map(|_| entry()).collect(),
                        ..Default::default()
                    }),
                }),
                context_extensions: (0..extensions).map(|_| entry()).collect(),
                ..Default::default()
            }),
        }
        .encode_to_vec()
    }

    #[test]
    fn a_check_counts_its_headers_and_extensions() {
        assert_eq!(count::<CheckRequest>(&check(12, 2)), Ok(14));
        assert_eq!(count::<CheckRequest>(&check(4094, 2)), Ok(4096));
        assert!(matches!(
            count::<CheckRequest>(&check(4095, 2)),
            Err(Refused::TooMany { limit: 4096, .. })
        ));
        assert!(matches!(
            decode::<CheckRequest>(check(5000, 0).into()),
            Err(Refused::TooMany { .. })
        ));
        assert_eq!(
            decode::<CheckRequest>(check(3, 1).into())
                .unwrap()
                .attributes
                .unwrap()
                .context_extensions
                .len(),
            1
        );
    }

    #[test]
    fn an_export_counts_every_level() {
        let records = |n: usize, attributes: usize| ScopeLogs {
            log_records: (0..n)
                .map(|_| LogRecord {
                    attributes: (0..attributes).map(|_| KeyValue::default()).collect(),
                })
                .collect(),
        };
        let export = ExportLogsServiceRequest {
            resource_logs: vec![
                ResourceLogs {
                    scope_logs: vec![records(3, 4), records(2, 0)],
                },
                ResourceLogs::default(),
            ],
        };
        // 2 resources + 2 scopes + 5 records + 12 attributes.
        assert_eq!(
            count::<ExportLogsServiceRequest>(&export.encode_to_vec()),
            Ok(21)
        );
        // Empty entries, two bytes each, are counted like any other: a
        // message of them holds eight times its bound.
        let empty = [0x0a, 0x00].repeat(1 << 16);
        assert!(matches!(
            count::<ExportLogsServiceRequest>(&empty),
            Err(Refused::TooMany { limit: 12_288, .. })
        ));
    }

    #[test]
    fn broken_wire_data_is_refused_not_skipped() {
        let mut wire = check(3, 0);
        wire.truncate(wire.len() - 3);
        assert!(matches!(
            count::<CheckRequest>(&wire),
            Err(Refused::Malformed(_))
        ));
        for junk in [&[0xff; 12][..], &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]] {
            assert!(matches!(
                count::<CheckRequest>(junk),
                Err(Refused::Malformed(_))
            ));
        }
        // A group, which prost would skip, cannot hide headers behind it.
        let mut grouped = vec![0x5b, 0x5c]; // field 11: start group, end group
        grouped.extend(check(5000, 0));
        assert!(count::<CheckRequest>(&grouped).is_err());
        // What the count accepts but is not a message is the decoder's.
        assert!(matches!(
            decode::<CheckRequest>(vec![0x00, 0x00].into()),
            Err(Refused::Malformed(_))
        ));
        // A message too short to go over is not walked: prost skips a
        // group in it, as in any message.
        let mut short = vec![0x5b, 0x5c];
        short.extend(check(3, 0));
        assert!(super::check::<CheckRequest>(&short).is_ok());
        assert!(
            count::<CheckRequest>(&short).is_err(),
            "the walk would refuse it"
        );
    }
}
