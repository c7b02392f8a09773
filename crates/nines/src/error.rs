//! The error type at the node's service boundary, grouped by what the caller
//! should do, and its one mapping to `tonic::Status`.

use nines_proto::metadata;
use tonic::{Code, Status};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Retry elsewhere: this node does not lead. The request had no effect.
    #[error("not the leader{}", leader_addr.as_ref().map(|a| format!("; the leader is node {} at {a}", leader_id.unwrap_or(0))).unwrap_or_else(|| "; no leader is known yet".into()))]
    NotLeader { leader_id: Option<u64>, leader_addr: Option<String> },
    /// Retry later or elsewhere. `retry_safe` says whether the request
    /// certainly had no effect.
    #[error("unavailable: {reason}")]
    Unavailable { reason: String, retry_safe: bool },
    /// Fix the request.
    #[error("{0}")]
    InvalidInput(String),
    /// The request is valid but the cluster's state refuses it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The outcome of a write is unknown: it may or may not have been applied.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// The outcome of a repeated session write is unknown and it was not
    /// applied again: do not retry it.
    #[error("outcome unknown: {0}")]
    SessionExpired(String),
    /// Stop: stored data is corrupt.
    #[error("corrupt data: {0}")]
    InvalidData(String),
    /// A bug or an unexpected failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }
}

fn set(status: &mut Status, key: &'static str, value: &str) {
    // Values that are not valid ASCII metadata (never the case for our
    // addresses) are left out rather than failing the response.
    if let Ok(v) = value.parse() {
        status.metadata_mut().insert(key, v);
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::NotLeader { leader_addr, .. } => {
                let mut s = Status::new(Code::Unavailable, msg);
                set(&mut s, metadata::RETRY_SAFE, "true");
                if let Some(addr) = leader_addr {
                    set(&mut s, metadata::LEADER_HINT, &addr);
                }
                s
            }
            Error::Unavailable { retry_safe, .. } => {
                let mut s = Status::new(Code::Unavailable, msg);
                if retry_safe {
                    set(&mut s, metadata::RETRY_SAFE, "true");
                }
                s
            }
            Error::InvalidInput(_) => Status::new(Code::InvalidArgument, msg),
            Error::FailedPrecondition(_) => Status::new(Code::FailedPrecondition, msg),
            Error::Indeterminate(_) => Status::new(Code::DeadlineExceeded, msg),
            Error::SessionExpired(_) => {
                let mut s = Status::new(Code::DeadlineExceeded, msg);
                set(&mut s, metadata::SESSION_EXPIRED, "true");
                s
            }
            Error::InvalidData(_) => Status::new(Code::DataLoss, msg),
            Error::Internal(_) => Status::new(Code::Internal, msg),
        }
    }
}

impl From<crate::storage::state_machine::ReadError> for Error {
    fn from(e: crate::storage::state_machine::ReadError) -> Self {
        match e {
            crate::storage::state_machine::ReadError::Corrupt { .. } => {
                tracing::error!(error = %e, "corrupt record in the state machine");
                Error::InvalidData(e.to_string())
            }
            crate::storage::state_machine::ReadError::Io(_) => Error::Internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_leader_carries_the_hint_and_is_retry_safe() {
        let s: Status =
            Error::NotLeader { leader_id: Some(2), leader_addr: Some("http://127.0.0.1:7002".into()) }.into();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.metadata().get(metadata::LEADER_HINT).unwrap(), "http://127.0.0.1:7002");
        assert!(s.metadata().get(metadata::RETRY_SAFE).is_some());
        assert!(s.message().contains("node 2"), "{}", s.message());
    }

    #[test]
    fn only_effect_free_failures_are_retry_safe() {
        let table = [
            (Error::Unavailable { reason: "x".into(), retry_safe: true }, Code::Unavailable, true),
            (Error::Unavailable { reason: "x".into(), retry_safe: false }, Code::Unavailable, false),
            (Error::Indeterminate("t".into()), Code::DeadlineExceeded, false),
            (Error::invalid("bad"), Code::InvalidArgument, false),
            (Error::InvalidData("crc".into()), Code::DataLoss, false),
        ];
        for (e, code, safe) in table {
            let s: Status = e.clone().into();
            assert_eq!(s.code(), code, "{e:?}");
            assert_eq!(s.metadata().get(metadata::RETRY_SAFE).is_some(), safe, "{e:?}");
        }
    }
}
