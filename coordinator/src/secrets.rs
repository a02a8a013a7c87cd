//! Secrets per namespace (docs/security.md): sealed with AES-256-GCM under a key from a file
//! or the environment, kept sealed in the store and in memory, opened only to hand a task the
//! secrets its input names. The sealing binds each value to its namespace and name, so a
//! sealed value moved to another row does not open.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use base64::Engine;
use mesh_proto::secrets::{MAX_VALUE, SecretValue, Secrets, check_name};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::{Backend, Store, now_ms};

/// The environment variable that may hold the key (base64 of 32 bytes).
pub const KEY_ENV: &str = "MESH_SECRETS_KEY";

/// `[secrets]` in `coordinator.toml`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// A file holding the key: base64 of 32 random bytes (`mesh secret key` writes one).
    /// `MESH_SECRETS_KEY` is read when this is absent.
    pub key_file: Option<std::path::PathBuf>,
}

/// A secret as stored: sealed, with its times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedSecret {
    pub namespace: String,
    pub name: String,
    /// The nonce, then the ciphertext and its tag.
    pub sealed: Vec<u8>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A secret as listed: its name and times, never its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretInfo {
    pub name: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A new key, as the key file holds it.
pub fn new_key() -> String {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random generator");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The key of the configuration: its file, else the environment; `None` without either.
pub fn load_key(config: &SecretsConfig) -> Result<Option<LessSafeKey>> {
    let (text, from) = match &config.key_file {
        Some(path) => (
            std::fs::read_to_string(path).map_err(|e| {
                Error::Fatal(format!(
                    "secrets.key_file: cannot read {}: {e}",
                    path.display()
                ))
            })?,
            format!("secrets.key_file ({})", path.display()),
        ),
        None => match std::env::var(KEY_ENV) {
            Ok(text) => (text, KEY_ENV.to_owned()),
            Err(_) => return Ok(None),
        },
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
        .filter(|b| b.len() == 32)
        .ok_or_else(|| Error::Fatal(format!("{from}: not base64 of 32 bytes")))?;
    let key = UnboundKey::new(&AES_256_GCM, &bytes)
        .map_err(|_| Error::Fatal(format!("{from}: not an AES-256 key")))?;
    Ok(Some(LessSafeKey::new(key)))
}

/// Writes a new key to `path`, readable by its owner only, unless one is there.
pub fn ensure_key_file(path: &Path) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    crate::write_secret(path, &new_key())
}

fn aad(namespace: &str, name: &str) -> Vec<u8> {
    format!("{namespace}\u{1f}{name}").into_bytes()
}

/// The namespace's secrets, sealed, and the key to open them.
#[derive(Clone)]
pub struct Vault {
    key: Option<Arc<LessSafeKey>>,
    sealed: Arc<RwLock<HashMap<(String, String), SealedSecret>>>,
    store: Store,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("key", &self.key.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Why a secret could not be set, named for the caller.
fn invalid(field: &str, why: impl Into<String>) -> Error {
    Error::InvalidArgument(mesh_proto::convert::FieldError::new(field, why))
}

impl Vault {
    pub async fn load(store: Store, key: Option<LessSafeKey>) -> Result<Vault> {
        let sealed = store
            .secrets()
            .await?
            .into_iter()
            .map(|s| ((s.namespace.clone(), s.name.clone()), s))
            .collect();
        Ok(Vault {
            key: key.map(Arc::new),
            sealed: Arc::new(RwLock::new(sealed)),
            store,
        })
    }

    fn key(&self) -> Result<&LessSafeKey> {
        self.key.as_deref().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "the coordinator has no secrets key: set secrets.key_file or {KEY_ENV}"
            ))
        })
    }

    /// Stores `value` as `name` in `namespace`, sealed; replaces an earlier value.
    pub async fn set(&self, namespace: &str, name: &str, value: &[u8]) -> Result<SecretInfo> {
        check_name(name).map_err(|e| invalid("name", e))?;
        if value.is_empty() {
            return Err(invalid("value", "must not be empty"));
        }
        if value.len() > MAX_VALUE {
            return Err(invalid(
                "value",
                format!("{} bytes is over the limit of {MAX_VALUE}", value.len()),
            ));
        }
        std::str::from_utf8(value).map_err(|_| invalid("value", "must be UTF-8 text"))?;
        let key = self.key()?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| Error::Fatal("the system's random generator failed".into()))?;
        let mut sealed = value.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(namespace, name)),
            &mut sealed,
        )
        .map_err(|_| Error::Fatal("sealing a secret failed".into()))?;
        sealed.splice(0..0, nonce);
        let now = now_ms();
        let created = self
            .read()
            .get(&(namespace.to_owned(), name.to_owned()))
            .map_or(now, |s| s.created_at_ms);
        let record = SealedSecret {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            sealed,
            created_at_ms: created,
            updated_at_ms: now,
        };
        self.store.put_secret(record.clone()).await?;
        self.sealed
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert((namespace.to_owned(), name.to_owned()), record);
        Ok(SecretInfo {
            name: name.to_owned(),
            created_at_ms: created,
            updated_at_ms: now,
        })
    }

    /// Deletes a secret; `false` when there was none.
    pub async fn delete(&self, namespace: &str, name: &str) -> Result<bool> {
        let key = (namespace.to_owned(), name.to_owned());
        let found = self.read().contains_key(&key);
        self.store.delete_secret(namespace, name).await?;
        self.sealed
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        Ok(found)
    }

    /// The namespace's secrets by name, after `after`, at most `limit`.
    pub fn list(&self, namespace: &str, after: &str, limit: usize) -> Vec<SecretInfo> {
        let mut names: Vec<SecretInfo> = self
            .read()
            .values()
            .filter(|s| s.namespace == namespace && s.name.as_str() > after)
            .map(|s| SecretInfo {
                name: s.name.clone(),
                created_at_ms: s.created_at_ms,
                updated_at_ms: s.updated_at_ms,
            })
            .collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        names.truncate(limit);
        names
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<(String, String), SealedSecret>> {
        self.sealed.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The values of `names` in `namespace`, for one task; an error names the first that is
    /// not set or does not open.
    pub fn open<'a>(
        &self,
        namespace: &str,
        names: impl IntoIterator<Item = &'a String>,
    ) -> std::result::Result<Secrets, String> {
        let mut out = Secrets::new();
        let sealed = self.read();
        for name in names {
            let record = sealed
                .get(&(namespace.to_owned(), name.clone()))
                .ok_or_else(|| format!("secret `{name}` is not set in namespace `{namespace}`"))?;
            let key = self.key.as_deref().ok_or_else(|| {
                format!("secret `{name}` cannot be opened: the coordinator has no secrets key")
            })?;
            let value = open(key, record).ok_or_else(|| {
                format!("secret `{name}` does not open with this coordinator's secrets key")
            })?;
            out.insert(name.clone(), SecretValue::new(value));
        }
        Ok(out)
    }
}

fn open(key: &LessSafeKey, record: &SealedSecret) -> Option<String> {
    if record.sealed.len() < NONCE_LEN {
        return None;
    }
    let (nonce, sealed) = record.sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut buf = sealed.to_vec();
    let plain = key
        .open_in_place(
            nonce,
            Aad::from(aad(&record.namespace, &record.name)),
            &mut buf,
        )
        .ok()?;
    String::from_utf8(plain.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LessSafeKey {
        load_key(&SecretsConfig {
            key_file: Some({
                let dir = tempfile::tempdir().unwrap().keep();
                let path = dir.join("k");
                std::fs::write(&path, new_key()).unwrap();
                path
            }),
        })
        .unwrap()
        .unwrap()
    }

    #[tokio::test]
    async fn a_secret_opens_only_in_its_own_row_and_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let vault = Vault::load(store.clone(), Some(key())).await.unwrap();
        vault.set("team-a", "API_KEY", b"s3cr3t").await.unwrap();
        let names = ["API_KEY".to_owned()];
        let got = vault.open("team-a", &names).unwrap();
        assert_eq!(got["API_KEY"].expose(), "s3cr3t");
        let err = vault.open("team-b", &names).unwrap_err();
        assert!(err.contains("not set in namespace `team-b`"), "{err}");

        // Kept sealed: the store file holds no clear value, and a reload opens it again.
        let file = std::fs::read(dir.path().join("mesh.db")).unwrap_or_default();
        assert!(!file.windows(6).any(|w| w == b"s3cr3t"));
        let again = Vault::load(store.clone(), Some(key())).await.unwrap();
        let err = again.open("team-a", &names).unwrap_err();
        assert!(err.contains("does not open"), "another key: {err}");

        // Moved to another row, it does not open.
        let mut moved = vault.read()[&("team-a".to_owned(), "API_KEY".to_owned())].clone();
        moved.namespace = "team-b".into();
        assert!(open(vault.key.as_deref().unwrap(), &moved).is_none());

        assert!(vault.delete("team-a", "API_KEY").await.unwrap());
        assert!(vault.list("team-a", "", 10).is_empty());
        assert!(!vault.delete("team-a", "API_KEY").await.unwrap());
    }

    #[tokio::test]
    async fn bad_values_and_a_missing_key_are_refused_naming_why() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let vault = Vault::load(store.clone(), Some(key())).await.unwrap();
        let err = |r: Result<SecretInfo>| r.unwrap_err().to_string();
        assert!(err(vault.set("a", "1x", b"v").await).contains("not a secret name"));
        assert!(err(vault.set("a", "K", b"").await).contains("value"));
        let big = vec![b'x'; MAX_VALUE + 1];
        assert!(err(vault.set("a", "K", &big).await).contains("over the limit"));
        let keyless = Vault::load(store, None).await.unwrap();
        assert!(err(keyless.set("a", "K", b"v").await).contains("no secrets key"));
    }
}
