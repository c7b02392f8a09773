//! How an error from a node is classified: may the request be retried, and
//! is it certain that it had no effect?

use std::error::Error as _;

use nines_proto::metadata;
use tonic::{Code, Status};

/// What a failed attempt allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The request certainly had no effect: retry anywhere.
    Safe,
    /// The node may be unavailable, but the request may have taken effect.
    Unsafe,
    /// Retrying will not help (bad input, refused by state, a bug).
    Final,
}

/// Whether the status reports a connection that could not be made at all
/// (refused, a name that does not resolve, a connect timeout), so the
/// request never left the client: tonic wraps every such failure in its
/// `ConnectError`, found by type in the status's source chain.
pub fn connect_failed(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Classifies a failed attempt.
pub fn classify(status: &Status) -> Retry {
    match status.code() {
        // Unavailable (not the leader) or ResourceExhausted (shed) that the
        // server marked as never started.
        Code::Unavailable | Code::ResourceExhausted if status.metadata().get(metadata::RETRY_SAFE).is_some() => {
            Retry::Safe
        }
        Code::Unavailable if connect_failed(status) => Retry::Safe,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::Aborted => Retry::Unsafe,
        _ => Retry::Final,
    }
}

/// The leader address a node suggested, if any.
pub fn leader_hint(status: &Status) -> Option<String> {
    status.metadata().get(metadata::LEADER_HINT).and_then(|v| v.to_str().ok()).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(code: Code, pairs: &[(&'static str, &str)]) -> Status {
        let mut s = Status::new(code, "x");
        for (k, v) in pairs {
            s.metadata_mut().insert(*k, v.parse().unwrap());
        }
        s
    }

    fn never_connected(kind: std::io::ErrorKind) -> Status {
        Status::from_error(Box::new(tonic::ConnectError(Box::new(std::io::Error::from(kind)))))
    }

    #[test]
    fn classification_table() {
        let table = [
            (with(Code::Unavailable, &[(metadata::RETRY_SAFE, "true")]), Retry::Safe),
            (with(Code::ResourceExhausted, &[(metadata::RETRY_SAFE, "true")]), Retry::Safe),
            (with(Code::ResourceExhausted, &[]), Retry::Final),
            (never_connected(std::io::ErrorKind::ConnectionRefused), Retry::Safe),
            (never_connected(std::io::ErrorKind::NotFound), Retry::Safe),
            // A connection lost after the request went out: maybe applied.
            (Status::from_error(Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset))), Retry::Unsafe),
            (with(Code::Unavailable, &[]), Retry::Unsafe),
            (with(Code::DeadlineExceeded, &[]), Retry::Unsafe),
            (with(Code::InvalidArgument, &[]), Retry::Final),
            (with(Code::FailedPrecondition, &[]), Retry::Final),
            (with(Code::DataLoss, &[]), Retry::Final),
        ];
        for (status, want) in table {
            assert_eq!(classify(&status), want, "{status:?}");
        }
    }

    #[test]
    fn leader_hint_is_read_from_metadata() {
        let s = with(Code::Unavailable, &[(metadata::LEADER_HINT, "http://127.0.0.1:7002")]);
        assert_eq!(leader_hint(&s).as_deref(), Some("http://127.0.0.1:7002"));
        assert_eq!(leader_hint(&Status::unavailable("x")), None);
    }
}
