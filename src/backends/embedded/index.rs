//! In-memory indexes: which segments exist, where each shard's records are,
//! and how far readers may read. Sealed segments persist their part as a
//! `.idx` file, so opening a log never scans more than the active segment.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::format::{Cursor, FormatError};
use crate::entry::ShardRef;

/// A sparse index point is added after this many records of one shard, so a
/// reader seeking an offset scans at most this many of its shard's records.
pub const SPARSE_EVERY: u64 = 64;

/// How far readers may read: everything before `end` in `segment`, and all of
/// every earlier segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurableMark {
    pub segment: u64,
    pub end: u64,
}

#[derive(Clone, Debug)]
pub struct SegmentInfo {
    pub header_len: u64,
    /// The readable length: the durable end while active, the file length
    /// once sealed.
    pub len: u64,
    pub sealed: bool,
    /// Newest record timestamp, for age-based retention (0 if empty).
    pub max_ts: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparsePoint {
    pub offset: u64,
    pub pos: u64,
    pub ts: u64,
}

/// One shard's records inside one segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegShard {
    pub first: u64,
    pub last: u64,
    pub sparse: Vec<SparsePoint>,
}

impl SegShard {
    fn new(p: SparsePoint) -> Self {
        Self {
            first: p.offset,
            last: p.offset,
            sparse: vec![p],
        }
    }

    pub fn add(&mut self, p: SparsePoint) {
        self.last = p.offset;
        let since = p.offset - self.sparse.last().map_or(p.offset, |s| s.offset);
        if since >= SPARSE_EVERY {
            self.sparse.push(p);
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ShardIndex {
    /// One past the last readable offset.
    pub next_offset: u64,
    pub segs: BTreeMap<u64, SegShard>,
}

#[derive(Clone, Debug)]
pub struct Index {
    pub segments: BTreeMap<u64, SegmentInfo>,
    pub shards: HashMap<ShardRef, ShardIndex>,
    pub mark: DurableMark,
}

impl Index {
    pub fn new(mark: DurableMark) -> Self {
        Self {
            segments: BTreeMap::new(),
            shards: HashMap::new(),
            mark,
        }
    }

    /// Record one readable record.
    pub fn add(&mut self, segment: u64, shard: &ShardRef, p: SparsePoint) {
        let s = self.shards.entry(shard.clone()).or_default();
        match s.segs.get_mut(&segment) {
            Some(seg) => seg.add(p),
            None => {
                s.segs.insert(segment, SegShard::new(p));
            }
        }
        s.next_offset = s.next_offset.max(p.offset + 1);
        if let Some(info) = self.segments.get_mut(&segment) {
            info.max_ts = info.max_ts.max(p.ts);
        }
    }

    /// Make sure a shard is known, with at least this next offset.
    pub fn note_next(&mut self, shard: &ShardRef, next: u64) {
        let s = self.shards.entry(shard.clone()).or_default();
        s.next_offset = s.next_offset.max(next);
    }

    pub fn next_offset(&self, shard: &ShardRef) -> u64 {
        self.shards.get(shard).map_or(0, |s| s.next_offset)
    }

    pub fn earliest_offset(&self, shard: &ShardRef) -> u64 {
        self.shards.get(shard).map_or(0, |s| {
            s.segs
                .values()
                .next()
                .map_or(s.next_offset, |seg| seg.first)
        })
    }

    pub fn shards(&self) -> Vec<(ShardRef, u64)> {
        let mut v: Vec<_> = self
            .shards
            .iter()
            .map(|(k, s)| (k.clone(), s.next_offset))
            .collect();
        v.sort();
        v
    }

    pub fn total_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.len).sum()
    }

    /// The shards' parts of one segment, for its `.idx` file.
    pub fn segment_part(&self, segment: u64) -> Vec<(ShardRef, SegShard)> {
        let mut v: Vec<_> = self
            .shards
            .iter()
            .filter_map(|(k, s)| s.segs.get(&segment).map(|p| (k.clone(), p.clone())))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Forget a deleted segment.
    pub fn remove_segment(&mut self, segment: u64) {
        self.segments.remove(&segment);
        for s in self.shards.values_mut() {
            s.segs.remove(&segment);
        }
    }
}

const IDX_MAGIC: &[u8; 8] = b"WALDENIX";

/// The `.idx` file of a sealed segment: its length and newest timestamp, and
/// each shard's offsets and sparse points, closed by a CRC32C.
pub fn encode_idx(len: u64, max_ts: u64, parts: &[(ShardRef, SegShard)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(IDX_MAGIC);
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&max_ts.to_le_bytes());
    b.extend_from_slice(&(parts.len() as u32).to_le_bytes());
    for (shard, part) in parts {
        b.extend_from_slice(&(shard.namespace.len() as u16).to_le_bytes());
        b.extend_from_slice(shard.namespace.as_bytes());
        b.extend_from_slice(&shard.shard.to_le_bytes());
        b.extend_from_slice(&part.first.to_le_bytes());
        b.extend_from_slice(&part.last.to_le_bytes());
        b.extend_from_slice(&(part.sparse.len() as u32).to_le_bytes());
        for p in &part.sparse {
            b.extend_from_slice(&p.offset.to_le_bytes());
            b.extend_from_slice(&p.pos.to_le_bytes());
            b.extend_from_slice(&p.ts.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

pub struct IdxFile {
    pub len: u64,
    pub max_ts: u64,
    pub parts: Vec<(ShardRef, SegShard)>,
}

pub fn decode_idx(b: &[u8]) -> Result<IdxFile, FormatError> {
    if b.len() < IDX_MAGIC.len() + 4 || &b[..8] != IDX_MAGIC {
        return Err(FormatError::Malformed("not an index file"));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
        return Err(FormatError::Malformed("index checksum mismatch"));
    }
    let mut r = Cursor {
        buf: &body[8..],
        pos: 0,
    };
    let len = r.u64()?;
    let max_ts = r.u64()?;
    let n = r.u32()?;
    let mut parts = Vec::new();
    for _ in 0..n {
        let ns: Arc<str> = r.string16()?.into();
        let shard = r.u32()?;
        let first = r.u64()?;
        let last = r.u64()?;
        let n_sparse = r.u32()? as usize;
        if n_sparse * 24 > r.remaining() {
            return Err(FormatError::Malformed("sparse index runs past the end"));
        }
        let mut sparse = Vec::with_capacity(n_sparse);
        for _ in 0..n_sparse {
            sparse.push(SparsePoint {
                offset: r.u64()?,
                pos: r.u64()?,
                ts: r.u64()?,
            });
        }
        parts.push((
            ShardRef {
                namespace: ns,
                shard,
            },
            SegShard {
                first,
                last,
                sparse,
            },
        ));
    }
    Ok(IdxFile { len, max_ts, parts })
}
