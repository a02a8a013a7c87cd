//! Access commands: API tokens, secrets and the audit log (docs/security.md).

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use mesh_proto::pb;

use crate::output::{self, table};
use crate::{Output, Target};

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token; its secret is printed once and kept nowhere.
    Create {
        /// The namespace it acts in (`*`: every namespace, for a cluster admin).
        #[arg(long, value_name = "NS")]
        for_namespace: Option<String>,
        /// read, write, worker or admin.
        #[arg(long)]
        role: String,
        /// How long it lasts (`30d`, `12h`); no expiry when absent.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// What it is for.
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// List tokens (no secrets), newest first.
    Ls {
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Revoke a token at once.
    Revoke { token_id: String },
}

#[derive(Subcommand)]
pub enum SecretCommand {
    /// Set a secret of namespace NS; its value is read from stdin (one trailing newline is
    /// dropped), never from the command line.
    Set { namespace: String, name: String },
    /// List a namespace's secrets: names and times, never values.
    Ls {
        namespace: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Delete a secret.
    Rm { namespace: String, name: String },
    /// Write a new secrets key (for `secrets.key_file` or `MESH_SECRETS_KEY`) to FILE,
    /// readable by its owner only; refuses to replace one.
    Key { file: std::path::PathBuf },
}

#[derive(Subcommand)]
pub enum MemoryCommand {
    /// Keys of the namespace's memory, with their number of entries.
    Ls {
        /// Only this scope (`workflow:NAME`, `agent:NAME`, `swarm:GOAL_ID`).
        #[arg(long)]
        scope: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// The newest entries of a key, oldest first.
    Get {
        scope: String,
        #[arg(value_name = "KEY")]
        entry_key: String,
        #[arg(long, default_value_t = 10)]
        last: u32,
    },
    /// Append a JSON value to a key.
    Put {
        scope: String,
        #[arg(value_name = "KEY")]
        entry_key: String,
        /// JSON (a bare word is taken as a string).
        value: String,
        /// How long the entry is kept (`30d`); forever when absent.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// Delete every entry of a key.
    Rm {
        scope: String,
        #[arg(value_name = "KEY")]
        entry_key: String,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum ToolCommand {
    /// Register a tool from a YAML or JSON file: a declaration as a step's `with.tools` entry
    /// (docs/tools.md); replaces an earlier one of that name.
    Put {
        /// The name the model sees.
        name: String,
        /// The declaration's file (`-` for stdin).
        file: std::path::PathBuf,
    },
    /// The namespace's registered tools.
    Ls {
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// One tool's declaration.
    Get { name: String },
    /// Delete a tool; steps that use it then fail, naming it.
    Rm { name: String },
}

fn tool_json(t: &pb::ToolInfo) -> serde_json::Value {
    serde_json::json!({
        "name": t.name, "kind": t.kind,
        "declaration": serde_json::from_str::<serde_json::Value>(&t.declaration_json)
            .unwrap_or_default(),
        "created_at_ms": t.created_at_ms, "updated_at_ms": t.updated_at_ms,
    })
}

pub async fn tool(target: &Target, format: Output, command: ToolCommand) -> Result<()> {
    let client = target.connect().await?;
    let show = |t: &pb::ToolInfo| match format {
        Output::Json => output::json(&tool_json(t)),
        Output::Table => table(
            &["name", "kind", "updated"],
            vec![vec![t.name.clone(), t.kind.clone(), when(t.updated_at_ms)]],
        ),
    };
    match command {
        ToolCommand::Put { name, file } => {
            let text = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
                text
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            // YAML 1.2 booleans only, as in workflows: `approval: yes` stays a string.
            let mut options = serde_saphyr::Options::default();
            options.strict_booleans = true;
            let declaration: serde_json::Value =
                serde_saphyr::from_str_with_options(&text, options)
                    .with_context(|| format!("{} is not YAML or JSON", file.display()))?;
            show(&client.put_tool(&name, &declaration).await?);
        }
        ToolCommand::Get { name } => match format {
            Output::Json => output::json(&tool_json(&client.get_tool(&name).await?)),
            Output::Table => {
                let t = client.get_tool(&name).await?;
                let declaration: serde_json::Value =
                    serde_json::from_str(&t.declaration_json).unwrap_or_default();
                println!("{}", serde_json::to_string_pretty(&declaration)?);
            }
        },
        ToolCommand::Ls { limit, page_token } => {
            let page = client.list_tools(limit, &page_token).await?;
            match format {
                Output::Json => output::json(&serde_json::json!({
                    "tools": page.tools.iter().map(tool_json).collect::<Vec<_>>(),
                    "next_page_token": page.next_page_token,
                })),
                Output::Table => {
                    let rows = (page.tools.iter())
                        .map(|t| vec![t.name.clone(), t.kind.clone(), when(t.updated_at_ms)])
                        .collect();
                    table(&["name", "kind", "updated"], rows);
                    if !page.next_page_token.is_empty() {
                        eprintln!("more: --page-token {:?}", page.next_page_token);
                    }
                }
            }
        }
        ToolCommand::Rm { name } => show(&client.delete_tool(&name).await?),
    }
    Ok(())
}

pub async fn memory(target: &Target, format: Output, command: MemoryCommand) -> Result<()> {
    let client = target.connect().await?;
    let entry_json = |e: &pb::MemoryEntry| {
        serde_json::json!({
            "value": serde_json::from_str::<serde_json::Value>(&e.value_json).unwrap_or_default(),
            "run_id": e.run_id, "step_id": e.step_id, "at_ms": e.at_ms,
            "expires_at_ms": e.expires_at_ms,
        })
    };
    match command {
        MemoryCommand::Ls {
            scope,
            limit,
            page_token,
        } => {
            let page = client
                .list_memory(pb::ListMemoryRequest {
                    scope: scope.unwrap_or_default(),
                    page_size: limit,
                    page_token,
                })
                .await?;
            match format {
                Output::Json => output::json(&serde_json::json!({
                    "keys": page.keys.iter().map(|k| serde_json::json!({
                        "scope": k.scope, "key": k.key, "entries": k.entries,
                        "updated_at_ms": k.updated_at_ms,
                    })).collect::<Vec<_>>(),
                    "next_page_token": page.next_page_token,
                })),
                Output::Table => {
                    let rows = page
                        .keys
                        .iter()
                        .map(|k| {
                            vec![
                                k.scope.clone(),
                                k.key.clone(),
                                k.entries.to_string(),
                                when(k.updated_at_ms),
                            ]
                        })
                        .collect();
                    table(&["scope", "key", "entries", "updated"], rows);
                    if !page.next_page_token.is_empty() {
                        eprintln!("more: --page-token {:?}", page.next_page_token);
                    }
                }
            }
        }
        MemoryCommand::Get {
            scope,
            entry_key: key,
            last,
        } => {
            let entries = client.get_memory(&scope, &key, last).await?;
            match format {
                Output::Json => output::json(&serde_json::json!({
                    "entries": entries.iter().map(entry_json).collect::<Vec<_>>(),
                })),
                Output::Table => {
                    let rows = entries
                        .iter()
                        .map(|e| {
                            let from = if e.run_id.is_empty() {
                                "(put)".to_owned()
                            } else {
                                format!("{}/{}", e.run_id, e.step_id)
                            };
                            vec![when(e.at_ms), from, e.value_json.clone()]
                        })
                        .collect();
                    table(&["at", "from", "value"], rows);
                }
            }
        }
        MemoryCommand::Put {
            scope,
            entry_key: key,
            value,
            ttl,
        } => {
            let value = serde_json::from_str(&value).unwrap_or(serde_json::Value::String(value));
            let put = client.put_memory(&scope, &key, &value, ttl).await?;
            match format {
                Output::Json => output::json(&entry_json(&put)),
                Output::Table => eprintln!("remembered under {scope} {key}"),
            }
        }
        MemoryCommand::Rm {
            scope,
            entry_key: key,
        } => {
            let deleted = client.delete_memory(&scope, &key).await?;
            match format {
                Output::Json => output::json(&serde_json::json!({ "deleted": deleted })),
                Output::Table => eprintln!("{deleted} entries of {scope} {key} deleted"),
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Audit rows, newest first.
    Ls {
        /// Only this actor (`token:NAME (ID)`).
        #[arg(long)]
        actor: Option<String>,
        /// allowed or denied.
        #[arg(long)]
        decision: Option<String>,
        /// Only this method (`/mesh.v1.GoalService/SubmitGoal`).
        #[arg(long)]
        method: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
}

fn when(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms as u64))
        .to_string()
}

fn token_row(t: &pb::Token) -> Vec<String> {
    vec![
        t.token_id.clone(),
        t.name.clone(),
        t.namespace.clone(),
        t.role.clone(),
        when(t.created_at_ms),
        when(t.expires_at_ms),
        when(t.revoked_at_ms),
    ]
}

const TOKEN_HEADERS: [&str; 7] = [
    "id",
    "name",
    "namespace",
    "role",
    "created",
    "expires",
    "revoked",
];

pub async fn token(target: &Target, format: Output, command: TokenCommand) -> Result<()> {
    let client = target.connect().await?;
    match command {
        TokenCommand::Create {
            for_namespace,
            role,
            ttl,
            name,
        } => {
            let ns = for_namespace.unwrap_or_default();
            let made = client.create_token(&name, &ns, &role, ttl).await?;
            let token = made.token.unwrap_or_default();
            match format {
                Output::Json => output::json(&serde_json::json!({
                    "token_id": token.token_id, "namespace": token.namespace,
                    "role": token.role, "secret": made.secret,
                })),
                Output::Table => {
                    eprintln!(
                        "token {} ({} in {}): shown once, keep it now",
                        token.token_id, token.role, token.namespace
                    );
                    println!("{}", made.secret);
                }
            }
        }
        TokenCommand::Ls { limit, page_token } => {
            let page = client.list_tokens(limit, &page_token).await?;
            match format {
                Output::Json => output::json(&serde_json::json!({
                    "tokens": page.tokens.iter().map(|t| serde_json::json!({
                        "token_id": t.token_id, "name": t.name, "namespace": t.namespace,
                        "role": t.role, "created_at_ms": t.created_at_ms,
                        "expires_at_ms": t.expires_at_ms, "revoked_at_ms": t.revoked_at_ms,
                    })).collect::<Vec<_>>(),
                    "next_page_token": page.next_page_token,
                })),
                Output::Table => {
                    table(&TOKEN_HEADERS, page.tokens.iter().map(token_row).collect());
                    if !page.next_page_token.is_empty() {
                        eprintln!("more: --page-token {}", page.next_page_token);
                    }
                }
            }
        }
        TokenCommand::Revoke { token_id } => {
            let t = client.revoke_token(&token_id).await?;
            match format {
                Output::Json => output::json(&serde_json::json!({
                    "token_id": t.token_id, "revoked_at_ms": t.revoked_at_ms,
                })),
                Output::Table => table(&TOKEN_HEADERS, vec![token_row(&t)]),
            }
        }
    }
    Ok(())
}

/// A secret's value from stdin, without its last newline; bounded.
fn read_value() -> Result<Vec<u8>> {
    use std::io::Read;
    let limit = mesh_proto::secrets::MAX_VALUE;
    let mut value = Vec::new();
    std::io::stdin()
        .take(limit as u64 + 2)
        .read_to_end(&mut value)?;
    if value.last() == Some(&b'\n') {
        value.pop();
        if value.last() == Some(&b'\r') {
            value.pop();
        }
    }
    if value.len() > limit {
        anyhow::bail!("the value on stdin is over the limit of {limit} bytes");
    }
    Ok(value)
}

pub async fn secret(target: &Target, format: Output, command: SecretCommand) -> Result<()> {
    let row =
        |s: &pb::SecretInfo| vec![s.name.clone(), when(s.created_at_ms), when(s.updated_at_ms)];
    const HEADERS: [&str; 3] = ["name", "created", "updated"];
    let json = |s: &pb::SecretInfo| {
        serde_json::json!({
            "name": s.name, "created_at_ms": s.created_at_ms, "updated_at_ms": s.updated_at_ms,
        })
    };
    match command {
        SecretCommand::Set { namespace, name } => {
            let value = read_value()?;
            let client = target.connect_in(&namespace).await?;
            let set = client.set_secret(&name, &value).await?;
            match format {
                Output::Json => output::json(&json(&set)),
                Output::Table => eprintln!("secret {} set in namespace {namespace}", set.name),
            }
        }
        SecretCommand::Ls {
            namespace,
            limit,
            page_token,
        } => {
            let client = target.connect_in(&namespace).await?;
            let page = client.list_secrets(limit, &page_token).await?;
            match format {
                Output::Json => output::json(&serde_json::json!({
                    "secrets": page.secrets.iter().map(json).collect::<Vec<_>>(),
                    "next_page_token": page.next_page_token,
                })),
                Output::Table => {
                    table(&HEADERS, page.secrets.iter().map(row).collect());
                    if !page.next_page_token.is_empty() {
                        eprintln!("more: --page-token {}", page.next_page_token);
                    }
                }
            }
        }
        SecretCommand::Rm { namespace, name } => {
            let client = target.connect_in(&namespace).await?;
            client.delete_secret(&name).await?;
            if matches!(format, Output::Table) {
                eprintln!("secret {name} deleted from namespace {namespace}");
            } else {
                output::json(&serde_json::json!({ "name": name, "deleted": true }));
            }
        }
        SecretCommand::Key { file } => {
            if file.exists() {
                anyhow::bail!(
                    "{} exists: a new key would not open the secrets sealed with it",
                    file.display()
                );
            }
            mesh_coordinator::secrets::ensure_key_file(&file)?;
            eprintln!(
                "a new secrets key is in {} (readable by you only): set secrets.key_file to it",
                file.display()
            );
        }
    }
    Ok(())
}

pub async fn audit(target: &Target, format: Output, command: AuditCommand) -> Result<()> {
    let client = target.connect().await?;
    let AuditCommand::Ls {
        actor,
        decision,
        method,
        limit,
        page_token,
    } = command;
    let page = client
        .list_audit(pb::ListAuditRequest {
            actor: actor.unwrap_or_default(),
            decision: decision.unwrap_or_default(),
            method: method.unwrap_or_default(),
            page_size: limit,
            page_token,
        })
        .await?;
    match format {
        Output::Json => output::json(&serde_json::json!({
            "rows": page.rows.iter().map(|r| serde_json::json!({
                "seq": r.seq, "at_ms": r.at_ms, "actor": r.actor, "namespace": r.namespace,
                "method": r.method, "resource": r.resource, "decision": r.decision,
                "reason": r.reason, "peer": r.peer,
            })).collect::<Vec<_>>(),
            "next_page_token": page.next_page_token,
        })),
        Output::Table => {
            let rows = page
                .rows
                .iter()
                .map(|r| {
                    vec![
                        r.seq.to_string(),
                        when(r.at_ms),
                        r.actor.clone(),
                        r.namespace.clone(),
                        r.method.rsplit('/').next().unwrap_or_default().to_owned(),
                        r.resource.clone(),
                        r.decision.clone(),
                        r.reason.clone(),
                    ]
                })
                .collect();
            table(
                &[
                    "seq",
                    "at",
                    "actor",
                    "namespace",
                    "method",
                    "resource",
                    "decision",
                    "reason",
                ],
                rows,
            );
            if !page.next_page_token.is_empty() {
                eprintln!("more: --page-token {}", page.next_page_token);
            }
        }
    }
    Ok(())
}
