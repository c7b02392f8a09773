//! The on-disk record format: every value nines writes to disk is
//! `[format version: u8][crc32 of payload: u32 LE][payload: postcard]`.
//!
//! Invariants:
//! - A record is checked after it is encoded (header present) and when it is
//!   read back (format version known, checksum matches, payload decodes and is
//!   fully consumed). Any mismatch is an error naming what was wrong; a
//!   corrupt record never reads as a missing one.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The only record format this build reads and writes.
pub const FORMAT_VERSION: u8 = 1;

/// Bytes before the payload: the format version and the checksum.
const HEADER_BYTES: usize = 1 + 4;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record of {len} bytes is shorter than its {HEADER_BYTES}-byte header")]
    TooShort { len: usize },
    #[error("record format version {found} is not the supported version {FORMAT_VERSION}")]
    UnknownFormat { found: u8 },
    #[error("record checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("record payload does not decode: {0}")]
    Decode(postcard::Error),
    #[error("record payload has {0} trailing bytes")]
    Trailing(usize),
    #[error("record does not encode: {0}")]
    Encode(postcard::Error),
}

/// Encodes a value as a checksummed record.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, RecordError> {
    let mut out = vec![FORMAT_VERSION, 0, 0, 0, 0];
    let mut out = postcard::to_extend(value, std::mem::take(&mut out)).map_err(RecordError::Encode)?;
    let crc = crc32fast::hash(&out[HEADER_BYTES..]);
    out[1..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    assert!(out.len() >= HEADER_BYTES, "encoded record lost its header");
    Ok(out)
}

/// Decodes a record, verifying its format version and checksum.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    if bytes.len() < HEADER_BYTES {
        return Err(RecordError::TooShort { len: bytes.len() });
    }
    if bytes[0] != FORMAT_VERSION {
        return Err(RecordError::UnknownFormat { found: bytes[0] });
    }
    let mut stored = [0u8; 4];
    stored.copy_from_slice(&bytes[1..HEADER_BYTES]);
    let stored = u32::from_le_bytes(stored);
    let payload = &bytes[HEADER_BYTES..];
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(RecordError::Checksum { stored, computed });
    }
    let (value, rest) = postcard::take_from_bytes(payload).map_err(RecordError::Decode)?;
    if !rest.is_empty() {
        return Err(RecordError::Trailing(rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips() {
        let v = (42u64, "hello".to_string(), vec![1u8, 2, 3]);
        let bytes = encode(&v).unwrap();
        assert_eq!(decode::<(u64, String, Vec<u8>)>(&bytes).unwrap(), v);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = encode(&(7u64, "value".to_string())).unwrap();
        for i in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(decode::<(u64, String)>(&bad).is_err(), "flip of bit {i} went unnoticed");
        }
    }

    #[test]
    fn truncated_and_foreign_records_are_errors() {
        let bytes = encode(&1u64).unwrap();
        assert!(matches!(decode::<u64>(&bytes[..3]), Err(RecordError::TooShort { len: 3 })));
        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert!(matches!(decode::<u64>(&v2), Err(RecordError::UnknownFormat { found: 2 })));
        let mut long = encode(&(1u64, 2u64)).unwrap();
        long.truncate(long.len() - 1);
        assert!(decode::<(u64, u64)>(&long).is_err());
    }
}

/// Hostile or damaged bytes never panic a decoder: every stored record type,
/// behind a valid header and checksum (so the payload decoder itself is
/// exercised), and snapshot frames as they arrive from a peer.
#[cfg(test)]
mod decoder_properties {
    use proptest::prelude::*;

    use super::*;
    use crate::storage::session::SessionRecord;
    use crate::storage::snapshot::{Item, read_frames};
    use crate::types::{Entry, RemoteEntry, StoredValue};

    /// `payload` behind a valid header and CRC.
    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut out = vec![FORMAT_VERSION];
        out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn stored_records_of_any_bytes_decode_or_fail_cleanly(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let record = framed(&payload);
            let _ = decode::<Entry>(&record);
            let _ = decode::<StoredValue>(&record);
            let _ = decode::<RemoteEntry>(&record);
            let _ = decode::<SessionRecord>(&record);
            let _ = decode::<Item>(&record);
            // Raw bytes (mostly a bad header or checksum) too.
            let _ = decode::<Entry>(&payload);
        }

        #[test]
        fn snapshot_frames_of_any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = read_frames(&bytes);
            // A frame whose length prefix fits, around a valid record of junk.
            let body = framed(&bytes);
            let mut frame = (body.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&body);
            let _ = read_frames(&frame);
        }
    }
}
