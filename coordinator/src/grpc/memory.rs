//! `MemoryService`: a namespace's memory (docs/memory.md), listed, read, added to and deleted.

use mesh_proto::pb;
use tonic::{Request, Response, Status};

use super::auth::{Caller, page_size};
use crate::memory::{MAX_PUT_BYTES, MemoryEntry, NewMemory, check_key, check_scope};
use crate::store::{Backend, Store};

pub struct MemoryApi {
    pub store: Store,
}

fn entry(e: MemoryEntry) -> pb::MemoryEntry {
    pb::MemoryEntry {
        value_json: e.value.to_string(),
        run_id: e.run_id,
        step_id: e.step_id,
        at_ms: e.at_ms,
        expires_at_ms: e.expires_at_ms.unwrap_or(0),
    }
}

fn checked(scope: &str, key: &str) -> Result<(), Status> {
    check_scope(scope).map_err(Status::invalid_argument)?;
    check_key(key).map_err(Status::invalid_argument)
}

fn internal(e: crate::error::Error) -> Status {
    Status::from(e)
}

#[tonic::async_trait]
impl pb::memory_service_server::MemoryService for MemoryApi {
    #[tracing::instrument(name = "grpc.list_memory", level = "debug", skip_all)]
    async fn list_memory(
        &self,
        request: Request<pb::ListMemoryRequest>,
    ) -> Result<Response<pb::ListMemoryResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        let size = page_size("page_size", req.page_size)?;
        let scope = (!req.scope.is_empty()).then_some(req.scope.as_str());
        if let Some(s) = scope {
            check_scope(s).map_err(Status::invalid_argument)?;
        }
        let after = match req.page_token.split_once('\n') {
            Some((s, k)) => Some((s.to_owned(), k.to_owned())),
            None if req.page_token.is_empty() => None,
            None => {
                return Err(Status::invalid_argument(
                    "page_token: not one this service gave",
                ));
            }
        };
        let page = self
            .store
            .list_memory(caller.namespace.as_str(), scope, size, after)
            .await
            .map_err(internal)?;
        Ok(Response::new(pb::ListMemoryResponse {
            keys: page
                .keys
                .into_iter()
                .map(|k| pb::MemoryKey {
                    scope: k.scope,
                    key: k.key,
                    entries: k.entries,
                    updated_at_ms: k.updated_at_ms,
                })
                .collect(),
            next_page_token: page
                .next
                .map(|(s, k)| format!("{s}\n{k}"))
                .unwrap_or_default(),
        }))
    }

    #[tracing::instrument(name = "grpc.get_memory", level = "debug", skip_all)]
    async fn get_memory(
        &self,
        request: Request<pb::GetMemoryRequest>,
    ) -> Result<Response<pb::GetMemoryResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        checked(&req.scope, &req.key)?;
        let last = match req.last {
            0 => 10,
            n @ 1..=1000 => n,
            n => {
                return Err(Status::invalid_argument(format!(
                    "last: {n} is over the limit of 1000"
                )));
            }
        };
        let entries = self
            .store
            .memory(caller.namespace.as_str(), &req.scope, &req.key, last)
            .await
            .map_err(internal)?;
        if entries.is_empty() {
            return Err(Status::not_found(format!(
                "no memory under `{}` `{}` in namespace `{}`",
                req.scope, req.key, caller.namespace
            )));
        }
        Ok(Response::new(pb::GetMemoryResponse {
            entries: entries.into_iter().map(entry).collect(),
        }))
    }

    #[tracing::instrument(name = "grpc.put_memory", level = "debug", skip_all)]
    async fn put_memory(
        &self,
        request: Request<pb::PutMemoryRequest>,
    ) -> Result<Response<pb::MemoryEntry>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        checked(&req.scope, &req.key)?;
        caller.acted_on(format!("memory/{}/{}", req.scope, req.key));
        if req.value_json.len() > MAX_PUT_BYTES {
            return Err(Status::invalid_argument(format!(
                "value_json: {} bytes, the limit is {MAX_PUT_BYTES}",
                req.value_json.len()
            )));
        }
        let value: serde_json::Value = serde_json::from_str(&req.value_json)
            .map_err(|e| Status::invalid_argument(format!("value_json: not JSON: {e}")))?;
        const MAX_TTL_MS: u64 = 3 * 365 * 24 * 3600 * 1000;
        if req.ttl_ms > MAX_TTL_MS {
            return Err(Status::invalid_argument("ttl_ms: at most 3 years"));
        }
        let new = NewMemory {
            namespace: caller.namespace.to_string(),
            scope: req.scope,
            key: req.key,
            value: value.clone(),
            ttl_ms: req.ttl_ms,
        };
        self.store.put_memory(new).await.map_err(internal)?;
        let now = crate::store::now_ms();
        Ok(Response::new(pb::MemoryEntry {
            value_json: value.to_string(),
            at_ms: now,
            expires_at_ms: if req.ttl_ms > 0 {
                now + req.ttl_ms as i64
            } else {
                0
            },
            ..Default::default()
        }))
    }

    #[tracing::instrument(name = "grpc.delete_memory", level = "debug", skip_all)]
    async fn delete_memory(
        &self,
        request: Request<pb::DeleteMemoryRequest>,
    ) -> Result<Response<pb::DeleteMemoryResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        checked(&req.scope, &req.key)?;
        caller.acted_on(format!("memory/{}/{}", req.scope, req.key));
        let ns = caller.namespace.as_str();
        let had = self
            .store
            .memory(ns, &req.scope, &req.key, crate::memory::MAX_ENTRIES_PER_KEY)
            .await
            .map_err(internal)?
            .len();
        if had == 0 {
            return Err(Status::not_found(format!(
                "no memory under `{}` `{}` in namespace `{ns}`",
                req.scope, req.key
            )));
        }
        self.store
            .delete_memory(ns, &req.scope, &req.key)
            .await
            .map_err(internal)?;
        Ok(Response::new(pb::DeleteMemoryResponse {
            deleted: had as u64,
        }))
    }
}
