//! What tasks may do on this machine: the operator's sandbox policy.
//!
//! A stored task on a shared server is someone else's code run with the Docker Engine's
//! power, which is root's. The policy says what such tasks may ask for: privileged
//! containers, the host's network and namespaces, host paths and the Docker socket,
//! extra kernel privileges, other networks, host ports, which local directories may be
//! contexts and where `file:`/`env:` secrets may come from, and how much CPU, memory and
//! how many processes one step gets.
//!
//! It is checked in two places that agree because they share [`Policy::check_container`]:
//! - when a task is stored or a run starts ([`check_task`]): findings at their line and
//!   column in the task file, naming the rule;
//! - on every container and build handed to the engine ([`Policed`], a `Runtime` that
//!   wraps another): nothing the executor builds can get past it, and the step limits are
//!   applied there.
//!
//! `acr-task run` on one's own machine is [`Policy::permissive`] unless a policy is given;
//! `serve` starts from [`Policy::server_default`].

mod check;
mod paths;
mod runtime;

pub use check::{check_task, Violation};
pub use paths::PathError;
pub use runtime::Policed;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a task may ask for beyond an ordinary unprivileged container on its own network
/// (by default: nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Allow {
    /// `privileged: true`, or `--privileged` in `cmd`.
    pub privileged: bool,
    /// The host's network or namespaces (`network: host`, `--pid host`, `--ipc host`,
    /// `--uts host`, `--userns host`) or another container's (`container:NAME`).
    pub host_network: bool,
    /// `-v/--volume` in `cmd`: host paths, or docker volumes that outlive the run.
    pub mounts: bool,
    /// The Docker Engine's socket as a volume (root on the host): needs `mounts` too.
    pub docker_socket: bool,
    /// `--cap-add`, `--device`, `--security-opt` in `cmd`.
    pub extra_privileges: bool,
    /// Joining networks the run did not create (`skipCreation: true`, `network: bridge`).
    pub join_networks: bool,
    /// Publishing ports on the host (`ports:`, `-p`).
    pub publish_ports: bool,
}

impl Allow {
    fn everything() -> Allow {
        Allow {
            privileged: true,
            host_network: true,
            mounts: true,
            docker_socket: true,
            extra_privileges: true,
            join_networks: true,
            publish_ports: true,
        }
    }
}

/// Resources one step's container (or build) gets at most.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct StepLimits {
    /// CPUs (`1.5`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Memory, swap included (`4GiB`).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_size",
        deserialize_with = "de_size"
    )]
    pub memory: Option<u64>,
    /// Processes and threads at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<i64>,
}

fn ser_size<S: serde::Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(b) if b % (1 << 30) == 0 => s.serialize_str(&format!("{}GiB", b >> 30)),
        Some(b) if b % (1 << 20) == 0 => s.serialize_str(&format!("{}MiB", b >> 20)),
        Some(b) => s.serialize_u64(*b),
        None => s.serialize_none(),
    }
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Option::<Size>::deserialize(d)? {
        None => Ok(None),
        Some(Size::Bytes(b)) => Ok(Some(b)),
        Some(Size::Text(t)) => crate::task::args::parse_size(&t)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// The operator's policy for tasks on this machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Policy {
    pub allow: Allow,
    /// Directories local contexts (and `file://` git URLs) must be inside; `None`: any.
    /// The server's data directory is never allowed, whatever this says.
    pub context_roots: Option<Vec<PathBuf>>,
    /// Directories `file:` secrets must be inside; `None`: any. An empty list: none.
    pub secret_dirs: Option<Vec<PathBuf>>,
    /// Environment variables `env:` secrets may name (`*` at the end matches any rest);
    /// `None`: any.
    pub secret_env: Option<Vec<String>>,
    /// Largest `file:` secret, in bytes.
    #[serde(serialize_with = "ser_bytes", deserialize_with = "de_bytes")]
    pub secret_max_bytes: u64,
    pub step_limits: StepLimits,
    /// Paths no task may read in any way (the server's data directory); set by `serve`,
    /// not by the policy file.
    #[serde(skip)]
    pub protected: Vec<PathBuf>,
    /// Inside a protected path, where the server itself prepares contexts (git clones):
    /// the runtime may fill a workspace from there; a task may never name it.
    #[serde(skip)]
    pub scratch: Vec<PathBuf>,
}

fn ser_bytes<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    ser_size(&Some(*v), s)
}

fn de_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    de_size(d)?.ok_or_else(|| serde::de::Error::custom("a size is required"))
}

/// The largest `file:` secret read by default.
pub const SECRET_MAX_BYTES: u64 = 64 * 1024;

impl Default for Policy {
    fn default() -> Policy {
        Policy::server_default()
    }
}

impl Policy {
    /// Everything allowed, nothing limited: a user's own machine (`acr-task run`).
    pub fn permissive() -> Policy {
        Policy {
            allow: Allow::everything(),
            context_roots: None,
            secret_dirs: None,
            secret_env: None,
            secret_max_bytes: SECRET_MAX_BYTES,
            step_limits: StepLimits::default(),
            protected: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// A shared server's starting point: nothing beyond an ordinary container, local
    /// contexts only under the serving user's home, `env:` secrets only from
    /// `ACR_TASK_SECRET_*` variables, no `file:` secrets until a directory is allowed, and
    /// each step limited to the host's CPUs, 4 GiB of memory and 4096 processes.
    pub fn server_default() -> Policy {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Policy {
            allow: Allow::default(),
            context_roots: Some(
                std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .into_iter()
                    .collect(),
            ),
            secret_dirs: Some(Vec::new()),
            secret_env: Some(vec!["ACR_TASK_SECRET_*".into()]),
            secret_max_bytes: SECRET_MAX_BYTES,
            step_limits: StepLimits {
                cpus: Some(cpus as f64),
                memory: Some(4 << 30),
                pids: Some(4096),
            },
            protected: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Reads a policy file (YAML; every field optional, unset fields from
    /// [`Policy::server_default`]).
    pub fn from_file(path: &Path) -> Result<Policy, crate::task::Diagnostic> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            crate::task::Diagnostic::new(&name, 0, 0, format!("cannot read the policy: {e}"))
        })?;
        if text.trim().is_empty() {
            return Ok(Policy::server_default());
        }
        crate::task::from_yaml(&name, &text)
    }

    /// The policy as YAML, as `serve --print-policy` shows it.
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }

    /// The step limits as the runtime applies them.
    pub fn limits(&self) -> crate::runtime::Limits {
        crate::runtime::Limits {
            nano_cpus: self.step_limits.cpus.map(|c| (c * 1e9) as i64),
            memory: self.step_limits.memory,
            pids: self.step_limits.pids,
        }
    }
}
