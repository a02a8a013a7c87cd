//! `mesh.v1.RegistryService`: nodes and agents with their health.

use std::time::Duration;

use mesh_proto::pb;
use tonic::{Request, Response, Status};

use super::status;
use crate::error::call_result;
use crate::registry::RegistryMsg;
use crate::root::Handles;

const LIST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct RegistryApi {
    pub handles: Handles,
}

#[tonic::async_trait]
impl pb::registry_service_server::RegistryService for RegistryApi {
    #[tracing::instrument(name = "grpc.list_nodes", skip_all)]
    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let registry = self.handles.registry.get();
        let nodes = call_result(
            "registry",
            registry
                .call(RegistryMsg::ListNodes, Some(LIST_TIMEOUT))
                .await,
        )
        .map_err(status)?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.into_iter().map(Into::into).collect(),
        }))
    }

    #[tracing::instrument(name = "grpc.list_agents", skip_all)]
    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let skill = Some(request.into_inner().skill).filter(|s| !s.is_empty());
        let registry = self.handles.registry.get();
        let agents = call_result(
            "registry",
            registry
                .call(
                    |reply| RegistryMsg::ListAgents(skill, reply),
                    Some(LIST_TIMEOUT),
                )
                .await,
        )
        .map_err(status)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.into_iter().map(Into::into).collect(),
        }))
    }
}
