//! [`GoalClient`]: submit goals, read and watch runs, list nodes and agents.

use std::time::Duration;

use futures::{Stream, StreamExt};
use mesh_proto::convert::check_id;
use mesh_proto::domain::*;
use mesh_proto::pb;
use mesh_proto::pb::auth_service_client::AuthServiceClient;
use mesh_proto::pb::goal_service_client::GoalServiceClient;
use mesh_proto::pb::memory_service_client::MemoryServiceClient;
use mesh_proto::pb::registry_service_client::RegistryServiceClient;
use mesh_proto::pb::secret_service_client::SecretServiceClient;
use mesh_proto::pb::tool_service_client::ToolServiceClient;
use mesh_proto::pb::workflow_service_client::WorkflowServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

/// The gRPC status of a failed call, without the transport's types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpcCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    DeadlineExceeded,
    Unavailable,
    Cancelled,
    Internal,
    /// No token, or one that is unknown, expired or revoked.
    Unauthenticated,
    /// The token's role does not allow the call in its namespace.
    PermissionDenied,
    Other,
}

impl From<tonic::Code> for RpcCode {
    fn from(c: tonic::Code) -> Self {
        match c {
            tonic::Code::InvalidArgument => RpcCode::InvalidArgument,
            tonic::Code::NotFound => RpcCode::NotFound,
            tonic::Code::AlreadyExists => RpcCode::AlreadyExists,
            tonic::Code::FailedPrecondition => RpcCode::FailedPrecondition,
            tonic::Code::ResourceExhausted => RpcCode::ResourceExhausted,
            tonic::Code::DeadlineExceeded => RpcCode::DeadlineExceeded,
            tonic::Code::Unavailable => RpcCode::Unavailable,
            tonic::Code::Cancelled => RpcCode::Cancelled,
            tonic::Code::Internal => RpcCode::Internal,
            tonic::Code::Unauthenticated => RpcCode::Unauthenticated,
            tonic::Code::PermissionDenied => RpcCode::PermissionDenied,
            _ => RpcCode::Other,
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the coordinator at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{code:?}: {message}")]
    Rpc { code: RpcCode, message: String },
    #[error("invalid reply from the coordinator: {0}")]
    Invalid(String),
}

impl ClientError {
    pub fn code(&self) -> Option<RpcCode> {
        match self {
            ClientError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Rpc {
            code: s.code().into(),
            message: s.message().to_owned(),
        }
    }
}

/// Deadline of every unary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// A client of the coordinator's goal and registry services.
#[derive(Clone, Debug)]
pub struct GoalClient {
    goals: GoalServiceClient<Channel>,
    registry: RegistryServiceClient<Channel>,
    workflows: WorkflowServiceClient<Channel>,
    auth: AuthServiceClient<Channel>,
    secrets: SecretServiceClient<Channel>,
    memory: MemoryServiceClient<Channel>,
    tools: ToolServiceClient<Channel>,
    /// `authorization: Bearer …`, sent with every call when set.
    token: Option<Bearer>,
    /// `mesh-namespace`, sent with every call when set (the coordinator's `default` else).
    namespace: Option<MetadataValue<Ascii>>,
}

/// A token as sent: never printed.
#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer ***")
    }
}

/// One problem of a workflow definition, as `validate_workflow` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkflowProblem {
    pub path: String,
    pub message: String,
}

/// A coordinator address this SDK can use: `http://host:port`, or `https://host:port` when
/// TLS is configured (`tls`), refused with a clear reason rather than tried and retried.
pub fn check_coordinator_url(url: &str, tls: bool) -> Result<(), String> {
    match (url.split_once("://").map(|(scheme, _)| scheme), tls) {
        (Some("http"), false) | (Some("https"), true) => Ok(()),
        (Some("https"), false) => Err(format!(
            "`{url}`: an https:// coordinator needs the CA that signed its certificate: give --ca (MESH_CA), or tls.ca_file in node.toml"
        )),
        (Some("http"), true) => Err(format!("`{url}`: TLS is configured; use https://")),
        _ => Err(format!("`{url}` must start with http:// or https://")),
    }
}

/// Where a client finds its TLS material: the CA that signed the coordinator's certificate
/// and, for mutual TLS (nodes), its own certificate and key. PEM files.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    pub ca_file: Option<std::path::PathBuf>,
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
}

impl TlsFiles {
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some()
    }

    /// The channel's TLS, read from the files now; `None` without a CA.
    pub fn client_config(&self) -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let Some(ca) = &self.ca_file else {
            if self.cert_file.is_some() || self.key_file.is_some() {
                return Err("tls: a certificate and key need the CA (ca_file) too".into());
            }
            return Ok(None);
        };
        crate::llm::install_crypto_provider();
        let read = |what: &str, path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| format!("tls: cannot read the {what} {}: {e}", path.display()))
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("CA", ca)?));
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read("certificate", cert)?,
                    read("key", key)?,
                ));
            }
            (None, None) => {}
            _ => return Err("tls: give both cert_file and key_file, or neither".into()),
        }
        Ok(Some(tls))
    }
}

/// The addresses of a comma-separated list (`MESH_COORDINATOR`, `--coordinator`).
pub fn addresses(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A coordinator to try: its URL and, when its host is an address a name resolved to, that
/// name, which the coordinator's certificate must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub server_name: Option<String>,
}

/// How long resolving one coordinator name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The coordinators a comma-separated list stands for: each address as given, except a name
/// that resolves to several addresses (a headless Kubernetes Service, DNS round robin), which
/// stands for each of them in the resolver's order. A name that does not resolve within two
/// seconds is kept as given: connecting to it then says why.
pub async fn resolve(list: &str) -> Vec<Target> {
    let mut targets = Vec::new();
    for address in addresses(list) {
        let mut ips = Vec::new();
        if let Some((_, host, port)) = parts(&address)
            && host.parse::<std::net::IpAddr>().is_err()
        {
            let lookup = tokio::net::lookup_host((host.as_str(), port));
            if let Ok(Ok(found)) = tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                ips.extend(found.map(|a| a.ip()));
            }
        }
        targets.extend(expand(&address, &ips));
    }
    targets
}

/// `address` once per distinct address of `ips` when there are several, else as given.
fn expand(address: &str, ips: &[std::net::IpAddr]) -> Vec<Target> {
    let mut distinct: Vec<std::net::IpAddr> = Vec::new();
    for ip in ips {
        if !distinct.contains(ip) {
            distinct.push(*ip);
        }
    }
    let as_given = || {
        vec![Target {
            url: address.to_owned(),
            server_name: None,
        }]
    };
    let Some((scheme, host, port)) = parts(address).filter(|_| distinct.len() > 1) else {
        return as_given();
    };
    distinct
        .into_iter()
        .map(|ip| Target {
            url: match ip {
                std::net::IpAddr::V4(ip) => format!("{scheme}://{ip}:{port}"),
                std::net::IpAddr::V6(ip) => format!("{scheme}://[{ip}]:{port}"),
            },
            server_name: Some(host.clone()),
        })
        .collect()
}

/// The scheme, host (without IPv6 brackets) and port of a coordinator URL.
fn parts(address: &str) -> Option<(String, String, u16)> {
    let uri: tonic::codegen::http::Uri = address.parse().ok()?;
    let scheme = uri.scheme_str()?.to_owned();
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    Some((scheme, host.to_owned(), port))
}

/// Whether the coordinator behind `channel` serves (a leader does; a standby says
/// NOT_SERVING), asked with gRPC health within two seconds.
async fn serving(channel: &Channel) -> bool {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(Duration::from_secs(2));
    matches!(
        tokio::time::timeout(Duration::from_secs(2), health.check(request)).await,
        Ok(Ok(answer)) if answer.get_ref().status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    )
}

impl GoalClient {
    /// Connects to `url` (`http://host:port`).
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Self::connect_with(url, &TlsFiles::default()).await
    }

    /// Connects to `url`: `https://host:port` with `tls` (its CA, and a certificate for
    /// mutual TLS), `http://host:port` without. Given several addresses, comma-separated
    /// (coordinators sharing a PostgreSQL store), it takes the first whose health says it
    /// serves, the leader; when none does, the first it reaches.
    ///
    /// A name that resolves to several addresses stands for each of them (see [`resolve`]).
    pub async fn connect_with(url: &str, tls: &TlsFiles) -> Result<Self, ClientError> {
        let list = resolve(url).await;
        if list.len() < 2 {
            return Self::connect_one(url.trim(), tls, None)
                .await
                .map(Self::over);
        }
        let (mut reached, mut failed) = (None, None);
        for target in &list {
            match Self::connect_one(&target.url, tls, target.server_name.as_deref()).await {
                Ok(channel) if serving(&channel).await => return Ok(Self::over(channel)),
                Ok(channel) => drop(reached.get_or_insert(channel)),
                Err(e) => drop(failed.get_or_insert(e)),
            }
        }
        match (reached, failed) {
            (Some(channel), _) => Ok(Self::over(channel)),
            (None, Some(e)) => Err(e),
            (None, None) => Err(ClientError::Invalid(
                "no coordinator address is given".into(),
            )),
        }
    }

    /// A client over `channel`, without credentials.
    fn over(channel: Channel) -> Self {
        Self {
            goals: GoalServiceClient::new(channel.clone()),
            registry: RegistryServiceClient::new(channel.clone()),
            workflows: WorkflowServiceClient::new(channel.clone()),
            auth: AuthServiceClient::new(channel.clone()),
            secrets: SecretServiceClient::new(channel.clone()),
            memory: MemoryServiceClient::new(channel.clone()),
            tools: ToolServiceClient::new(channel),
            token: None,
            namespace: None,
        }
    }

    /// A channel to `url`; with TLS, the coordinator's certificate must be for `server_name`
    /// (a name `url`'s address was resolved from) or else for `url`'s host.
    async fn connect_one(
        url: &str,
        tls: &TlsFiles,
        server_name: Option<&str>,
    ) -> Result<Channel, ClientError> {
        let err = |reason: String| ClientError::Connect {
            url: url.to_owned(),
            reason,
        };
        check_coordinator_url(url, tls.is_set()).map_err(err)?;
        let mut endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| err(e.to_string()))?;
        if let Some(mut config) = tls.client_config().map_err(err)? {
            if let Some(name) = server_name {
                config = config.domain_name(name);
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| err(e.to_string()))?;
        }
        endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| err(e.to_string()))
    }

    /// Calls with `token` (`authorization: Bearer <token>`), as a coordinator with
    /// authentication on requires.
    pub fn with_token(mut self, token: &str) -> Result<Self, ClientError> {
        let value = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| ClientError::Invalid("the token is not printable ASCII".into()))?;
        self.token = Some(Bearer(value));
        Ok(self)
    }

    /// Calls in `namespace` (`mesh-namespace`); the coordinator's `default` otherwise.
    pub fn with_namespace(mut self, namespace: &str) -> Result<Self, ClientError> {
        check_id("namespace", namespace).map_err(|e| ClientError::Invalid(e.to_string()))?;
        self.namespace =
            Some(namespace.parse().map_err(|_| {
                ClientError::Invalid(format!("namespace `{namespace}` is not ASCII"))
            })?);
        Ok(self)
    }

    /// A unary call's request: the credentials and a deadline.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = self.stream_request(msg);
        req.set_timeout(CALL_TIMEOUT);
        req
    }

    /// A streaming call's request: the credentials, and no deadline on the whole stream.
    fn stream_request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(Bearer(token)) = &self.token {
            req.metadata_mut().insert("authorization", token.clone());
        }
        if let Some(ns) = &self.namespace {
            req.metadata_mut().insert("mesh-namespace", ns.clone());
        }
        req
    }

    /// A new token; its secret is in the answer only (`AuthService.CreateToken`).
    pub async fn create_token(
        &self,
        name: &str,
        namespace: &str,
        role: &str,
        ttl: Option<Duration>,
    ) -> Result<pb::CreateTokenResponse, ClientError> {
        let r = self
            .auth
            .clone()
            .create_token(self.request(pb::CreateTokenRequest {
                name: name.to_owned(),
                namespace: namespace.to_owned(),
                role: role.to_owned(),
                ttl_seconds: ttl.map_or(0, |t| t.as_secs().max(1)),
            }))
            .await?;
        Ok(r.into_inner())
    }

    /// One page of the namespace's tokens (every token for a cluster admin).
    pub async fn list_tokens(
        &self,
        page_size: u32,
        page_token: &str,
    ) -> Result<pb::ListTokensResponse, ClientError> {
        let r = self
            .auth
            .clone()
            .list_tokens(self.request(pb::ListTokensRequest {
                page_size,
                page_token: page_token.to_owned(),
            }))
            .await?;
        Ok(r.into_inner())
    }

    /// Revokes a token at once.
    pub async fn revoke_token(&self, token_id: &str) -> Result<pb::Token, ClientError> {
        let r = self
            .auth
            .clone()
            .revoke_token(self.request(pb::RevokeTokenRequest {
                token_id: token_id.to_owned(),
            }))
            .await?;
        Ok(r.into_inner())
    }

    /// One page of the audit log, newest first.
    pub async fn list_audit(
        &self,
        query: pb::ListAuditRequest,
    ) -> Result<pb::ListAuditResponse, ClientError> {
        let r = self.auth.clone().list_audit(self.request(query)).await?;
        Ok(r.into_inner())
    }

    /// Sets a secret of the client's namespace (`SecretService.SetSecret`).
    pub async fn set_secret(
        &self,
        name: &str,
        value: &[u8],
    ) -> Result<pb::SecretInfo, ClientError> {
        let r = self
            .secrets
            .clone()
            .set_secret(self.request(pb::SetSecretRequest {
                name: name.to_owned(),
                value: value.to_vec(),
            }))
            .await?;
        Ok(r.into_inner())
    }

    /// One page of the namespace's secrets: names and times, never values.
    pub async fn list_secrets(
        &self,
        page_size: u32,
        page_token: &str,
    ) -> Result<pb::ListSecretsResponse, ClientError> {
        let r = self
            .secrets
            .clone()
            .list_secrets(self.request(pb::ListSecretsRequest {
                page_size,
                page_token: page_token.to_owned(),
            }))
            .await?;
        Ok(r.into_inner())
    }

    /// Deletes a secret of the namespace.
    pub async fn delete_secret(&self, name: &str) -> Result<pb::SecretInfo, ClientError> {
        let r = self
            .secrets
            .clone()
            .delete_secret(self.request(pb::DeleteSecretRequest {
                name: name.to_owned(),
            }))
            .await?;
        Ok(r.into_inner())
    }

    /// Registers a tool in the namespace (`ToolService.PutTool`; docs/tools.md): a
    /// declaration as a step's `with.tools` entry, which steps then name with `- use: NAME`.
    pub async fn put_tool(
        &self,
        name: &str,
        declaration: &serde_json::Value,
    ) -> Result<pb::ToolInfo, ClientError> {
        let r = self
            .tools
            .clone()
            .put_tool(self.request(pb::PutToolRequest {
                name: name.to_owned(),
                declaration_json: declaration.to_string(),
            }))
            .await?;
        Ok(r.into_inner())
    }

    pub async fn get_tool(&self, name: &str) -> Result<pb::ToolInfo, ClientError> {
        let req = self.request(pb::GetToolRequest {
            name: name.to_owned(),
        });
        Ok(self.tools.clone().get_tool(req).await?.into_inner())
    }

    /// One page of the namespace's registered tools, by name.
    pub async fn list_tools(
        &self,
        page_size: u32,
        page_token: &str,
    ) -> Result<pb::ListToolsResponse, ClientError> {
        let req = self.request(pb::ListToolsRequest {
            page_size,
            page_token: page_token.to_owned(),
        });
        Ok(self.tools.clone().list_tools(req).await?.into_inner())
    }

    pub async fn delete_tool(&self, name: &str) -> Result<pb::ToolInfo, ClientError> {
        let req = self.request(pb::GetToolRequest {
            name: name.to_owned(),
        });
        Ok(self.tools.clone().delete_tool(req).await?.into_inner())
    }

    /// One page of the namespace's memory keys (`MemoryService.ListMemory`; docs/memory.md).
    pub async fn list_memory(
        &self,
        query: pb::ListMemoryRequest,
    ) -> Result<pb::ListMemoryResponse, ClientError> {
        let r = self.memory.clone().list_memory(self.request(query)).await?;
        Ok(r.into_inner())
    }

    /// The newest `last` entries of a memory key, oldest first.
    pub async fn get_memory(
        &self,
        scope: &str,
        key: &str,
        last: u32,
    ) -> Result<Vec<pb::MemoryEntry>, ClientError> {
        let r = self
            .memory
            .clone()
            .get_memory(self.request(pb::GetMemoryRequest {
                scope: scope.to_owned(),
                key: key.to_owned(),
                last,
            }))
            .await?;
        Ok(r.into_inner().entries)
    }

    /// Appends a JSON value to a memory key, kept `ttl` (forever when `None`).
    pub async fn put_memory(
        &self,
        scope: &str,
        key: &str,
        value: &serde_json::Value,
        ttl: Option<std::time::Duration>,
    ) -> Result<pb::MemoryEntry, ClientError> {
        let r = self
            .memory
            .clone()
            .put_memory(self.request(pb::PutMemoryRequest {
                scope: scope.to_owned(),
                key: key.to_owned(),
                value_json: value.to_string(),
                ttl_ms: ttl.map_or(0, |t| t.as_millis() as u64),
            }))
            .await?;
        Ok(r.into_inner())
    }

    /// Deletes every entry of a memory key; how many there were.
    pub async fn delete_memory(&self, scope: &str, key: &str) -> Result<u64, ClientError> {
        let r = self
            .memory
            .clone()
            .delete_memory(self.request(pb::DeleteMemoryRequest {
                scope: scope.to_owned(),
                key: key.to_owned(),
            }))
            .await?;
        Ok(r.into_inner().deleted)
    }

    /// Submits a goal; returns once it is durable.
    pub async fn submit(&self, goal: GoalSpec) -> Result<RunRef, ClientError> {
        let r = self
            .goals
            .clone()
            .submit_goal(self.request(pb::SubmitGoalRequest::from(goal)))
            .await?
            .into_inner();
        Ok(RunRef {
            goal_id: GoalId(r.goal_id),
            run_id: RunId(r.run_id),
            created: r.created,
        })
    }

    /// Submits a goal and follows its run in one call: returns once the goal is durable,
    /// with the run's events (a snapshot, every change, to `Finished`) to read to the end.
    pub async fn submit_and_watch(
        &self,
        goal: GoalSpec,
    ) -> Result<
        (
            RunRef,
            impl Stream<Item = Result<RunEvent, ClientError>> + use<>,
        ),
        ClientError,
    > {
        use pb::submit_and_watch_event::Kind;
        let mut client = self.goals.clone();
        let request = self.stream_request(pb::SubmitGoalRequest::from(goal));
        let (stream, first) = tokio::time::timeout(CALL_TIMEOUT, async move {
            let mut stream = client
                .submit_and_watch(request)
                .await?
                .into_inner();
            let first = stream.message().await?;
            Ok::<_, tonic::Status>((stream, first))
        })
        .await
        .map_err(|_| {
            tonic::Status::deadline_exceeded(
                "SubmitAndWatch: no acknowledgement in time; submit again with the same idempotency key",
            )
        })??;
        let invalid = |what: &str| ClientError::Invalid(format!("SubmitAndWatch: {what}"));
        let run = match first {
            Some(pb::SubmitAndWatchEvent {
                kind: Some(Kind::Accepted(r)),
            }) => RunRef {
                goal_id: GoalId(r.goal_id),
                run_id: RunId(r.run_id),
                created: r.created,
            },
            _ => return Err(invalid("the first message is not the acknowledgement")),
        };
        let events = stream.map(move |item| match item {
            Ok(pb::SubmitAndWatchEvent {
                kind: Some(Kind::Event(event)),
            }) => RunEvent::try_from(event).map_err(|e| ClientError::Invalid(e.to_string())),
            Ok(_) => Err(invalid("a second acknowledgement")),
            Err(status) => Err(status.into()),
        });
        Ok((run, events))
    }

    /// Submits a goal and waits for its run to finish, in one call; returns the run and
    /// its `Finished` event.
    pub async fn submit_and_wait(&self, goal: GoalSpec) -> Result<(RunRef, RunEvent), ClientError> {
        let (run, events) = self.submit_and_watch(goal).await?;
        let mut events = Box::pin(events);
        let mut finished = None;
        // Read to the end (the stream ends right after `Finished`): dropping a stream early
        // resets it, and a connection that resets too many is closed by HTTP/2.
        while let Some(event) = events.next().await {
            if let e @ RunEvent::Finished { .. } = event? {
                finished = Some(e);
            }
        }
        let finished = finished.ok_or_else(|| {
            ClientError::Invalid(format!(
                "the watch of run {} ended without its end",
                run.run_id
            ))
        })?;
        Ok((run, finished))
    }

    /// A step's output (`step` None: the run's), read in pages: for outputs a view carries
    /// only as their size (`output_elided_bytes`).
    pub async fn output(
        &self,
        run_id: &RunId,
        step: Option<&str>,
    ) -> Result<serde_json::Value, ClientError> {
        let mut text = Vec::new();
        loop {
            let page = self
                .goals
                .clone()
                .get_output(self.request(pb::GetOutputRequest {
                    run_id: run_id.0.clone(),
                    step_id: step.unwrap_or_default().to_owned(),
                    offset: text.len() as u64,
                    max_bytes: 0,
                }))
                .await?
                .into_inner();
            if page.chunk.is_empty() && !page.done {
                return Err(ClientError::Invalid("GetOutput: an empty page".into()));
            }
            text.extend_from_slice(&page.chunk);
            if page.done {
                break;
            }
        }
        serde_json::from_slice(&text).map_err(|e| ClientError::Invalid(format!("GetOutput: {e}")))
    }

    pub async fn get_run(&self, run_id: &RunId) -> Result<RunView, ClientError> {
        let r = self
            .goals
            .clone()
            .get_run(self.request(pb::GetRunRequest {
                run_id: run_id.0.clone(),
            }))
            .await?;
        Ok(r.into_inner().into())
    }

    pub async fn cancel_run(&self, run_id: &RunId, reason: &str) -> Result<RunView, ClientError> {
        let r = self
            .goals
            .clone()
            .cancel_run(self.request(pb::CancelRunRequest {
                run_id: run_id.0.clone(),
                reason: reason.to_owned(),
            }))
            .await?;
        Ok(r.into_inner().into())
    }

    /// Registers a workflow definition (YAML or JSON text with `name` and `version`);
    /// `created` is false when this exact version was registered before.
    pub async fn register_workflow(
        &self,
        definition: &str,
    ) -> Result<(WorkflowRecord, bool), ClientError> {
        let r = self
            .workflows
            .clone()
            .register(self.request(pb::RegisterWorkflowRequest {
                definition: definition.to_owned(),
            }))
            .await?
            .into_inner();
        let created = r.created;
        Ok((r.into(), created))
    }

    /// A registered workflow; its newest version when `version` is `None`.
    pub async fn get_workflow(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<WorkflowRecord, ClientError> {
        let r = self
            .workflows
            .clone()
            .get(self.request(pb::GetWorkflowRequest {
                name: name.to_owned(),
                version: version.unwrap_or(0),
            }))
            .await?;
        Ok(r.into_inner().into())
    }

    /// One page of registered workflows, by name then newest version first.
    pub async fn list_workflows(
        &self,
        name: Option<&str>,
        page_size: u32,
        page_token: Option<String>,
    ) -> Result<(Vec<WorkflowRecord>, Option<String>), ClientError> {
        let r = self
            .workflows
            .clone()
            .list(self.request(pb::ListWorkflowsRequest {
                name: name.unwrap_or_default().to_owned(),
                page_size,
                page_token: page_token.unwrap_or_default(),
            }))
            .await?
            .into_inner();
        let next = (!r.next_page_token.is_empty()).then_some(r.next_page_token);
        Ok((r.workflows.into_iter().map(Into::into).collect(), next))
    }

    /// Checks a definition on the coordinator without storing it.
    /// Where a run spent its time (`GoalService.GetRunTrace`): per step and attempt, when it
    /// was queued, started and finished, where, how it ended, what it cost; the critical path.
    pub async fn trace(&self, run_id: &RunId) -> Result<pb::RunTrace, ClientError> {
        let r = self
            .goals
            .clone()
            .get_run_trace(self.request(pb::GetRunTraceRequest {
                run_id: run_id.0.clone(),
            }))
            .await?;
        Ok(r.into_inner())
    }

    /// A workflow's steps over its recent finished runs (`WorkflowService.Profile`): p50 and
    /// p95 duration, failure rate, share of the cost. `version` `None`: every version.
    pub async fn profile(
        &self,
        name: &str,
        version: Option<u32>,
        runs: u32,
    ) -> Result<pb::WorkflowProfile, ClientError> {
        let r = self
            .workflows
            .clone()
            .profile(self.request(pb::ProfileWorkflowRequest {
                name: name.to_owned(),
                version: version.unwrap_or(0),
                runs,
            }))
            .await?;
        Ok(r.into_inner())
    }

    pub async fn validate_workflow(
        &self,
        definition: &str,
    ) -> Result<Vec<WorkflowProblem>, ClientError> {
        let r = self
            .workflows
            .clone()
            .validate(self.request(pb::ValidateWorkflowRequest {
                definition: definition.to_owned(),
            }))
            .await?
            .into_inner();
        Ok(r.problems
            .into_iter()
            .map(|p| WorkflowProblem {
                path: p.path,
                message: p.message,
            })
            .collect())
    }

    /// Approves (`approved`) or rejects a step that awaits approval.
    pub async fn decide(
        &self,
        run_id: &RunId,
        step: &str,
        approved: bool,
        comment: &str,
        by: &str,
    ) -> Result<RunView, ClientError> {
        let req = self.request(pb::DecideRequest {
            run_id: run_id.0.clone(),
            step_id: step.to_owned(),
            comment: comment.to_owned(),
            by: by.to_owned(),
        });
        let mut goals = self.goals.clone();
        let r = if approved {
            goals.approve(req).await?
        } else {
            goals.reject(req).await?
        };
        Ok(r.into_inner().into())
    }

    /// Runs a failed or parked step again, with every step that depends on it.
    pub async fn retry_run(&self, run_id: &RunId, from_step: &str) -> Result<RunView, ClientError> {
        let r = self
            .goals
            .clone()
            .retry_run(self.request(pb::RetryRunRequest {
                run_id: run_id.0.clone(),
                from_step: from_step.to_owned(),
            }))
            .await?;
        Ok(r.into_inner().into())
    }

    /// Skips a parked step: its dependents go on without it.
    pub async fn skip_step(
        &self,
        run_id: &RunId,
        step: &str,
        comment: &str,
    ) -> Result<RunView, ClientError> {
        let r = self
            .goals
            .clone()
            .skip_step(self.request(pb::SkipStepRequest {
                run_id: run_id.0.clone(),
                step_id: step.to_owned(),
                comment: comment.to_owned(),
            }))
            .await?;
        Ok(r.into_inner().into())
    }

    /// Raises a running run's budget: limits left out keep their value, and none may be
    /// lower than it was. Steps held at the old budget go on if the new one allows.
    pub async fn raise_budget(
        &self,
        run_id: &RunId,
        raise: &Budget,
        keep_on_exceed: bool,
        comment: &str,
    ) -> Result<RunView, ClientError> {
        let mut budget = pb::Budget::from(raise.clone());
        if keep_on_exceed {
            budget.on_exceed.clear();
        }
        let r = self
            .goals
            .clone()
            .raise_budget(self.request(pb::RaiseBudgetRequest {
                run_id: run_id.0.clone(),
                budget: Some(budget),
                comment: comment.to_owned(),
            }))
            .await?;
        Ok(r.into_inner().into())
    }

    /// Sends a named signal, with a JSON payload, to a run.
    pub async fn signal(
        &self,
        run_id: &RunId,
        name: &str,
        payload: &serde_json::Value,
    ) -> Result<RunView, ClientError> {
        let r = self
            .goals
            .clone()
            .signal(self.request(pb::SignalRequest {
                run_id: run_id.0.clone(),
                name: name.to_owned(),
                payload_json: payload.to_string(),
            }))
            .await?;
        Ok(r.into_inner().into())
    }

    pub async fn list_runs(
        &self,
        state: Option<RunState>,
        page_size: u32,
        page_token: Option<String>,
    ) -> Result<RunPage, ClientError> {
        let r = self
            .goals
            .clone()
            .list_runs(self.request(pb::ListRunsRequest {
                state: state.map(|s| pb::RunState::from(s) as i32).unwrap_or(0),
                page_size,
                page_token: page_token.unwrap_or_default(),
            }))
            .await?
            .into_inner();
        Ok(RunPage {
            runs: r.runs.into_iter().map(Into::into).collect(),
            next_page_token: Some(r.next_page_token).filter(|t| !t.is_empty()),
        })
    }

    /// The run's current state, then every change, until it finishes. Read it to the end:
    /// dropping it earlier resets the HTTP/2 stream.
    pub async fn watch(
        &self,
        run_id: &RunId,
    ) -> Result<impl Stream<Item = Result<RunEvent, ClientError>> + use<>, ClientError> {
        let stream = self
            .goals
            .clone()
            .watch_run(self.stream_request(pb::WatchRunRequest {
                run_id: run_id.0.clone(),
            }))
            .await?
            .into_inner();
        Ok(stream.map(|item| match item {
            Ok(event) => RunEvent::try_from(event).map_err(|e| ClientError::Invalid(e.to_string())),
            Err(status) => Err(status.into()),
        }))
    }

    /// Waits until the run finishes and returns its final view.
    pub async fn wait(&self, run_id: &RunId) -> Result<RunView, ClientError> {
        let mut events = Box::pin(self.watch(run_id).await?);
        // Read to the end (the stream ends right after `Finished`): dropping a stream early
        // resets it, and a connection that resets too many is closed by HTTP/2.
        while let Some(event) = events.next().await {
            event?;
        }
        self.get_run(run_id).await
    }

    pub async fn nodes(&self) -> Result<Vec<NodeView>, ClientError> {
        let r = self
            .registry
            .clone()
            .list_nodes(self.request(pb::ListNodesRequest {}))
            .await?
            .into_inner();
        Ok(r.nodes.into_iter().map(Into::into).collect())
    }

    /// Asks a node to drain: no new work, in-flight attempts finish, then it leaves.
    pub async fn drain_node(&self, node: &str, reason: &str) -> Result<NodeView, ClientError> {
        let r = self
            .registry
            .clone()
            .drain_node(self.request(pb::DrainNodeRequest {
                node_id: node.to_owned(),
                reason: reason.to_owned(),
            }))
            .await?;
        Ok(r.into_inner().into())
    }

    pub async fn agents(&self, skill: Option<&str>) -> Result<Vec<AgentView>, ClientError> {
        let r = self
            .registry
            .clone()
            .list_agents(self.request(pb::ListAgentsRequest {
                skill: skill.unwrap_or_default().to_owned(),
            }))
            .await?
            .into_inner();
        Ok(r.agents.into_iter().map(Into::into).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_name_with_several_addresses_stands_for_each_and_keeps_its_name_for_tls() {
        let got = expand(
            "https://mesh-coordinator:7700",
            &[ip("10.0.0.7"), ip("fd00::9"), ip("10.0.0.7")],
        );
        assert_eq!(
            got,
            vec![
                Target {
                    url: "https://10.0.0.7:7700".into(),
                    server_name: Some("mesh-coordinator".into()),
                },
                Target {
                    url: "https://[fd00::9]:7700".into(),
                    server_name: Some("mesh-coordinator".into()),
                },
            ]
        );
        // The default port of the scheme.
        assert_eq!(
            expand("http://c", &[ip("10.0.0.1"), ip("10.0.0.2")])[1].url,
            "http://10.0.0.2:80"
        );
    }

    #[test]
    fn one_address_or_none_keeps_the_url_as_given() {
        let given = |url: &str| {
            vec![Target {
                url: url.into(),
                server_name: None,
            }]
        };
        assert_eq!(
            expand("http://c:7700", &[ip("10.0.0.1")]),
            given("http://c:7700")
        );
        assert_eq!(expand("http://c:7700", &[]), given("http://c:7700"));
        assert_eq!(
            expand("not a url", &[ip("10.0.0.1"), ip("10.0.0.2")]),
            given("not a url")
        );
    }

    #[tokio::test]
    async fn a_list_resolves_in_order_and_addresses_are_not_looked_up() {
        let got = resolve(" http://127.0.0.1:7700 , http://[::1]:7701,").await;
        let urls: Vec<&str> = got.iter().map(|t| t.url.as_str()).collect();
        assert_eq!(urls, ["http://127.0.0.1:7700", "http://[::1]:7701"]);
        assert!(got.iter().all(|t| t.server_name.is_none()));
        // A name that does not resolve is kept: connecting to it says why.
        let got = resolve("http://no-such-host.invalid:7700").await;
        assert_eq!(got[0].url, "http://no-such-host.invalid:7700");
    }
}
