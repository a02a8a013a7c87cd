//! Goal files are workflow definitions (YAML or JSON, see docs/workflows.md), checked here
//! with the coordinator's own validator before anything is sent.

use std::path::Path;

use anyhow::{Context, Result, bail};
use mesh_proto::domain::GoalSpec;
use mesh_workflow::{Limits, Workflow};
use serde_json::{Map, Value};

/// Parses and validates a definition; errors name the file and the field's path.
pub fn check(name: &str, text: &str) -> Result<Workflow> {
    mesh_workflow::load(text, &Limits::default()).map_err(|e| {
        let lines: Vec<String> = e.0.iter().map(|p| format!("  {p}")).collect();
        anyhow::anyhow!("{name} is not a valid workflow:\n{}", lines.join("\n"))
    })
}

/// `key=value` pairs; a value that reads as JSON (`3`, `true`, `[1,2]`) is taken as such,
/// anything else as text.
pub fn inputs(pairs: &[String]) -> Result<Value> {
    let mut out = Map::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--input `{pair}`: expected key=value");
        };
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
        out.insert(key.to_owned(), value);
    }
    Ok(Value::Object(out))
}

/// A goal that runs the definition in `text` with `inputs`.
pub fn goal(name: &str, text: &str, inputs: Value, objective: Option<String>) -> Result<GoalSpec> {
    let workflow = check(name, text)?;
    workflow
        .bind_inputs(&inputs)
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    Ok(GoalSpec {
        objective: objective.unwrap_or_else(|| workflow.def.description.clone()),
        inputs,
        steps: Vec::new(),
        workflow: Some(text.to_owned()),
        workflow_ref: None,
        idempotency_key: None,
        budget: None,
        namespace: Default::default(),
    })
}

pub fn read(path: &Path) -> Result<(String, String)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok((path.display().to_string(), text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_example_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut seen = 0;
        for sub in ["goals", "workflows"] {
            for entry in std::fs::read_dir(dir.join(sub)).unwrap() {
                let path = entry.unwrap().path();
                let (name, text) = read(&path).unwrap();
                check(&name, &text).unwrap();
                seen += 1;
            }
        }
        assert!(seen >= 7, "examples found: {seen}");
    }

    #[test]
    fn names_the_file_and_field() {
        let err = check(
            "g.yaml",
            "steps:\n  - id: a\n    uses: echo\n    needs: [b]\n",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("g.yaml is not a valid workflow:\n  steps[0].needs[0]: unknown step `b`"),
            "{err}"
        );
        let err = goal(
            "g.yaml",
            "inputs: { n: integer }\nsteps:\n  - { id: a, uses: echo }\n",
            inputs(&["n=x".into()]).unwrap(),
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("inputs.n: expected integer, got a string"),
            "{err}"
        );
    }

    #[test]
    fn inputs_take_json_or_text() {
        assert_eq!(
            inputs(&["n=3".into(), "topic=agent meshes".into(), "xs=[1,2]".into()]).unwrap(),
            json!({ "n": 3, "topic": "agent meshes", "xs": [1, 2] })
        );
        assert!(inputs(&["novalue".into()]).is_err());
    }
}
