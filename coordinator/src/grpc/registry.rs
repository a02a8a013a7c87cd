//! `mesh.v1.RegistryService`: nodes and agents with their health.

use std::time::Duration;

use mesh_proto::convert::check_id;
use mesh_proto::domain::{NAMESPACE_LABEL, NodeId, NodeView, serves_namespace};
use mesh_proto::pb;
use tonic::{Request, Response, Status};

use super::{Caller, status};
use crate::auth::Need;
use crate::error::call_result;
use crate::registry::RegistryMsg;
use crate::root::Handles;

const LIST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct RegistryApi {
    pub handles: Handles,
}

impl RegistryApi {
    /// The nodes the caller sees: its namespace's (every node for a cluster admin).
    async fn nodes(&self, caller: &Caller) -> Result<Vec<NodeView>, Status> {
        let registry = self.handles.registry.get();
        let nodes = call_result(
            "registry",
            registry
                .call(RegistryMsg::ListNodes, Some(LIST_TIMEOUT))
                .await,
        )
        .map_err(status)?;
        let every = caller.principal.is_cluster_admin() && caller.authenticated();
        Ok(nodes
            .into_iter()
            .filter(|n| every || serves_namespace(&n.labels, caller.namespace.as_str()))
            .collect())
    }
}

#[tonic::async_trait]
impl pb::registry_service_server::RegistryService for RegistryApi {
    #[tracing::instrument(name = "grpc.drain_node", level = "debug", skip_all)]
    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::NodeView>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        check_id("node_id", &req.node_id).map_err(|e| status(e.into()))?;
        caller.acted_on(format!("node/{}", req.node_id));
        // A node of another namespace is not found; one that serves others too needs the
        // caller to administer each of them.
        let Some(seen) = self
            .nodes(&caller)
            .await?
            .into_iter()
            .find(|n| n.node_id.as_str() == req.node_id)
        else {
            return Err(status(crate::error::Error::NodeNotFound(req.node_id)));
        };
        let served = seen
            .labels
            .get(NAMESPACE_LABEL)
            .cloned()
            .unwrap_or_default();
        if let Some(other) = served
            .split(',')
            .find(|ns| !caller.principal.may(ns, Need::Admin))
        {
            return Err(Status::permission_denied(format!(
                "node `{}` serves namespace `{other}` too: draining it needs the admin role there",
                req.node_id
            )));
        }
        let reason = if req.reason.is_empty() {
            "drain requested by an operator".to_owned()
        } else {
            req.reason
        };
        let node = NodeId(req.node_id);
        let registry = self.handles.registry.get();
        let view = call_result(
            "registry",
            registry
                .call(
                    |reply| RegistryMsg::Drain {
                        node,
                        reason,
                        reply,
                    },
                    Some(LIST_TIMEOUT),
                )
                .await,
        )
        .map_err(status)?
        .map_err(status)?;
        Ok(Response::new(view.into()))
    }

    #[tracing::instrument(name = "grpc.list_nodes", level = "debug", skip_all)]
    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let caller = Caller::of(&request)?;
        let nodes = self.nodes(&caller).await?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.into_iter().map(Into::into).collect(),
        }))
    }

    #[tracing::instrument(name = "grpc.list_agents", level = "debug", skip_all)]
    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let caller = Caller::of(&request)?;
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
        let mine: Vec<NodeId> = self
            .nodes(&caller)
            .await?
            .into_iter()
            .map(|n| n.node_id)
            .collect();
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents
                .into_iter()
                .filter(|a| mine.contains(&a.node_id))
                .map(Into::into)
                .collect(),
        }))
    }
}
