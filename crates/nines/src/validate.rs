//! Request validation: every limit and every malformed field is refused with
//! `INVALID_ARGUMENT` and a message that names the field and the limit.

use nines_proto::v1::{CompareAndSwapRequest, Consistency, ScanRequest, compare_and_swap_request};

use crate::error::Error;
use crate::limits::{KEY_BYTES_MAX, LABEL_BYTES_MAX, SCAN_LIMIT_DEFAULT, SCAN_LIMIT_MAX, VALUE_BYTES_MAX};
use crate::types::{Expected, SessionTag};

pub fn key(key: &[u8]) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::invalid("key is empty; a key must have at least 1 byte"));
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(Error::invalid(format!("key is {} bytes; limit KEY_BYTES_MAX is {KEY_BYTES_MAX}", key.len())));
    }
    Ok(())
}

pub fn value(value: &[u8]) -> Result<(), Error> {
    if value.len() > VALUE_BYTES_MAX {
        return Err(Error::invalid(format!(
            "value is {} bytes; limit VALUE_BYTES_MAX is {VALUE_BYTES_MAX}",
            value.len()
        )));
    }
    Ok(())
}

/// The read consistency; unknown numbers are refused, unspecified means
/// linearizable.
pub fn consistency(raw: i32) -> Result<Consistency, Error> {
    match Consistency::try_from(raw) {
        Ok(Consistency::Unspecified) => Ok(Consistency::Linearizable),
        Ok(c) => Ok(c),
        Err(_) => Err(Error::invalid(format!("consistency {raw} is not a known level (1 = linearizable, 2 = local)"))),
    }
}

/// A write's client session, if it names one.
pub fn session(session: Option<&nines_proto::v1::Session>) -> Result<Option<SessionTag>, Error> {
    let Some(s) = session else { return Ok(None) };
    let client = <[u8; 16]>::try_from(s.client.as_slice())
        .map_err(|_| Error::invalid(format!("session client id is {} bytes; it must be 16", s.client.len())))?;
    if s.seq == 0 {
        return Err(Error::invalid("session seq 0 is not a write number; sessions number writes from 1"));
    }
    if s.first_unanswered == 0 || s.first_unanswered > s.seq {
        return Err(Error::invalid(format!(
            "session first_unanswered {} must be between 1 and the write's seq {}",
            s.first_unanswered, s.seq
        )));
    }
    Ok(Some(SessionTag { client, seq: s.seq, first_unanswered: s.first_unanswered, retry: s.retry }))
}

pub fn expected(req: &CompareAndSwapRequest) -> Result<Expected, Error> {
    match &req.expected {
        None => Err(Error::invalid("expected is not set; give expected_index or expect_absent")),
        Some(compare_and_swap_request::Expected::ExpectAbsent(true)) => Ok(Expected::Absent),
        Some(compare_and_swap_request::Expected::ExpectAbsent(false)) => {
            Err(Error::invalid("expect_absent must be true when set; to compare a version use expected_index"))
        }
        Some(compare_and_swap_request::Expected::ExpectedIndex(0)) => {
            Err(Error::invalid("expected_index 0 is never a version; use expect_absent for a missing key"))
        }
        Some(compare_and_swap_request::Expected::ExpectedIndex(i)) => Ok(Expected::Index(*i)),
        Some(compare_and_swap_request::Expected::ExpectedVersion(v)) => {
            if v.origin_region.is_empty() || (v.hlc_physical_ms == 0 && v.hlc_logical == 0) {
                return Err(Error::invalid(
                    "expected_version needs its hlc and origin_region: they name the write in every region",
                ));
            }
            if v.origin_region.len() > LABEL_BYTES_MAX {
                return Err(Error::invalid(format!(
                    "expected_version origin_region is {} bytes; limit LABEL_BYTES_MAX is {LABEL_BYTES_MAX}",
                    v.origin_region.len()
                )));
            }
            Ok(Expected::Write {
                hlc: crate::hlc::Hlc { physical_ms: v.hlc_physical_ms, logical: v.hlc_logical },
                origin: v.origin_region.clone(),
            })
        }
    }
}

/// A validated scan: `[start, end)` with `end` empty meaning unbounded.
#[derive(Debug, PartialEq, Eq)]
pub struct ScanBounds {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
    pub limit: u32,
}

/// The smallest key greater than every key that starts with `prefix`, or
/// empty (unbounded) if there is none (the prefix is all 0xff).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

pub fn scan(req: &ScanRequest) -> Result<ScanBounds, Error> {
    let limit = match req.limit {
        0 => SCAN_LIMIT_DEFAULT,
        l if l > SCAN_LIMIT_MAX => {
            return Err(Error::invalid(format!("limit {l} is above SCAN_LIMIT_MAX {SCAN_LIMIT_MAX}")));
        }
        l => l,
    };
    for (name, k) in [("start", &req.start), ("end", &req.end), ("prefix", &req.prefix)] {
        if k.len() > KEY_BYTES_MAX {
            return Err(Error::invalid(format!("{name} is {} bytes; limit KEY_BYTES_MAX is {KEY_BYTES_MAX}", k.len())));
        }
    }
    if !req.prefix.is_empty() {
        if !req.start.is_empty() || !req.end.is_empty() {
            return Err(Error::invalid("give either prefix or start/end, not both"));
        }
        return Ok(ScanBounds { start: req.prefix.clone(), end: prefix_end(&req.prefix), limit });
    }
    if !req.end.is_empty() && req.start >= req.end {
        return Err(Error::invalid("start must be below end (an empty end means no upper bound)"));
    }
    Ok(ScanBounds { start: req.start.clone(), end: req.end.clone(), limit })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_at_and_beyond_their_limits() {
        assert!(key(&[b'k'; KEY_BYTES_MAX]).is_ok());
        let e = key(&vec![b'k'; KEY_BYTES_MAX + 1]).unwrap_err().to_string();
        assert!(e.contains("KEY_BYTES_MAX"), "{e}");
        assert!(key(b"").unwrap_err().to_string().contains("empty"));
        assert!(value(&vec![0; VALUE_BYTES_MAX]).is_ok());
        assert!(value(&vec![0; VALUE_BYTES_MAX + 1]).unwrap_err().to_string().contains("VALUE_BYTES_MAX"));
    }

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        let table: &[(&[u8], &[u8])] = &[(b"a", b"b"), (b"a\xff", b"b"), (b"\xff\xff", b""), (b"ab", b"ac")];
        for (p, want) in table {
            assert_eq!(prefix_end(p), want.to_vec(), "prefix {p:?}");
        }
    }

    #[test]
    fn malformed_scans_name_their_problem() {
        let table = [
            (ScanRequest { limit: SCAN_LIMIT_MAX + 1, ..Default::default() }, "SCAN_LIMIT_MAX"),
            (ScanRequest { prefix: b"a".to_vec(), start: b"a".to_vec(), ..Default::default() }, "not both"),
            (ScanRequest { start: b"b".to_vec(), end: b"a".to_vec(), ..Default::default() }, "below end"),
        ];
        for (req, want) in table {
            let e = scan(&req).unwrap_err().to_string();
            assert!(e.contains(want), "{req:?}: {e}");
        }
        assert_eq!(scan(&ScanRequest::default()).unwrap().limit, SCAN_LIMIT_DEFAULT);
    }

    #[test]
    fn cas_expectations() {
        let mut r = CompareAndSwapRequest::default();
        assert!(expected(&r).unwrap_err().to_string().contains("not set"));
        r.expected = Some(compare_and_swap_request::Expected::ExpectedIndex(0));
        assert!(expected(&r).is_err());
        r.expected = Some(compare_and_swap_request::Expected::ExpectAbsent(false));
        assert!(expected(&r).is_err());
        r.expected = Some(compare_and_swap_request::Expected::ExpectedIndex(9));
        assert_eq!(expected(&r).unwrap(), Expected::Index(9));
        assert!(consistency(7).is_err());
        assert_eq!(consistency(0).unwrap(), Consistency::Linearizable);
    }
}
