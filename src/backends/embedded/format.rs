//! Byte layout of segment headers. The records after a header are
//! [`crate::entry::frame`]s. See the module header of `embedded` for the
//! format and the invariants it keeps.

use std::sync::Arc;

pub(crate) use crate::entry::frame::Cursor;
use crate::entry::frame::put_str16;
pub use crate::entry::frame::{
    Claimed, FRAME_PREFIX, FormatError, Frame, MAX_BODY, MIN_BODY, Record, claimed_header,
    decode_frame, encode_record, encoded_len, find_next_valid, frame_owner,
};

pub const SEGMENT_MAGIC: &[u8; 8] = b"WALDENLG";
pub const FORMAT_VERSION: u32 = 1;
// The largest payload config allows leaves room for the id, key and headers.
const _: () = assert!(crate::config::MAX_PAYLOAD_LIMIT * 2 <= MAX_BODY);

/// The next offset of every shard known when a segment was created. Kept in
/// the segment header, so offsets stay monotonic even after retention has
/// deleted every segment that held a shard's records.
pub type ShardTable = Vec<(Arc<str>, u32, u64)>;

/// A parsed segment header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub segment_id: u64,
    pub created_ms: u64,
    pub next_offsets: ShardTable,
}

/// Encode a segment header: magic, version, total length, id, creation time,
/// the shard table, and a CRC32C over everything before it.
pub fn encode_segment_header(h: &SegmentHeader) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(SEGMENT_MAGIC);
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // total length, patched below
    buf.extend_from_slice(&h.segment_id.to_le_bytes());
    buf.extend_from_slice(&h.created_ms.to_le_bytes());
    buf.extend_from_slice(&(h.next_offsets.len() as u32).to_le_bytes());
    for (ns, shard, next) in &h.next_offsets {
        put_str16(&mut buf, ns);
        buf.extend_from_slice(&shard.to_le_bytes());
        buf.extend_from_slice(&next.to_le_bytes());
    }
    let total = (buf.len() + 4) as u32;
    buf[12..16].copy_from_slice(&total.to_le_bytes());
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

/// The fixed part of a header: enough to learn its full length.
pub const SEGMENT_HEADER_PREFIX: usize = 16;

/// Why a segment header did not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header is truncated ({have} of {need} bytes)")]
    Truncated { have: usize, need: usize },
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported format version {0}")]
    Version(u32),
    #[error("header checksum mismatch")]
    Checksum,
    #[error("malformed header: {0}")]
    Malformed(&'static str),
}

/// Parse a segment header from the start of `buf`; returns it and its length.
pub fn decode_segment_header(buf: &[u8]) -> Result<(SegmentHeader, usize), HeaderError> {
    if buf.len() < SEGMENT_HEADER_PREFIX {
        return Err(HeaderError::Truncated {
            have: buf.len(),
            need: SEGMENT_HEADER_PREFIX,
        });
    }
    if &buf[0..8] != SEGMENT_MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let version = u32::from_le_bytes(buf[8..12].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(HeaderError::Version(version));
    }
    let total = u32::from_le_bytes(buf[12..16].try_into().unwrap()) as usize;
    if !(SEGMENT_HEADER_PREFIX + 24..=MAX_BODY).contains(&total) {
        return Err(HeaderError::Malformed("implausible header length"));
    }
    if buf.len() < total {
        return Err(HeaderError::Truncated {
            have: buf.len(),
            need: total,
        });
    }
    let stored = u32::from_le_bytes(buf[total - 4..total].try_into().unwrap());
    if crc32c::crc32c(&buf[..total - 4]) != stored {
        return Err(HeaderError::Checksum);
    }
    let mut r = Cursor {
        buf: &buf[16..total - 4],
        pos: 0,
    };
    let bad = |_| HeaderError::Malformed("shard table runs past the header");
    let segment_id = r.u64().map_err(bad)?;
    let created_ms = r.u64().map_err(bad)?;
    let n = r.u32().map_err(bad)?;
    let mut next_offsets = Vec::with_capacity(n.min(1 << 16) as usize);
    for _ in 0..n {
        let ns = r.string16().map_err(bad)?;
        let shard = r.u32().map_err(bad)?;
        let next = r.u64().map_err(bad)?;
        next_offsets.push((Arc::from(ns), shard, next));
    }
    Ok((
        SegmentHeader {
            segment_id,
            created_ms,
            next_offsets,
        },
        total,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = SegmentHeader {
            segment_id: 5,
            created_ms: 77,
            next_offsets: vec![(Arc::from("a"), 0, 10), (Arc::from("b"), 3, 99)],
        };
        let bytes = encode_segment_header(&h);
        let (back, len) = decode_segment_header(&bytes).unwrap();
        assert_eq!(back, h);
        assert_eq!(len, bytes.len());
    }
}
