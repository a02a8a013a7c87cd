//! Who may call what: API tokens, roles per namespace, and the rule of every RPC. Plain
//! decisions, with no store and no clock of their own: the layer in `grpc/auth.rs` asks them
//! for each call, the token service and tests call them directly.
//!
//! A token grants one role in one namespace (`*`: every namespace, for cluster admins). The
//! secret (`mesh_` and 43 characters of base64url, 256 random bits) is shown once; the store
//! keeps its SHA-256 only, so a stolen store file gives no usable token.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The namespace of everything given without one.
pub const DEFAULT_NAMESPACE: &str = "default";
/// A grant's namespace that stands for every namespace.
pub const EVERY_NAMESPACE: &str = "*";
/// The metadata key naming the namespace a call acts in.
pub const NAMESPACE_HEADER: &str = "mesh-namespace";

/// What a token may do in its namespace. `read` ⊂ `write` ⊂ `admin`; `worker` is the node
/// stream only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Read,
    Write,
    Worker,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }

    /// Whether this role covers what `need` asks for.
    fn covers(self, need: Need) -> bool {
        match need {
            Need::Open => true,
            Need::Read => matches!(self, Role::Read | Role::Write | Role::Admin),
            Need::Write => matches!(self, Role::Write | Role::Admin),
            Need::Worker => matches!(self, Role::Worker | Role::Admin),
            Need::Admin => self == Role::Admin,
            // Only through a grant on every namespace.
            Need::ClusterAdmin => false,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Role::Read),
            "write" => Ok(Role::Write),
            "worker" => Ok(Role::Worker),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "`{other}` is not a role: read, write, worker or admin"
            )),
        }
    }
}

/// What a method asks of its caller, in the namespace it acts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Health and reflection: anyone who can reach the port.
    Open,
    Read,
    Write,
    Worker,
    Admin,
    /// Every namespace's admin (a grant on `*`): no method needs it yet, and it answers
    /// whether a caller sees across namespaces.
    ClusterAdmin,
}

impl Need {
    pub fn as_str(self) -> &'static str {
        match self {
            Need::Open => "open",
            Need::Read => "read",
            Need::Write => "write",
            Need::Worker => "worker",
            Need::Admin => "admin",
            Need::ClusterAdmin => "cluster admin",
        }
    }

    /// Whether a call with this need changes state (and so is audited when allowed).
    pub fn changes_state(self) -> bool {
        matches!(
            self,
            Need::Write | Need::Worker | Need::Admin | Need::ClusterAdmin
        )
    }
}

/// The rule of every method the coordinator serves. A method missing here is refused, so
/// that a new RPC cannot ship without a rule (the matrix test walks this table and the
/// services' descriptors).
pub const RULES: &[(&str, Need)] = &[
    ("/mesh.v1.NodeService/Connect", Need::Worker),
    ("/mesh.v1.GoalService/SubmitGoal", Need::Write),
    ("/mesh.v1.GoalService/SubmitAndWatch", Need::Write),
    ("/mesh.v1.GoalService/GetRun", Need::Read),
    ("/mesh.v1.GoalService/WatchRun", Need::Read),
    ("/mesh.v1.GoalService/CancelRun", Need::Write),
    ("/mesh.v1.GoalService/ListRuns", Need::Read),
    ("/mesh.v1.GoalService/Approve", Need::Write),
    ("/mesh.v1.GoalService/Reject", Need::Write),
    ("/mesh.v1.GoalService/Signal", Need::Write),
    ("/mesh.v1.GoalService/RetryRun", Need::Write),
    ("/mesh.v1.GoalService/SkipStep", Need::Write),
    ("/mesh.v1.GoalService/RaiseBudget", Need::Write),
    ("/mesh.v1.GoalService/GetOutput", Need::Read),
    ("/mesh.v1.GoalService/GetRunTrace", Need::Read),
    ("/mesh.v1.WorkflowService/Register", Need::Write),
    ("/mesh.v1.WorkflowService/Get", Need::Read),
    ("/mesh.v1.WorkflowService/List", Need::Read),
    ("/mesh.v1.WorkflowService/Validate", Need::Read),
    ("/mesh.v1.WorkflowService/Profile", Need::Read),
    ("/mesh.v1.RegistryService/ListNodes", Need::Read),
    ("/mesh.v1.RegistryService/ListAgents", Need::Read),
    // The handler asks for admin in every namespace the node serves.
    ("/mesh.v1.RegistryService/DrainNode", Need::Admin),
    ("/mesh.v1.AuthService/CreateToken", Need::Admin),
    ("/mesh.v1.AuthService/ListTokens", Need::Admin),
    ("/mesh.v1.AuthService/RevokeToken", Need::Admin),
    ("/mesh.v1.AuthService/ListAudit", Need::Admin),
    ("/mesh.v1.SecretService/SetSecret", Need::Admin),
    ("/mesh.v1.SecretService/ListSecrets", Need::Admin),
    ("/mesh.v1.SecretService/DeleteSecret", Need::Admin),
    ("/mesh.v1.ToolService/PutTool", Need::Write),
    ("/mesh.v1.ToolService/GetTool", Need::Read),
    ("/mesh.v1.ToolService/ListTools", Need::Read),
    ("/mesh.v1.ToolService/DeleteTool", Need::Write),
    ("/mesh.v1.MemoryService/ListMemory", Need::Read),
    ("/mesh.v1.MemoryService/GetMemory", Need::Read),
    ("/mesh.v1.MemoryService/PutMemory", Need::Write),
    ("/mesh.v1.MemoryService/DeleteMemory", Need::Write),
];

/// Services anyone may call: health and reflection.
const OPEN_SERVICES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The rule of `path` (`/package.Service/Method`); `None` for a method without one.
pub fn need(path: &str) -> Option<Need> {
    if OPEN_SERVICES.iter().any(|s| path.starts_with(s)) {
        return Some(Need::Open);
    }
    RULES.iter().find(|(p, _)| *p == path).map(|(_, n)| *n)
}

/// One role in one namespace (`*`: every namespace).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub namespace: String,
    pub role: Role,
}

/// Who is calling: a token's name and id, and what it grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// For the audit log and approvals: `token:NAME (ID)`, or `anonymous` with auth off.
    pub subject: String,
    pub grants: Vec<Grant>,
}

impl Principal {
    /// The caller when authentication is off: everything, everywhere.
    pub fn anonymous() -> Principal {
        Principal {
            subject: "anonymous".into(),
            grants: vec![Grant {
                namespace: EVERY_NAMESPACE.into(),
                role: Role::Admin,
            }],
        }
    }

    /// Whether the caller may do what `need` asks in `namespace`.
    pub fn may(&self, namespace: &str, need: Need) -> bool {
        self.grants.iter().any(|g| {
            let every = g.namespace == EVERY_NAMESPACE;
            match need {
                Need::ClusterAdmin => every && g.role == Role::Admin,
                _ => (every || g.namespace == namespace) && g.role.covers(need),
            }
        })
    }

    /// Whether the caller administers every namespace.
    pub fn is_cluster_admin(&self) -> bool {
        self.may(DEFAULT_NAMESPACE, Need::ClusterAdmin)
    }
}

/// An API token as stored: everything but its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub token_id: String,
    pub name: String,
    pub namespace: String,
    pub role: Role,
    /// SHA-256 of the secret, in hex.
    pub hash: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
}

impl TokenRecord {
    pub fn principal(&self) -> Principal {
        Principal {
            subject: format!("token:{} ({})", self.name, self.token_id),
            grants: vec![Grant {
                namespace: self.namespace.clone(),
                role: self.role,
            }],
        }
    }
}

/// Whether a call was let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allowed,
    Denied,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Denied => "denied",
        }
    }

    pub fn parse(s: &str) -> Option<Decision> {
        match s {
            "allowed" => Some(Decision::Allowed),
            "denied" => Some(Decision::Denied),
            _ => None,
        }
    }
}

/// One row of the audit log: an authorization decision, or a state-changing call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its place in the log (given by the store; 0 before).
    pub seq: u64,
    pub at_ms: i64,
    pub actor: String,
    pub namespace: String,
    pub method: String,
    pub resource: String,
    pub decision: Decision,
    pub reason: String,
    pub peer: String,
}

/// A page of the audit log, newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// `None`: every namespace.
    pub namespace: Option<String>,
    pub actor: Option<String>,
    pub decision: Option<Decision>,
    pub method: Option<String>,
    pub page_size: u32,
    /// The last `seq` of the previous page.
    pub before: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditPage {
    pub rows: Vec<AuditEntry>,
    pub next: Option<u64>,
}

/// Why a caller is not authenticated; each names what is wrong, never the secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send `authorization: Bearer <token>` (the CLI reads MESH_TOKEN)")]
    Missing,
    #[error("the authorization header is not `Bearer <token>`")]
    Malformed,
    #[error("unknown token")]
    Unknown,
    #[error("token {0} has expired")]
    Expired(String),
    #[error("token {0} has been revoked")]
    Revoked(String),
    #[error("JWT refused: {0}")]
    Jwt(String),
}

/// The token of an `authorization: Bearer …` header.
pub fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or(AuthError::Malformed)
}

/// Whether a bearer token is one of the coordinator's own (else it may be a JWT).
pub fn is_api_token(token: &str) -> bool {
    token.starts_with(SECRET_PREFIX)
}

/// What every API token's secret starts with.
const SECRET_PREFIX: &str = "mesh_";

/// A new secret and its hash: 32 random bytes from the system's generator.
pub fn new_secret() -> (String, String) {
    use base64::Engine;
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random generator");
    let secret = format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = hash(&secret);
    (secret, hash)
}

/// SHA-256 of a secret, in hex.
pub fn hash(secret: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The tokens the coordinator knows, by hash: what every call is checked against, kept in
/// memory and updated with the store.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    by_hash: HashMap<String, TokenRecord>,
}

impl Tokens {
    pub fn new(records: impl IntoIterator<Item = TokenRecord>) -> Tokens {
        Tokens {
            by_hash: records.into_iter().map(|t| (t.hash.clone(), t)).collect(),
        }
    }

    pub fn put(&mut self, record: TokenRecord) {
        self.by_hash.insert(record.hash.clone(), record);
    }

    /// The principal of an `authorization` header's value at `now_ms`.
    pub fn authenticate(&self, header: Option<&str>, now_ms: i64) -> Result<Principal, AuthError> {
        self.check(bearer(header)?, now_ms)
    }

    /// The principal of an API token's secret at `now_ms`.
    pub fn check(&self, secret: &str, now_ms: i64) -> Result<Principal, AuthError> {
        // Looked up by its hash: how long the lookup takes tells nothing of the secret.
        let record = self.by_hash.get(&hash(secret)).ok_or(AuthError::Unknown)?;
        if record.revoked_at_ms.is_some() {
            return Err(AuthError::Revoked(record.token_id.clone()));
        }
        if record.expires_at_ms.is_some_and(|at| at <= now_ms) {
            return Err(AuthError::Expired(record.token_id.clone()));
        }
        Ok(record.principal())
    }

    /// Whether some live token administers every namespace.
    pub fn has_cluster_admin(&self, now_ms: i64) -> bool {
        self.by_hash.values().any(|t| {
            t.namespace == EVERY_NAMESPACE
                && t.role == Role::Admin
                && t.revoked_at_ms.is_none()
                && t.expires_at_ms.is_none_or(|at| at > now_ms)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(namespace: &str, role: Role) -> (String, TokenRecord) {
        let (secret, hash) = new_secret();
        let record = TokenRecord {
            token_id: "t1".into(),
            name: "ci".into(),
            namespace: namespace.into(),
            role,
            hash,
            created_at_ms: 0,
            expires_at_ms: Some(1_000),
            revoked_at_ms: None,
        };
        (secret, record)
    }

    #[test]
    fn roles_cover_what_they_should_in_their_namespace_only() {
        let p = |ns: &str, role| token(ns, role).1.principal();
        let read = p("a", Role::Read);
        assert!(read.may("a", Need::Read));
        assert!(!read.may("a", Need::Write));
        assert!(!read.may("b", Need::Read), "another namespace");
        let write = p("a", Role::Write);
        assert!(write.may("a", Need::Write) && write.may("a", Need::Read));
        assert!(!write.may("a", Need::Worker) && !write.may("a", Need::Admin));
        let worker = p("a", Role::Worker);
        assert!(worker.may("a", Need::Worker));
        assert!(!worker.may("a", Need::Read) && !worker.may("a", Need::Write));
        let admin = p("a", Role::Admin);
        assert!(admin.may("a", Need::Admin) && admin.may("a", Need::Write));
        assert!(!admin.may("a", Need::ClusterAdmin) && !admin.may("b", Need::Read));
        let root = p(EVERY_NAMESPACE, Role::Admin);
        assert!(root.may("b", Need::ClusterAdmin) && root.is_cluster_admin());
        let every_reader = p(EVERY_NAMESPACE, Role::Read);
        assert!(every_reader.may("b", Need::Read) && !every_reader.may("b", Need::ClusterAdmin));
    }

    #[test]
    fn a_token_is_known_by_its_hash_and_refused_naming_why() {
        let (secret, record) = token("a", Role::Write);
        assert!(secret.starts_with("mesh_") && secret.len() == 48);
        assert_ne!(record.hash, secret);
        let mut tokens = Tokens::new([record.clone()]);
        let bearer = format!("Bearer {secret}");
        let who = tokens.authenticate(Some(&bearer), 999).unwrap();
        assert_eq!(who.subject, "token:ci (t1)");
        assert_eq!(tokens.authenticate(None, 0), Err(AuthError::Missing));
        assert_eq!(
            tokens.authenticate(Some(&secret), 0),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            tokens.authenticate(Some("Bearer mesh_forged"), 0),
            Err(AuthError::Unknown)
        );
        assert_eq!(
            tokens.authenticate(Some(&bearer), 1_000),
            Err(AuthError::Expired("t1".into()))
        );
        tokens.put(TokenRecord {
            revoked_at_ms: Some(5),
            ..record
        });
        assert_eq!(
            tokens.authenticate(Some(&bearer), 10),
            Err(AuthError::Revoked("t1".into()))
        );
        // No message names the secret.
        for e in [AuthError::Unknown, AuthError::Expired("t1".into())] {
            assert!(!e.to_string().contains(&secret));
        }
    }

    /// A new RPC cannot ship without a rule: every method of every mesh service in the
    /// descriptor set has one, and every rule names a method that exists.
    #[test]
    fn every_rpc_of_every_service_has_a_rule() {
        let methods = mesh_proto::declared_methods();
        let mesh: Vec<&String> = methods
            .iter()
            .filter(|m| m.starts_with("/mesh.v1."))
            .collect();
        assert!(mesh.len() >= 25, "{methods:?}");
        for m in &mesh {
            assert!(need(m).is_some(), "{m} has no authorization rule");
        }
        for (path, _) in RULES {
            assert!(methods.iter().any(|m| m == path), "rule for unknown {path}");
        }
    }

    #[test]
    fn every_method_has_a_rule_and_unknown_ones_have_none() {
        assert_eq!(need("/grpc.health.v1.Health/Check"), Some(Need::Open));
        assert_eq!(need("/mesh.v1.GoalService/SubmitGoal"), Some(Need::Write));
        assert_eq!(need("/mesh.v1.GoalService/Nope"), None);
        let mut seen = std::collections::HashSet::new();
        assert!(RULES.iter().all(|(p, _)| seen.insert(*p)), "one rule each");
    }
}
