//! What the executor needs from a container backend, as a trait over plain types.
//! `docker` is the real implementation (bollard); tests may provide fakes for scheduling.

pub mod docker;
pub mod gate;
pub mod runner;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

pub use crate::credentials::Credential;

/// Receives output lines of a build, container or push, as they come.
pub type LogSink = Arc<dyn Fn(String) + Send + Sync>;

/// Label put on every container, network and volume of a run, so a run can always be
/// cleaned up by its id even after a crash.
pub const RUN_LABEL: &str = "io.acr-task.run";

/// Where a build context comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildContext {
    /// A directory on this host.
    Dir(PathBuf),
    /// A directory inside a volume (a run's `/workspace`), so files earlier steps wrote
    /// are part of the context, as in ACR.
    Volume { volume: String, path: String },
}

impl Default for BuildContext {
    fn default() -> Self {
        BuildContext::Dir(PathBuf::from("."))
    }
}

/// Resources one container (or build) may use; `None`: the engine's default (no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// CPUs in billionths (`--cpus 1.5` is 1.5e9).
    pub nano_cpus: Option<i64>,
    /// Memory in bytes (swap included: no more than this is used in all).
    pub memory: Option<u64>,
    /// Processes and threads at once.
    pub pids: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildSpec {
    pub context: BuildContext,
    /// Dockerfile path relative to the context.
    pub dockerfile: String,
    pub tags: Vec<String>,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    pub no_cache: bool,
    /// Images the engine may reuse layers from (`--cache-from`).
    pub cache_from: Vec<String>,
    pub platform: Option<String>,
    /// Always attempt to pull newer base images.
    pub pull: bool,
    pub network: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// CPU and memory of the build's containers (pids cannot be limited for builds).
    pub limits: Limits,
    /// Logins for the registries the build pulls from, by registry host (`docker.io`,
    /// `HOST:PORT`).
    pub registry_auth: BTreeMap<String, Credential>,
}

/// A local image: the digest its registry knows it by (`RepoDigests` for its repository;
/// `None` for an image built or loaded here) and the engine's image id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageIdentity {
    pub repo_digest: Option<String>,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BuildOutput {
    pub image_id: String,
}

/// A host directory to copy into a volume, and where containers will see the volume.
/// Symbolic links are copied as links (as docker does); a relative one that leads out of
/// the directory is written as the absolute path it resolves to from `mounted_at`, which
/// means the same inside the containers and is what the engine accepts.
#[derive(Debug, Clone, Copy)]
pub struct VolumeSource<'a> {
    pub dir: &'a std::path::Path,
    pub mounted_at: &'a str,
}

/// A mount of a named volume into a container.
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    pub volume: String,
    pub target: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerSpec {
    /// Container name; unique on the engine.
    pub name: String,
    pub image: String,
    pub args: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub privileged: bool,
    pub network: Option<String>,
    /// Names this container answers to on `network` (ACR: the step id).
    pub network_aliases: Vec<String>,
    /// `host:container[/proto]` or `container` port publications.
    pub ports: Vec<String>,
    pub expose: Vec<String>,
    pub mounts: Vec<Mount>,
    pub isolation: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// `os/arch[/variant]` the image must be for (`None`: the engine's own).
    pub platform: Option<String>,
    /// `SRC:DST[:OPTS]` binds of host paths or docker volumes (`cmd: -v ...`).
    pub binds: Vec<String>,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub security_opt: Vec<String>,
    /// `HOST[:CONTAINER[:PERMISSIONS]]` device mappings.
    pub devices: Vec<String>,
    /// Namespace modes (`host`, `container:NAME`, ...); `None`: the container's own.
    pub pid_mode: Option<String>,
    pub ipc_mode: Option<String>,
    pub uts_mode: Option<String>,
    pub userns_mode: Option<String>,
    pub hostname: Option<String>,
    /// `HOST:IP` entries for `/etc/hosts`.
    pub extra_hosts: Vec<String>,
    pub init: bool,
    pub read_only: bool,
    pub tty: bool,
    pub limits: Limits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull only when the image is not present (Docker's default).
    Missing,
    Always,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot reach the Docker Engine at {host}: {reason}. Start it (e.g. `sudo systemctl start docker`) or set DOCKER_HOST")]
    Unreachable { host: String, reason: String },
    #[error("image `{image}` not found locally and could not be pulled: {reason}")]
    ImageNotFound { image: String, reason: String },
    #[error("build failed: {message}")]
    Build { message: String },
    #[error("push of `{image}` failed: {message}")]
    Push { image: String, message: String },
    #[error("invalid {what} `{value}`: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("build context: {0}")]
    Context(#[from] crate::source::SourceError),
    #[error("docker: {0}")]
    Engine(String),
    #[error("refused by this server's policy: {0}")]
    Denied(String),
}

/// Where the host answers on a container network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkGateway {
    pub gateway: std::net::Ipv4Addr,
    pub subnet: std::net::Ipv4Addr,
    pub prefix: u8,
}

impl NetworkGateway {
    /// True when `ip` is inside the network's subnet.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let std::net::IpAddr::V4(ip) = ip else {
            return false;
        };
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix.min(32)))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.subnet) & mask
    }
}

/// The container backend. Futures may be dropped to cancel; the caller then removes the
/// container by name (`remove_container`), so implementations need no cancel hooks.
pub trait Runtime: Send + Sync + 'static {
    /// Checks the backend answers.
    fn ping(&self) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn create_network(
        &self,
        name: &str,
        driver: Option<&str>,
        ipv6: bool,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn remove_network(&self, name: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// The host's address on a network (its IPv4 gateway) and the network's subnet
    /// (address, prefix length); `None` for networks without one (`host`, `none`).
    fn network_gateway(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<NetworkGateway>, RuntimeError>> + Send;
    fn create_volume(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn remove_volume(&self, name: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Copies a directory tree into a volume, at its root, and optionally adds files
    /// (name, content) at the volume's root.
    fn fill_volume(
        &self,
        volume: &str,
        dir: Option<VolumeSource<'_>>,
        files: &BTreeMap<String, Vec<u8>>,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Reads one file from a volume (`path` relative to its root); `None` when absent.
    fn read_volume_file(
        &self,
        volume: &str,
        path: &str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, RuntimeError>> + Send;
    /// Makes sure `image` is present (for `platform`, when given), pulling it per `policy`
    /// (with `auth`, the login for its registry, when there is one).
    fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        platform: Option<&str>,
        auth: Option<&Credential>,
        log: &LogSink,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn build(
        &self,
        spec: &BuildSpec,
        log: &LogSink,
    ) -> impl Future<Output = Result<BuildOutput, RuntimeError>> + Send;
    /// Runs a container to completion, streaming its output; returns the exit code.
    fn run(
        &self,
        spec: &ContainerSpec,
        log: &LogSink,
    ) -> impl Future<Output = Result<i64, RuntimeError>> + Send;
    /// Creates and starts a container that waits at a gate until [`Runtime::run_prepared`]
    /// releases it, so the engine's slow part (create, start, network) happens while an
    /// earlier step still runs. The container's process is the spec's own once released,
    /// with the environment, working directory and user it would have had. `Ok(false)`:
    /// this backend or this spec cannot be prepared (nothing was made): `run` it instead.
    fn prepare(
        &self,
        _spec: &ContainerSpec,
    ) -> impl Future<Output = Result<bool, RuntimeError>> + Send {
        async { Ok(false) }
    }
    /// Releases a container [`Runtime::prepare`] made and runs it to completion like `run`.
    fn run_prepared(
        &self,
        spec: &ContainerSpec,
        log: &LogSink,
    ) -> impl Future<Output = Result<i64, RuntimeError>> + Send {
        self.run(spec, log)
    }
    /// Starts a container and returns once it runs; its output keeps streaming to `log`.
    fn start_detached(
        &self,
        spec: &ContainerSpec,
        log: &LogSink,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Force-removes a container (and its anonymous volumes); absent is not an error.
    fn remove_container(&self, name: &str)
        -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Pushes an image (with `auth`, the login for its registry); returns the manifest
    /// digest the registry reported.
    fn push(
        &self,
        image: &str,
        auth: Option<&Credential>,
        log: &LogSink,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    /// What identifies a local image (`None` when absent): the registry digest it was
    /// pulled or pushed by, if any, and its image id.
    fn image_digest(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<Option<ImageIdentity>, RuntimeError>> + Send;
    /// `None` when the image is absent, else the value of `label` on it (if set).
    fn image_label(
        &self,
        image: &str,
        label: &str,
    ) -> impl Future<Output = Result<Option<Option<String>>, RuntimeError>> + Send;
    /// Removes every container, network and volume labelled with this run id.
    fn remove_run_resources(
        &self,
        run_id: &str,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
}

#[cfg(test)]
mod gateway_tests {
    use super::NetworkGateway;

    #[test]
    fn only_the_network_s_own_addresses_are_inside() {
        let gw = NetworkGateway {
            gateway: "172.18.0.1".parse().unwrap(),
            subnet: "172.18.0.0".parse().unwrap(),
            prefix: 16,
        };
        assert!(gw.contains("172.18.3.4".parse().unwrap()));
        assert!(!gw.contains("172.17.0.2".parse().unwrap()));
        assert!(!gw.contains("127.0.0.1".parse().unwrap()));
        assert!(!gw.contains("::1".parse().unwrap()));
    }
}
