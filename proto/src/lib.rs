//! The agentmesh wire contract.
//!
//! - [`pb`]: code generated from `proto/mesh/v1/mesh.proto` (prost messages, tonic
//!   clients and servers). Only gRPC adapters touch it.
//! - [`domain`]: the types the rest of the mesh works with: ids, agent cards, goals,
//!   fencing tokens, node frames, run views.
//! - [`convert`]: `TryFrom`/`From` between the two. Conversions from the wire validate
//!   and name the offending field in their error.
//! - [`codec`]: the services' codec (prost; malformed messages are `INVALID_ARGUMENT`).

pub mod codec;
pub mod convert;
pub mod domain;
pub mod fuzz;
pub mod secrets;
pub mod trace_context;

/// Generated protobuf and gRPC code for package `mesh.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("mesh.v1");
}

/// The bare echo service `mesh bench baseline` measures the transport with.
#[allow(clippy::all, missing_docs)]
pub mod bench_pb {
    tonic::include_proto!("mesh.bench.v1");
}

/// Encoded `FileDescriptorSet` of mesh.v1, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("mesh_descriptor");

/// Every method of every service the protos declare, as `/package.Service/Method` (the
/// path a call names): what the authorization rules and their tests must cover.
pub fn declared_methods() -> Vec<String> {
    use prost::Message;
    let Ok(set) = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET) else {
        return Vec::new();
    };
    let mut methods = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                methods.push(format!(
                    "/{}.{}/{}",
                    file.package(),
                    service.name(),
                    method.name()
                ));
            }
        }
    }
    methods
}

pub use convert::FieldError;

impl std::fmt::Debug for pb::Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task")
            .field("token", &self.token)
            .field("agent", &self.agent)
            .field("skill", &self.skill)
            .field("input_json", &self.input_json)
            .field("deadline_ms", &self.deadline_ms)
            .field("idempotency_key", &self.idempotency_key)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("traceparent", &self.traceparent)
            .finish()
    }
}

impl std::fmt::Debug for pb::SetSecretRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetSecretRequest")
            .field("name", &self.name)
            .field("value", &"***")
            .finish()
    }
}
