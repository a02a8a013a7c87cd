//! Secrets in task inputs (docs/security.md). A workflow names a secret as
//! `${{ secrets.NAME }}`; the placeholder stays as written in everything the coordinator keeps
//! (the journal, run views), and the values travel beside the input, in the one task that
//! needs them ([`crate::domain::Task::secrets`]). The SDK puts them in the input just before
//! the agent runs; whatever comes back is scrubbed of them on the node and again on the
//! coordinator.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::Value;

/// A secret's value: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> SecretValue {
        SecretValue(value.into())
    }

    /// The value itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(***)")
    }
}

/// A task's secrets, by name.
pub type Secrets = BTreeMap<String, SecretValue>;

/// Longest secret name.
pub const MAX_NAME: usize = 128;
/// Largest secret value.
pub const MAX_VALUE: usize = 64 * 1024;

/// A secret's name: a letter or `_`, then letters, digits and `_` (as environment variables).
pub fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || name.len() > MAX_NAME || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "`{name}` is not a secret name: a letter or `_`, then letters, digits or `_`, at most {MAX_NAME}"
        ));
    }
    Ok(())
}

/// The name an expression body refers to, when it is exactly `secrets.NAME`.
pub fn reference(body: &str) -> Option<&str> {
    let name = body.trim().strip_prefix("secrets.")?;
    check_name(name).ok().map(|()| name)
}

/// How a reference to `name` is written, in every input the coordinator keeps.
pub fn placeholder(name: &str) -> String {
    format!("${{{{ secrets.{name} }}}}")
}

/// Every secret `value` refers to.
pub fn references(value: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    walk(value, &mut |s| {
        let mut rest = s;
        while let Some(start) = rest.find("${{") {
            let body = &rest[start + 3..];
            let Some(end) = body.find("}}") else { break };
            if let Some(name) = reference(&body[..end]) {
                out.insert(name.to_owned());
            }
            rest = &body[end + 2..];
        }
    });
    out
}

fn walk(value: &Value, f: &mut impl FnMut(&str)) {
    match value {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter().for_each(|v| walk(v, f)),
        Value::Object(map) => map.values().for_each(|v| walk(v, f)),
        _ => {}
    }
}

fn walk_mut(value: &mut Value, f: &mut impl FnMut(&mut String)) {
    match value {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter_mut().for_each(|v| walk_mut(v, f)),
        Value::Object(map) => map.values_mut().for_each(|v| walk_mut(v, f)),
        _ => {}
    }
}

/// Puts each secret's value where `value` refers to it (`${{ secrets.NAME }}`, spaces or
/// not); a reference to a secret not given stays as written.
pub fn fill(value: &mut Value, secrets: &Secrets) {
    if secrets.is_empty() {
        return;
    }
    walk_mut(value, &mut |s| {
        if !s.contains("${{") {
            return;
        }
        let mut out = String::with_capacity(s.len());
        let mut rest = s.as_str();
        while let Some(start) = rest.find("${{") {
            let body = &rest[start + 3..];
            let Some(end) = body.find("}}") else { break };
            out.push_str(&rest[..start]);
            match reference(&body[..end]).and_then(|name| secrets.get(name)) {
                Some(secret) => out.push_str(secret.expose()),
                None => out.push_str(&rest[start..start + 3 + end + 2]),
            }
            rest = &body[end + 2..];
        }
        out.push_str(rest);
        *s = out;
    });
}

/// `text` with every secret's value replaced by its placeholder.
pub fn scrub_text(text: &str, secrets: &Secrets) -> String {
    let mut out = text.to_owned();
    for (name, secret) in secrets {
        if !secret.expose().is_empty() && out.contains(secret.expose()) {
            out = out.replace(secret.expose(), &placeholder(name));
        }
    }
    out
}

/// `value` with every secret's value replaced by its placeholder, in strings and keys.
pub fn scrub(value: &mut Value, secrets: &Secrets) {
    if secrets.is_empty() {
        return;
    }
    if let Value::Object(map) = value
        && map.keys().any(|k| {
            secrets
                .values()
                .any(|s| !s.0.is_empty() && k.contains(&s.0))
        })
    {
        let fields = std::mem::take(map);
        *map = fields
            .into_iter()
            .map(|(k, v)| (scrub_text(&k, secrets), v))
            .collect();
    }
    match value {
        Value::String(s) => *s = scrub_text(s, secrets),
        Value::Array(items) => items.iter_mut().for_each(|v| scrub(v, secrets)),
        Value::Object(map) => map.values_mut().for_each(|v| scrub(v, secrets)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secrets() -> Secrets {
        [("API_KEY".to_owned(), SecretValue::new("s3cr3t"))].into()
    }

    #[test]
    fn references_are_found_filled_and_scrubbed() {
        let mut input = json!({
            "headers": { "authorization": "Bearer ${{ secrets.API_KEY }}" },
            "list": ["${{secrets.OTHER}}", "${{ inputs.x }}"],
        });
        let names: Vec<String> = references(&input).into_iter().collect();
        assert_eq!(names, ["API_KEY", "OTHER"]);
        fill(&mut input, &secrets());
        assert_eq!(input["headers"]["authorization"], "Bearer s3cr3t");
        let mut echoed = json!({ "got": input, "s3cr3t": 1 });
        scrub(&mut echoed, &secrets());
        let text = echoed.to_string();
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("Bearer ${{ secrets.API_KEY }}"), "{text}");
        assert_eq!(
            format!("{:?}", secrets()),
            "{\"API_KEY\": SecretValue(***)}"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("OPENAI_API_KEY").is_ok());
        assert!(check_name("_x1").is_ok());
        for bad in ["", "1x", "a-b", "a.b", &"x".repeat(MAX_NAME + 1)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(reference(" secrets.K "), Some("K"));
        assert_eq!(reference("secrets.K + 'x'"), None);
    }
}
