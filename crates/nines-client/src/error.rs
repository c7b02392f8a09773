//! What can go wrong, grouped by what the caller should do, and how one
//! failed attempt is classified: by the error's type (tonic's
//! `ConnectError` for a connection never made) and the server's metadata,
//! never by its message text.

use std::error::Error as _;

use nines_proto::metadata;
use tonic::{Code, Status};

/// A failed call. `#[non_exhaustive]`: match the cases you handle and treat
/// the rest as [`Error::Server`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No node could take the request before the deadline, and as far as
    /// the client knows it had no effect. Safe to try again later.
    #[error("unavailable after {attempts} attempts: {last}")]
    Unavailable {
        /// Attempts made within the deadline.
        attempts: u32,
        /// The last attempt's error.
        last: String,
    },
    /// A write may or may not have been applied, and the client could not
    /// settle it within the deadline (or the region that may have applied
    /// it is no longer the one taking writes). Read back to find out.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The request is malformed or beyond a limit; the message names which.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The cluster's state refuses the request (it had no effect).
    #[error("refused: {0}")]
    Refused(String),
    /// An endpoint cannot be used; `reason` says why.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other server error, with its gRPC code's name.
    #[error("server error {code}: {message}")]
    Server {
        /// The gRPC code, e.g. `DataLoss`.
        code: String,
        /// The server's message.
        message: String,
    },
}

impl Error {
    /// Whether a write that failed with this error may have been applied.
    ///
    /// ```
    /// let e = nines_client::Error::OutcomeUnknown("connection lost".into());
    /// assert!(e.is_outcome_unknown());
    /// ```
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Error::OutcomeUnknown(_))
    }
}

/// What one failed attempt allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// The request certainly had no effect: retry, at `leader` if given.
    NotApplied { leader: Option<String>, transport: bool },
    /// The request may have had an effect.
    Unknown { transport: bool },
    /// A repeated session write whose first result the region no longer
    /// keeps: never retry it.
    SessionExpired,
    /// Retrying does not help.
    Final(Error),
}

impl Attempt {
    /// Whether the failure was the node's or the network's (it counts
    /// against the endpoint's circuit breaker), not an answer.
    pub(crate) fn transport(&self) -> bool {
        matches!(self, Attempt::NotApplied { transport: true, .. } | Attempt::Unknown { transport: true })
    }
}

/// Whether tonic reported that no connection could be made (refused, name
/// not resolved, connect timeout): the request never left the client.
fn never_connected(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Classifies a failed attempt. A status with a source was made by the
/// client's transport (the server never answered); one without came from
/// the server.
pub(crate) fn classify(status: &Status) -> Attempt {
    let transport = status.source().is_some();
    let leader = status.metadata().get(metadata::LEADER_HINT).and_then(|v| v.to_str().ok()).map(str::to_string);
    match status.code() {
        _ if never_connected(status) => Attempt::NotApplied { leader: None, transport: true },
        // Made by the transport mid-call (a reset, a GOAWAY, a protocol
        // error), whatever code it maps to: the request may have arrived.
        _ if transport => Attempt::Unknown { transport: true },
        // Not the leader (Unavailable), or shed by an overloaded node
        // (ResourceExhausted): the server says the call never started.
        Code::Unavailable | Code::ResourceExhausted if status.metadata().get(metadata::RETRY_SAFE).is_some() => {
            Attempt::NotApplied { leader, transport: false }
        }
        Code::DeadlineExceeded if status.metadata().get(metadata::SESSION_EXPIRED).is_some() => Attempt::SessionExpired,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::Aborted => {
            Attempt::Unknown { transport }
        }
        Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted => {
            Attempt::Final(Error::InvalidInput(status.message().to_string()))
        }
        Code::FailedPrecondition => Attempt::Final(Error::Refused(status.message().to_string())),
        code => Attempt::Final(Error::Server { code: format!("{code:?}"), message: status.message().to_string() }),
    }
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

    #[test]
    fn attempts_are_classified_by_type_and_metadata() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let never = Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        let reset = Status::from_error(Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)));
        let table = [
            (never, Attempt::NotApplied { leader: None, transport: true }),
            (
                with(Code::Unavailable, &[(metadata::RETRY_SAFE, "true"), (metadata::LEADER_HINT, "http://a:1")]),
                Attempt::NotApplied { leader: Some("http://a:1".into()), transport: false },
            ),
            (with(Code::Unavailable, &[]), Attempt::Unknown { transport: false }),
            (
                with(Code::ResourceExhausted, &[(metadata::RETRY_SAFE, "true")]),
                Attempt::NotApplied { leader: None, transport: false },
            ),
            (reset, Attempt::Unknown { transport: true }),
            (
                Status::from_error(Box::new(std::io::Error::other("h2 protocol error"))),
                Attempt::Unknown { transport: true },
            ),
            (with(Code::DeadlineExceeded, &[(metadata::SESSION_EXPIRED, "true")]), Attempt::SessionExpired),
            (with(Code::InvalidArgument, &[]), Attempt::Final(Error::InvalidInput("x".into()))),
            (with(Code::FailedPrecondition, &[]), Attempt::Final(Error::Refused("x".into()))),
            (with(Code::DataLoss, &[]), Attempt::Final(Error::Server { code: "DataLoss".into(), message: "x".into() })),
        ];
        for (status, want) in table {
            assert_eq!(classify(&status), want, "{status:?}");
        }
    }
}
