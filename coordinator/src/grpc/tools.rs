//! `ToolService`: a namespace's registered tools (docs/tools.md), put, read, listed, deleted.

use mesh_proto::pb;
use tonic::{Request, Response, Status};

use super::auth::{Caller, page_size};
use crate::tools::{ToolRecord, ToolRegistry, check_name, checked_declaration, kind_of};

pub struct ToolApi {
    pub tools: ToolRegistry,
}

fn info(t: ToolRecord) -> pb::ToolInfo {
    pb::ToolInfo {
        kind: kind_of(&t.declaration).to_owned(),
        declaration_json: t.declaration.to_string(),
        name: t.name,
        created_at_ms: t.created_at_ms,
        updated_at_ms: t.updated_at_ms,
    }
}

fn named(name: &str) -> Result<(), Status> {
    check_name(name).map_err(|e| Status::invalid_argument(format!("name: {e}")))
}

fn not_found(name: &str, namespace: &str) -> Status {
    Status::not_found(format!(
        "no tool `{name}` is registered in namespace `{namespace}`"
    ))
}

#[tonic::async_trait]
impl pb::tool_service_server::ToolService for ToolApi {
    #[tracing::instrument(name = "grpc.put_tool", level = "debug", skip_all)]
    async fn put_tool(
        &self,
        request: Request<pb::PutToolRequest>,
    ) -> Result<Response<pb::ToolInfo>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        caller.acted_on(format!("tool/{}", req.name));
        let declaration = checked_declaration(&req.name, &req.declaration_json)?;
        let record = self
            .tools
            .put(caller.namespace.as_str(), &req.name, declaration)
            .await?;
        Ok(Response::new(info(record)))
    }

    #[tracing::instrument(name = "grpc.get_tool", level = "debug", skip_all)]
    async fn get_tool(
        &self,
        request: Request<pb::GetToolRequest>,
    ) -> Result<Response<pb::ToolInfo>, Status> {
        let caller = Caller::of(&request)?;
        let name = request.into_inner().name;
        named(&name)?;
        let ns = caller.namespace.as_str();
        match self.tools.get(ns, &name) {
            Some(t) => Ok(Response::new(info(t))),
            None => Err(not_found(&name, ns)),
        }
    }

    #[tracing::instrument(name = "grpc.list_tools", level = "debug", skip_all)]
    async fn list_tools(
        &self,
        request: Request<pb::ListToolsRequest>,
    ) -> Result<Response<pb::ListToolsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        let size = page_size("page_size", req.page_size)? as usize;
        if !req.page_token.is_empty() {
            named(&req.page_token)
                .map_err(|_| Status::invalid_argument("page_token: not one this service gave"))?;
        }
        let mut page = self
            .tools
            .list(caller.namespace.as_str(), size + 1, &req.page_token);
        let next = if page.len() > size {
            page.truncate(size);
            page.last().map(|t| t.name.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListToolsResponse {
            tools: page.into_iter().map(info).collect(),
            next_page_token: next,
        }))
    }

    #[tracing::instrument(name = "grpc.delete_tool", level = "debug", skip_all)]
    async fn delete_tool(
        &self,
        request: Request<pb::GetToolRequest>,
    ) -> Result<Response<pb::ToolInfo>, Status> {
        let caller = Caller::of(&request)?;
        let name = request.into_inner().name;
        named(&name)?;
        caller.acted_on(format!("tool/{name}"));
        let ns = caller.namespace.as_str();
        match self.tools.delete(ns, &name).await? {
            Some(t) => Ok(Response::new(info(t))),
            None => Err(not_found(&name, ns)),
        }
    }
}
