//! MCP servers as tools of the `llm` agent, through the official Rust SDK (`rmcp`): a server the
//! node's configuration names is connected for an attempt that uses it (a child process over
//! stdio, or a streamable HTTP endpoint), its tools are listed and offered to the model, calls
//! go to it, and the connection is closed (the child process ended) when the attempt ends.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use rmcp::model::{CallToolRequestParams, ContentBlock};
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::Value;

use crate::config::McpServerConfig;
use crate::tools::Outcome;

/// The MCP servers of a node, by name.
pub type Servers = BTreeMap<String, McpServerConfig>;

/// Most bytes of a call's result given to the model.
const MAX_RESULT_BYTES: usize = 256 * 1024;

/// One attempt's connection to one server.
pub struct Session {
    pub server: String,
    client: RunningService<RoleClient, ()>,
    timeout: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("server", &self.server)
            .finish()
    }
}

/// Connects to the server `name` and lists its tools, within `left` and the server's own
/// timeout; what went wrong, said for the step's error.
pub async fn connect(
    name: &str,
    config: &McpServerConfig,
    left: Duration,
) -> Result<(Session, Vec<rmcp::model::Tool>), String> {
    let limit = config.timeout.min(left);
    let work = async {
        let client = match &config.url {
            Some(url) => {
                let mut settings = StreamableHttpClientTransportConfig::with_uri(url.as_str());
                if let Some(bearer) = &config.bearer {
                    settings = settings.auth_header(bearer.expose());
                }
                let transport = StreamableHttpClientTransport::from_config(settings);
                ().serve(transport)
                    .await
                    .map_err(|e| format!("cannot start a session: {e}"))?
            }
            None => {
                let (program, args) = config
                    .command
                    .split_first()
                    .ok_or_else(|| "no command".to_owned())?;
                let mut command = tokio::process::Command::new(program);
                // A clean environment: the node's keys are not the server's business.
                command.args(args).env_clear();
                for var in ["PATH", "HOME"] {
                    if let Some(v) = std::env::var_os(var) {
                        command.env(var, v);
                    }
                }
                command.envs(&config.env).kill_on_drop(true);
                let (transport, _) = TokioChildProcess::builder(command)
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| format!("cannot start `{program}`: {e}"))?;
                ().serve(transport)
                    .await
                    .map_err(|e| format!("the server did not start a session: {e}"))?
            }
        };
        let tools = client
            .list_all_tools()
            .await
            .map_err(|e| format!("listing its tools failed: {e}"))?;
        Ok::<_, String>((client, tools))
    };
    let (client, tools) = tokio::time::timeout(limit, work)
        .await
        .map_err(|_| format!("no answer within {limit:?}"))??;
    Ok((
        Session {
            server: name.to_owned(),
            client,
            timeout: config.timeout,
        },
        tools,
    ))
}

impl Session {
    /// Calls the server's tool `tool`; an error result, a failure or a timeout is an error
    /// outcome for the model.
    pub async fn call(&self, tool: &str, arguments: &Value, left: Duration) -> Outcome {
        let mut params = CallToolRequestParams::new(tool.to_owned());
        if let Value::Object(args) = arguments {
            params = params.with_arguments(args.clone());
        }
        let limit = self.timeout.min(left);
        let result = match tokio::time::timeout(limit, self.client.call_tool(params)).await {
            Err(_) => return Outcome::error(format!("no answer within {limit:?}")),
            Ok(Err(e)) => return Outcome::error(format!("the call failed: {e}")),
            Ok(Ok(result)) => result,
        };
        let mut text: String = result
            .content
            .iter()
            .filter_map(|block| match block {
                ContentBlock::Text(t) => Some(t.text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n");
        if text.is_empty()
            && let Some(structured) = &result.structured_content
        {
            text = structured.to_string();
        }
        if let Some((i, _)) = text.char_indices().nth(MAX_RESULT_BYTES) {
            text.truncate(i);
            text.push_str(&format!("\n[result cut at {MAX_RESULT_BYTES} characters]"));
        }
        if result.is_error == Some(true) {
            Outcome::error(text)
        } else {
            Outcome::ok(text)
        }
    }

    /// Ends the session (and its child process), waiting a second at most.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.close()).await;
    }
}
