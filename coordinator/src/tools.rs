//! Tools registered once per namespace (reference: docs/tools.md): a declaration as a step
//! would write it in its `with.tools`, kept in the store and in memory, and put in place of
//! the references to it (`- use: NAME`, or just `- NAME`) when an attempt is dispatched, so
//! that its secrets are opened like the step's own and a tool changed applies to the next
//! attempt. The node checks the declaration in full, as it checks a step's own.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::store::{Backend, Store, now_ms};

/// A registered tool as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolRecord {
    pub namespace: String,
    pub name: String,
    pub declaration: Value,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// Largest declaration, as JSON.
pub const MAX_DECLARATION_BYTES: usize = 64 * 1024;
/// Most tools a namespace registers.
pub const MAX_TOOLS_PER_NAMESPACE: usize = 1_000;
/// What a declaration does: exactly one of these.
const KINDS: [&str; 5] = ["http", "skill", "code", "message", "mcp"];

fn invalid(field: &str, why: impl Into<String>) -> Error {
    Error::InvalidArgument(mesh_proto::convert::FieldError::new(field, why))
}

/// A tool's name: what every provider takes as a function name.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(format!("`{name}`: 1 to 64 letters, digits, `_` or `-`"))
    }
}

/// A declaration to register as `name`, checked for its shape (the node checks the rest when
/// a step uses it) and given that name.
pub fn checked_declaration(name: &str, json: &str) -> Result<Value> {
    check_name(name).map_err(|e| invalid("name", e))?;
    if json.len() > MAX_DECLARATION_BYTES {
        return Err(invalid(
            "declaration_json",
            format!(
                "{} bytes is over the limit of {MAX_DECLARATION_BYTES}",
                json.len()
            ),
        ));
    }
    let value: Value = mesh_proto::convert::parse_json_deep("declaration_json", json, Value::Null)
        .map_err(Error::InvalidArgument)?;
    let Value::Object(mut map) = value else {
        return Err(invalid(
            "declaration_json",
            "must be a map, as a step's `with.tools` entry",
        ));
    };
    let kinds: Vec<&str> = KINDS
        .iter()
        .copied()
        .filter(|k| map.contains_key(*k))
        .collect();
    match kinds.as_slice() {
        [_] => {}
        _ => {
            return Err(invalid(
                "declaration_json",
                format!("needs exactly one of {}", KINDS.join(", ")),
            ));
        }
    }
    if map.contains_key("use") {
        return Err(invalid(
            "declaration_json.use",
            "a registered tool cannot refer to another",
        ));
    }
    // The registered name is the tool's name, wherever the kind keeps it.
    match kinds[0] {
        "code" | "message" => {
            if let Some(Value::Object(inner)) = map.get_mut(kinds[0]) {
                inner.insert("name".into(), Value::String(name.to_owned()));
            }
        }
        "mcp" => {}
        _ => {
            map.insert("name".into(), Value::String(name.to_owned()));
        }
    }
    Ok(Value::Object(map))
}

/// The name a `with.tools` entry refers to, if it is a reference.
fn reference(entry: &Value) -> Option<&str> {
    match entry {
        Value::String(name) => Some(name),
        Value::Object(map) if map.len() == 1 => map.get("use").and_then(Value::as_str),
        _ => None,
    }
}

/// The namespaces' registered tools, kept in memory (loaded at start, written through).
#[derive(Clone, Debug)]
pub struct ToolRegistry {
    tools: Arc<RwLock<HashMap<(String, String), ToolRecord>>>,
    store: Store,
}

impl ToolRegistry {
    pub async fn load(store: Store) -> Result<Self> {
        let tools = store
            .tools()
            .await?
            .into_iter()
            .map(|t| ((t.namespace.clone(), t.name.clone()), t))
            .collect();
        Ok(Self {
            tools: Arc::new(RwLock::new(tools)),
            store,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<(String, String), ToolRecord>> {
        self.tools.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `declaration` (already checked) as `name`, replacing an earlier one.
    pub async fn put(&self, namespace: &str, name: &str, declaration: Value) -> Result<ToolRecord> {
        let key = (namespace.to_owned(), name.to_owned());
        let (created, count) = {
            let all = self.read();
            let count = all.keys().filter(|(ns, _)| ns == namespace).count();
            (all.get(&key).map(|t| t.created_at_ms), count)
        };
        if created.is_none() && count >= MAX_TOOLS_PER_NAMESPACE {
            return Err(Error::ResourceExhausted(format!(
                "namespace `{namespace}` has {MAX_TOOLS_PER_NAMESPACE} tools, its limit"
            )));
        }
        let now = now_ms();
        let record = ToolRecord {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            declaration,
            created_at_ms: created.unwrap_or(now),
            updated_at_ms: now,
        };
        self.store.put_tool(record.clone()).await?;
        self.tools
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, record.clone());
        Ok(record)
    }

    /// Deletes a tool; `None` when there was none.
    pub async fn delete(&self, namespace: &str, name: &str) -> Result<Option<ToolRecord>> {
        let key = (namespace.to_owned(), name.to_owned());
        let Some(found) = self.read().get(&key).cloned() else {
            return Ok(None);
        };
        self.store.delete_tool(namespace, name).await?;
        self.tools
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        Ok(Some(found))
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<ToolRecord> {
        self.read()
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// A namespace's tools by name, after `after`, at most `limit`.
    pub fn list(&self, namespace: &str, limit: usize, after: &str) -> Vec<ToolRecord> {
        let mut found: Vec<ToolRecord> = (self.read().values())
            .filter(|t| t.namespace == namespace && t.name.as_str() > after)
            .cloned()
            .collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        found.truncate(limit);
        found
    }

    /// Puts the registered declarations in place of the references in `input.with.tools`;
    /// a name not registered in `namespace` is an error naming the entry.
    pub fn resolve(&self, namespace: &str, input: &mut Value) -> std::result::Result<(), String> {
        let Some(Value::Array(entries)) = input.pointer_mut("/with/tools") else {
            return Ok(());
        };
        if !entries.iter().any(|e| reference(e).is_some()) {
            return Ok(());
        }
        let all = self.read();
        for (i, entry) in entries.iter_mut().enumerate() {
            let Some(name) = reference(entry) else {
                continue;
            };
            match all.get(&(namespace.to_owned(), name.to_owned())) {
                Some(t) => *entry = t.declaration.clone(),
                None => {
                    return Err(format!(
                        "with.tools[{i}]: no tool `{name}` is registered in namespace \
                         `{namespace}` (mesh tool ls)"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A declaration's map, for tests and the CLI's listing.
pub fn kind_of(declaration: &Value) -> &'static str {
    let map: Option<&Map<String, Value>> = declaration.as_object();
    KINDS
        .iter()
        .copied()
        .find(|k| map.is_some_and(|m| m.contains_key(*k)))
        .unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn declarations_are_checked_and_named() {
        let d = checked_declaration("weather", r#"{"http":{"url":"http://a/"}}"#).unwrap();
        assert_eq!(d["name"], "weather");
        let d = checked_declaration("run_py", r#"{"code":{"language":"python"}}"#).unwrap();
        assert_eq!(d["code"]["name"], "run_py");
        assert_eq!(kind_of(&d), "code");
        for (name, json, field) in [
            ("bad name", r#"{"http":{}}"#, "name"),
            ("w", "[1]", "declaration_json"),
            ("w", r#"{"http":{},"skill":"echo"}"#, "declaration_json"),
            ("w", r#"{"name":"w"}"#, "declaration_json"),
            ("w", "{not json", "declaration_json"),
        ] {
            let e = checked_declaration(name, json).unwrap_err().to_string();
            assert!(e.contains(field), "{json}: {e}");
        }
        let big = format!(r#"{{"http":{{"url":"{}"}}}}"#, "x".repeat(70_000));
        assert!(
            checked_declaration("w", &big)
                .unwrap_err()
                .to_string()
                .contains("over the limit")
        );
    }

    #[tokio::test]
    async fn references_are_resolved_in_their_namespace_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let registry = ToolRegistry::load(store.clone()).await.unwrap();
        let decl = checked_declaration("weather", r#"{"http":{"url":"http://a/"}}"#).unwrap();
        registry
            .put("team-a", "weather", decl.clone())
            .await
            .unwrap();
        let mut input =
            json!({ "with": { "tools": ["weather", { "use": "weather" }, { "skill": "echo" }] } });
        registry.resolve("team-a", &mut input).unwrap();
        assert_eq!(input["with"]["tools"][0], decl);
        assert_eq!(input["with"]["tools"][1], decl);
        assert_eq!(input["with"]["tools"][2], json!({ "skill": "echo" }));
        let mut other = json!({ "with": { "tools": [{ "skill": "echo" }, "weather"] } });
        let e = registry.resolve("team-b", &mut other).unwrap_err();
        assert!(
            e.contains("with.tools[1]") && e.contains("namespace `team-b`"),
            "{e}"
        );
        // Kept by the store: a restarted coordinator has them.
        let again = ToolRegistry::load(store).await.unwrap();
        assert_eq!(again.get("team-a", "weather").unwrap().declaration, decl);
        assert_eq!(again.list("team-a", 10, "").len(), 1);
        assert!(again.list("team-b", 10, "").is_empty());
        assert!(again.delete("team-a", "weather").await.unwrap().is_some());
        assert!(again.delete("team-a", "weather").await.unwrap().is_none());
    }
}
