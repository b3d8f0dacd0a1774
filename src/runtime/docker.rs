//! The Docker Engine backend (bollard, local socket or `DOCKER_HOST`).

use std::collections::{BTreeMap, HashMap};

use bollard::auth::DockerCredentials;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, NetworkCreateRequest, NetworkingConfig,
    PortBinding, VolumeCreateRequest,
};
use bollard::query_parameters::{
    AttachContainerOptions, BuildImageOptions, CreateContainerOptions, CreateImageOptions,
    ListContainersOptions, ListNetworksOptions, ListVolumesOptions, LogsOptions, PushImageOptions,
    RemoveContainerOptions, RemoveVolumeOptions, TagImageOptions, UploadToContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;

use super::{
    BuildContext, BuildOutput, BuildSpec, ContainerSpec, Credential, ImageIdentity, LogSink,
    NetworkGateway, PullPolicy, Runtime, RuntimeError, VolumeSource, RUN_LABEL,
};

/// An image with no files, used to hold volumes while files are copied into them.
const SCRATCH_IMAGE: &str = "acr-task/scratch:1";
/// How many lines of build output a build error shows.
const BUILD_ERROR_TAIL: usize = 15;

#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
    /// Container creations whose request is in flight. A caller may drop a `run` future
    /// mid-create (cancel, timeout) while the engine still creates the container; creations
    /// therefore finish in their own task, and the run's cleanup sweep waits for them.
    creating: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Each run's gate volume (see [`super::gate`]), made at its first prepared container.
    gates: std::sync::Arc<tokio::sync::Mutex<HashMap<String, String>>>,
}

/// Waits for a container to stop (it must be running or have run) and returns its exit code.
async fn exit_code(docker: &Docker, name: &str) -> Result<i64, RuntimeError> {
    let mut wait = docker.wait_container(name, None);
    match wait.next().await {
        Some(Ok(r)) => Ok(r.status_code),
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
        Some(Err(e)) => Err(engine(e)),
        None => Err(RuntimeError::Engine(format!(
            "no exit status for container {name}"
        ))),
    }
}

fn engine(e: bollard::errors::Error) -> RuntimeError {
    RuntimeError::Engine(e.to_string())
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn hashmap(labels: &BTreeMap<String, String>) -> HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Splits `name[:tag]` (registry ports are not tags).
pub fn split_tag(image: &str) -> (&str, Option<&str>) {
    let slash = image.rfind('/').map(|i| i + 1).unwrap_or(0);
    match image[slash..].rfind(':') {
        Some(i) if !image.contains('@') => (&image[..slash + i], Some(&image[slash + i + 1..])),
        _ => (image, None),
    }
}

impl DockerRuntime {
    /// Connects as the `docker` CLI does (`DOCKER_HOST` or the local socket), agrees on an
    /// API version the engine supports, and checks that it answers.
    pub async fn connect() -> Result<DockerRuntime, RuntimeError> {
        let host = std::env::var("DOCKER_HOST")
            .unwrap_or_else(|_| "unix:///var/run/docker.sock".to_string());
        let unreachable = |reason: String| RuntimeError::Unreachable {
            host: host.clone(),
            reason,
        };
        let docker = Docker::connect_with_defaults().map_err(|e| unreachable(e.to_string()))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let rt = DockerRuntime {
            docker,
            creating: Default::default(),
            gates: Default::default(),
        };
        rt.docker
            .ping()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(rt)
    }

    /// Adds a `name:tag` to an image.
    pub async fn tag(&self, image: &str, target: &str) -> Result<(), RuntimeError> {
        let (repo, tag) = split_tag(target);
        let opts = TagImageOptions {
            repo: Some(repo.into()),
            tag: Some(tag.unwrap_or("latest").into()),
        };
        self.docker
            .tag_image(image, Some(opts))
            .await
            .map_err(engine)
    }

    /// Removes one tag from the engine (the image goes only when no other tag or
    /// container holds it); an absent tag is not an error.
    pub async fn untag(&self, image: &str) -> Result<(), RuntimeError> {
        let opts = bollard::query_parameters::RemoveImageOptions {
            force: false,
            noprune: false,
            ..Default::default()
        };
        match self.docker.remove_image(image, Some(opts), None).await {
            Err(e) if !is_not_found(&e) => Err(engine(e)),
            _ => Ok(()),
        }
    }

    pub fn client(&self) -> &Docker {
        &self.docker
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        self.image_present_for(image, None).await
    }

    /// Whether `image` is present, and for `platform` (`os/arch[/variant]`) when given.
    async fn image_present_for(
        &self,
        image: &str,
        platform: Option<&str>,
    ) -> Result<bool, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(info) => Ok(platform.is_none_or(|p| {
                let mut want = p.split('/');
                let (os, arch, variant) = (want.next(), want.next(), want.next());
                os == info.os.as_deref()
                    && (arch.is_none() || arch == info.architecture.as_deref())
                    && (variant.is_none() || variant == info.variant.as_deref())
            })),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(engine(e)),
        }
    }

    async fn ensure_scratch(&self) -> Result<(), RuntimeError> {
        if self.image_present(SCRATCH_IMAGE).await? {
            return Ok(());
        }
        let empty_tar = tar::Builder::new(Vec::new())
            .into_inner()
            .map_err(|e| RuntimeError::Engine(e.to_string()))?;
        let (repo, tag) = split_tag(SCRATCH_IMAGE);
        let opts = CreateImageOptions {
            from_src: Some("-".into()),
            repo: Some(repo.into()),
            tag: tag.map(str::to_string),
            ..Default::default()
        };
        let mut s =
            self.docker
                .create_image(Some(opts), Some(bollard::body_full(empty_tar.into())), None);
        while let Some(item) = s.next().await {
            item.map_err(engine)?;
        }
        Ok(())
    }

    /// A never-started container holding `volume` at `/v`, for copying files in and out.
    async fn holder(
        &self,
        volume: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<String, RuntimeError> {
        self.ensure_scratch().await?;
        // The holder carries the volume's labels (its run), so a crash mid-copy leaves
        // nothing the run's cleanup sweep would miss.
        let mut labels = labels.clone();
        if labels.is_empty() {
            if let Ok(v) = self.docker.inspect_volume(volume).await {
                labels.extend(v.labels);
            }
        }
        let name = format!("{volume}-io-{}", uuid::Uuid::new_v4().simple());
        let spec = ContainerSpec {
            name: name.clone(),
            image: SCRATCH_IMAGE.into(),
            args: vec!["/nonexistent".into()],
            mounts: vec![super::Mount {
                volume: volume.into(),
                target: "/v".into(),
            }],
            labels,
            ..Default::default()
        };
        self.create(&spec).await?;
        Ok(name)
    }

    /// The engine's tar of `path` inside a volume (entries under its base name); `None`
    /// when the path does not exist.
    async fn download_from_volume(
        &self,
        volume: &str,
        path: &str,
    ) -> Result<Option<Vec<u8>>, RuntimeError> {
        let holder = self.holder(volume, &BTreeMap::new()).await?;
        let opts = bollard::query_parameters::DownloadFromContainerOptions {
            path: format!("/v/{}", path.trim_start_matches('/')),
        };
        let mut stream = self.docker.download_from_container(&holder, Some(opts));
        let mut out = Vec::new();
        let mut result = Ok(());
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => out.extend_from_slice(&b),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.remove_container(&holder).await?;
        match result {
            Ok(()) => Ok(Some(out)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(engine(e)),
        }
    }

    fn container_body(spec: &ContainerSpec) -> Result<ContainerCreateBody, RuntimeError> {
        let mut port_bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
        let mut exposed: Vec<String> = Vec::new();
        for p in &spec.ports {
            let (host, container) = parse_port(p)?;
            exposed.push(container.clone());
            port_bindings
                .entry(container)
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(PortBinding {
                    host_ip: host.0,
                    host_port: host.1,
                });
        }
        for e in &spec.expose {
            exposed.push(if e.contains('/') {
                e.clone()
            } else {
                format!("{e}/tcp")
            });
        }
        let mounts = spec
            .mounts
            .iter()
            .map(|m| bollard::models::Mount {
                target: Some(m.target.clone()),
                source: Some(m.volume.clone()),
                typ: Some(bollard::models::MountType::VOLUME),
                ..Default::default()
            })
            .collect();
        let isolation = match spec.isolation.as_deref() {
            None | Some("") | Some("default") => None,
            Some("process") => Some(bollard::models::HostConfigIsolationEnum::PROCESS),
            Some("hyperv") => Some(bollard::models::HostConfigIsolationEnum::HYPERV),
            Some(other) => {
                return Err(RuntimeError::Invalid {
                    what: "isolation",
                    value: other.into(),
                    reason: "expected default, process or hyperv".into(),
                })
            }
        };
        let networking_config = spec.network.as_ref().map(|n| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                n.clone(),
                EndpointSettings {
                    aliases: Some(spec.network_aliases.clone()),
                    ..Default::default()
                },
            )])),
        });
        let devices = spec
            .devices
            .iter()
            .map(|d| {
                let mut parts = d.splitn(3, ':');
                let host = parts.next().unwrap_or_default().to_string();
                let inside = parts
                    .next()
                    .map(str::to_string)
                    .unwrap_or_else(|| host.clone());
                bollard::models::DeviceMapping {
                    path_on_host: Some(host),
                    path_in_container: Some(inside),
                    cgroup_permissions: Some(parts.next().unwrap_or("rwm").to_string()),
                }
            })
            .collect::<Vec<_>>();
        let some = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        let memory = spec
            .limits
            .memory
            .map(|m| i64::try_from(m).unwrap_or(i64::MAX));
        Ok(ContainerCreateBody {
            image: Some(spec.image.clone()),
            hostname: spec.hostname.clone(),
            tty: spec.tty.then_some(true),
            cmd: if spec.args.is_empty() {
                None
            } else {
                Some(spec.args.clone())
            },
            entrypoint: spec.entrypoint.clone(),
            env: Some(spec.env.clone()),
            working_dir: spec.working_dir.clone(),
            user: spec.user.clone(),
            labels: Some(hashmap(&spec.labels)),
            exposed_ports: if exposed.is_empty() {
                None
            } else {
                Some(exposed)
            },
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            host_config: Some(HostConfig {
                privileged: Some(spec.privileged),
                network_mode: spec.network.clone(),
                port_bindings: Some(port_bindings),
                mounts: Some(mounts),
                isolation,
                binds: some(&spec.binds),
                cap_add: some(&spec.cap_add),
                cap_drop: some(&spec.cap_drop),
                security_opt: some(&spec.security_opt),
                devices: (!devices.is_empty()).then_some(devices),
                pid_mode: spec.pid_mode.clone(),
                ipc_mode: spec.ipc_mode.clone(),
                uts_mode: spec.uts_mode.clone(),
                userns_mode: spec.userns_mode.clone(),
                extra_hosts: some(&spec.extra_hosts),
                init: spec.init.then_some(true),
                readonly_rootfs: spec.read_only.then_some(true),
                nano_cpus: spec.limits.nano_cpus,
                memory,
                // Swap counted in the limit: the container cannot double it by swapping.
                memory_swap: memory,
                pids_limit: spec.limits.pids,
                ..Default::default()
            }),
            networking_config,
            ..Default::default()
        })
    }

    /// The run's gate volume, holding the static busybox the gate runs (made once per run,
    /// labelled with it, so the run's sweep removes it).
    async fn gate_volume(&self, run: &str) -> Result<String, RuntimeError> {
        let mut gates = self.gates.lock().await;
        if let Some(v) = gates.get(run) {
            return Ok(v.clone());
        }
        let safe: String = run
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let name = format!("acr-task-gate-{safe}");
        let labels = BTreeMap::from([(RUN_LABEL.to_string(), run.to_string())]);
        self.create_volume(&name, &labels).await?;
        let busybox = super::runner::busybox_binary()?;
        let archive = tokio::task::spawn_blocking(move || {
            std::fs::read(&busybox).and_then(|b| super::gate::volume_archive(&b))
        })
        .await
        .map_err(|e| RuntimeError::Engine(e.to_string()))?
        .map_err(|e| RuntimeError::Engine(format!("the gate's busybox: {e}")))?;
        let holder = self.holder(&name, &labels).await?;
        let opts = UploadToContainerOptions {
            path: "/v".into(),
            ..Default::default()
        };
        let uploaded = self
            .docker
            .upload_to_container(&holder, Some(opts), bollard::body_full(archive.into()))
            .await
            .map_err(engine);
        self.remove_container(&holder).await?;
        uploaded?;
        gates.insert(run.to_string(), name.clone());
        Ok(name)
    }

    /// Streams an attached container's output to `log` until it ends, then its exit code
    /// (from `wait`, when given: a wait asked for before the container was released).
    async fn stream_and_wait(
        &self,
        name: &str,
        wait: Option<tokio::task::JoinHandle<Result<i64, RuntimeError>>>,
        mut output: std::pin::Pin<
            Box<
                dyn futures_util::Stream<
                        Item = Result<bollard::container::LogOutput, bollard::errors::Error>,
                    > + Send,
            >,
        >,
        log: &LogSink,
    ) -> Result<i64, RuntimeError> {
        let mut out = LineSplitter { buf: Vec::new() };
        let mut err = LineSplitter { buf: Vec::new() };
        while let Some(item) = output.next().await {
            match item {
                Ok(bollard::container::LogOutput::StdErr { message }) => err.push(&message, log),
                Ok(other) => out.push(&other.into_bytes(), log),
                Err(e) => {
                    tracing::debug!(container = %name, error = %e, "attach stream ended");
                    break;
                }
            }
        }
        out.flush(log);
        err.flush(log);
        match wait {
            Some(w) => w
                .await
                .map_err(|e| RuntimeError::Engine(format!("waiting for {name}: {e}")))?,
            None => exit_code(&self.docker, name).await,
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<(), RuntimeError> {
        self.create_with(spec, Self::container_body(spec)?).await
    }

    async fn create_with(
        &self,
        spec: &ContainerSpec,
        body: ContainerCreateBody,
    ) -> Result<(), RuntimeError> {
        let opts = CreateContainerOptions {
            name: Some(spec.name.clone()),
            platform: spec.platform.clone().unwrap_or_default(),
        };
        use std::sync::atomic::Ordering;
        let (docker, creating) = (self.docker.clone(), self.creating.clone());
        creating.fetch_add(1, Ordering::SeqCst);
        let created = tokio::spawn(async move {
            let r = docker.create_container(Some(opts), body).await;
            creating.fetch_sub(1, Ordering::SeqCst);
            r
        })
        .await
        .map_err(|e| RuntimeError::Engine(format!("creating a container: {e}")))?;
        match created {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Err(RuntimeError::ImageNotFound {
                image: spec.image.clone(),
                reason: e.to_string(),
            }),
            Err(e) => Err(engine(e)),
        }
    }
}

/// `[ip:]host:container[/proto]` or `container[/proto]` → ((ip, host port), `container/proto`).
#[allow(clippy::type_complexity)]
fn parse_port(p: &str) -> Result<((Option<String>, Option<String>), String), RuntimeError> {
    let (spec, proto) = p.split_once('/').unwrap_or((p, "tcp"));
    let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
    let bad = || RuntimeError::Invalid {
        what: "port",
        value: p.into(),
        reason: "expected [ip:]hostPort:containerPort[/proto]".into(),
    };
    let container = parts
        .first()
        .filter(|c| c.parse::<u16>().is_ok())
        .ok_or_else(bad)?;
    let host = parts
        .get(1)
        .map(|h| h.to_string())
        .filter(|h| !h.is_empty());
    if let Some(h) = &host {
        h.parse::<u16>().map_err(|_| bad())?;
    }
    let ip = parts.get(2).map(|s| s.to_string());
    Ok(((ip, host), format!("{container}/{proto}")))
}

/// Turns a byte stream into lines for a log sink, keeping partial lines until complete.
struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    fn push(&mut self, bytes: &[u8], log: &LogSink) {
        self.buf.extend_from_slice(bytes);
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]);
            log(text.trim_end_matches('\r').to_string());
        }
    }
    fn flush(&mut self, log: &LogSink) {
        if !self.buf.is_empty() {
            log(String::from_utf8_lossy(&self.buf).into_owned());
            self.buf.clear();
        }
    }
}

/// The registry host part of an image name as the engine keys logins: Docker Hub's is
/// its v1 URL, as `docker login` stores it.
fn registry_of(image: &str) -> String {
    match crate::registry::reference::ImageRef::parse(image) {
        Some(r) if r.registry != crate::registry::reference::DOCKER_HUB => r.registry,
        _ => DOCKER_HUB_INDEX.to_string(),
    }
}

const DOCKER_HUB_INDEX: &str = "https://index.docker.io/v1/";

fn engine_credentials(server: String, c: &Credential) -> DockerCredentials {
    DockerCredentials {
        username: Some(c.username.clone()),
        password: Some(c.password.clone()),
        serveraddress: Some(server),
        ..Default::default()
    }
}

/// A build's logins as the engine's `X-Registry-Config` holds them: by registry host,
/// Docker Hub's under its v1 URL.
fn build_credentials(
    auth: &BTreeMap<String, Credential>,
) -> Option<HashMap<String, DockerCredentials>> {
    if auth.is_empty() {
        return None;
    }
    Some(
        auth.iter()
            .map(|(host, c)| {
                let key = if host == "docker.io" {
                    DOCKER_HUB_INDEX.to_string()
                } else {
                    host.clone()
                };
                (key.clone(), engine_credentials(key, c))
            })
            .collect(),
    )
}

impl Runtime for DockerRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.docker.ping().await.map(|_| ()).map_err(engine)
    }

    async fn create_network(
        &self,
        name: &str,
        driver: Option<&str>,
        ipv6: bool,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), RuntimeError> {
        let req = NetworkCreateRequest {
            name: name.into(),
            driver: Some(driver.unwrap_or("bridge").into()),
            enable_ipv6: Some(ipv6),
            labels: Some(hashmap(labels)),
            ..Default::default()
        };
        self.docker
            .create_network(req)
            .await
            .map(|_| ())
            .map_err(engine)
    }

    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        match self.docker.remove_network(name).await {
            Err(e) if !is_not_found(&e) => Err(engine(e)),
            _ => Ok(()),
        }
    }

    async fn network_gateway(&self, name: &str) -> Result<Option<NetworkGateway>, RuntimeError> {
        let net = match self.docker.inspect_network(name, None).await {
            Ok(n) => n,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(engine(e)),
        };
        let configs = net.ipam.and_then(|i| i.config).unwrap_or_default();
        Ok(configs.iter().find_map(|c| {
            let gateway = c.gateway.as_deref()?.parse().ok()?;
            let (subnet, prefix) = c.subnet.as_deref()?.split_once('/')?;
            Some(NetworkGateway {
                gateway,
                subnet: subnet.parse().ok()?,
                prefix: prefix.parse().ok()?,
            })
        }))
    }

    async fn create_volume(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), RuntimeError> {
        let req = VolumeCreateRequest {
            name: Some(name.into()),
            labels: Some(hashmap(labels)),
            ..Default::default()
        };
        self.docker
            .create_volume(req)
            .await
            .map(|_| ())
            .map_err(engine)
    }

    async fn remove_volume(&self, name: &str) -> Result<(), RuntimeError> {
        let opts = RemoveVolumeOptions { force: true };
        match self.docker.remove_volume(name, Some(opts)).await {
            Err(e) if !is_not_found(&e) => Err(engine(e)),
            _ => Ok(()),
        }
    }

    async fn fill_volume(
        &self,
        volume: &str,
        dir: Option<VolumeSource<'_>>,
        files: &BTreeMap<String, Vec<u8>>,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), RuntimeError> {
        let holder = self.holder(volume, labels).await?;
        let dir = dir.map(|s| (s.dir.to_path_buf(), s.mounted_at.to_string()));
        let files = files.clone();
        let archive = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, RuntimeError> {
            let mut out = match &dir {
                Some((d, at)) => crate::source::tar_tree(d, at, Vec::new())?,
                None => Vec::new(),
            };
            // A tar ends with two zero blocks: drop them to append more entries.
            if !files.is_empty() {
                let mut b = tar::Builder::new(Vec::new());
                for (name, data) in &files {
                    let mut h = tar::Header::new_gnu();
                    h.set_size(data.len() as u64);
                    h.set_mode(0o644);
                    h.set_cksum();
                    b.append_data(&mut h, name, &data[..])
                        .map_err(|e| RuntimeError::Engine(e.to_string()))?;
                }
                let extra = b
                    .into_inner()
                    .map_err(|e| RuntimeError::Engine(e.to_string()))?;
                out.truncate(out.len().saturating_sub(1024));
                out.extend_from_slice(&extra);
            }
            Ok(out)
        })
        .await
        .map_err(|e| RuntimeError::Engine(e.to_string()))??;
        let result = if archive.is_empty() {
            Ok(())
        } else {
            let opts = UploadToContainerOptions {
                path: "/v".into(),
                ..Default::default()
            };
            self.docker
                .upload_to_container(&holder, Some(opts), bollard::body_full(archive.into()))
                .await
                .map_err(engine)
        };
        self.remove_container(&holder).await?;
        result
    }

    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        platform: Option<&str>,
        auth: Option<&Credential>,
        log: &LogSink,
    ) -> Result<(), RuntimeError> {
        if policy == PullPolicy::Missing && self.image_present_for(image, platform).await? {
            return Ok(());
        }
        let (repo, tag) = split_tag(image);
        let opts = CreateImageOptions {
            from_image: Some(repo.into()),
            tag: Some(tag.unwrap_or("latest").into()),
            platform: platform.unwrap_or_default().into(),
            ..Default::default()
        };
        let creds = auth.map(|c| engine_credentials(registry_of(image), c));
        let mut s = self.docker.create_image(Some(opts), None, creds);
        let mut failure = None;
        while let Some(item) = s.next().await {
            match item {
                Ok(info) => {
                    if let Some(status) = info.status {
                        if info.progress_detail.is_none() || info.id.is_none() {
                            log(status);
                        }
                    }
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        match failure {
            None => Ok(()),
            // With `pull: true` a local image still does when the registry cannot be reached.
            Some(_) if policy == PullPolicy::Always && self.image_present(image).await? => Ok(()),
            Some(reason) => Err(RuntimeError::ImageNotFound {
                image: image.into(),
                reason,
            }),
        }
    }

    async fn read_volume_file(
        &self,
        volume: &str,
        path: &str,
    ) -> Result<Option<Vec<u8>>, RuntimeError> {
        let Some(archive) = self.download_from_volume(volume, path).await? else {
            return Ok(None);
        };
        let mut ar = tar::Archive::new(&archive[..]);
        let io = |e: std::io::Error| RuntimeError::Engine(format!("reading {path}: {e}"));
        for entry in ar.entries().map_err(io)? {
            let mut entry = entry.map_err(io)?;
            if entry.header().entry_type().is_file() {
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut data).map_err(io)?;
                return Ok(Some(data));
            }
        }
        Ok(None)
    }

    async fn build(&self, spec: &BuildSpec, log: &LogSink) -> Result<BuildOutput, RuntimeError> {
        let dockerfile = spec.dockerfile.clone();
        let context = match &spec.context {
            BuildContext::Dir(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || {
                    crate::source::tar_context(&dir, &dockerfile, Vec::new())
                })
                .await
                .map_err(|e| RuntimeError::Engine(e.to_string()))??
            }
            BuildContext::Volume { volume, path } => {
                let archive = self
                    .download_from_volume(volume, path)
                    .await?
                    .ok_or_else(|| RuntimeError::Build {
                        message: format!("build context {path} does not exist in the workspace"),
                    })?;
                tokio::task::spawn_blocking(move || {
                    crate::source::rebase_context_tar(&archive, &dockerfile)
                })
                .await
                .map_err(|e| RuntimeError::Engine(e.to_string()))??
            }
        };
        let opts = BuildImageOptions {
            dockerfile: spec.dockerfile.clone(),
            t: spec.tags.first().cloned(),
            nocache: spec.no_cache,
            cachefrom: (!spec.cache_from.is_empty()).then(|| spec.cache_from.clone()),
            pull: spec.pull.then(|| "1".to_string()),
            rm: true,
            forcerm: true,
            buildargs: Some(
                spec.build_args
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            labels: Some(hashmap(&spec.labels)),
            networkmode: spec.network.clone(),
            platform: spec.platform.clone().unwrap_or_default(),
            target: spec.target.clone().unwrap_or_default(),
            // The engine's build API takes 32-bit byte counts here.
            memory: spec
                .limits
                .memory
                .map(|m| i32::try_from(m).unwrap_or(i32::MAX)),
            memswap: spec
                .limits
                .memory
                .map(|m| i32::try_from(m).unwrap_or(i32::MAX)),
            cpuperiod: spec.limits.nano_cpus.map(|_| 100_000),
            cpuquota: spec
                .limits
                .nano_cpus
                .map(|n| i32::try_from(n / 10_000).unwrap_or(i32::MAX)),
            ..Default::default()
        };
        let mut stream = self.docker.build_image(
            opts,
            build_credentials(&spec.registry_auth),
            Some(bollard::body_full(context.into())),
        );
        let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        let mut image_id = None;
        let mut splitter = LineSplitter { buf: Vec::new() };
        let tail_log: LogSink = {
            let log = log.clone();
            std::sync::Arc::new(move |l: String| log(l))
        };
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(s) = info.stream {
                        for l in s.split_inclusive('\n') {
                            if l.ends_with('\n') {
                                let line = l.trim_end().to_string();
                                if tail.len() == BUILD_ERROR_TAIL {
                                    tail.pop_front();
                                }
                                tail.push_back(line);
                            }
                        }
                        splitter.push(s.as_bytes(), &tail_log);
                    }
                    if let Some(aux) = info.aux.and_then(|a| a.id) {
                        image_id = Some(aux);
                    }
                }
                Err(e) => {
                    splitter.flush(&tail_log);
                    let message = match e {
                        bollard::errors::Error::DockerStreamError { error } => error,
                        other => other.to_string(),
                    };
                    let mut shown: Vec<String> = tail.into_iter().collect();
                    shown.push(message);
                    return Err(RuntimeError::Build {
                        message: shown.join("\n"),
                    });
                }
            }
        }
        splitter.flush(&tail_log);
        let image_id = match image_id {
            Some(id) => id,
            None => {
                // Older engines only print "Successfully built <id>".
                tail.iter()
                    .rev()
                    .find_map(|l| l.strip_prefix("Successfully built ").map(str::to_string))
                    .ok_or_else(|| RuntimeError::Build {
                        message: "the engine reported no image id".into(),
                    })?
            }
        };
        for t in spec.tags.iter().skip(1) {
            self.tag(&image_id, t).await?;
        }
        Ok(BuildOutput { image_id })
    }

    async fn run(&self, spec: &ContainerSpec, log: &LogSink) -> Result<i64, RuntimeError> {
        let t0 = std::time::Instant::now();
        self.create(spec).await?;
        tracing::debug!(container = %spec.name, ms = t0.elapsed().as_millis() as u64, "created");
        // Attached before it starts, so the stream has everything; `logs` too would
        // replay output the stream also carries (seen: a line twice under load).
        let opts = AttachContainerOptions {
            stdout: true,
            stderr: true,
            stream: true,
            logs: false,
            ..Default::default()
        };
        let attached = self
            .docker
            .attach_container(&spec.name, Some(opts))
            .await
            .map_err(engine)?;
        tracing::debug!(container = %spec.name, ms = t0.elapsed().as_millis() as u64, "attached");
        self.docker
            .start_container(&spec.name, None)
            .await
            .map_err(engine)?;
        tracing::debug!(container = %spec.name, ms = t0.elapsed().as_millis() as u64, "started");
        self.stream_and_wait(&spec.name, None, attached.output, log)
            .await
    }

    async fn prepare(&self, spec: &ContainerSpec) -> Result<bool, RuntimeError> {
        let Some(run) = spec.labels.get(RUN_LABEL) else {
            return Ok(false);
        };
        if spec.tty {
            return Ok(false);
        }
        let image = self
            .docker
            .inspect_image(&spec.image)
            .await
            .map_err(engine)?;
        let config = image.config.unwrap_or_default();
        let Some(argv) = super::gate::command_line(
            spec.entrypoint.as_deref(),
            &spec.args,
            config.entrypoint.as_deref(),
            config.cmd.as_deref(),
        ) else {
            return Ok(false);
        };
        let volume = self.gate_volume(run).await?;
        let gated = ContainerSpec {
            entrypoint: Some(super::gate::entrypoint()),
            args: argv,
            ..spec.clone()
        };
        let mut body = Self::container_body(&gated)?;
        body.open_stdin = Some(true);
        body.stdin_once = Some(true);
        body.attach_stdin = Some(true);
        if let Some(hc) = body.host_config.as_mut() {
            hc.mounts
                .get_or_insert_with(Vec::new)
                .push(bollard::models::Mount {
                    target: Some(super::gate::DIR.into()),
                    source: Some(volume),
                    typ: Some(bollard::models::MountType::VOLUME),
                    read_only: Some(true),
                    ..Default::default()
                });
        }
        self.create_with(spec, body).await?;
        self.docker
            .start_container(&spec.name, None)
            .await
            .map_err(engine)?;
        Ok(true)
    }

    async fn run_prepared(&self, spec: &ContainerSpec, log: &LogSink) -> Result<i64, RuntimeError> {
        use tokio::io::AsyncWriteExt;
        // The container runs (gated), so a wait asked for now ends at its exit: one round
        // trip less after it.
        let (docker, name) = (self.docker.clone(), spec.name.clone());
        let wait = tokio::spawn(async move { exit_code(&docker, &name).await });
        // Attached before the release: the step has printed nothing yet (see `run`).
        let opts = AttachContainerOptions {
            stdin: true,
            stdout: true,
            stderr: true,
            stream: true,
            logs: false,
            ..Default::default()
        };
        let attached = self
            .docker
            .attach_container(&spec.name, Some(opts))
            .await
            .map_err(engine)?;
        let mut input = attached.input;
        // The release line, then the end of stdin: the step's process reads EOF, as it
        // would from `docker run` without `-i`.
        let released = async {
            input.write_all(super::gate::RELEASE).await?;
            input.shutdown().await
        };
        released
            .await
            .map_err(|e| RuntimeError::Engine(format!("releasing container {}: {e}", spec.name)))?;
        self.stream_and_wait(&spec.name, Some(wait), attached.output, log)
            .await
    }

    async fn start_detached(
        &self,
        spec: &ContainerSpec,
        log: &LogSink,
    ) -> Result<(), RuntimeError> {
        self.create(spec).await?;
        self.docker
            .start_container(&spec.name, None)
            .await
            .map_err(engine)?;
        let docker = self.docker.clone();
        let name = spec.name.clone();
        let log = log.clone();
        tokio::spawn(async move {
            let opts = LogsOptions {
                follow: true,
                stdout: true,
                stderr: true,
                ..Default::default()
            };
            let mut s = docker.logs(&name, Some(opts));
            let mut lines = LineSplitter { buf: Vec::new() };
            while let Some(Ok(chunk)) = s.next().await {
                lines.push(&chunk.into_bytes(), &log);
            }
            lines.flush(&log);
        });
        Ok(())
    }

    async fn remove_container(&self, name: &str) -> Result<(), RuntimeError> {
        let opts = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match self.docker.remove_container(name, Some(opts)).await {
            Err(e) if !is_not_found(&e) => Err(engine(e)),
            _ => Ok(()),
        }
    }

    async fn push(
        &self,
        image: &str,
        auth: Option<&Credential>,
        log: &LogSink,
    ) -> Result<String, RuntimeError> {
        let (repo, tag) = split_tag(image);
        let opts = PushImageOptions {
            tag: Some(tag.unwrap_or("latest").into()),
            ..Default::default()
        };
        let creds = auth.map(|c| engine_credentials(registry_of(image), c));
        let mut s = self.docker.push_image(repo, Some(opts), creds);
        let mut digest = None;
        // Byte progress per layer, summed into a line every few seconds (a big push is
        // not silent; a small one prints none). bollard's push item carries no layer id:
        // layers are told apart by size (two of one size share a slot; only the line's
        // figures are affected).
        let mut layers: std::collections::HashMap<i64, i64> = Default::default();
        let mut said = std::time::Instant::now();
        while let Some(item) = s.next().await {
            match item {
                Ok(info) => {
                    if let Some(status) = info.status {
                        if let Some(d) = status.split("digest: ").nth(1) {
                            digest = d.split_whitespace().next().map(str::to_string);
                        }
                        let detail = info.progress_detail.as_ref();
                        match (detail.and_then(|p| p.current), detail.and_then(|p| p.total)) {
                            (Some(cur), Some(total)) => {
                                layers.insert(total, cur);
                                if said.elapsed() >= std::time::Duration::from_secs(3) {
                                    said = std::time::Instant::now();
                                    let (c, t) = layers
                                        .iter()
                                        .fold((0, 0), |(c, t), (total, cur)| (c + cur, t + total));
                                    log(format!(
                                        "pushing {image}: {} of {} sent",
                                        crate::tier::human(c.max(0) as u64),
                                        crate::tier::human(t.max(0) as u64)
                                    ));
                                }
                            }
                            (_, None) => log(status),
                            _ => {}
                        }
                    }
                }
                Err(e) => {
                    let message = match e {
                        bollard::errors::Error::DockerStreamError { error } => error,
                        other => other.to_string(),
                    };
                    return Err(RuntimeError::Push {
                        image: image.into(),
                        message,
                    });
                }
            }
        }
        digest.ok_or_else(|| RuntimeError::Push {
            image: image.into(),
            message: "the engine reported no digest".into(),
        })
    }

    async fn image_digest(&self, image: &str) -> Result<Option<ImageIdentity>, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(info) => {
                let (repo, _) = split_tag(image);
                let repo_digest = info
                    .repo_digests
                    .unwrap_or_default()
                    .into_iter()
                    .find(|d| d.split('@').next() == Some(repo))
                    .and_then(|d| d.split('@').nth(1).map(str::to_string));
                Ok(Some(ImageIdentity {
                    repo_digest,
                    id: info.id.unwrap_or_default(),
                }))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(engine(e)),
        }
    }

    async fn image_label(
        &self,
        image: &str,
        label: &str,
    ) -> Result<Option<Option<String>>, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(info) => Ok(Some(
                info.config
                    .and_then(|c| c.labels)
                    .and_then(|mut l| l.remove(label)),
            )),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(engine(e)),
        }
    }

    async fn remove_run_resources(&self, run_id: &str) -> Result<(), RuntimeError> {
        self.gates.lock().await.remove(run_id);
        // Let creations still in flight land first, so the sweep sees their containers.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.creating.load(std::sync::atomic::Ordering::SeqCst) > 0
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let label = format!("{RUN_LABEL}={run_id}");
        let filters: HashMap<String, Vec<String>> =
            HashMap::from([("label".to_string(), vec![label])]);
        let containers = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters.clone()),
                ..Default::default()
            }))
            .await
            .map_err(engine)?;
        for c in containers {
            if let Some(id) = c.id {
                self.remove_container(&id).await?;
            }
        }
        let networks = self
            .docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(filters.clone()),
            }))
            .await
            .map_err(engine)?;
        for n in networks {
            if let Some(id) = n.id {
                self.remove_network(&id).await?;
            }
        }
        let volumes = self
            .docker
            .list_volumes(Some(ListVolumesOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(engine)?;
        for v in volumes.volumes.unwrap_or_default() {
            self.remove_volume(&v.name).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_ports() {
        assert_eq!(
            split_tag("127.0.0.1:5000/app:v1"),
            ("127.0.0.1:5000/app", Some("v1"))
        );
        assert_eq!(
            split_tag("127.0.0.1:5000/app"),
            ("127.0.0.1:5000/app", None)
        );
        assert_eq!(split_tag("busybox"), ("busybox", None));
        assert_eq!(
            parse_port("8080:80").unwrap(),
            ((None, Some("8080".into())), "80/tcp".into())
        );
        assert_eq!(
            parse_port("127.0.0.1:53:53/udp").unwrap(),
            (
                (Some("127.0.0.1".into()), Some("53".into())),
                "53/udp".into()
            )
        );
        assert_eq!(parse_port("80").unwrap(), ((None, None), "80/tcp".into()));
        assert!(parse_port("x:80").is_err());
    }
}
