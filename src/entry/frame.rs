//! The one byte form of an entry, wherever Walden stores one (the embedded
//! log's segments, the state store's parked and delayed entries): a
//! length-prefixed, CRC32C-checked frame that names its namespace, shard and
//! sequence. See the module header of `backends::embedded` for the
//! invariants the log builds on it.

use std::sync::Arc;

use bytes::Bytes;

use super::Entry;

/// `len` + `crc` in front of every record body.
pub const FRAME_PREFIX: usize = 8;
/// Fixed part of a body: kind, shard, offset, timestamp, due.
const BODY_FIXED: usize = 1 + 4 + 8 + 8 + 8;
/// The smallest body that can decode: fixed part, empty ns, empty id, no key,
/// no headers.
pub const MIN_BODY: usize = BODY_FIXED + 2 + 2 + 4 + 2;
/// No body is larger; a larger `len` is damage, not a record.
pub const MAX_BODY: usize = 64 << 20;
const RECORD_KIND_ENTRY: u8 = 1;
const NO_KEY: u32 = u32::MAX;

/// A record as it sits in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub namespace: Arc<str>,
    pub shard: u32,
    pub offset: u64,
    pub entry: Arc<Entry>,
}

/// Why bytes did not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("frame length {0} is outside [{MIN_BODY}, {MAX_BODY}]")]
    BadLength(usize),
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("malformed body: {0}")]
    Malformed(&'static str),
    #[error("field `{field}` is {len} bytes; the format allows {max}")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

/// The result of looking at the bytes at one position.
#[derive(Debug)]
pub enum Frame {
    /// A whole, valid record of `len` bytes (prefix included).
    Valid { record: Record, len: usize },
    /// The buffer ends before the frame does; `need` bytes would hold it.
    Incomplete { need: usize },
    /// The bytes are not a valid frame.
    Bad(FormatError),
}

/// Cheap header fields of a frame, read without checking its CRC. Used to
/// skip other shards' records and to name the owner of a damaged frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    pub namespace: String,
    pub shard: u32,
    pub offset: u64,
}

/// Append one encoded record to `buf`. Fields are checked before anything is
/// written, so a failed call leaves `buf` unchanged.
pub fn encode_record(
    buf: &mut Vec<u8>,
    namespace: &str,
    shard: u32,
    offset: u64,
    entry: &Entry,
) -> Result<usize, FormatError> {
    check_len("namespace", namespace.len(), u16::MAX as usize)?;
    check_len("id", entry.id.len(), u16::MAX as usize)?;
    if let Some(key) = &entry.key {
        check_len("key", key.len(), (NO_KEY - 1) as usize)?;
    }
    check_len("headers", entry.headers.len(), u16::MAX as usize)?;
    for (name, value) in &entry.headers {
        check_len("header name", name.len(), u16::MAX as usize)?;
        check_len("header value", value.len(), u32::MAX as usize)?;
    }
    let body_len = body_len(namespace, entry);
    check_len("record", body_len, MAX_BODY)?;

    let start = buf.len();
    buf.reserve(FRAME_PREFIX + body_len);
    buf.extend_from_slice(&(body_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // crc, patched below
    buf.push(RECORD_KIND_ENTRY);
    buf.extend_from_slice(&shard.to_le_bytes());
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&entry.timestamp_ms.to_le_bytes());
    buf.extend_from_slice(&entry.due_ms.to_le_bytes());
    put_str16(buf, namespace);
    put_str16(buf, &entry.id);
    match &entry.key {
        Some(key) => {
            buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
            buf.extend_from_slice(key.as_bytes());
        }
        None => buf.extend_from_slice(&NO_KEY.to_le_bytes()),
    }
    buf.extend_from_slice(&(entry.headers.len() as u16).to_le_bytes());
    for (name, value) in &entry.headers {
        put_str16(buf, name);
        buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
        buf.extend_from_slice(value.as_bytes());
    }
    buf.extend_from_slice(&entry.payload);
    debug_assert_eq!(buf.len() - start, FRAME_PREFIX + body_len);
    let crc = crc32c::crc32c(&buf[start + FRAME_PREFIX..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(FRAME_PREFIX + body_len)
}

/// The encoded size of a record, prefix included.
pub fn encoded_len(namespace: &str, entry: &Entry) -> usize {
    FRAME_PREFIX + body_len(namespace, entry)
}

fn body_len(namespace: &str, entry: &Entry) -> usize {
    BODY_FIXED
        + 2
        + namespace.len()
        + 2
        + entry.id.len()
        + 4
        + entry.key.as_ref().map_or(0, |k| k.len())
        + 2
        + entry
            .headers
            .iter()
            .map(|(n, v)| 2 + n.len() + 4 + v.len())
            .sum::<usize>()
        + entry.payload.len()
}

fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), FormatError> {
    if len > max {
        return Err(FormatError::FieldTooLong { field, len, max });
    }
    Ok(())
}

pub(crate) fn put_str16(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u16).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// Decode the frame at the start of `buf`.
pub fn decode_frame(buf: &[u8]) -> Frame {
    if buf.len() < FRAME_PREFIX {
        return Frame::Incomplete { need: FRAME_PREFIX };
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
    if !(MIN_BODY..=MAX_BODY).contains(&len) {
        return Frame::Bad(FormatError::BadLength(len));
    }
    let total = FRAME_PREFIX + len;
    if buf.len() < total {
        return Frame::Incomplete { need: total };
    }
    let stored = u32::from_le_bytes(buf[4..8].try_into().unwrap());
    let body = &buf[FRAME_PREFIX..total];
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Frame::Bad(FormatError::Checksum { stored, computed });
    }
    match decode_body(body) {
        Ok(record) => Frame::Valid { record, len: total },
        Err(e) => Frame::Bad(e),
    }
}

/// Read the namespace, shard and offset of the frame at the start of `buf`
/// without checking anything. The answer is a claim, not a fact.
pub fn claimed_header(buf: &[u8]) -> Option<Claimed> {
    let body = buf.get(FRAME_PREFIX..)?;
    let mut r = Cursor { buf: body, pos: 0 };
    let _kind = r.u8().ok()?;
    let shard = r.u32().ok()?;
    let offset = r.u64().ok()?;
    r.u64().ok()?;
    r.u64().ok()?;
    let namespace = String::from_utf8_lossy(r.str16_bytes().ok()?).into_owned();
    Some(Claimed {
        namespace,
        shard,
        offset,
    })
}

/// The namespace bytes and shard of the frame at the start of `buf`, read
/// without copying or checking; callers check the CRC first.
pub fn frame_owner(buf: &[u8]) -> Option<(&[u8], u32)> {
    let body = buf.get(FRAME_PREFIX..)?;
    let shard = u32::from_le_bytes(body.get(1..5)?.try_into().ok()?);
    let ns_at = BODY_FIXED;
    let ns_len = u16::from_le_bytes(body.get(ns_at..ns_at + 2)?.try_into().ok()?) as usize;
    Some((body.get(ns_at + 2..ns_at + 2 + ns_len)?, shard))
}

/// Find the first position after `from` where a valid frame starts, or
/// `None` if there is none. Used to tell a torn tail (nothing valid follows)
/// from corruption (valid frames follow), and to step over a damaged frame.
pub fn find_next_valid(buf: &[u8], from: usize) -> Option<usize> {
    // A frame whose CRC matches by chance is 1 in 2^32 per candidate, and a
    // candidate must also have a plausible length and a well-formed body.
    (from + 1..buf.len().saturating_sub(FRAME_PREFIX + MIN_BODY - 1))
        .find(|&pos| matches!(decode_frame(&buf[pos..]), Frame::Valid { .. }))
}

fn decode_body(body: &[u8]) -> Result<Record, FormatError> {
    let mut r = Cursor { buf: body, pos: 0 };
    if r.u8()? != RECORD_KIND_ENTRY {
        return Err(FormatError::Malformed("unknown record kind"));
    }
    let shard = r.u32()?;
    let offset = r.u64()?;
    let timestamp_ms = r.u64()?;
    let due_ms = r.u64()?;
    let namespace: Arc<str> = r.string16()?.into();
    let id = r.string16()?;
    let key_len = r.u32()?;
    let key = if key_len == NO_KEY {
        None
    } else {
        Some(utf8(r.take(key_len as usize)?)?)
    };
    let n_headers = r.u16()?;
    let mut headers = Vec::with_capacity(n_headers as usize);
    for _ in 0..n_headers {
        let name = r.string16()?;
        let len = r.u32()? as usize;
        let value = utf8(r.take(len)?)?;
        headers.push((name, value));
    }
    let payload = Bytes::copy_from_slice(&body[r.pos..]);
    Ok(Record {
        namespace,
        shard,
        offset,
        entry: Arc::new(Entry {
            id,
            key,
            headers,
            payload,
            timestamp_ms,
            due_ms,
        }),
    })
}

fn utf8(bytes: &[u8]) -> Result<String, FormatError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| FormatError::Malformed("invalid UTF-8"))
}

/// A bounds-checked little-endian reader.
pub(crate) struct Cursor<'a> {
    pub buf: &'a [u8],
    pub pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(FormatError::Malformed("field runs past the end"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    pub fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn str16_bytes(&mut self) -> Result<&'a [u8], FormatError> {
        let len = self.u16()? as usize;
        self.take(len)
    }
    pub fn string16(&mut self) -> Result<String, FormatError> {
        utf8(self.str16_bytes()?)
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(payload: &[u8]) -> Entry {
        Entry {
            id: "id-1".into(),
            key: Some("k".into()),
            headers: vec![("traceparent".into(), "00-abc".into())],
            payload: Bytes::copy_from_slice(payload),
            timestamp_ms: 7,
            due_ms: 9,
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_detected() {
        let mut buf = Vec::new();
        encode_record(&mut buf, "ns", 3, 42, &entry(b"hello")).unwrap();
        for byte in 0..buf.len() {
            let mut damaged = buf.clone();
            damaged[byte] ^= 0x10;
            assert!(
                !matches!(decode_frame(&damaged), Frame::Valid { .. }),
                "flip at byte {byte} went unnoticed"
            );
        }
    }

    #[test]
    fn an_oversized_field_is_refused_and_writes_nothing() {
        let mut buf = vec![1, 2, 3];
        let mut e = entry(b"x");
        e.id = "i".repeat(70_000);
        let err = encode_record(&mut buf, "ns", 0, 0, &e).unwrap_err();
        assert!(matches!(err, FormatError::FieldTooLong { field: "id", .. }));
        assert_eq!(buf, vec![1, 2, 3]);
    }
}
