//! What the service stores and serves: task definitions, runs, triggers (plain serde data).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A stored task, as created over the API (`az acr task create` in spirit).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct TaskSpec {
    pub name: String,
    /// Path of the task file inside the context (default `acb.yaml`) unless `task_yaml`.
    pub file: Option<String>,
    /// The task file's text, inline.
    #[serde(alias = "task_yaml")]
    pub task_yaml: Option<String>,
    /// A local directory (absolute path) or a git URL.
    pub context: String,
    /// Branch of a git context (and the branch a commit trigger listens to); default `main`.
    pub branch: Option<String>,
    /// Values file text (YAML) for `{{.Values.x}}`.
    pub values: Option<String>,
    /// `key=value` overrides applied after `values`, in order.
    pub set: Vec<String>,
    /// Secret references, name -> `env:VAR` or `file:/path`, resolved on the server when a
    /// run starts (values are never stored).
    pub secrets: BTreeMap<String, String>,
    /// Logins for other registries its runs pull from or push to, by login server
    /// (`az acr task credential`); the password is a secret reference.
    pub credentials: BTreeMap<String, TaskCredential>,
    pub triggers: Triggers,
    /// Whole-run timeout in seconds (default 3600, as ACR).
    pub timeout: Option<u64>,
    /// Target platform `os/arch[/variant]` of every build and container of its runs.
    pub platform: Option<String>,
    /// A secret reference (`env:VAR`, `file:/path`) to a PEM private key: its runs' push
    /// steps sign what they push (cosign's format), resolved when a run starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
    /// The agent pool its runs go to (`acr-task agent --pool NAME`); none: the server runs
    /// them itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_pool: Option<String>,
}

/// A task's login for one registry: a user name (plain, or a secret reference) and a
/// password secret reference (`env:VAR`, `file:/path`), resolved when a run starts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskCredential {
    pub username: String,
    pub password: String,
}

pub const DEFAULT_TIMEOUT_SECS: u64 = 3600;
pub const DEFAULT_BRANCH: &str = "main";
pub const DEFAULT_FILE: &str = "acb.yaml";

impl TaskSpec {
    /// The stored platform, parsed (checked when the task was stored; normalized here,
    /// `linux` → `linux/amd64`).
    pub fn target_platform(&self) -> Option<crate::task::Platform> {
        self.platform.as_deref().and_then(|p| p.parse().ok())
    }
    pub fn branch(&self) -> &str {
        self.branch.as_deref().unwrap_or(DEFAULT_BRANCH)
    }
    pub fn timeout_secs(&self) -> u64 {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS)
    }
    /// Whether the context is a git URL (else a local directory).
    pub fn is_git(&self) -> bool {
        crate::source::is_git_url(&self.context)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Triggers {
    /// Git commit trigger (webhooks; polling for git contexts; ref watch for local repos).
    pub commit: Option<CommitTrigger>,
    /// Rebuild when a base image of an image this task builds changes in our registry.
    #[serde(alias = "base_image")]
    pub base_image: bool,
    pub timers: Vec<TimerTrigger>,
}

impl Default for Triggers {
    fn default() -> Triggers {
        Triggers {
            commit: None,
            base_image: true,
            timers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct CommitTrigger {
    /// Shared secret of the webhooks (HMAC key, or GitLab's token). Webhooks are refused
    /// when it is absent.
    pub secret: Option<String>,
    /// Poll the remote branch every this many seconds (git contexts).
    #[serde(alias = "poll_interval")]
    pub poll_interval: Option<u64>,
    /// Watch the local repository's refs (local contexts inside a git checkout).
    pub watch: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimerTrigger {
    pub name: String,
    /// Standard 5-field cron expression, UTC.
    pub schedule: String,
}

/// Why a run exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum Trigger {
    Manual,
    /// `acr-task run --no-wait`: a task file run once, with no stored task.
    Quick,
    Commit {
        /// `github`, `gitlab`, `gitea`, `generic`, `poll` or `watch`.
        source: String,
        delivery: Option<String>,
        commit: String,
        branch: String,
    },
    BaseImage {
        image: String,
        #[serde(alias = "old_digest")]
        old_digest: Option<String>,
        #[serde(alias = "new_digest")]
        new_digest: String,
    },
    Timer {
        name: String,
        schedule: String,
        /// The schedule's time this run is for (RFC 3339; the latest one missed, when
        /// several passed while no server looked).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        due: Option<String>,
    },
}

impl Trigger {
    /// The kind's name, as the API's `kind` field spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::Quick => "quick",
            Trigger::Commit { .. } => "commit",
            Trigger::BaseImage { .. } => "base_image",
            Trigger::Timer { .. } => "timer",
        }
    }
}

/// A run as stored and served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    pub id: String,
    pub seq: i64,
    pub task: String,
    pub status: crate::exec::Status,
    pub trigger: Trigger,
    /// The commit to build (git contexts), or the commit built once known.
    pub commit: Option<String>,
    pub branch: Option<String>,
    pub queued_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    /// The executor's `RunReport` (steps, images pushed, base images) once finished.
    pub report: Option<crate::exec::RunReport>,
    /// The agent pool it waits for or runs in (none: the server runs it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The agent that holds (or last held) it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Which attempt this is: a run whose agent stopped heartbeating is handed to
    /// another agent as the next attempt.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
}

fn first_attempt() -> u32 {
    1
}

impl RunRecord {
    pub fn is_finished(&self) -> bool {
        self.status.is_final()
    }
}
