//! The one mapping from the library's [`Error`] to gRPC status codes. The `match` is
//! exhaustive with no catch-all arm: a new error variant must be given its code here.

use crate::Error;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let message = err.to_string();
        match err {
            Error::InvalidArgument { .. } => Status::invalid_argument(message),
            Error::NotFound(_) => Status::not_found(message),
            Error::FailedPrecondition(_) => Status::failed_precondition(message),
            Error::AlreadyExists(_) => Status::already_exists(message),
            Error::ResourceExhausted { retry_after, .. } => Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            Error::Unauthenticated(_) => Status::unauthenticated(message),
            Error::PermissionDenied(_) => Status::permission_denied(message),
            Error::Unavailable(_) => Status::unavailable(message),
            Error::Internal(_) => {
                tracing::error!(%message, "internal error");
                Status::internal(message)
            }
        }
    }
}
