//! The one authorization layer in front of every service, and the token service.
//!
//! For each call the [`GuardLayer`] finds the method's rule ([`crate::auth::need`]), reads the
//! namespace (`mesh-namespace`, `default` when absent) and, with authentication on, the
//! caller's token; it refuses what the token does not allow (`UNAUTHENTICATED` naming why,
//! `PERMISSION_DENIED` naming the role needed) and writes the audit row of every denial and
//! of every state-changing call it lets through. Handlers read who called, and in which
//! namespace, from the request's [`Caller`]; they may name the resource acted on for the audit
//! row with [`Caller::acted_on`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_proto::convert::check_id;
use mesh_proto::domain::Namespace;
use mesh_proto::pb;
use tokio::sync::mpsc;
use tonic::codegen::http;
use tonic::{Request, Response, Status};
use tower::{Layer, Service};
use tracing::warn;

use crate::auth::{
    AuditEntry, AuditQuery, AuthError, DEFAULT_NAMESPACE, Decision, EVERY_NAMESPACE,
    NAMESPACE_HEADER, Need, Principal, Role, TokenRecord, Tokens, bearer, is_api_token, need,
    new_secret,
};
use crate::jwt::JwtVerifier;
use crate::store::{Backend, Store, now_ms};

/// Audit rows waiting to be written; past it callers wait.
const AUDIT_QUEUE: usize = 4096;
/// Most rows written at once.
const AUDIT_BATCH: usize = 256;

/// Who is calling, in which namespace: put in every request by the guard.
#[derive(Clone, Debug)]
pub struct Caller {
    pub principal: Principal,
    pub namespace: Namespace,
    /// Every namespace of the call: the one above, or those a node stream serves.
    pub namespaces: Vec<Namespace>,
    /// The client certificate the peer presented over TLS (DER), if any.
    pub certificate: Option<Vec<u8>>,
    resource: Arc<Mutex<String>>,
}

impl Caller {
    /// Names what the call acts on, for its audit row.
    pub fn acted_on(&self, resource: impl Into<String>) {
        *self.resource.lock().unwrap_or_else(|p| p.into_inner()) = resource.into();
    }

    /// Whether authentication is on for this call (an anonymous caller is not).
    pub fn authenticated(&self) -> bool {
        self.principal != Principal::anonymous()
    }

    /// The caller of a request; the guard puts one in every request it lets through.
    pub fn of<T>(request: &Request<T>) -> Result<Caller, Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::internal("no caller: the guard layer is missing"))
    }
}

/// What the guard knows: whether authentication is on, the tokens, where audit rows go.
#[derive(Clone, Debug)]
pub struct Guard {
    enabled: bool,
    /// Node streams must present a client certificate (`tls.client_ca_file` is set).
    node_certificates: bool,
    tokens: Arc<RwLock<Tokens>>,
    /// JWTs from an outside issuer, when configured.
    jwt: Option<Arc<JwtVerifier>>,
    audit: mpsc::Sender<AuditEntry>,
}

impl Guard {
    /// Loads the tokens and starts the audit writer. With authentication on and no live
    /// cluster admin, makes one and returns its secret (for the caller to write to a file).
    pub async fn start(
        store: &Store,
        enabled: bool,
        node_certificates: bool,
        jwt: Option<JwtVerifier>,
    ) -> crate::error::Result<(Guard, Option<String>)> {
        let tokens = Tokens::new(store.tokens().await?);
        let mut bootstrap = None;
        let guard = {
            let (tx, rx) = mpsc::channel(AUDIT_QUEUE);
            tokio::spawn(write_audit(store.clone(), rx));
            Guard {
                enabled,
                node_certificates,
                tokens: Arc::new(RwLock::new(tokens)),
                jwt: jwt.map(Arc::new),
                audit: tx,
            }
        };
        if enabled && !guard.read_tokens().has_cluster_admin(now_ms()) {
            let (secret, record) = guard
                .create(store, "bootstrap", EVERY_NAMESPACE, Role::Admin, None)
                .await?;
            guard.put(record);
            bootstrap = Some(secret);
        }
        Ok((guard, bootstrap))
    }

    /// The principal of a call's `authorization`: one of the coordinator's tokens, or a JWT
    /// when an issuer is configured.
    fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let token = bearer(authorization)?;
        match &self.jwt {
            Some(jwt) if !is_api_token(token) => jwt.verify(token),
            _ => self.read_tokens().check(token, now_ms()),
        }
    }

    /// Whether authentication is on.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Writes an audit row (behind the caller, in a batch).
    pub(crate) async fn audit(&self, row: AuditEntry) {
        let _ = self.audit.send(row).await;
    }

    /// The audit row of a state-changing call let through, with authentication on.
    pub(crate) async fn audit_allowed(
        &self,
        caller: &Caller,
        path: &str,
        peer: &str,
        reason: String,
    ) {
        if !self.enabled {
            return;
        }
        let resource = caller
            .resource
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.audit(AuditEntry {
            seq: 0,
            at_ms: now_ms(),
            actor: caller.principal.subject.clone(),
            namespace: caller.namespace.0.clone(),
            method: path.to_owned(),
            resource,
            decision: Decision::Allowed,
            reason,
            peer: peer.to_owned(),
        })
        .await;
    }

    fn read_tokens(&self) -> std::sync::RwLockReadGuard<'_, Tokens> {
        self.tokens.read().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, record: TokenRecord) {
        self.tokens
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .put(record);
    }

    /// A new token, stored; its secret is returned and kept nowhere.
    async fn create(
        &self,
        store: &Store,
        name: &str,
        namespace: &str,
        role: Role,
        ttl: Option<Duration>,
    ) -> crate::error::Result<(String, TokenRecord)> {
        let (secret, hash) = new_secret();
        let now = now_ms();
        let record = TokenRecord {
            token_id: format!("tok_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]),
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            role,
            hash,
            created_at_ms: now,
            expires_at_ms: ttl.map(|t| now + t.as_millis() as i64),
            revoked_at_ms: None,
        };
        store.put_token(record.clone()).await?;
        Ok((secret, record))
    }

    /// Decides a call: the caller to pass on, or the status to answer with its audit row.
    pub(crate) fn decide(
        &self,
        path: &str,
        authorization: Option<&str>,
        namespace: Option<&str>,
        peer: &str,
        certificate: Option<Vec<u8>>,
    ) -> Result<(Caller, Need), Box<Refusal>> {
        // A node stream may serve several namespaces (`a,b`); every other call acts in one.
        let rule = need(path);
        let namespaces: Vec<String> = match namespace {
            None | Some("") => vec![DEFAULT_NAMESPACE.to_owned()],
            Some(list) if rule == Some(Need::Worker) => {
                list.split(',').map(|ns| ns.trim().to_owned()).collect()
            }
            Some(ns) => vec![ns.to_owned()],
        };
        for ns in &namespaces {
            check_id(NAMESPACE_HEADER, ns)
                .map_err(|e| Refusal::new(Status::invalid_argument(e.to_string()), None))?;
        }
        let namespace = namespaces.join(",");
        let row = |actor: &str, decision, reason: String| AuditEntry {
            seq: 0,
            at_ms: now_ms(),
            actor: actor.to_owned(),
            namespace: namespace.clone(),
            method: path.to_owned(),
            resource: String::new(),
            decision,
            reason,
            peer: peer.to_owned(),
        };
        let has_certificate = certificate.is_some();
        let caller = |principal| Caller {
            principal,
            namespace: Namespace(namespaces[0].clone()),
            namespaces: namespaces.iter().cloned().map(Namespace).collect(),
            certificate: certificate.clone(),
            resource: Arc::default(),
        };
        if self.node_certificates && rule == Some(Need::Worker) && !has_certificate {
            let why =
                "a node stream needs a client certificate signed by the coordinator's client CA"
                    .to_owned();
            return Err(Refusal::new(
                Status::unauthenticated(why.clone()),
                Some(row("anonymous", Decision::Denied, why)),
            ));
        }
        if !self.enabled {
            return Ok((
                caller(Principal::anonymous()),
                need(path).unwrap_or(Need::Open),
            ));
        }
        let Some(need) = need(path) else {
            let why = format!("{path} has no authorization rule");
            return Err(Refusal::new(
                Status::permission_denied(why.clone()),
                Some(row("anonymous", Decision::Denied, why)),
            ));
        };
        if need == Need::Open {
            return Ok((caller(Principal::anonymous()), need));
        }
        let principal = match self.authenticate(authorization) {
            Ok(p) => p,
            Err(e) => {
                let why = e.to_string();
                return Err(Refusal::new(
                    Status::unauthenticated(why.clone()),
                    Some(row("anonymous", Decision::Denied, why)),
                ));
            }
        };
        if let Some(ns) = namespaces.iter().find(|ns| !principal.may(ns, need)) {
            let why = format!(
                "{} may not call {path} in namespace `{ns}`: it needs the {} role there",
                principal.subject,
                need.as_str()
            );
            return Err(Refusal::new(
                Status::permission_denied(why.clone()),
                Some(row(&principal.subject, Decision::Denied, why)),
            ));
        }
        Ok((caller(principal), need))
    }
}

/// A call refused by the guard: its answer, and its audit row.
#[derive(Debug)]
pub struct Refusal {
    status: Status,
    row: Option<AuditEntry>,
}

impl Refusal {
    /// The answer, and the audit row to write.
    pub(crate) fn into_parts(self) -> (Status, Option<AuditEntry>) {
        (self.status, self.row)
    }

    fn new(status: Status, row: Option<AuditEntry>) -> Box<Refusal> {
        Box::new(Refusal { status, row })
    }
}

/// Writes audit rows in batches, in order, until every sender is gone.
async fn write_audit(store: Store, mut rx: mpsc::Receiver<AuditEntry>) {
    let mut batch = Vec::with_capacity(AUDIT_BATCH);
    while rx.recv_many(&mut batch, AUDIT_BATCH).await > 0 {
        let rows = std::mem::take(&mut batch);
        let n = rows.len();
        if let Err(e) = store.append_audit(rows).await {
            metrics::counter!("mesh_audit_write_errors_total").increment(n as u64);
            warn!(error = %e, rows = n, "audit rows not written");
        }
    }
}

/// The layer; see the module documentation.
#[derive(Clone, Debug)]
pub struct GuardLayer {
    pub guard: Guard,
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded {
            inner,
            guard: self.guard.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Guarded<S> {
    inner: S,
    guard: Guard,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Guarded<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (authorization, namespace) = (header("authorization"), header(NAMESPACE_HEADER));
        let traceparent = header(mesh_proto::trace_context::TRACEPARENT);
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let (peer, certificate) = match request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()
        {
            Some(tls) => (
                tls.get_ref().remote_addr(),
                tls.peer_certs()
                    .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec())),
            ),
            None => (
                request
                    .extensions()
                    .get::<TcpConnectInfo>()
                    .and_then(|i| i.remote_addr()),
                None,
            ),
        };
        let peer = peer.map(|a| a.to_string()).unwrap_or_default();
        let decided = self.guard.decide(
            &path,
            authorization.as_deref(),
            namespace.as_deref(),
            &peer,
            certificate,
        );
        let audit = self.guard.audit.clone();
        let audited = self.guard.enabled;
        match decided {
            Err(refusal) => Box::pin(async move {
                let Refusal { status, row } = *refusal;
                metrics::counter!("mesh_auth_denied_total").increment(1);
                if let Some(row) = row {
                    let _ = audit.send(row).await;
                }
                Ok(status.into_http())
            }),
            Ok((caller, need)) => {
                request.extensions_mut().insert(caller.clone());
                let span = rpc_span(&path, traceparent);
                let answer = {
                    let _entered = span.enter();
                    self.inner.call(request)
                };
                Box::pin(tracing::Instrument::instrument(
                    async move {
                        let response = answer.await?;
                        if audited && need.changes_state() {
                            let reason = response
                                .headers()
                                .get("grpc-status")
                                .and_then(|v| v.to_str().ok())
                                .filter(|code| *code != "0")
                                .map(|code| format!("answered grpc-status {code}"))
                                .unwrap_or_default();
                            let resource = caller
                                .resource
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .clone();
                            let row = AuditEntry {
                                seq: 0,
                                at_ms: now_ms(),
                                actor: caller.principal.subject,
                                namespace: caller.namespace.0,
                                method: path,
                                resource,
                                decision: Decision::Allowed,
                                reason,
                                peer,
                            };
                            let _ = audit.send(row).await;
                        }
                        Ok(response)
                    },
                    span,
                ))
            }
        }
    }
}

/// The server span of a call, child of the caller's `traceparent` when it sent one; none
/// with tracing off, nor for a node's stream, which lasts as long as the node.
fn rpc_span(path: &str, traceparent: Option<String>) -> tracing::Span {
    if !mesh_proto::trace_context::enabled() || path == "/mesh.v1.NodeService/Connect" {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "rpc",
        otel.name = path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
    );
    if let Some(parent) = traceparent {
        mesh_proto::trace_context::set_parent(&span, &parent);
    }
    span
}

/// `AuthService`: tokens and the audit log.
pub struct AuthApi {
    pub guard: Guard,
    pub store: Store,
}

fn token_pb(t: &TokenRecord) -> pb::Token {
    pb::Token {
        token_id: t.token_id.clone(),
        name: t.name.clone(),
        namespace: t.namespace.clone(),
        role: t.role.as_str().to_owned(),
        created_at_ms: t.created_at_ms,
        expires_at_ms: t.expires_at_ms.unwrap_or(0),
        revoked_at_ms: t.revoked_at_ms.unwrap_or(0),
    }
}

/// 1..=1000; 0 means 100.
pub(super) fn page_size(field: &str, n: u32) -> Result<u32, Status> {
    match n {
        0 => Ok(100),
        1..=1000 => Ok(n),
        _ => Err(Status::invalid_argument(format!(
            "{field}: {n} is over the limit of 1000"
        ))),
    }
}

/// Whether `caller` sees what belongs to `namespace`.
fn sees(caller: &Caller, namespace: &str) -> bool {
    caller.principal.is_cluster_admin() || caller.namespace.as_str() == namespace
}

#[tonic::async_trait]
impl pb::auth_service_server::AuthService for AuthApi {
    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        check_id("name", &req.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let role: Role = req
            .role
            .parse()
            .map_err(|e: String| Status::invalid_argument(format!("role: {e}")))?;
        let namespace = match req.namespace.as_str() {
            "" => caller.namespace.0.clone(),
            EVERY_NAMESPACE => EVERY_NAMESPACE.to_owned(),
            ns => {
                check_id("namespace", ns).map_err(|e| Status::invalid_argument(e.to_string()))?;
                ns.to_owned()
            }
        };
        // An admin grants within the namespace it administers; `*` only a cluster admin.
        let need = if namespace == EVERY_NAMESPACE {
            Need::ClusterAdmin
        } else {
            Need::Admin
        };
        if !caller.principal.may(&namespace, need) {
            return Err(Status::permission_denied(format!(
                "{} may not create tokens for namespace `{namespace}`: it needs the {} role there",
                caller.principal.subject,
                need.as_str()
            )));
        }
        const MAX_TTL: u64 = 10 * 365 * 24 * 3600;
        if req.ttl_seconds > MAX_TTL {
            return Err(Status::invalid_argument(format!(
                "ttl_seconds: {} is over the limit of {MAX_TTL} (ten years)",
                req.ttl_seconds
            )));
        }
        let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(req.ttl_seconds));
        let (secret, record) = self
            .guard
            .create(&self.store, &req.name, &namespace, role, ttl)
            .await
            .map_err(Status::from)?;
        caller.acted_on(format!("token {}", record.token_id));
        self.guard.put(record.clone());
        Ok(Response::new(pb::CreateTokenResponse {
            token: Some(token_pb(&record)),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        let size = page_size("page_size", req.page_size)? as usize;
        let all = self.store.tokens().await.map_err(Status::from)?;
        let visible = all.iter().filter(|t| sees(&caller, &t.namespace));
        let after = req.page_token;
        let mut page: Vec<&TokenRecord> = visible
            .skip_while(|t| !after.is_empty() && t.token_id != after)
            .skip(usize::from(!after.is_empty()))
            .take(size + 1)
            .collect();
        let next_page_token = if page.len() > size {
            page.truncate(size);
            page.last().map(|t| t.token_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTokensResponse {
            tokens: page.into_iter().map(token_pb).collect(),
            next_page_token,
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::Token>, Status> {
        let caller = Caller::of(&request)?;
        let id = request.into_inner().token_id;
        check_id("token_id", &id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        caller.acted_on(format!("token {id}"));
        let all = self.store.tokens().await.map_err(Status::from)?;
        // Another namespace's token is as unknown as a token that never was.
        let Some(mut record) = all
            .into_iter()
            .find(|t| t.token_id == id && sees(&caller, &t.namespace))
        else {
            return Err(Status::not_found(format!("token `{id}` not found")));
        };
        if record.revoked_at_ms.is_none() {
            record.revoked_at_ms = Some(now_ms());
            self.store
                .put_token(record.clone())
                .await
                .map_err(Status::from)?;
            self.guard.put(record.clone());
        }
        Ok(Response::new(token_pb(&record)))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        let before = match req.page_token.as_str() {
            "" => None,
            t => Some(t.parse::<u64>().map_err(|_| {
                Status::invalid_argument(format!("page_token: `{t}` is not a page token"))
            })?),
        };
        let decision = match req.decision.as_str() {
            "" => None,
            d => Some(Decision::parse(d).ok_or_else(|| {
                Status::invalid_argument(format!("decision: `{d}` is not allowed or denied"))
            })?),
        };
        let query = AuditQuery {
            namespace: (!caller.principal.is_cluster_admin()).then(|| caller.namespace.0.clone()),
            actor: (!req.actor.is_empty()).then_some(req.actor),
            decision,
            method: (!req.method.is_empty()).then_some(req.method),
            page_size: page_size("page_size", req.page_size)?,
            before,
        };
        let page = self.store.list_audit(&query).await.map_err(Status::from)?;
        Ok(Response::new(pb::ListAuditResponse {
            rows: page
                .rows
                .into_iter()
                .map(|r| pb::AuditRow {
                    seq: r.seq,
                    at_ms: r.at_ms,
                    actor: r.actor,
                    namespace: r.namespace,
                    method: r.method,
                    resource: r.resource,
                    decision: r.decision.as_str().to_owned(),
                    reason: r.reason,
                    peer: r.peer,
                })
                .collect(),
            next_page_token: page.next.map(|s| s.to_string()).unwrap_or_default(),
        }))
    }
}
