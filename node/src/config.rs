//! The node's TOML configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_agent_sdk::RuntimeConfig;
use mesh_agent_sdk::llm::{
    LlmConfig, ModelRef, Price, Prices, ProviderConfig, RateLimit, check_limit,
};
use serde::{Deserialize, Serialize};

use crate::Error;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Coordinator gRPC address.
    pub coordinator: String,
    /// This node's stable name (its node id).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Where to serve `/metrics`; none when absent.
    pub http_listen: Option<SocketAddr>,
    /// Append one JSON line per attempt started by a built-in agent (for audits and tests).
    pub execution_log: Option<PathBuf>,
    /// How long a drain waits for in-flight attempts.
    #[serde(with = "humantime_serde")]
    pub drain_grace: Duration,
    /// Reconnect backoff bounds.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// How long the coordinator may leave the stream's HTTP/2 pings unanswered before the node
    /// leaves it and tries the next address (a paused or cut-off coordinator).
    #[serde(with = "humantime_serde")]
    pub coordinator_silence: Duration,
    pub agents: Vec<AgentConfig>,
    /// Model providers for `llm` agents, over what the environment says.
    pub llm: NodeLlmConfig,
    /// MCP servers the `llm` agent's steps may use as tools, by name (`docs/tools.md`).
    pub mcp: BTreeMap<String, McpServerConfig>,
    /// The sandbox of `code` agents and tools (`docs/tools.md`).
    pub sandbox: crate::sandbox::SandboxConfig,
    /// A file holding a `worker` token, for a coordinator with authentication on; `mesh
    /// node` reads `MESH_TOKEN` when this is absent.
    pub token_file: Option<PathBuf>,
    /// TLS to an `https://` coordinator: `ca_file`, and `cert_file` + `key_file` for mutual
    /// TLS (the certificate must be for this node's `name`).
    pub tls: mesh_agent_sdk::TlsFiles,
    /// The namespaces this node serves: it gets the tasks of their runs only, and its token
    /// must hold the `worker` role in each (`MESH_NAMESPACE` for `mesh node` when empty;
    /// `default` else).
    pub namespaces: Vec<String>,
    /// The token itself (from `token_file` or the environment; not a configuration key).
    #[serde(skip)]
    pub token: Option<mesh_agent_sdk::llm::Secret>,
}

/// `[mcp.NAME]`: an MCP server, either a command the node starts for each attempt that uses
/// it (speaking MCP over stdio, with a clean environment: `PATH`, `HOME` and `env` only) or
/// the URL of a streamable HTTP server. Steps name servers; they cannot start commands of
/// their own.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    /// The program and its arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// Variables for the command, on top of `PATH` and `HOME`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A streamable HTTP server's endpoint (`http://host:port/mcp`).
    pub url: Option<String>,
    /// A bearer token for the HTTP server.
    pub bearer: Option<mesh_agent_sdk::llm::Secret>,
    /// The limit for starting the server and listing its tools, and for each call.
    #[serde(default = "default_mcp_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_mcp_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `[llm]`: per provider `base_url` and `api_key` (over `OPENAI_API_KEY` and the like), and
/// prices per model in USD per million tokens (over the vendored table).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeLlmConfig {
    pub openai: ProviderConfig,
    pub anthropic: ProviderConfig,
    pub gemini: ProviderConfig,
    pub ollama: ProviderConfig,
    pub prices: BTreeMap<String, PriceConfig>,
    /// Rate limits that wait, by provider (`openai`) or model (`openai/gpt-4o`).
    pub limits: BTreeMap<String, RateLimit>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    pub input_per_million: f64,
    pub output_per_million: f64,
}

impl NodeLlmConfig {
    pub fn providers(&self) -> LlmConfig {
        LlmConfig {
            openai: self.openai.clone(),
            anthropic: self.anthropic.clone(),
            gemini: self.gemini.clone(),
            ollama: self.ollama.clone(),
        }
    }

    /// The rate limits, checked.
    pub fn limits(&self) -> Result<std::collections::HashMap<String, RateLimit>, Error> {
        self.limits
            .iter()
            .map(|(name, limit)| {
                check_limit(name, limit).map_err(|e| Error::Config(format!("llm.limits.{e}")))?;
                Ok((name.clone(), *limit))
            })
            .collect()
    }

    pub fn prices(&self) -> Result<Prices, Error> {
        let mut table = std::collections::HashMap::new();
        for (name, p) in &self.prices {
            let model = ModelRef::parse(name)
                .map_err(|e| Error::Config(format!("llm.prices.\"{name}\": {e}")))?;
            if !(p.input_per_million >= 0.0 && p.output_per_million >= 0.0) {
                return Err(Error::Config(format!(
                    "llm.prices.\"{name}\": prices must be numbers of USD, 0 or more"
                )));
            }
            table.insert(
                model.to_string(),
                Price::per_million(p.input_per_million, p.output_per_million),
            );
        }
        Ok(Prices::new(table))
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        let rt = RuntimeConfig::default();
        Self {
            coordinator: rt.coordinator,
            name: rt.name,
            labels: BTreeMap::new(),
            http_listen: None,
            execution_log: None,
            drain_grace: rt.drain_grace,
            reconnect_min: rt.reconnect_min,
            reconnect_max: rt.reconnect_max,
            coordinator_silence: rt.coordinator_silence,
            agents: vec![
                AgentConfig::of(BuiltinKind::Echo),
                AgentConfig::of(BuiltinKind::Sleep),
                AgentConfig::of(BuiltinKind::Flaky),
            ],
            llm: NodeLlmConfig::default(),
            mcp: BTreeMap::new(),
            sandbox: crate::sandbox::SandboxConfig::default(),
            token_file: None,
            tls: mesh_agent_sdk::TlsFiles::default(),
            namespaces: Vec::new(),
            token: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuiltinKind {
    Echo,
    Sleep,
    Flaky,
    /// Calls a language model (see `docs/llm.md`).
    Llm,
    /// Serves `plan`: a model writes a text goal's workflow (`model` names it).
    LlmPlanner,
    /// Runs Python or shell in a sandbox (see `docs/tools.md`).
    Code,
}

impl BuiltinKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BuiltinKind::Echo => "echo",
            BuiltinKind::Sleep => "sleep",
            BuiltinKind::Flaky => "flaky",
            BuiltinKind::Llm => "llm",
            BuiltinKind::LlmPlanner => "plan",
            BuiltinKind::Code => "code",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlakyMode {
    /// Fail with a retryable error.
    #[default]
    Error,
    /// Panic inside the handler (the agent actor is restarted).
    Panic,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub kind: BuiltinKind,
    /// Agent name; defaults to the kind.
    #[serde(default)]
    pub name: Option<String>,
    /// Skills; default to the kind.
    #[serde(default)]
    pub skills: Vec<String>,
    #[serde(default = "default_concurrency")]
    pub max_concurrency: u32,
    /// `flaky` only: attempts of each step that fail before one succeeds.
    #[serde(default = "default_fail_first")]
    pub fail_first: u32,
    /// `flaky` only.
    #[serde(default)]
    pub mode: FlakyMode,
    /// `llm_planner` only: the model (`provider/model`, or a chain) that writes workflows.
    #[serde(default)]
    pub models: Vec<String>,
}

fn default_concurrency() -> u32 {
    64
}

fn default_fail_first() -> u32 {
    1
}

impl AgentConfig {
    pub fn of(kind: BuiltinKind) -> Self {
        Self {
            kind,
            name: None,
            skills: Vec::new(),
            max_concurrency: default_concurrency(),
            fail_first: default_fail_first(),
            mode: FlakyMode::Error,
            models: Vec::new(),
        }
    }

    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.kind.as_str().to_owned())
    }

    pub fn skills(&self) -> Vec<String> {
        if self.skills.is_empty() {
            vec![self.kind.as_str().to_owned()]
        } else {
            self.skills.clone()
        }
    }
}

impl NodeConfig {
    /// Reads a TOML file; unknown fields are errors.
    pub fn from_file(path: &std::path::Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    pub fn validate(&self) -> Result<(), Error> {
        if self.coordinator_silence < Duration::from_millis(500) {
            return Err(Error::Config(format!(
                "coordinator_silence: {:?} is too short to tell a busy coordinator from a gone one (at least 500ms)",
                self.coordinator_silence
            )));
        }
        for (name, server) in &self.mcp {
            match (server.command.is_empty(), &server.url) {
                (false, None) | (true, Some(_)) => {}
                _ => {
                    return Err(Error::Config(format!(
                        "mcp.{name}: give `command` (a stdio server) or `url` (streamable HTTP), one of them"
                    )));
                }
            }
            if server.timeout.is_zero() {
                return Err(Error::Config(format!(
                    "mcp.{name}.timeout: must be above 0"
                )));
            }
        }
        if self.agents.is_empty() {
            return Err(Error::Config(
                "agents: a node needs at least one agent".into(),
            ));
        }
        for (i, a) in self.agents.iter().enumerate() {
            if a.max_concurrency == 0 {
                return Err(Error::Config(format!(
                    "agents[{i}].max_concurrency: must be at least 1"
                )));
            }
            match (a.kind, a.models.is_empty()) {
                (BuiltinKind::LlmPlanner, true) => {
                    return Err(Error::Config(format!(
                        "agents[{i}].models: an llm_planner needs the model that writes workflows"
                    )));
                }
                (BuiltinKind::LlmPlanner, false) => {
                    mesh_agent_sdk::llm::parse_models(&a.models)
                        .map_err(|e| Error::Config(format!("agents[{i}].models: {e}")))?;
                }
                (_, false) => {
                    return Err(Error::Config(format!(
                        "agents[{i}]: `models` applies to `llm_planner` agents only"
                    )));
                }
                (_, true) => {}
            }
            if a.kind != BuiltinKind::Flaky
                && (a.mode != FlakyMode::Error || a.fail_first != default_fail_first())
            {
                return Err(Error::Config(format!(
                    "agents[{i}]: `fail_first` and `mode` apply to `flaky` agents only"
                )));
            }
        }
        Ok(())
    }

    pub fn runtime_config(&self) -> RuntimeConfig {
        RuntimeConfig {
            coordinator: self.coordinator.clone(),
            name: self.name.clone(),
            labels: self.labels.clone(),
            drain_grace: self.drain_grace,
            reconnect_min: self.reconnect_min,
            reconnect_max: self.reconnect_max,
            coordinator_silence: self.coordinator_silence,
            token: self.token.clone(),
            namespaces: self.namespaces.clone(),
            tls: self.tls.clone(),
            ..RuntimeConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llm_settings_are_checked_naming_the_field() {
        let cfg: NodeConfig = toml::from_str(
            r#"
            [llm.openai]
            base_url = "http://127.0.0.1:9/v1/"
            api_key = "sk-x"
            [llm.limits.openai]
            requests_per_minute = 60
            [llm.limits."anthropic/claude-haiku-4-5"]
            tokens_per_minute = 10000
            [llm.prices."ollama/llama3.2"]
            input_per_million = 0.0
            output_per_million = 0.0
            "#,
        )
        .unwrap();
        assert_eq!(cfg.llm.limits().unwrap().len(), 2);
        assert!(cfg.llm.prices().is_ok());
        assert!(!format!("{cfg:?}").contains("sk-x"), "the key never prints");
        let bad: NodeConfig =
            toml::from_str("[llm.limits.azure]\nrequests_per_minute = 1").unwrap();
        let e = bad.llm.limits().unwrap_err().to_string();
        assert!(e.contains("llm.limits.`azure`"), "{e}");
        let bad: NodeConfig = toml::from_str(
            "[llm.prices.\"gpt-4o\"]\ninput_per_million = 1.0\noutput_per_million = 1.0",
        )
        .unwrap();
        let e = bad.llm.prices().unwrap_err().to_string();
        assert!(e.contains("llm.prices.\"gpt-4o\""), "{e}");
    }

    #[test]
    fn parses_a_node_file_and_rejects_unknown_fields() {
        let cfg: NodeConfig = toml::from_str(
            r#"
            coordinator = "http://127.0.0.1:7700"
            name = "n1"
            drain_grace = "10s"
            [labels]
            zone = "a"
            [[agents]]
            kind = "sleep"
            max_concurrency = 20
            [[agents]]
            kind = "flaky"
            name = "crashy"
            fail_first = 2
            mode = "panic"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.drain_grace, Duration::from_secs(10));
        assert_eq!(cfg.agents[1].name(), "crashy");
        assert_eq!(cfg.agents[1].skills(), ["flaky"]);
        cfg.validate().unwrap();
        let err = toml::from_str::<NodeConfig>("nmae = \"x\"").unwrap_err();
        assert!(err.to_string().contains("nmae"), "{err}");
        let bad: NodeConfig =
            toml::from_str("[[agents]]\nkind = \"echo\"\nmode = \"panic\"").unwrap();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("agents[0]")
        );
        let quiet: NodeConfig = toml::from_str("coordinator_silence = \"2s\"").unwrap();
        assert_eq!(
            quiet.runtime_config().coordinator_silence,
            Duration::from_secs(2)
        );
        let hasty: NodeConfig = toml::from_str("coordinator_silence = \"10ms\"").unwrap();
        let err = hasty.validate().unwrap_err().to_string();
        assert!(err.contains("coordinator_silence"), "{err}");
    }
}
