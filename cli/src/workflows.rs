//! `mesh workflow`: register, read, list and validate workflow definitions.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Subcommand;
use mesh_agent_sdk::WorkflowRecord;

use crate::Output;
use crate::output::{self, table};

#[derive(Subcommand)]
pub enum WorkflowCommand {
    /// Register a definition (it needs `name` and `version`; a version never changes).
    Register { file: PathBuf },
    /// Show a registered workflow: `NAME@VERSION`, or `NAME` for its newest version.
    Get { reference: String },
    /// List registered workflows.
    Ls {
        /// Only this name.
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Per step over the workflow's recent finished runs (`NAME` for every version,
    /// `NAME@VERSION` for one): p50 and p95 duration, failure rate, share of the cost.
    Profile {
        reference: String,
        /// How many recent runs (at most 500).
        #[arg(long, default_value_t = 100)]
        runs: u32,
    },
    /// Check a definition; with `--remote` the coordinator checks it instead of this binary.
    Validate {
        file: PathBuf,
        #[arg(long)]
        remote: bool,
    },
}

fn row(w: &WorkflowRecord) -> Vec<String> {
    vec![
        w.name.clone(),
        w.version.to_string(),
        w.steps.to_string(),
        w.description.clone(),
    ]
}

pub async fn workflow(
    target: &crate::Target,
    format: Output,
    command: WorkflowCommand,
) -> Result<()> {
    if let WorkflowCommand::Validate {
        file,
        remote: false,
    } = &command
    {
        let (name, text) = crate::goalfile::read(file)?;
        let w = crate::goalfile::check(&name, &text)?;
        println!("{name}: valid ({} steps)", w.steps.len());
        return Ok(());
    }
    let client = target.connect().await?;
    match command {
        WorkflowCommand::Register { file } => {
            let (name, text) = crate::goalfile::read(&file)?;
            crate::goalfile::check(&name, &text)?;
            let (w, created) = client.register_workflow(&text).await?;
            match format {
                Output::Json => output::json(&w),
                Output::Table => println!(
                    "{} {}@{} ({} steps)",
                    if created {
                        "registered"
                    } else {
                        "already registered:"
                    },
                    w.name,
                    w.version,
                    w.steps
                ),
            }
        }
        WorkflowCommand::Profile { reference, runs } => {
            let (name, version) = mesh_proto::convert::parse_workflow_ref(&reference)?;
            let profile = client.profile(&name, version, runs).await?;
            match format {
                Output::Json => output::json(&crate::trace::profile_json(&profile)),
                Output::Table => {
                    println!("{} over its last {} runs", profile.workflow, profile.runs);
                    table(
                        &crate::trace::PROFILE_HEADERS,
                        crate::trace::profile_rows(&profile),
                    );
                }
            }
        }
        WorkflowCommand::Get { reference } => {
            let (name, version) = mesh_proto::convert::parse_workflow_ref(&reference)?;
            let w = client.get_workflow(&name, version).await?;
            match format {
                Output::Json => output::json(&w),
                Output::Table => {
                    println!("# {}@{} — {} steps", w.name, w.version, w.steps);
                    print!("{}", w.definition);
                }
            }
        }
        WorkflowCommand::Ls {
            name,
            limit,
            page_token,
        } => {
            let (workflows, next) = client
                .list_workflows(name.as_deref(), limit, page_token)
                .await?;
            match format {
                Output::Json => output::json(&serde_json::json!({
                    "workflows": workflows, "next_page_token": next
                })),
                Output::Table => {
                    table(
                        &["NAME", "VERSION", "STEPS", "DESCRIPTION"],
                        workflows.iter().map(row).collect(),
                    );
                    if let Some(t) = next {
                        println!("more: --page-token {t}");
                    }
                }
            }
        }
        WorkflowCommand::Validate { file, .. } => {
            let (name, text) = crate::goalfile::read(&file)?;
            let problems = client.validate_workflow(&text).await?;
            if !problems.is_empty() {
                let lines: Vec<String> = problems
                    .iter()
                    .map(|p| format!("  {}: {}", p.path, p.message))
                    .collect();
                bail!("{name} is not a valid workflow:\n{}", lines.join("\n"));
            }
            println!("{name}: valid");
        }
    }
    Ok(())
}
