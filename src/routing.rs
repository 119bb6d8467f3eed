//! Which shard a key goes to. A namespace routes with one hash for life:
//! changing it (or the shard count) moves keys between shards, and a key
//! whose entries sit in two shards loses its order.
//!
//! - `murmur2`, the default for new namespaces, is Kafka's: the Java
//!   client's `toPositive(murmur2(key)) % n` and librdkafka's
//!   `murmur2_random`, so other Kafka producers put a key where Walden does.
//! - `crc32` is librdkafka's default partitioner, `consistent_random`.
//! - `crc32c` is what Walden used before. It is linear, so short keys that
//!   differ in one character share low bits and crowd a few shards (`k0` to
//!   `k9` land on 2 of 4).

use serde::{Deserialize, Serialize};

/// `routing.hash`: how a key is hashed to its shard.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RouteHash {
    #[default]
    Murmur2,
    Crc32,
    Crc32c,
}

impl RouteHash {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteHash::Murmur2 => "murmur2",
            RouteHash::Crc32 => "crc32",
            RouteHash::Crc32c => "crc32c",
        }
    }

    /// The shard of `route` among `shards`.
    pub fn shard(self, route: &[u8], shards: u32) -> u32 {
        let shards = shards.max(1);
        match self {
            RouteHash::Murmur2 => (murmur2(route) & 0x7fff_ffff) % shards,
            RouteHash::Crc32 => crc32fast::hash(route) % shards,
            RouteHash::Crc32c => crc32c::crc32c(route) % shards,
        }
    }
}

impl std::fmt::Display for RouteHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The shard an entry goes to: the hash of its key, or of its id if it has
/// none, so a key always lands on one shard.
pub fn shard_of(hash: RouteHash, key: Option<&str>, id: &str, shards: u32) -> u32 {
    hash.shard(key.unwrap_or(id).as_bytes(), shards)
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`): 32-bit
/// MurmurHash2 with seed 0x9747b28c, little-endian blocks.
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes(block.try_into().expect("four bytes"));
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        for (i, &b) in tail.iter().enumerate().rev() {
            h ^= (b as u32) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kafka's own vectors (clients' `UtilsTest.testMurmur2`), as the Java
    /// client's signed ints, and librdkafka's (`rdmurmur2.c`).
    #[test]
    fn murmur2_matches_kafka_s_test_vectors() {
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (s, want) in cases {
            assert_eq!(murmur2(s.as_bytes()) as i32, want, "{s}");
        }
        assert_eq!(murmur2(b"kafka"), 0xd067_cf64);
    }

    /// The Java client's partition of a key: `toPositive(murmur2) % n`.
    #[test]
    fn murmur2_partitions_as_the_java_client_does() {
        let java = |s: &str, n: i32| ((murmur2(s.as_bytes()) as i32) & 0x7fff_ffff) % n;
        for s in ["21", "foobar", "abc", "kafka", ""] {
            assert_eq!(
                RouteHash::Murmur2.shard(s.as_bytes(), 7) as i32,
                java(s, 7),
                "{s}"
            );
        }
    }

    #[test]
    fn crc32_is_librdkafka_s_consistent_partitioner() {
        // zlib's CRC-32 of "123456789".
        assert_eq!(RouteHash::Crc32.shard(b"123456789", u32::MAX), 0xcbf4_3926);
    }

    fn shards_used(hash: RouteHash, keys: impl Iterator<Item = String>, n: u32) -> Vec<usize> {
        let mut counts = vec![0; n as usize];
        for k in keys {
            counts[hash.shard(k.as_bytes(), n) as usize] += 1;
        }
        counts
    }

    #[test]
    fn short_keys_spread_over_the_shards() {
        let keys = || (0..10).map(|i| format!("k{i}"));
        let used = |h| shards_used(h, keys(), 4).iter().filter(|&&c| c > 0).count();
        assert!(used(RouteHash::Murmur2) >= 3);
        // What the default fixes.
        assert_eq!(used(RouteHash::Crc32c), 2);
    }

    #[test]
    fn ten_thousand_keys_of_each_pattern_land_within_two_points_of_a_quarter() {
        type Pattern = Box<dyn Fn(usize) -> String>;
        let patterns: [(&str, Pattern); 3] = [
            ("k<i>", Box::new(|i| format!("k{i}"))),
            ("user-<i>", Box::new(|i| format!("user-{i}"))),
            // Walden's own ids, which route entries that have no key.
            ("uuid v7", Box::new(|_| uuid::Uuid::now_v7().to_string())),
        ];
        for (name, make) in &patterns {
            let counts = shards_used(RouteHash::Murmur2, (0..10_000).map(make), 4);
            for c in counts {
                assert!(
                    (2_300..=2_700).contains(&c),
                    "{name}: a shard took {c} of 10,000"
                );
            }
        }
    }
}
