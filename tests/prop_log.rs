//! Property tests: records round-trip through encode and decode, and any
//! byte-level truncation of a log recovers to a prefix of what was written.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::{DIR, entry, open_sim, read_all, segment};
use proptest::prelude::*;
use walden::backends::embedded::LogConfig;
use walden::backends::embedded::format::{Frame, decode_frame, encode_record};
use walden::entry::{Entry, ShardRef};
use walden::fs::{Fs, SimFs};

fn arb_entry() -> impl Strategy<Value = Entry> {
    (
        ".{0,40}",
        proptest::option::of(".{0,40}"),
        proptest::collection::vec((".{0,10}", ".{0,30}"), 0..4),
        proptest::collection::vec(any::<u8>(), 0..400),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(id, key, headers, payload, timestamp_ms, due_ms)| Entry {
            id,
            key,
            headers,
            payload: Bytes::from(payload),
            timestamp_ms,
            due_ms,
        })
}

proptest! {
    #[test]
    fn records_round_trip(e in arb_entry(), ns in "[a-z]{0,20}", shard: u32, offset: u64) {
        let mut buf = vec![0xAA; 3];
        let len = encode_record(&mut buf, &ns, shard, offset, &e).unwrap();
        prop_assert_eq!(buf.len(), 3 + len);
        match decode_frame(&buf[3..]) {
            Frame::Valid { record, len: got } => {
                prop_assert_eq!(got, len);
                prop_assert_eq!(&*record.namespace, ns.as_str());
                prop_assert_eq!(record.shard, shard);
                prop_assert_eq!(record.offset, offset);
                prop_assert_eq!(&*record.entry, &e);
            }
            other => prop_assert!(false, "did not decode: {:?}", other),
        }
        // Every strict prefix is incomplete or bad, never a different record.
        for cut in 0..len {
            let valid = matches!(decode_frame(&buf[3..3 + cut]), Frame::Valid { .. });
            prop_assert!(!valid, "a prefix of {} bytes decoded", cut);
        }
    }
}

/// The log's files, in order, as one stream of bytes.
fn segments(fs: &SimFs) -> Vec<(u64, Vec<u8>)> {
    (1..)
        .map_while(|id| fs.read_file(&segment(Path::new(DIR), id)).map(|b| (id, b)))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_truncation_recovers_to_a_prefix(
        sizes in proptest::collection::vec(1usize..300, 1..40),
        cut_frac in 0.0f64..1.0,
    ) {
        let config = LogConfig { segment_bytes: 1500, ..LogConfig::default() };
        let fs = SimFs::new();
        let shard = ShardRef::new("ns", 0);
        let written: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![i as u8; n])
            .collect();
        {
            let log = open_sim(&fs, config.clone());
            for (i, p) in written.iter().enumerate() {
                log.append(&shard, entry(i.to_string(), p)).wait().unwrap();
            }
        }
        // Cut the log at one byte of the concatenation of its segments:
        // later segments go, the one holding the cut is truncated there.
        let segs = segments(&fs);
        let total: usize = segs.iter().map(|(_, b)| b.len()).sum();
        let mut cut = (cut_frac * total as f64) as usize;
        for (id, bytes) in segs {
            let path = segment(Path::new(DIR), id);
            if cut == 0 {
                fs.remove_file(&path).unwrap();
                let _ = fs.remove_file(&path.with_extension("idx"));
            } else if cut < bytes.len() {
                fs.write_file(&path, bytes[..cut].to_vec());
                cut = 0;
            } else {
                cut -= bytes.len();
            }
        }
        let log = open_sim(&fs, config);
        let got = read_all(&log, &shard, 0);
        prop_assert!(got.len() <= written.len());
        for (i, r) in got.iter().enumerate() {
            prop_assert_eq!(r.offset, i as u64);
            prop_assert_eq!(&r.entry.payload[..], &written[i][..]);
        }
        // And it takes appends again.
        let next = log.append(&shard, entry("next", "x")).wait().unwrap();
        prop_assert!(next.sequence >= got.len() as u64);
    }
}
