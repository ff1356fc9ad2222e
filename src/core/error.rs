//! The one error type of the library. Every fallible call of [`crate::Scheduler`] returns it;
//! the gRPC layer maps each variant to a status code in a single exhaustive `match`
//! (`grpc::error`), so adding a variant forces a decision about its code.

use std::time::Duration;

/// What went wrong, in terms of the domain. Messages name the offending field or id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is malformed; nothing was changed.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// An unknown (or, where the call needs a live one, destroyed) room, process or deployment.
    #[error("{0}")]
    NotFound(String),
    /// The request is well-formed but the app is not ready for it (e.g. no deployment yet).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A caller-chosen id is already taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// A capacity limit was hit; the caller may retry after `retry_after`.
    #[error("{message}")]
    ResourceExhausted {
        message: String,
        retry_after: Duration,
    },
    /// The caller did not prove who it is (no or an unknown token). Raised by the service's
    /// access checks, never by the library's own calls.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but may not touch this app. Raised by the service's access
    /// checks, never by the library's own calls.
    #[error("{0}")]
    PermissionDenied(String),
    /// The scheduler cannot take the call now (shutting down, store unavailable).
    #[error("{0}")]
    Unavailable(String),
    /// A bug: an invariant did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

/// Shorthand for results of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
