//! The task-file model: the `acb.yaml` dialect of ACR Tasks, as plain data.
//! Field names, types and defaults follow Azure/acr-builder (`graph/step.go`, `graph/task.go`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default per-step timeout in seconds (acr-builder `defaultStepTimeoutInSeconds`).
pub const DEFAULT_STEP_TIMEOUT: u64 = 600;
/// Default timeout for the whole task in seconds (acr-builder `defaultTotalTimeoutInSeconds`).
pub const DEFAULT_TOTAL_TIMEOUT: u64 = 3600;
/// Default task-file version.
pub const DEFAULT_VERSION: &str = "v1.0.0";
/// Prefix of generated step ids: `acb_step_0`, `acb_step_1`, ...
pub const STEP_ID_PREFIX: &str = "acb_step_";
/// The `when` entry that means "start immediately".
pub const IMMEDIATE: &str = "-";
/// Name of the default network ACR creates for each run.
pub const DEFAULT_NETWORK: &str = "acb_default_network";
/// The directory where the build context is mounted in every `cmd` step.
pub const WORKSPACE: &str = "/workspace";

fn default_version() -> String {
    DEFAULT_VERSION.to_string()
}
fn default_step_timeout() -> u64 {
    DEFAULT_STEP_TIMEOUT
}
fn default_total_timeout() -> u64 {
    DEFAULT_TOTAL_TIMEOUT
}

/// An ACR Tasks multi-step task file (`acb.yaml`). After `task::load*` every step has an id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Task {
    /// Task-file version: `v1.0.0` or `v1.1.0`.
    #[serde(default = "default_version")]
    pub version: String,
    /// User-defined aliases (`$name` replacements) and the directive character.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<Alias>,
    /// Default timeout of each step, in seconds.
    #[serde(default = "default_step_timeout")]
    pub step_timeout: u64,
    /// Timeout of the whole task, in seconds.
    #[serde(default = "default_total_timeout")]
    pub total_timeout: u64,
    /// Default working directory of every step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_directory: Option<String>,
    /// Environment (`KEY=value`) given to every step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Secrets resolved before the run (Key Vault references in ACR).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<Secret>,
    /// Docker networks the run creates or joins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<Network>,
    /// Volumes (with secret files) the run creates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// The steps, in file order (none is valid: nothing runs).
    #[serde(default)]
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Alias {
    /// The character that starts an alias; `$` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directive: Option<String>,
    /// Alias name to replacement text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Secret {
    /// Name the secret is referred to by (`{{.Secrets.id}}`).
    pub id: String,
    /// Azure Key Vault secret URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyvault: Option<String>,
    /// Client id of the managed identity that reads the secret.
    #[serde(default, rename = "clientID", skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Network {
    pub name: String,
    /// Docker network driver, e.g. `bridge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Enable IPv6 on the network.
    #[serde(default)]
    pub ipv6: bool,
    /// Join an existing network instead of creating it.
    #[serde(default)]
    pub skip_creation: bool,
    /// Steps without `network` join this one.
    #[serde(default)]
    pub is_default: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Volume {
    pub name: String,
    /// File name to content (base64 in ACR) written into the volume.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeMount {
    /// A volume declared under `volumes`.
    pub name: String,
    /// Absolute path inside the container.
    pub mount_path: String,
}

/// One step. Exactly one of `build`, `cmd`, `push` is set.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Step {
    /// Step id; generated as `acb_step_N` (N = index in the file) when absent.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// `docker build` arguments, e.g. `-t $Registry/app:$ID -f Dockerfile .`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// An image followed by its arguments, e.g. `busybox echo hello`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    /// Images to push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<Vec<String>>,
    /// Ids this step waits for; `["-"]` starts at once; absent waits for the previous step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Vec<String>>,
    /// Run the container in the background; later steps do not wait for it to exit.
    #[serde(default)]
    pub detach: bool,
    /// Override the image's entry point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    /// Environment (`KEY=value`) for this step; wins over the task's `env`.
    pub env: Vec<String>,
    /// Container ports to expose (`docker run --expose`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    /// Port mappings (`host:container`, as `docker run -p`).
    pub ports: Vec<String>,
    /// Keep a detached container running after the task ends.
    #[serde(default)]
    pub keep: bool,
    /// Seconds to wait before starting.
    #[serde(default)]
    pub start_delay: u64,
    /// Step timeout in seconds; the task's `stepTimeout` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    #[serde(default)]
    /// Times to retry the step after a failure.
    pub retries: u32,
    /// Seconds between retries.
    #[serde(default)]
    pub retry_delay: u64,
    /// Run the step this many extra times after the first.
    #[serde(default)]
    pub repeat: u32,
    #[serde(default)]
    /// The task carries on (and succeeds) even if this step fails.
    pub ignore_errors: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Container isolation (`default`, `process`, `hyperv`; Windows only).
    pub isolation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Network to join: one under `networks`, or `host`, `none`, `bridge`, `default`.
    pub network: Option<String>,
    #[serde(default)]
    /// Run the container privileged.
    pub privileged: bool,
    /// Always pull the image before running.
    #[serde(default)]
    pub pull: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// User (name or uid[:gid]) to run as.
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Working directory inside the container; the task's `workingDirectory` when absent.
    pub working_directory: Option<String>,
    /// Keep the image's own working directory instead of the default one.
    #[serde(default)]
    pub disable_working_directory_override: bool,
    /// `enabled` (default) or `disabled`: build cache for `build` steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    /// Volumes (declared under `volumes`) to mount; `cmd` steps only.
    pub volume_mounts: Vec<VolumeMount>,
    /// The step succeeds only if it exits with one of these codes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exited_with: Vec<i64>,
    /// The step succeeds only if it exits with none of these codes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exited_without: Vec<i64>,
    /// Times to retry pulling a `cmd` step's image (`pull: true`); acb's
    /// `cmdDownloadRetries` (its docs say `downloadRetries`, which it ignores).
    #[serde(default)]
    pub cmd_download_retries: u32,
    /// Seconds between those retries.
    #[serde(default)]
    pub cmd_download_retry_delay: u64,
    /// CPUs the container may use (`docker run --cpus`), e.g. `1.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<String>,
    /// Retry a failed attempt only when its output contains one of these texts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on_errors: Vec<String>,
}

/// What a step does; derived from the exactly-one-of fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind<'a> {
    Build(&'a str),
    Cmd(&'a str),
    Push(&'a [String]),
}

impl Step {
    /// The step's action. Validated tasks always have exactly one; `None` only on raw input.
    pub fn kind(&self) -> Option<StepKind<'_>> {
        match (&self.build, &self.cmd, &self.push) {
            (Some(b), None, None) => Some(StepKind::Build(b)),
            (None, Some(c), None) => Some(StepKind::Cmd(c)),
            (None, None, Some(p)) => Some(StepKind::Push(p)),
            _ => None,
        }
    }

    /// The timeout that applies to this step in `task`.
    pub fn effective_timeout(&self, task: &Task) -> u64 {
        self.timeout.unwrap_or(task.step_timeout)
    }
}
