//! `mesh.v1.WorkflowService`: register, read, list and validate workflow definitions.

use mesh_proto::FieldError;
use mesh_proto::convert::{check_id, parse_workflow_ref};
use mesh_proto::pb;
use mesh_workflow::Invalid;
use tonic::{Request, Response, Status};

use super::{Caller, status};
use crate::error::Error;
use crate::intake;
use crate::root::Handles;
use crate::store::{Backend, NewWorkflow};

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;

#[derive(Clone, Debug)]
pub struct WorkflowApi {
    pub handles: Handles,
}

fn problems(invalid: &Invalid) -> Vec<pb::Problem> {
    invalid
        .0
        .iter()
        .map(|p| pb::Problem {
            path: p.path.clone(),
            message: p.message.clone(),
        })
        .collect()
}

fn invalid(field: &str, message: impl Into<String>) -> Status {
    status(Error::InvalidArgument(FieldError::new(field, message)))
}

#[tonic::async_trait]
impl pb::workflow_service_server::WorkflowService for WorkflowApi {
    #[tracing::instrument(name = "grpc.register_workflow", level = "debug", skip_all)]
    async fn register(
        &self,
        request: Request<pb::RegisterWorkflowRequest>,
    ) -> Result<Response<pb::Workflow>, Status> {
        let caller = Caller::of(&request)?;
        let ns = &caller.namespace;
        let source = request.into_inner().definition;
        let limits = &self.handles.deps.limits;
        let mut workflow = mesh_workflow::load(&source, limits).map_err(|e| status(e.into()))?;
        check_id("definition.name", &workflow.def.name).map_err(|_| {
            invalid(
                "definition.name",
                "a registered workflow needs a `name` (letters, digits, `_`, `-`, `.`, `:`)",
            )
        })?;
        if workflow.def.version.is_none_or(|v| v == 0) {
            return Err(invalid(
                "definition.version",
                "a registered workflow needs a `version`, a whole number from 1",
            ));
        }
        intake::check_sub_workflows(&workflow, limits, &self.handles.store, ns)
            .await
            .map_err(status)?;
        caller.acted_on(format!(
            "workflow {}@{}",
            workflow.def.name,
            workflow.def.version.unwrap_or_default()
        ));
        workflow.def.name = intake::stored_name(ns, &workflow.def.name);
        let new = NewWorkflow {
            source,
            def: workflow.def,
        };
        let (mut record, created) = self
            .handles
            .store
            .register_workflow(new)
            .await
            .map_err(|e| status(intake::in_namespace_words(e, ns)))?;
        record.name = intake::plain_name(&record.name).to_owned();
        tracing::info!(name = %record.name, version = record.version, created, "workflow registered");
        let mut answer = pb::Workflow::from(record);
        answer.created = created;
        Ok(Response::new(answer))
    }

    #[tracing::instrument(name = "grpc.get_workflow", level = "debug", skip_all)]
    async fn get(
        &self,
        request: Request<pb::GetWorkflowRequest>,
    ) -> Result<Response<pb::Workflow>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        check_id("name", &req.name).map_err(|e| status(e.into()))?;
        let version = (req.version > 0).then_some(req.version);
        let record =
            intake::namespaced_workflow(&self.handles.store, &caller.namespace, &req.name, version)
                .await
                .map_err(status)?;
        Ok(Response::new(record.into()))
    }

    #[tracing::instrument(name = "grpc.list_workflows", level = "debug", skip_all)]
    async fn list(
        &self,
        request: Request<pb::ListWorkflowsRequest>,
    ) -> Result<Response<pb::ListWorkflowsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let ns = &caller.namespace;
        let req = request.into_inner();
        let name = (!req.name.is_empty()).then_some(req.name);
        if let Some(n) = &name {
            check_id("name", n).map_err(|e| status(e.into()))?;
        }
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE,
            n if n <= MAX_PAGE => n,
            n => {
                return Err(invalid(
                    "page_size",
                    format!("is {n}, the limit is {MAX_PAGE}"),
                ));
            }
        };
        let after = if req.page_token.is_empty() {
            None
        } else {
            match parse_workflow_ref(&req.page_token) {
                Ok((n, Some(v))) => Some((intake::stored_name(ns, &n), v)),
                _ => return Err(invalid("page_token", "not a token this service gave")),
            }
        };
        let name = name.map(|n| intake::stored_name(ns, &n));
        let (workflows, next) = self
            .handles
            .store
            .list_workflows(ns, name.as_deref(), page_size, after)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListWorkflowsResponse {
            workflows: workflows
                .into_iter()
                .map(|mut w| {
                    w.name = intake::plain_name(&w.name).to_owned();
                    w.into()
                })
                .collect(),
            next_page_token: next
                .map(|t| intake::plain_name(&t).to_owned())
                .unwrap_or_default(),
        }))
    }

    #[tracing::instrument(name = "grpc.validate_workflow", level = "debug", skip_all)]
    async fn validate(
        &self,
        request: Request<pb::ValidateWorkflowRequest>,
    ) -> Result<Response<pb::ValidateWorkflowResponse>, Status> {
        let source = request.into_inner().definition;
        let answer = match mesh_workflow::load(&source, &self.handles.deps.limits) {
            Ok(w) => pb::ValidateWorkflowResponse {
                valid: true,
                problems: Vec::new(),
                steps: w.steps.len() as u32,
            },
            Err(e) => pb::ValidateWorkflowResponse {
                valid: false,
                problems: problems(&e),
                steps: 0,
            },
        };
        Ok(Response::new(answer))
    }

    #[tracing::instrument(name = "grpc.profile_workflow", level = "debug", skip_all)]
    async fn profile(
        &self,
        request: Request<pb::ProfileWorkflowRequest>,
    ) -> Result<Response<pb::WorkflowProfile>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        check_id("name", &req.name).map_err(|e| status(e.into()))?;
        let runs = match req.runs {
            0 => 100,
            n @ 1..=500 => n,
            n => {
                return Err(status(Error::InvalidArgument(FieldError::new(
                    "runs",
                    format!("{n} is over the limit of 500"),
                ))));
            }
        };
        let version = (req.version > 0).then_some(req.version);
        let names = [
            req.name.clone(),
            intake::stored_name(&caller.namespace, &req.name),
        ];
        let ids = self
            .handles
            .store
            .runs_of_workflow(&caller.namespace, &names, version, runs)
            .await
            .map_err(status)?;
        let label = match version {
            Some(v) => format!("{}@{v}", req.name),
            None => req.name.clone(),
        };
        if ids.is_empty() {
            return Err(Status::not_found(format!(
                "workflow `{label}` has no finished run in namespace `{}`",
                caller.namespace
            )));
        }
        let mut traces = Vec::with_capacity(ids.len());
        for id in &ids {
            let (_, trace) = crate::trace::load(&self.handles.store, id)
                .await
                .map_err(status)?;
            traces.push(trace);
        }
        Ok(Response::new(crate::trace::profile(&label, &traces)))
    }
}
