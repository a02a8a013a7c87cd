//! `SecretService`: a namespace's secrets, set, listed by name and deleted; never read back.

use mesh_proto::pb;
use tonic::{Request, Response, Status};

use super::auth::{Caller, page_size};
use crate::secrets::{SecretInfo, Vault};

pub struct SecretApi {
    pub vault: Vault,
}

fn info(s: SecretInfo) -> pb::SecretInfo {
    pb::SecretInfo {
        name: s.name,
        created_at_ms: s.created_at_ms,
        updated_at_ms: s.updated_at_ms,
    }
}

#[tonic::async_trait]
impl pb::secret_service_server::SecretService for SecretApi {
    #[tracing::instrument(name = "grpc.set_secret", level = "debug", skip_all)]
    async fn set_secret(
        &self,
        request: Request<pb::SetSecretRequest>,
    ) -> Result<Response<pb::SecretInfo>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        caller.acted_on(format!("secret/{}", req.name));
        let set = self
            .vault
            .set(caller.namespace.as_str(), &req.name, &req.value)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(info(set)))
    }

    #[tracing::instrument(name = "grpc.list_secrets", level = "debug", skip_all)]
    async fn list_secrets(
        &self,
        request: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        let size = page_size("page_size", req.page_size)? as usize;
        // One more than asked: whether there is a next page.
        let mut page = self
            .vault
            .list(caller.namespace.as_str(), &req.page_token, size + 1);
        let next = if page.len() > size {
            page.truncate(size);
            page.last().map(|s| s.name.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListSecretsResponse {
            secrets: page.into_iter().map(info).collect(),
            next_page_token: next,
        }))
    }

    #[tracing::instrument(name = "grpc.delete_secret", level = "debug", skip_all)]
    async fn delete_secret(
        &self,
        request: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::SecretInfo>, Status> {
        let caller = Caller::of(&request)?;
        let name = request.into_inner().name;
        caller.acted_on(format!("secret/{name}"));
        let ns = caller.namespace.as_str();
        let found = self.vault.delete(ns, &name).await.map_err(Status::from)?;
        if !found {
            return Err(Status::not_found(format!(
                "secret `{name}` is not set in namespace `{ns}`"
            )));
        }
        Ok(Response::new(pb::SecretInfo {
            name,
            ..Default::default()
        }))
    }
}
