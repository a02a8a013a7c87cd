//! Memory that outlives a run (reference: docs/memory.md): lists of entries kept by the store,
//! per namespace, scope and key. A step with `memory:` gets the newest entries of its key in
//! its task's input and saves its output (its `remember` field when it has one) after it
//! succeeds, in the same transaction as the result; operators and clients read, add and
//! delete entries through `MemoryService` and `mesh memory`.

use serde_json::Value;

/// The most entries a key keeps: the oldest go when a new one comes.
pub const MAX_ENTRIES_PER_KEY: u32 = 1000;
/// The largest entry a client may put (a step's bigger output is remembered by its size).
pub const MAX_PUT_BYTES: usize = crate::machine::MAX_MEMORY_VALUE_BYTES;

/// One remembered value.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryEntry {
    pub seq: i64,
    pub value: Value,
    /// The run and step that saved it; empty for an entry put through the API.
    pub run_id: String,
    pub step_id: String,
    pub at_ms: i64,
    pub expires_at_ms: Option<i64>,
}

/// A key, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryKey {
    pub scope: String,
    pub key: String,
    pub entries: u64,
    pub updated_at_ms: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryPage {
    pub keys: Vec<MemoryKey>,
    /// `(scope, key)` of the last key, for the next page; `None` at the end.
    pub next: Option<(String, String)>,
}

/// An entry put through the API.
#[derive(Clone, Debug, PartialEq)]
pub struct NewMemory {
    pub namespace: String,
    pub scope: String,
    pub key: String,
    pub value: Value,
    /// 0: kept until deleted.
    pub ttl_ms: u64,
}

/// Checks a scope named by a client: `workflow:NAME`, `agent:NAME` or `swarm:GOAL`.
pub fn check_scope(scope: &str) -> Result<(), String> {
    match scope.split_once(':') {
        Some(("workflow" | "agent" | "swarm", name)) if !name.is_empty() && scope.len() <= 300 => {
            Ok(())
        }
        _ => Err(format!(
            "scope `{scope}`: `workflow:NAME`, `agent:NAME` or `swarm:GOAL_ID`"
        )),
    }
}

/// Checks a key named by a client.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 256 || key.chars().any(char::is_control) {
        return Err("key: 1 to 256 printable characters".into());
    }
    Ok(())
}
