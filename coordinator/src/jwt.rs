//! JWTs from an outside issuer (docs/security.md): checked against the issuer, audience and
//! public keys of `[auth.jwt]`, their permission claim read as `namespace:role` entries, as
//! Temporal's default claim mapper reads them (`*:admin` or `system:admin`: a cluster admin).
//!
//! Only public keys are configured: the issuer signs, the coordinator verifies (RS*, PS*,
//! ES256, ES384, EdDSA; shared HMAC secrets are refused).

use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::{Deserialize, Serialize};

use crate::auth::{AuthError, EVERY_NAMESPACE, Grant, Principal, Role};

/// `[auth.jwt]` in `coordinator.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The `iss` every token must carry.
    pub issuer: String,
    /// The `aud` every token must carry (one of its values).
    pub audience: String,
    /// PEM public keys the issuer signs with; several during a key rotation.
    pub public_key_files: Vec<PathBuf>,
    /// The algorithms accepted, by their JOSE names.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// The claim holding the `namespace:role` entries.
    #[serde(default = "default_claim")]
    pub permissions_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into(), "EdDSA".into()]
}

fn default_claim() -> String {
    "permissions".into()
}

fn default_leeway() -> u64 {
    30
}

/// What a JWT configuration cannot be used for, naming the field or file.
#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    #[error(
        "auth.jwt.algorithms: `{0}` is not an asymmetric JOSE algorithm (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"
    )]
    Algorithm(String),
    #[error("auth.jwt.public_key_files: cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("auth.jwt.public_key_files: {0} is not a PEM public key for any of {1:?}")]
    Key(PathBuf, Vec<String>),
    #[error("auth.jwt.{0} must not be empty")]
    Empty(&'static str),
}

/// Checks JWTs; built once from the configuration.
pub struct JwtVerifier {
    issuer: String,
    audience: String,
    claim: String,
    leeway: u64,
    /// Each key with the algorithms it serves.
    keys: Vec<(Vec<Algorithm>, DecodingKey)>,
    algorithms: Vec<Algorithm>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("keys", &self.keys.len())
            .finish()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
    Ed,
}

fn family(algorithm: Algorithm) -> Option<Family> {
    use Algorithm::*;
    match algorithm {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Some(Family::Rsa),
        ES256 | ES384 => Some(Family::Ec),
        EdDSA => Some(Family::Ed),
        _ => None,
    }
}

fn key(pem: &[u8], family: Family) -> Option<DecodingKey> {
    match family {
        Family::Rsa => DecodingKey::from_rsa_pem(pem).ok(),
        Family::Ec => DecodingKey::from_ec_pem(pem).ok(),
        Family::Ed => DecodingKey::from_ed_pem(pem).ok(),
    }
}

impl JwtVerifier {
    pub fn new(config: &JwtConfig) -> Result<JwtVerifier, JwtConfigError> {
        if config.issuer.is_empty() {
            return Err(JwtConfigError::Empty("issuer"));
        }
        if config.audience.is_empty() {
            return Err(JwtConfigError::Empty("audience"));
        }
        if config.public_key_files.is_empty() {
            return Err(JwtConfigError::Empty("public_key_files"));
        }
        let algorithms = config
            .algorithms
            .iter()
            .map(|name| {
                name.parse::<Algorithm>()
                    .ok()
                    .filter(|a| family(*a).is_some())
                    .ok_or_else(|| JwtConfigError::Algorithm(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err(JwtConfigError::Empty("algorithms"));
        }
        let mut keys = Vec::new();
        for path in &config.public_key_files {
            keys.push(load(path, &algorithms, &config.algorithms)?);
        }
        Ok(JwtVerifier {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            claim: config.permissions_claim.clone(),
            leeway: config.leeway_seconds,
            keys,
            algorithms,
        })
    }

    /// The principal of a JWT, or why it is refused (never quoting the token).
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let refused = |why: String| AuthError::Jwt(why);
        let header =
            decode_header(token).map_err(|_| refused("it is not a well-formed JWT".into()))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(refused(format!(
                "its algorithm {:?} is not one of auth.jwt.algorithms",
                header.alg
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        for (algorithms, key) in &self.keys {
            if !algorithms.contains(&header.alg) {
                continue;
            }
            let e =
                match decode::<serde_json::Map<String, serde_json::Value>>(token, key, &validation)
                {
                    Ok(data) => return Ok(self.principal(&data.claims)),
                    Err(e) => e,
                };
            // The signature is checked first: a claim is named only once it is signed.
            use jsonwebtoken::errors::ErrorKind::*;
            let why = match e.kind() {
                InvalidSignature => continue,
                ExpiredSignature => "it has expired".to_owned(),
                ImmatureSignature => "it is not valid yet (nbf)".to_owned(),
                InvalidAudience => format!("its audience is not `{}`", self.audience),
                InvalidIssuer => format!("its issuer is not `{}`", self.issuer),
                MissingRequiredClaim(claim) => format!("it has no `{claim}` claim"),
                _ => "it is not a well-formed JWT".to_owned(),
            };
            return Err(refused(why));
        }
        Err(refused(
            "its signature does not verify with any key of auth.jwt.public_key_files".into(),
        ))
    }

    fn principal(&self, claims: &serde_json::Map<String, serde_json::Value>) -> Principal {
        let text = |name: &str| claims.get(name).and_then(|v| v.as_str());
        let subject = text("sub").or_else(|| text("iss")).unwrap_or("unknown");
        let entries: Vec<&str> = match claims.get(&self.claim) {
            Some(serde_json::Value::Array(items)) => {
                items.iter().filter_map(|v| v.as_str()).collect()
            }
            Some(serde_json::Value::String(s)) => s.split([' ', ',']).collect(),
            _ => Vec::new(),
        };
        Principal {
            subject: format!("jwt:{subject}"),
            grants: entries.into_iter().filter_map(grant).collect(),
        }
    }
}

/// `namespace:role` as a grant; `*` and `system` stand for every namespace. Anything else
/// grants nothing (as Temporal's claim mapper ignores what it does not know).
fn grant(entry: &str) -> Option<Grant> {
    let (namespace, role) = entry.trim().rsplit_once(':')?;
    let role: Role = role.parse().ok()?;
    let namespace = match namespace {
        "*" | "system" => EVERY_NAMESPACE.to_owned(),
        ns if mesh_proto::convert::check_id("namespace", ns).is_ok() => ns.to_owned(),
        _ => return None,
    };
    Some(Grant { namespace, role })
}

/// A key file, with the configured algorithms its PEM serves.
fn load(
    path: &Path,
    algorithms: &[Algorithm],
    names: &[String],
) -> Result<(Vec<Algorithm>, DecodingKey), JwtConfigError> {
    let pem = std::fs::read(path).map_err(|e| JwtConfigError::Read(path.to_owned(), e))?;
    for fam in [Family::Rsa, Family::Ec, Family::Ed] {
        let served: Vec<Algorithm> = algorithms
            .iter()
            .copied()
            .filter(|a| family(*a) == Some(fam))
            .collect();
        if served.is_empty() {
            continue;
        }
        if let Some(key) = key(&pem, fam) {
            return Ok((served, key));
        }
    }
    Err(JwtConfigError::Key(path.to_owned(), names.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_entries_become_grants_and_unknown_ones_grant_nothing() {
        let g = |ns: &str, role| {
            Some(Grant {
                namespace: ns.into(),
                role,
            })
        };
        assert_eq!(grant("team-a:write"), g("team-a", Role::Write));
        assert_eq!(grant("system:admin"), g(EVERY_NAMESPACE, Role::Admin));
        assert_eq!(grant("*:read"), g(EVERY_NAMESPACE, Role::Read));
        assert_eq!(grant("team-a:owner"), None);
        assert_eq!(grant("no role"), None);
        assert_eq!(grant("bad ns!:read"), None);
    }
}
