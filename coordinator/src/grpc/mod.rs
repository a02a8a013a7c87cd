//! Thin gRPC adapters, one file per service: convert, call one actor, convert back.

mod auth;
mod bounded;
mod goal;
mod limits;
mod memory;
mod node;
mod registry;
mod secrets;
mod tools;
mod workflow;

pub use auth::{AuthApi, Caller, Guard, GuardLayer};
pub use goal::GoalApi;
pub use limits::CallLimitsLayer;
pub use memory::MemoryApi;
pub use node::NodeApi;
pub use registry::RegistryApi;
pub use secrets::SecretApi;
pub use tools::ToolApi;
pub use workflow::WorkflowApi;

use crate::error::Error;

/// Largest message accepted or sent on any service.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

pub(crate) fn status(e: Error) -> tonic::Status {
    e.into()
}
