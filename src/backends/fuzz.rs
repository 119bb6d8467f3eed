//! What each backend decodes from bytes it reads back, driven by arbitrary
//! input ([`crate::fuzz`]): a log segment on recovery, and a dead letter of
//! each backend. None may panic or hang, whatever the bytes.

use std::path::Path;
use std::sync::Arc;

use super::embedded::{EmbeddedLog, LogConfig, OnCorruption};
use crate::entry::frame::{Frame, decode_frame};
use crate::entry::{Entry, ShardRef};
use crate::fs::SimFs;

/// The namespace the seed segments were written for.
const NAMESPACE: &str = "ns";

/// `data` as the first segment file of an embedded log: recovered (stopping
/// at, and then skipping, what is bad), then read out shard by shard. The
/// records read, counted over both ways.
pub fn log_recovery(data: &[u8]) -> usize {
    let mut read = 0;
    let mut rest = data;
    while let Frame::Valid { len, .. } = decode_frame(rest) {
        rest = &rest[len..];
    }
    let _ = super::embedded::format::decode_segment_header(data);
    for on_corruption in [OnCorruption::Stop, OnCorruption::Skip] {
        let fs = SimFs::new();
        fs.write_file(
            Path::new("/data/log/00000000000000000001.seg"),
            data.to_vec(),
        );
        let config = LogConfig {
            on_corruption,
            ..LogConfig::default()
        };
        let Ok(log) = EmbeddedLog::open_with_fs(Arc::new(fs), "/data", config) else {
            continue;
        };
        for shard in 0..4 {
            let Ok(mut reader) = log.reader(&ShardRef::new(NAMESPACE, shard), 0) else {
                continue;
            };
            // Bounded: a reader that never ends is a finding too, but as a
            // timeout, not a hang of the whole run.
            for _ in 0..10_000 {
                match reader.read_batch(256) {
                    Ok(batch) if !batch.is_empty() => read += batch.len(),
                    _ => break,
                }
            }
        }
        log.close();
    }
    read
}

/// `data` as the parts of a dead letter, read back by each backend: fields
/// split at 0xFF bytes, the first the payload, then header names and values
/// in turn.
pub fn dlq_letters(data: &[u8]) {
    let mut fields = data.split(|b| *b == 0xff);
    let payload = fields.next().unwrap_or_default();
    let rest: Vec<&[u8]> = fields.collect();
    let pairs: Vec<(String, &[u8])> = rest
        .chunks(2)
        .map(|kv| {
            (
                String::from_utf8_lossy(kv[0]).into_owned(),
                kv.get(1).copied().unwrap_or_default(),
            )
        })
        .collect();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();

    // Embedded: a letter is an entry of the DLQ log, its fields in headers.
    let stored = Entry {
        id: text(payload),
        key: None,
        headers: pairs.iter().map(|(k, v)| (k.clone(), text(v))).collect(),
        payload: bytes::Bytes::copy_from_slice(payload),
        timestamp_ms: 0,
        due_ms: 0,
    };
    let _ = super::embedded::decode_letter(7, stored);
    // The letter's frame on disk, too.
    let _ = decode_frame(data);

    // Kafka: a record of the DLQ topic.
    let _ = super::kafka::letter_from(
        "ns.dlq",
        0,
        42,
        payload,
        pairs.iter().map(|(k, v)| (k.as_str(), Some(*v))),
        Some(1),
    );

    // SQS: a message of the DLQ queue, its fields in string attributes.
    let mut msg = aws_sdk_sqs::types::Message::builder().body(text(payload));
    for (k, v) in &pairs {
        if let Ok(value) = aws_sdk_sqs::types::MessageAttributeValue::builder()
            .data_type("String")
            .string_value(text(v))
            .build()
        {
            msg = msg.message_attributes(k.clone(), value);
        }
    }
    let _ = super::sqs::letter_from(&msg.build(), NAMESPACE, |e| e.id.len() as u32 % 4);
}
