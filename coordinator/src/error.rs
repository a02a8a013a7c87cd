//! The coordinator's error type and its mapping to gRPC status codes.

use mesh_proto::FieldError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(#[from] FieldError),
    #[error("invalid workflow: {0}")]
    InvalidWorkflow(#[from] mesh_workflow::Invalid),
    #[error("run `{0}` not found")]
    RunNotFound(String),
    #[error("workflow `{0}` is not registered")]
    WorkflowNotFound(String),
    #[error("{0}")]
    StepNotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("node `{0}` is not live")]
    NodeNotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// A namespace's quota: try again after `retry_after_ms`.
    #[error("{message}; retry in {retry_after_ms} ms")]
    QuotaExceeded {
        message: String,
        retry_after_ms: u64,
    },
    #[error("{0} did not answer in time")]
    Timeout(&'static str),
    #[error("{0} is not running")]
    Unavailable(&'static str),
    #[error("store: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("store: {0}")]
    Corrupt(String),
    #[error("store: {0}")]
    Commit(String),
    /// This coordinator's lease (of this epoch) is lost: another leads, or it expired.
    #[error(
        "this coordinator no longer leads (its epoch {0} has lost its lease): the write was refused"
    )]
    Deposed(u64),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The coordinator cannot go on (its actors failed past their restart budget).
    #[error("{0}")]
    Fatal(String),
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(_) | Error::InvalidWorkflow(_) => {
                tonic::Status::invalid_argument(msg)
            }
            Error::RunNotFound(_)
            | Error::NodeNotFound(_)
            | Error::WorkflowNotFound(_)
            | Error::StepNotFound(_) => tonic::Status::not_found(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::ResourceExhausted(_) => {
                let mut status = tonic::Status::resource_exhausted(msg);
                // A machine-readable hint for clients that back off.
                status.metadata_mut().insert(
                    "retry-after-ms",
                    tonic::metadata::MetadataValue::from_static("1000"),
                );
                status
            }
            Error::QuotaExceeded { retry_after_ms, .. } => {
                let mut status = tonic::Status::resource_exhausted(msg);
                if let Ok(v) = retry_after_ms.to_string().parse() {
                    status.metadata_mut().insert("retry-after-ms", v);
                }
                status
            }
            Error::Timeout(_) => tonic::Status::deadline_exceeded(msg),
            Error::Unavailable(_) | Error::Deposed(_) => tonic::Status::unavailable(msg),
            Error::Store(_)
            | Error::Corrupt(_)
            | Error::Commit(_)
            | Error::Io(_)
            | Error::Fatal(_) => tonic::Status::internal(msg),
        }
    }
}

/// Maps the outcome of an actor call: the outer error means the actor could not be reached.
pub fn call_result<T>(
    actor: &'static str,
    result: std::result::Result<ractor::rpc::CallResult<T>, ractor::MessagingErr<impl Sized>>,
) -> Result<T> {
    match result {
        Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
        Ok(ractor::rpc::CallResult::Timeout) => Err(Error::Timeout(actor)),
        Ok(ractor::rpc::CallResult::SenderError) | Err(_) => Err(Error::Unavailable(actor)),
    }
}
