//! Client commands: goals, runs, nodes and agents.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Subcommand;
use futures::StreamExt;
use mesh_agent_sdk::GoalClient;
use mesh_proto::domain::*;

use crate::Output;
use crate::output::{self, step_line, table};

#[derive(Subcommand)]
pub enum GoalCommand {
    /// Submit a workflow file (YAML or JSON) as a goal, validated first; or, with
    /// `--workflow NAME@VERSION`, a registered workflow; or, with only `--objective`, a text
    /// goal that an agent with the `plan` skill turns into a workflow.
    Submit {
        #[arg(required_unless_present_any = ["workflow", "objective"], conflicts_with = "workflow")]
        file: Option<PathBuf>,
        /// A registered workflow, `NAME@VERSION` or `NAME` (its newest version).
        #[arg(long)]
        workflow: Option<String>,
        /// An input of the workflow, `key=value` (the value as JSON if it parses, else text).
        #[arg(long = "input", value_name = "KEY=VALUE")]
        inputs: Vec<String>,
        /// What the goal is for; the workflow's description by default.
        #[arg(long)]
        objective: Option<String>,
        /// Watch the run until it finishes; exit non-zero unless it succeeds.
        #[arg(long)]
        watch: bool,
        /// Submitting again with the same key returns the first run.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        budget: BudgetArgs,
    },
}

/// A budget for model calls, given on the command line.
#[derive(clap::Args, Default)]
pub struct BudgetArgs {
    /// Tokens in and out the run may use on model calls (replaces the workflow's budget).
    #[arg(long)]
    max_tokens: Option<u64>,
    /// USD the run may spend on priced model calls (replaces the workflow's budget).
    #[arg(long)]
    max_cost_usd: Option<f64>,
    /// At the budget: `fail` the step that would exceed it, or `park` it until the budget
    /// is raised (`mesh run budget`).
    #[arg(long, value_parser = ["fail", "park"])]
    on_exceed: Option<String>,
}

impl BudgetArgs {
    /// The budget given, if any limit was; `on_exceed` alone is refused.
    fn budget(&self) -> Result<Option<Budget>> {
        let on_exceed = self.on_exceed.as_deref().map(str::parse::<OnExceed>);
        let on_exceed = on_exceed.transpose().map_err(anyhow::Error::msg)?;
        if self.max_tokens.is_none() && self.max_cost_usd.is_none() {
            if on_exceed.is_some() {
                bail!("--on-exceed needs --max-tokens or --max-cost-usd");
            }
            return Ok(None);
        }
        Ok(Some(Budget {
            max_tokens: self.max_tokens,
            max_cost_usd: self.max_cost_usd,
            on_exceed: on_exceed.unwrap_or_default(),
        }))
    }
}

/// An approval decision: which step of which run, and what to record with it.
#[derive(clap::Args)]
pub struct Decision {
    run_id: String,
    step: String,
    #[arg(long, default_value = "")]
    comment: String,
    /// Who decides, for the record; $USER by default.
    #[arg(long, env = "USER", default_value = "")]
    by: String,
}

#[derive(Subcommand)]
pub enum RunCommand {
    /// Show a run with its steps.
    Get { run_id: String },
    /// Follow a run until it finishes; exit non-zero unless it succeeds.
    Watch { run_id: String },
    /// Where a run spent its time: a waterfall of its steps and attempts, with the critical
    /// path (*) and the slowest steps (!) marked.
    Trace {
        run_id: String,
        /// Columns for the bars.
        #[arg(long, default_value_t = 60)]
        width: usize,
    },
    /// Print a step's output as JSON (the run's output without STEP), read in pages: for
    /// outputs too large for `run get` to show.
    Output {
        run_id: String,
        step: Option<String>,
    },
    /// Cancel a run: in-flight attempts are cancelled, the rest skipped.
    Cancel {
        run_id: String,
        #[arg(long, default_value = "cancelled from the CLI")]
        reason: String,
    },
    /// Approve a step that awaits approval.
    Approve(Decision),
    /// Reject a step that awaits approval: it fails (and the run with it, unless the step
    /// says `on_failure: continue` or `park`).
    Reject(Decision),
    /// Run a failed or parked step again, with every step that depends on it; a failed run
    /// runs again from there. Every other result is kept.
    Retry {
        run_id: String,
        /// The step to run again.
        #[arg(long = "from")]
        from: String,
    },
    /// Skip a parked step: its dependents go on without it.
    Skip {
        run_id: String,
        step: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Raise a running run's budget for model calls (journaled); steps parked at the old
    /// budget go on when the new one allows. A limit left out keeps its value.
    Budget {
        run_id: String,
        #[command(flatten)]
        budget: BudgetArgs,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Send a named signal to a run; steps waiting for it complete with the payload.
    Signal {
        run_id: String,
        name: String,
        /// JSON payload (text that is not JSON is sent as a string).
        #[arg(long, default_value = "null")]
        payload: String,
    },
    /// List runs, newest first.
    Ls {
        /// running, succeeded, failed or cancelled.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Continue after this page token.
        #[arg(long)]
        page_token: Option<String>,
    },
}

pub async fn goal(target: &crate::Target, format: Output, command: GoalCommand) -> Result<()> {
    let client = target.connect().await?;
    match command {
        GoalCommand::Submit {
            file,
            workflow,
            inputs,
            objective,
            watch,
            idempotency_key,
            budget,
        } => {
            let inputs = crate::goalfile::inputs(&inputs)?;
            let mut goal = match (file, workflow) {
                (Some(file), _) => {
                    let (name, text) = crate::goalfile::read(&file)?;
                    crate::goalfile::goal(&name, &text, inputs, objective)?
                }
                (None, reference) => GoalSpec {
                    objective: objective.unwrap_or_default(),
                    inputs,
                    steps: Vec::new(),
                    workflow: None,
                    workflow_ref: reference,
                    idempotency_key: None,
                    budget: None,
                    namespace: Default::default(),
                },
            };
            goal.idempotency_key = idempotency_key;
            if let Some(budget) = budget.budget()? {
                goal.budget = Some(budget);
            }
            if watch {
                // One round trip: the acknowledgement, then the run's events.
                let (run, events) = client.submit_and_watch(goal).await?;
                announce(&run);
                return follow(&client, &run.run_id, events, format).await;
            }
            let run = client.submit(goal).await?;
            match format {
                Output::Json => output::json(&serde_json::json!({
                    "goal_id": run.goal_id, "run_id": run.run_id, "created": run.created
                })),
                _ => announce(&run),
            }
            if format == Output::Table {
                println!("{}", run.run_id);
            }
            Ok(())
        }
    }
}

fn announce(run: &RunRef) {
    let what = if run.created {
        "started"
    } else {
        "already submitted:"
    };
    eprintln!("{what} run {} (goal {})", run.run_id, run.goal_id);
}

/// Follows a run, printing each step change; errors unless it succeeds.
pub async fn watch_run(client: &GoalClient, run_id: &RunId, format: Output) -> Result<()> {
    let events = client.watch(run_id).await?;
    follow(client, run_id, events, format).await
}

/// Prints a run's events as they come, then the run; errors unless it succeeded.
async fn follow(
    client: &GoalClient,
    run_id: &RunId,
    events: impl futures::Stream<Item = Result<RunEvent, mesh_agent_sdk::ClientError>>,
    format: Output,
) -> Result<()> {
    let mut events = Box::pin(events);
    // The step task whose text is being printed, so that a line starts when another speaks.
    let mut speaking: Option<(mesh_agent_sdk::StepId, u32)> = None;
    while let Some(event) = events.next().await {
        let event = event?;
        if format == Output::Table && speaking.is_some() && !matches!(event, RunEvent::Delta { .. })
        {
            eprintln!();
            speaking = None;
        }
        match event {
            RunEvent::Delta {
                step,
                index,
                attempt,
                text,
                restart,
            } => {
                if format == Output::Table {
                    use std::io::Write;
                    let who = (step.clone(), index);
                    if restart || speaking.as_ref() != Some(&who) {
                        if speaking.is_some() {
                            eprintln!();
                        }
                        let again = if restart {
                            " (again, another model)"
                        } else {
                            ""
                        };
                        eprint!("step {step:<16} text  attempt {attempt}{again}  ");
                        speaking = Some(who);
                    }
                    eprint!("{text}");
                    let _ = std::io::stderr().flush();
                }
            }
            RunEvent::Snapshot(view) => {
                if format == Output::Table {
                    for step in &view.steps {
                        eprintln!("{}", step_line(step));
                    }
                }
            }
            RunEvent::Step(step) => {
                if format == Output::Table {
                    eprintln!("{}", step_line(&step));
                }
            }
            RunEvent::Progress {
                step,
                attempt,
                message,
                fraction,
            } => {
                if format == Output::Table {
                    let pct = fraction
                        .map(|f| format!(" {:>3.0}%", f * 100.0))
                        .unwrap_or_default();
                    eprintln!("step {step:<16} progress{pct}  attempt {attempt}  {message}");
                }
            }
            RunEvent::Finished { .. } => {}
        }
    }
    let view = client.get_run(run_id).await?;
    output::run(&view, format);
    match view.state {
        RunState::Succeeded => Ok(()),
        state => bail!(
            "run {run_id} {state}{}",
            view.error.map(|e| format!(": {e}")).unwrap_or_default()
        ),
    }
}

fn mesh_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn run_id(s: String) -> Result<RunId> {
    Ok(mesh_proto::convert::run_id("run_id", s)?)
}

pub async fn run(target: &crate::Target, format: Output, command: RunCommand) -> Result<()> {
    let client = target.connect().await?;
    match command {
        RunCommand::Get { run_id: id } => {
            let view = client.get_run(&run_id(id)?).await?;
            output::run(&view, format);
        }
        RunCommand::Watch { run_id: id } => watch_run(&client, &run_id(id)?, format).await?,
        RunCommand::Trace { run_id: id, width } => {
            let trace = client.trace(&run_id(id)?).await?;
            match format {
                Output::Json => output::json(&crate::trace::trace_json(&trace)),
                Output::Table => print!(
                    "{}",
                    crate::trace::waterfall(&trace, mesh_now_ms(), width.clamp(10, 400))
                ),
            }
        }
        RunCommand::Output { run_id: id, step } => {
            let value = client.output(&run_id(id)?, step.as_deref()).await?;
            output::json(&value);
        }
        RunCommand::Cancel { run_id: id, reason } => {
            let view = client.cancel_run(&run_id(id)?, &reason).await?;
            output::run(&view, format);
        }
        RunCommand::Approve(d) => {
            let view = client
                .decide(&run_id(d.run_id)?, &d.step, true, &d.comment, &d.by)
                .await?;
            output::run(&view, format);
        }
        RunCommand::Reject(d) => {
            let view = client
                .decide(&run_id(d.run_id)?, &d.step, false, &d.comment, &d.by)
                .await?;
            output::run(&view, format);
        }
        RunCommand::Retry { run_id: id, from } => {
            let view = client.retry_run(&run_id(id)?, &from).await?;
            output::run(&view, format);
        }
        RunCommand::Skip {
            run_id: id,
            step,
            comment,
        } => {
            let view = client.skip_step(&run_id(id)?, &step, &comment).await?;
            output::run(&view, format);
        }
        RunCommand::Budget {
            run_id: id,
            budget,
            comment,
        } => {
            let keep_on_exceed = budget.on_exceed.is_none();
            let Some(raise) = budget.budget()? else {
                bail!("give --max-tokens, --max-cost-usd or both");
            };
            let view = client
                .raise_budget(&run_id(id)?, &raise, keep_on_exceed, &comment)
                .await?;
            output::run(&view, format);
        }
        RunCommand::Signal {
            run_id: id,
            name,
            payload,
        } => {
            let payload =
                serde_json::from_str(&payload).unwrap_or(serde_json::Value::String(payload));
            let view = client.signal(&run_id(id)?, &name, &payload).await?;
            output::run(&view, format);
        }
        RunCommand::Ls {
            state,
            limit,
            page_token,
        } => {
            let state = match state.as_deref() {
                None => None,
                Some(s) => Some(RunState::parse(s).ok_or_else(|| {
                    anyhow::anyhow!(
                        "--state: `{s}` is not one of running, succeeded, failed, cancelled"
                    )
                })?),
            };
            let page = client.list_runs(state, limit, page_token).await?;
            match format {
                Output::Json => output::json(&serde_json::json!({
                    "runs": page.runs, "next_page_token": page.next_page_token
                })),
                Output::Table => {
                    let rows = page
                        .runs
                        .iter()
                        .map(|r| {
                            vec![
                                r.run_id.to_string(),
                                r.state.to_string(),
                                r.objective.clone(),
                            ]
                        })
                        .collect();
                    table(&["run", "state", "objective"], rows);
                    if let Some(token) = page.next_page_token {
                        eprintln!("more: --page-token {token}");
                    }
                }
            }
        }
    }
    Ok(())
}

pub async fn nodes(target: &crate::Target, format: Output) -> Result<()> {
    let nodes = target.connect().await?.nodes().await?;
    match format {
        Output::Json => output::json(&nodes),
        Output::Table => table(
            &[
                "node",
                "instance",
                "health",
                "heartbeat age",
                "agents",
                "in flight",
            ],
            nodes
                .iter()
                .map(|n| {
                    vec![
                        n.node_id.to_string(),
                        n.instance.to_string(),
                        n.health.to_string(),
                        format!("{} ms", n.heartbeat_age_ms),
                        n.agents.to_string(),
                        n.in_flight.to_string(),
                    ]
                })
                .collect(),
        ),
    }
    Ok(())
}

pub async fn agents(target: &crate::Target, format: Output, skill: Option<&str>) -> Result<()> {
    let agents = target.connect().await?.agents(skill).await?;
    match format {
        Output::Json => output::json(&agents),
        Output::Table => table(
            &[
                "node",
                "agent",
                "skills",
                "health",
                "circuit",
                "in flight",
                "max",
            ],
            agents
                .iter()
                .map(|a| {
                    vec![
                        a.node_id.to_string(),
                        a.name.clone(),
                        a.skills.join(","),
                        a.health.to_string(),
                        a.circuit.clone(),
                        a.in_flight.to_string(),
                        a.max_concurrency.to_string(),
                    ]
                })
                .collect(),
        ),
    }
    Ok(())
}

pub async fn drain(target: &crate::Target, format: Output, node: &str, reason: &str) -> Result<()> {
    let view = target.connect().await?.drain_node(node, reason).await?;
    match format {
        Output::Json => output::json(&view),
        Output::Table => println!(
            "node {} (instance {}) is {}; {} attempts in flight finish before it leaves",
            view.node_id, view.instance, view.health, view.in_flight
        ),
    }
    Ok(())
}
