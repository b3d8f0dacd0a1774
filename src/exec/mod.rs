//! The executor: runs a planned task on a `Runtime` with all the parallelism the DAG allows,
//! applying ACR's step semantics (timeouts, retries, repeat, startDelay, ignoreErrors,
//! exitedWith/exitedWithout, detach/keep), and emitting typed events as it goes.
//!
//! Every resource of a run carries the run label, so teardown is one sweep by label, done
//! whatever way the run ends (success, failure, timeout, cancel).

pub mod container;
pub mod report;
#[cfg(test)]
mod scheduling_tests;
pub mod secrets;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::credentials::Credentials;
use crate::plan::Plan;
use crate::registry::reference::ImageRef;
use crate::runtime::{
    BuildSpec, ContainerSpec, Credential, LogSink, PullPolicy, Runtime, RuntimeError, RUN_LABEL,
};
use crate::task::{args, Step, StepKind, Task, DEFAULT_NETWORK, WORKSPACE};
pub use report::*;
use tracing::Instrument as _;

/// How one run is set up; names are decided by the caller because templates see them.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub run_id: String,
    /// Host directory copied into the shared volume and used as the build context root.
    pub context_dir: PathBuf,
    pub max_parallel: usize,
    /// Name of the volume mounted at `/workspace` (`.Run.SharedVolume`).
    pub shared_volume: String,
    /// Name of the run's default network (ACR's `acb_default_network`, made unique per run).
    pub network: String,
    /// Values of `{{.Secrets.id}}`, substituted when a step runs and masked in its logs.
    pub secrets: BTreeMap<String, String>,
    /// The platform every build and container targets (`None`: the engine's).
    pub platform: Option<crate::task::Platform>,
    /// The run's registry (`.Run.Registry`), which `acr` steps talk to by default.
    pub registry: Option<String>,
    /// Logins for the registries the run pulls from and pushes to (the run's own
    /// registry's is given with `Credentials::set`); their passwords are masked too.
    pub credentials: Arc<Credentials>,
    /// Content trust and signing for the images the run uses and pushes (none: neither).
    pub trust: Option<Arc<dyn ImageTrust>>,
    /// The stored task's name (`None`: a quick run, acb's `quickrun`), which names the
    /// registry cache of `cache: enabled` build steps.
    pub task_name: Option<String>,
}

/// A boxed future, for the object-safe traits a run is wired with.
pub type BoxFut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What a run asks of content trust, wired by whoever starts it (`setup::RunTrust`).
pub trait ImageTrust: Send + Sync + std::fmt::Debug {
    /// `Err(why)` when the run may not use `image` (a build's base, a step's image).
    fn check<'a>(&'a self, image: &'a str) -> BoxFut<'a, Result<(), String>>;
    /// Signs `image`, pushed as `digest`, when the run has a signing key (`login`: the
    /// run's for its registry); the signature's id, or `None` without a key.
    fn sign<'a>(
        &'a self,
        image: &'a str,
        digest: &'a str,
        login: Option<crate::credentials::Credential>,
    ) -> BoxFut<'a, Result<Option<String>, String>>;
}

impl RunConfig {
    /// Conventional resource names for a run id.
    pub fn for_run(run_id: &str, context_dir: PathBuf, max_parallel: usize) -> RunConfig {
        RunConfig {
            run_id: run_id.to_string(),
            context_dir,
            max_parallel: max_parallel.max(1),
            shared_volume: format!("acb_home_vol_{run_id}"),
            network: format!("{DEFAULT_NETWORK}_{run_id}"),
            secrets: BTreeMap::new(),
            platform: None,
            registry: None,
            credentials: Arc::default(),
            trust: None,
            task_name: None,
        }
    }
}

/// Where a `cache: enabled` build step keeps its layers, as acb names it:
/// `REGISTRY/REPO:cache_TASK_STEP` of the first tag that names a registry, else the run's
/// registry with the first tag's repository. None when there is neither.
pub fn cache_ref(
    tags: &[String],
    registry: Option<&str>,
    task: &str,
    step: &str,
) -> Option<String> {
    let names_registry = |t: &str| {
        t.split_once('/')
            .is_some_and(|(host, _)| host.contains(['.', ':']) || host == "localhost")
    };
    let repo_of = |t: &str| -> String {
        let t = t.split('@').next().unwrap_or(t);
        // A ':' after the last '/' starts the tag.
        match t.rfind(':') {
            Some(i) if !t[i..].contains('/') => t[..i].to_string(),
            _ => t.to_string(),
        }
    };
    let repo = match tags.iter().find(|t| names_registry(t)) {
        Some(t) => repo_of(t),
        None => format!("{}/{}", registry?, repo_of(tags.first()?)),
    };
    // A tag is at most 128 of [A-Za-z0-9_.-], not starting with '.' or '-'.
    let tag: String = format!("cache_{task}_{step}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    Some(format!("{repo}:{tag}"))
}

#[derive(Debug, Clone)]
pub enum Event {
    StepQueued { step: usize },
    StepStarted { step: usize, attempt: u32 },
    Log { step: usize, line: String },
    StepFinished { step: usize, report: StepReport },
    RunFinished { report: RunReport },
}

/// Runs `task` to the end and returns its report (also sent as `RunFinished`).
/// Cancelling `cancel` stops running steps, skips the rest and tears everything down.
pub async fn execute<R: Runtime>(
    rt: Arc<R>,
    task: Arc<Task>,
    plan: Arc<Plan>,
    cfg: RunConfig,
    events: UnboundedSender<Event>,
    cancel: CancellationToken,
) -> RunReport {
    let started = Instant::now();
    let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let labels = BTreeMap::from([(RUN_LABEL.to_string(), cfg.run_id.clone())]);
    let ctx = Arc::new(Ctx {
        rt,
        task,
        labels,
        events,
        network: Mutex::new(cfg.network.clone()),
        provisioning: tokio::sync::Mutex::new(()),
        run_started: started,
        removals: Mutex::new(Vec::new()),
        known_images: Mutex::new(std::collections::HashSet::new()),
        masker: Arc::new(secrets::Masker::new(
            cfg.secrets.values().chain(
                cfg.credentials
                    .given_secrets()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
                    .iter(),
            ),
        )),
        relay: tokio::sync::Mutex::new(None),
        prepared: Mutex::new(HashMap::new()),
        cfg,
    });
    let n = ctx.task.steps.len();
    let mut reports: Vec<Option<StepReport>> = vec![None; n];
    let (status, error) = match ctx.setup().await {
        Err(e) => (Status::Failed, Some(format!("setting up the run: {e}"))),
        Ok(()) => ctx.schedule(&plan, &mut reports, &cancel).await,
    };
    if let Some(r) = ctx.relay.lock().await.take() {
        r.task.abort();
    }
    ctx.prepares_done().await;
    ctx.removals_done().await;
    if let Err(e) = ctx.rt.remove_run_resources(&ctx.cfg.run_id).await {
        tracing::warn!(run = %ctx.cfg.run_id, error = %e, "cleanup of run resources failed");
    }
    let steps = reports
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let mut r = r.unwrap_or_else(|| skipped(&ctx.task.steps[i]));
            r.needs = step_needs(&ctx.task, &plan, i);
            r
        })
        .collect();
    let report = RunReport {
        run_id: ctx.cfg.run_id.clone(),
        status,
        started_at,
        duration_ms: started.elapsed().as_millis() as u64,
        error,
        steps,
    };
    let _ = ctx.events.send(Event::RunFinished {
        report: report.clone(),
    });
    report
}

/// The ids of the steps `step` waits for.
pub fn step_needs(task: &Task, plan: &Plan, step: usize) -> Vec<String> {
    plan.deps(step)
        .iter()
        .filter_map(|&d| task.steps.get(d).map(|s| s.id.clone()))
        .collect()
}

/// `build`, `cmd` or `push`.
pub fn kind_name(step: &Step) -> &'static str {
    match step.kind() {
        Some(StepKind::Build(_)) => "build",
        Some(StepKind::Cmd(_)) => "cmd",
        Some(StepKind::Push(_)) => "push",
        None => "invalid",
    }
}

fn skipped(step: &Step) -> StepReport {
    StepReport {
        id: step.id.clone(),
        kind: kind_name(step).to_string(),
        status: Status::Skipped,
        started_ms: 0,
        duration_ms: 0,
        exit_code: None,
        attempts: 0,
        ignored_error: false,
        error: None,
        pushed: Vec::new(),
        built: None,
        needs: Vec::new(),
    }
}

/// Docker names allow `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn container_name(run_id: &str, step_id: &str) -> String {
    let clean: String = step_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{run_id}_{clean}")
}

/// Outcome of one attempt of a step.
struct Attempt {
    status: Status,
    exit_code: Option<i64>,
    error: Option<String>,
    pushed: Vec<PushedImage>,
    built: Option<BuiltImage>,
}

impl Attempt {
    fn failed(error: impl std::fmt::Display) -> Attempt {
        Attempt {
            status: Status::Failed,
            exit_code: None,
            error: Some(error.to_string()),
            pushed: Vec::new(),
            built: None,
        }
    }
    fn with(status: Status, error: Option<String>) -> Attempt {
        Attempt {
            status,
            exit_code: None,
            error,
            pushed: Vec::new(),
            built: None,
        }
    }
}

/// Whether an exit code means success for this step (ACR's exitedWith / exitedWithout).
pub fn exit_ok(step: &Step, code: i64) -> bool {
    if !step.exited_with.is_empty() {
        step.exited_with.contains(&code)
    } else if !step.exited_without.is_empty() {
        !step.exited_without.contains(&code)
    } else {
        code == 0
    }
}

struct Ctx<R> {
    rt: Arc<R>,
    task: Arc<Task>,
    cfg: RunConfig,
    labels: BTreeMap<String, String>,
    events: UnboundedSender<Event>,
    /// The network steps join when they name none (a task network marked `isDefault` wins).
    network: Mutex<String>,
    run_started: Instant,
    removals: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Images known present (checked once per run for the `Missing` pull policy).
    known_images: Mutex<std::collections::HashSet<String>>,
    /// Serialises on-demand runner builds between parallel steps.
    provisioning: tokio::sync::Mutex<()>,
    /// Hides the run's secrets in everything it reports.
    masker: Arc<secrets::Masker>,
    /// Relays the run's loopback registry to `acr` steps (started by the first one).
    relay: tokio::sync::Mutex<Option<Relay>>,
    /// Containers made ahead for steps not yet ready (see [`Ctx::prepare_step`]): the
    /// spec each was made from, or `None` where preparing was not possible.
    prepared: Mutex<HashMap<usize, tokio::task::JoinHandle<Option<ContainerSpec>>>>,
}

/// How many steps may wait in prepared containers at once: enough to keep the engine's
/// start of the next containers off the critical path, few enough not to crowd the steps
/// that run (two cores).
const PREPARE_AHEAD: usize = 2;

/// A listener on the run network's gateway that forwards to the run's registry, for its
/// containers only.
struct Relay {
    network: String,
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl<R: Runtime> Ctx<R> {
    fn default_network(&self) -> String {
        self.network
            .lock()
            .map(|n| n.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn volume_name(&self, name: &str) -> String {
        container::volume_name(&self.cfg, name)
    }

    async fn setup(&self) -> Result<(), crate::runtime::RuntimeError> {
        self.rt.ping().await?;
        let mut default = None;
        for net in &self.task.networks {
            if !net.skip_creation {
                self.rt
                    .create_network(&net.name, net.driver.as_deref(), net.ipv6, &self.labels)
                    .await?;
            }
            if net.is_default {
                default = Some(net.name.clone());
            }
        }
        match default {
            Some(name) => {
                if let Ok(mut n) = self.network.lock() {
                    *n = name;
                }
            }
            None => {
                self.rt
                    .create_network(&self.cfg.network, None, false, &self.labels)
                    .await?
            }
        }
        self.rt
            .create_volume(&self.cfg.shared_volume, &self.labels)
            .await?;
        self.rt
            .fill_volume(
                &self.cfg.shared_volume,
                Some(crate::runtime::VolumeSource {
                    dir: &self.cfg.context_dir,
                    mounted_at: WORKSPACE,
                }),
                &BTreeMap::new(),
                &self.labels,
            )
            .await?;
        for vol in &self.task.volumes {
            let name = self.volume_name(&vol.name);
            self.rt.create_volume(&name, &self.labels).await?;
            let mut files = BTreeMap::new();
            for (file, b64) in &vol.secret {
                let data = crate::task::b64decode(b64).ok_or_else(|| {
                    crate::runtime::RuntimeError::Invalid {
                        what: "volume secret",
                        value: format!("{}/{}", vol.name, file),
                        reason: "not valid base64".into(),
                    }
                })?;
                files.insert(file.clone(), data);
            }
            if !files.is_empty() {
                self.rt
                    .fill_volume(&name, None, &files, &self.labels)
                    .await?;
            }
        }
        Ok(())
    }

    async fn schedule(
        self: &Arc<Self>,
        plan: &Plan,
        reports: &mut [Option<StepReport>],
        cancel: &CancellationToken,
    ) -> (Status, Option<String>) {
        #[derive(Clone, Copy, PartialEq)]
        enum St {
            Pending,
            Running,
            Done(bool),
        }
        let n = self.task.steps.len();
        let mut state = vec![St::Pending; n];
        for step in 0..n {
            let _ = self.events.send(Event::StepQueued { step });
        }
        let steps_cancel = cancel.child_token();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(self.task.total_timeout);
        let mut set: JoinSet<(usize, StepReport)> = JoinSet::new();
        let mut outcome: Option<(Status, String)> = None;
        loop {
            if outcome.is_none() {
                for i in 0..n {
                    if set.len() >= self.cfg.max_parallel {
                        break;
                    }
                    if state[i] == St::Pending
                        && plan.deps(i).iter().all(|d| state[*d] == St::Done(true))
                    {
                        state[i] = St::Running;
                        let ctx = Arc::clone(self);
                        let c = steps_cancel.clone();
                        // A span per step (inside the run's): every log line of the
                        // step names it (`--log-format json`).
                        let span = tracing::info_span!("step", step = %ctx.task.steps[i].id);
                        set.spawn(async move { (i, ctx.run_step(i, c).await) }.instrument(span));
                    }
                }
                self.prepare_ahead(plan, &|i| match state[i] {
                    St::Pending => Some(false),
                    St::Running => Some(true),
                    St::Done(ok) => ok.then_some(true),
                });
            }
            if set.is_empty() {
                break;
            }
            // Biased: a cancel or the total timeout is recorded before the step reports it
            // causes, so the run's status names the cause, not a canceled step.
            tokio::select! {
                biased;
                _ = cancel.cancelled(), if outcome.is_none() => {
                    outcome = Some((Status::Canceled, "run canceled".to_string()));
                    steps_cancel.cancel();
                }
                _ = tokio::time::sleep_until(deadline), if outcome.is_none() => {
                    outcome = Some((Status::TimedOut, format!("run timed out after {} s", self.task.total_timeout)));
                    steps_cancel.cancel();
                }
                joined = set.join_next() => {
                    let Some(joined) = joined else { break };
                    let (i, report) = match joined {
                        Ok(r) => r,
                        Err(e) => {
                            // A panicking step must not take the run down silently.
                            outcome.get_or_insert((Status::Failed, format!("internal error: {e}")));
                            steps_cancel.cancel();
                            continue;
                        }
                    };
                    let ok = report.status == Status::Succeeded || report.ignored_error;
                    state[i] = St::Done(ok);
                    if !ok && outcome.is_none() {
                        let why = report.error.clone().unwrap_or_else(|| report.status.as_str().to_lowercase());
                        outcome = Some((Status::Failed, format!("step `{}` failed: {why}", report.id)));
                        steps_cancel.cancel();
                    }
                    let _ = self.events.send(Event::StepFinished { step: i, report: report.clone() });
                    reports[i] = Some(report);
                }
            }
        }
        match outcome {
            None => (Status::Succeeded, None),
            Some((s, e)) => (s, Some(e)),
        }
    }

    /// Starts preparing containers for the steps that come next: pending steps whose
    /// every dependency is running, done or itself prepared, in the task's order, at most
    /// [`PREPARE_AHEAD`] waiting at a time. `progress(i)`: `Some(true)` for a step running or
    /// succeeded, `Some(false)` for one pending, `None` for one that failed.
    fn prepare_ahead(self: &Arc<Self>, plan: &Plan, progress: &dyn Fn(usize) -> Option<bool>) {
        if !self.warm_start_allowed() {
            return;
        }
        let Ok(mut prepared) = self.prepared.lock() else {
            return;
        };
        let mut waiting = prepared
            .keys()
            .filter(|i| progress(**i) == Some(false))
            .count();
        for i in 0..self.task.steps.len() {
            if waiting >= PREPARE_AHEAD {
                break;
            }
            if progress(i) != Some(false) || prepared.contains_key(&i) {
                continue;
            }
            let deps_coming = plan
                .deps(i)
                .iter()
                .all(|d| progress(*d) == Some(true) || prepared.contains_key(d));
            if !deps_coming || !self.warm_candidate(&self.task.steps[i]) {
                continue;
            }
            let ctx = Arc::clone(self);
            prepared.insert(i, tokio::spawn(async move { ctx.prepare_step(i).await }));
            waiting += 1;
        }
    }

    /// Whether this run may prepare containers ahead at all: a step that can reach the
    /// engine itself (the Docker socket) could change what a later step's image is.
    fn warm_start_allowed(&self) -> bool {
        self.task.steps.len() > 1
            && !self.task.steps.iter().any(|s| {
                s.kind().is_some_and(|k| match k {
                    StepKind::Cmd(c) => c.contains("docker.sock"),
                    _ => false,
                })
            })
    }

    /// Whether a step's container can be made before it is ready: a plain `cmd` step
    /// (not detached, kept or pulled each time) whose image no step of this run builds.
    fn warm_candidate(&self, step: &Step) -> bool {
        let Some(StepKind::Cmd(cmd)) = step.kind() else {
            return false;
        };
        if step.detach || step.keep || step.pull {
            return false;
        }
        let Ok(line) = args::parse_cmd_line(cmd) else {
            return false;
        };
        let image = line.image.as_str();
        if crate::runtime::runner::is_acr_image(image) {
            return false;
        }
        !self.task.steps.iter().any(|s| match s.kind() {
            Some(StepKind::Build(b)) => args::parse_build(b)
                .map(|b| b.tags.iter().any(|t| t == image))
                .unwrap_or(true),
            _ => false,
        })
    }

    /// Makes step `i`'s first container ahead, gated (see [`Runtime::prepare`]), when its
    /// image is here already and nothing in its spec ties it to the moment it runs
    /// (published ports, a terminal, another container's namespaces).
    async fn prepare_step(self: Arc<Self>, i: usize) -> Option<ContainerSpec> {
        let step = self.with_task_env(&self.task.steps[i]);
        let Some(StepKind::Cmd(cmd)) = step.kind() else {
            return None;
        };
        let line = args::parse_cmd_line(cmd).ok()?;
        // Pulls stay where their progress is shown: in the step.
        let image = line.image.clone();
        let known = self
            .known_images
            .lock()
            .map(|s| s.contains(&image))
            .unwrap_or(false);
        if !known && !matches!(self.rt.image_digest(&image).await, Ok(Some(_))) {
            return None;
        }
        let name = container_name(&self.cfg.run_id, &step.id);
        let spec = self.container_spec(&step, &name, line);
        let tied = |m: &Option<String>| m.as_deref().is_some_and(|m| m.starts_with("container:"));
        if spec.tty
            || !spec.ports.is_empty()
            || [
                &spec.pid_mode,
                &spec.ipc_mode,
                &spec.uts_mode,
                &spec.network,
            ]
            .into_iter()
            .any(tied)
        {
            return None;
        }
        match self.rt.prepare(&spec).await {
            Ok(true) => Some(spec),
            Ok(false) => None,
            Err(e) => {
                tracing::debug!(container = %name, error = %e, "preparing a step ahead failed");
                let _ = self.rt.remove_container(&name).await;
                None
            }
        }
    }

    /// The container prepared for step `i`'s first attempt, if one was.
    async fn take_prepared(&self, i: usize) -> Option<ContainerSpec> {
        let handle = self.prepared.lock().ok()?.remove(&i)?;
        handle.await.ok().flatten()
    }

    /// Waits for preparations still in flight (before the teardown sweep, so it sees what
    /// they made).
    async fn prepares_done(&self) {
        let handles: Vec<_> = match self.prepared.lock() {
            Ok(mut p) => p.drain().map(|(_, h)| h).collect(),
            Err(_) => Vec::new(),
        };
        for h in handles {
            let _ = h.await;
        }
    }

    /// Removes a finished container in the background; teardown waits for it.
    fn remove_later(&self, name: String) {
        let rt = Arc::clone(&self.rt);
        let handle = tokio::spawn(async move {
            if let Err(e) = rt.remove_container(&name).await {
                tracing::warn!(container = %name, error = %e, "removing step container failed");
            }
        });
        if let Ok(mut r) = self.removals.lock() {
            r.push(handle);
        }
    }

    /// Waits for background removals (called before the teardown sweep).
    async fn removals_done(&self) {
        let handles: Vec<_> = match self.removals.lock() {
            Ok(mut r) => r.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for h in handles {
            let _ = h.await;
        }
    }

    fn log_sink(&self, step: usize) -> LogSink {
        let events = self.events.clone();
        let masker = self.masker.clone();
        Arc::new(move |line: String| {
            let line = masker.mask(&line);
            let _ = events.send(Event::Log { step, line });
        })
    }

    fn mask(&self, text: &str) -> String {
        self.masker.mask(text)
    }

    /// The step with the task's env before its own (a step's entry wins, being later).
    fn with_task_env(&self, step: &Step) -> Step {
        let mut step = step.clone();
        let mut env = self.task.env.clone();
        env.append(&mut step.env);
        step.env = env;
        step
    }

    async fn run_step(self: Arc<Self>, i: usize, cancel: CancellationToken) -> StepReport {
        let started = Instant::now();
        let mut attempts = 0;
        let mut last = Attempt::with(Status::Succeeded, None);
        let step = &self.with_task_env(&self.task.steps[i]);
        let timeout = Duration::from_secs(step.effective_timeout(&self.task));
        let base_name = container_name(&self.cfg.run_id, &step.id);
        let log = self.log_sink(i);
        if step.start_delay > 0
            && !sleep_or_cancel(Duration::from_secs(step.start_delay), &cancel).await
        {
            last = Attempt::with(Status::Canceled, Some("canceled".into()));
        } else {
            'repeat: for _ in 0..=step.repeat {
                for retry in 0..=step.retries {
                    attempts += 1;
                    // Each attempt gets its own container, so removing the last one can
                    // happen off the critical path.
                    let name = if attempts == 1 {
                        base_name.clone()
                    } else {
                        format!("{base_name}_{attempts}")
                    };
                    let _ = self.events.send(Event::StepStarted {
                        step: i,
                        attempt: attempts,
                    });
                    tracing::info!(attempt = attempts, "step started");
                    // `retryOnErrors`: whether this attempt's output named one of them.
                    let matched = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let attempt_log: LogSink = if step.retry_on_errors.is_empty() {
                        log.clone()
                    } else {
                        let (log, matched, needles) =
                            (log.clone(), matched.clone(), step.retry_on_errors.clone());
                        Arc::new(move |line: String| {
                            if needles.iter().any(|n| line.contains(n.as_str())) {
                                matched.store(true, std::sync::atomic::Ordering::SeqCst);
                            }
                            log(line)
                        })
                    };
                    let prepared = if attempts == 1 {
                        tokio::select! {
                            p = self.take_prepared(i) => p,
                            _ = cancel.cancelled() => None,
                        }
                    } else {
                        None
                    };
                    last = tokio::select! {
                        r = tokio::time::timeout(timeout, self.attempt(step, &name, &attempt_log, prepared)) => match r {
                            Ok(a) => a,
                            Err(_) => Attempt::with(Status::TimedOut, Some(format!("step {} timed out after {} s", step.id, timeout.as_secs()))),
                        },
                        _ = cancel.cancelled() => Attempt::with(Status::Canceled, Some("canceled".into())),
                    };
                    // A detached container lives on until the run ends; any other is done now.
                    if !(step.detach && last.status == Status::Succeeded) {
                        self.remove_later(name);
                    }
                    if matches!(last.status, Status::Succeeded | Status::Canceled) {
                        break;
                    }
                    let named = matched.load(std::sync::atomic::Ordering::SeqCst)
                        || last.error.as_deref().is_some_and(|e| {
                            step.retry_on_errors.iter().any(|n| e.contains(n.as_str()))
                        });
                    if !step.retry_on_errors.is_empty() && !named {
                        if retry < step.retries {
                            log("the failure names none of `retryOnErrors`: not retried".into());
                        }
                        break;
                    }
                    if retry < step.retries {
                        log(format!(
                            "attempt {attempts} failed; retrying in {} s",
                            step.retry_delay
                        ));
                        if !sleep_or_cancel(Duration::from_secs(step.retry_delay), &cancel).await {
                            last = Attempt::with(Status::Canceled, Some("canceled".into()));
                            break 'repeat;
                        }
                    }
                }
                if last.status != Status::Succeeded {
                    break;
                }
            }
        }
        let ignored_error =
            step.ignore_errors && matches!(last.status, Status::Failed | Status::TimedOut);
        let last_error = last.error.as_deref().map(|e| self.mask(e));
        tracing::info!(
            status = last.status.as_str(),
            attempts,
            ms = started.elapsed().as_millis() as u64,
            "step finished"
        );
        StepReport {
            id: step.id.clone(),
            kind: kind_name(step).to_string(),
            status: last.status,
            started_ms: started.duration_since(self.run_started).as_millis() as u64,
            duration_ms: started.elapsed().as_millis() as u64,
            exit_code: last.exit_code,
            attempts,
            ignored_error,
            error: last_error,
            pushed: last.pushed,
            built: last.built,
            needs: Vec::new(),
        }
    }

    async fn attempt(
        &self,
        step: &Step,
        name: &str,
        log: &LogSink,
        prepared: Option<ContainerSpec>,
    ) -> Attempt {
        match step.kind() {
            Some(StepKind::Cmd(_)) if prepared.is_some() => {
                let spec = prepared.unwrap_or_default();
                self.exited(step, self.rt.run_prepared(&spec, log).await)
            }
            Some(StepKind::Cmd(cmd)) => self.cmd(step, cmd, name, log).await,
            Some(StepKind::Build(build)) => self.build(step, build, log).await,
            Some(StepKind::Push(images)) => self.push(images, log).await,
            None => Attempt::failed("a step needs exactly one of build, cmd or push"),
        }
    }

    fn container_spec(&self, step: &Step, name: &str, cmd: args::CmdLine) -> ContainerSpec {
        container::spec(&container::Setting {
            task: &self.task,
            cfg: &self.cfg,
            default_network: &self.default_network(),
            labels: &self.labels,
            step,
            name,
            cmd,
        })
    }

    /// The run's platform as the engine names it (`linux/arm64`).
    fn platform(&self) -> Option<String> {
        self.cfg.platform.as_ref().map(ToString::to_string)
    }

    async fn cmd(&self, step: &Step, cmd: &str, name: &str, log: &LogSink) -> Attempt {
        let line = match args::parse_cmd_line(cmd) {
            Ok(x) => x,
            Err(e) => return Attempt::failed(e),
        };
        let image = line.image.clone();
        let policy = if step.pull {
            PullPolicy::Always
        } else {
            PullPolicy::Missing
        };
        let platform = self.platform();
        // `cmdDownloadRetries`: more tries of the pull, `cmdDownloadRetryDelay` apart.
        let mut tries = 0;
        loop {
            match self
                .ensure_image(&image, policy, platform.as_deref(), log)
                .await
            {
                Ok(()) => break,
                Err(e) if tries < step.cmd_download_retries => {
                    tries += 1;
                    log(format!("pulling {image} failed ({e}); retry {tries}"));
                    tokio::time::sleep(Duration::from_secs(step.cmd_download_retry_delay)).await;
                }
                Err(e) => return Attempt::failed(format!("step {}: {e}", step.id)),
            }
        }
        let mut spec = self.container_spec(step, name, line);
        if crate::runtime::runner::is_acr_image(&spec.image) {
            match self.acr_env(&spec).await {
                Ok(env) => {
                    // Before the step's own, so a step's `ACR_DEFAULT_REGISTRY` wins.
                    spec.env.splice(0..0, env);
                }
                Err(e) => return Attempt::failed(format!("step {}: {e}", step.id)),
            }
        }
        if step.detach {
            return match self.rt.start_detached(&spec, log).await {
                Ok(()) => Attempt::with(Status::Succeeded, None),
                Err(e) => Attempt::failed(e),
            };
        }
        self.exited(step, self.rt.run(&spec, log).await)
    }

    /// A finished container's attempt: by its exit code and the step's `exitedWith`.
    fn exited(&self, step: &Step, result: Result<i64, RuntimeError>) -> Attempt {
        match result {
            Ok(code) => {
                let ok = exit_ok(step, code);
                Attempt {
                    status: if ok {
                        Status::Succeeded
                    } else {
                        Status::Failed
                    },
                    exit_code: Some(code),
                    error: (!ok).then(|| format!("exited with code {code}")),
                    pushed: Vec::new(),
                    built: None,
                }
            }
            Err(e) => Attempt::failed(e),
        }
    }

    /// What an `acr` step needs to reach the run's registry: `ACR_DEFAULT_REGISTRY`, and,
    /// when the registry is on the host's loopback, a relay on the step network's gateway
    /// (`ACR_TASK_RELAY`, served inside the container by the acr image).
    async fn acr_env(&self, spec: &ContainerSpec) -> Result<Vec<String>, RuntimeError> {
        let Some(registry) = self.cfg.registry.clone() else {
            return Ok(Vec::new());
        };
        let mut env = vec![format!("{}={registry}", crate::relay::DEFAULT_REGISTRY_ENV)];
        // The run's own login, for `acr` commands that name no other (never logged: masked).
        if let Some(login) = self.login_for_host(registry.clone()).await {
            env.push(format!("{}={}", crate::relay::USERNAME_ENV, login.username));
            env.push(format!("{}={}", crate::relay::PASSWORD_ENV, login.password));
        }
        let Some((host, port)) = registry.rsplit_once(':') else {
            return Ok(env);
        };
        let loopback = crate::registry::reference::is_loopback(&registry);
        let Some(network) = spec.network.clone().filter(|_| loopback) else {
            return Ok(env);
        };
        let mut relay = self.relay.lock().await;
        if relay.as_ref().is_some_and(|r| r.network != network) {
            // One relay per run: only the run's default network is served.
            return Ok(env);
        }
        if relay.is_none() {
            let Some(gw) = self.rt.network_gateway(&network).await? else {
                return Ok(env);
            };
            let target: Vec<std::net::SocketAddr> = tokio::net::lookup_host(&registry)
                .await
                .map(|a| a.collect())
                .unwrap_or_default();
            let listener = tokio::net::TcpListener::bind((gw.gateway, 0))
                .await
                .map_err(|e| {
                    RuntimeError::Engine(format!(
                        "relaying the registry to network {network} on {}: {e}",
                        gw.gateway
                    ))
                })?;
            let addr = listener
                .local_addr()
                .map_err(|e| RuntimeError::Engine(format!("relay address: {e}")))?;
            let task = tokio::spawn(crate::relay::forward(listener, target, move |peer| {
                gw.contains(peer.ip())
            }));
            *relay = Some(Relay {
                network,
                addr,
                task,
            });
        }
        if let Some(r) = relay.as_ref() {
            let inside = if host == "localhost" {
                "127.0.0.1"
            } else {
                host
            };
            env.push(format!(
                "{}={inside}:{port}={}",
                crate::relay::RELAY_ENV,
                r.addr
            ));
        }
        Ok(env)
    }

    /// The login for `image`'s registry, if the run has one (a credential helper may be
    /// asked: off the async threads).
    async fn login_for(&self, image: &str) -> Option<Credential> {
        let host = ImageRef::parse(image)?.api_host().to_string();
        self.login_for_host(host).await
    }

    /// The run's login for a registry host, if it has one.
    async fn login_for_host(&self, host: String) -> Option<Credential> {
        let creds = self.cfg.credentials.clone();
        tokio::task::spawn_blocking(move || creds.get(&host))
            .await
            .ok()
            .flatten()
    }

    /// Like `Runtime::ensure_image`, but makes runner images (`busybox`) from the local
    /// recipe when the engine lacks them and no registry has them.
    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        platform: Option<&str>,
        log: &LogSink,
    ) -> Result<(), RuntimeError> {
        let known = |set: &Mutex<std::collections::HashSet<String>>| {
            set.lock().map(|s| s.contains(image)).unwrap_or(false)
        };
        if let Some(t) = &self.cfg.trust {
            t.check(image).await.map_err(RuntimeError::Denied)?;
        }
        if policy == PullPolicy::Missing && known(&self.known_images) {
            return Ok(());
        }
        let result = if crate::runtime::runner::is_acr_image(image) {
            self.ensure_acr_image(log).await
        } else {
            let login = self.login_for(image).await;
            match self
                .rt
                .ensure_image(image, policy, platform, login.as_ref(), log)
                .await
                .map_err(|e| login_hint(e, image, login.is_some()))
            {
                Err(RuntimeError::ImageNotFound { .. })
                    if crate::runtime::runner::is_runner_image(image) =>
                {
                    self.build_runner_if_absent(image, log).await
                }
                other => other,
            }
        };
        if result.is_ok() {
            if let Ok(mut set) = self.known_images.lock() {
                set.insert(image.to_string());
            }
        }
        result
    }

    async fn build_runner_if_absent(&self, image: &str, log: &LogSink) -> Result<(), RuntimeError> {
        let _guard = self.provisioning.lock().await;
        if self
            .rt
            .image_label(image, crate::runtime::runner::RUNNER_LABEL)
            .await?
            .is_none()
        {
            log(format!(
                "{image} not found: building it from the host's busybox (runners/busybox)"
            ));
            crate::runtime::runner::build_runner(self.rt.as_ref(), log).await?;
        }
        Ok(())
    }

    /// The acr image is this binary: (re)built when absent or made of another build.
    async fn ensure_acr_image(&self, log: &LogSink) -> Result<(), RuntimeError> {
        use crate::runtime::runner::{self, ACR_BINARY_LABEL, RUNNER_IMAGE};
        let (_, key) = runner::acr_binary()?;
        let current = |label: Option<Option<String>>| label.flatten().as_deref() == Some(&key);
        let image = crate::task::alias::ACR_IMAGE;
        if current(self.rt.image_label(image, ACR_BINARY_LABEL).await?) {
            return Ok(());
        }
        self.build_runner_if_absent(RUNNER_IMAGE, log).await?;
        let _guard = self.provisioning.lock().await;
        if !current(self.rt.image_label(image, ACR_BINARY_LABEL).await?) {
            log(format!(
                "{image}: building it from this acr-task binary (runners/acr)"
            ));
            runner::build_acr_image(self.rt.as_ref(), log).await?;
        }
        Ok(())
    }

    async fn build(&self, step: &Step, build: &str, log: &LogSink) -> Attempt {
        let mut b = match args::parse_build(build) {
            Ok(b) => b,
            Err(e) => return Attempt::failed(e),
        };
        // `--build-arg KEY`: from the step's environment (task env, then the step's own).
        for key in std::mem::take(&mut b.env_build_args) {
            let prefix = format!("{key}=");
            if let Some(v) = step.env.iter().rev().find_map(|e| e.strip_prefix(&prefix)) {
                b.build_args.insert(key, v.to_string());
            }
        }
        if b.context.contains("://") || b.context.starts_with("git@") {
            return Attempt::failed(format!(
                "remote build context `{}` is not supported; use a path in the context",
                b.context
            ));
        }
        // Paths are relative to the workspace (the run's shared volume), so files earlier
        // steps wrote there are part of the build, as in ACR.
        let context = match workspace_path(&b.context) {
            Ok(p) => p,
            Err(e) => return Attempt::failed(e),
        };
        // `-f` is relative to the working directory (the workspace root), as with `docker build`.
        let dockerfile_path = match &b.dockerfile {
            Some(f) => workspace_path(f),
            None if context.is_empty() => Ok("Dockerfile".to_string()),
            None => Ok(format!("{context}/Dockerfile")),
        };
        let dockerfile_path = match dockerfile_path {
            Ok(p) => p,
            Err(e) => return Attempt::failed(e),
        };
        let dockerfile = if context.is_empty() {
            dockerfile_path.clone()
        } else {
            match dockerfile_path.strip_prefix(&format!("{context}/")) {
                Some(rel) => rel.to_string(),
                None => {
                    return Attempt::failed(format!(
                        "Dockerfile {dockerfile_path} is outside the build context {context}"
                    ))
                }
            }
        };
        let text = match self
            .rt
            .read_volume_file(&self.cfg.shared_volume, &dockerfile_path)
            .await
        {
            Ok(Some(t)) => String::from_utf8_lossy(&t).into_owned(),
            Ok(None) => {
                return Attempt::failed(format!(
                    "Dockerfile {dockerfile_path} not found in the workspace"
                ))
            }
            Err(e) => return Attempt::failed(format!("cannot read {dockerfile_path}: {e}")),
        };
        let bases = crate::dockerfile::base_images(&text, &b.build_args);
        // `--platform` on the step wins over the run's.
        let platform = b.platform.clone().or_else(|| self.platform());
        // Fetch (or make) base images first: a missing one then names itself and the step.
        for image in &bases {
            let policy = if b.pull || step.pull {
                PullPolicy::Always
            } else {
                PullPolicy::Missing
            };
            if let Err(e) = self
                .ensure_image(image, policy, platform.as_deref(), log)
                .await
            {
                return Attempt::failed(format!("step {}: base image: {e}", step.id));
            }
        }
        // `cache: enabled`: layers from (and, after the build, to) the step's cache image
        // in a registry, so a build on another engine reuses them (acb's registry cache).
        let mut cache_from = b.cache_from.clone();
        let cache = step
            .cache
            .as_deref()
            .filter(|c| c.eq_ignore_ascii_case("enabled"))
            .and_then(|_| {
                let task = self.cfg.task_name.as_deref().unwrap_or("quickrun");
                cache_ref(&b.tags, self.cfg.registry.as_deref(), task, &step.id)
            });
        if let Some(c) = &cache {
            match self
                .ensure_image(c, PullPolicy::Always, platform.as_deref(), log)
                .await
            {
                Ok(()) => {
                    log(format!("cache: reusing the layers of {c}"));
                    cache_from.push(c.clone());
                }
                Err(e) => log(format!("cache: not using {c} ({e}); this build fills it")),
            }
        }
        // The engine pulls base images again with `--pull`, and reads `--cache-from` ones.
        let mut registry_auth = BTreeMap::new();
        for image in bases.iter().chain(&cache_from) {
            if let (Some(r), Some(login)) = (ImageRef::parse(image), self.login_for(image).await) {
                registry_auth.insert(r.registry, login);
            }
        }
        let spec = BuildSpec {
            context: crate::runtime::BuildContext::Volume {
                volume: self.cfg.shared_volume.clone(),
                path: if context.is_empty() {
                    ".".into()
                } else {
                    context
                },
            },
            dockerfile,
            tags: b.tags.iter().chain(&cache).cloned().collect(),
            build_args: b.build_args,
            target: b.target,
            no_cache: b.no_cache
                || step
                    .cache
                    .as_deref()
                    .is_some_and(|c| c.eq_ignore_ascii_case("disabled")),
            cache_from,
            platform,
            pull: b.pull || step.pull,
            network: Some(b.network.unwrap_or_else(|| self.default_network())),
            labels: b.labels,
            limits: Default::default(),
            registry_auth,
        };
        match self.rt.build(&spec, log).await {
            Ok(out) => {
                if let Some(c) = &cache {
                    // Best effort: a cache that cannot be written costs the next build time,
                    // not this step.
                    let login = self.login_for(c).await;
                    match self.rt.push(c, login.as_ref(), log).await {
                        Ok(_) => log(format!("cache: pushed {c}")),
                        Err(e) => log(format!("cache: could not push {c}: {e}")),
                    }
                }
                let mut base_images = Vec::new();
                for image in bases {
                    let local = self.rt.image_digest(&image).await.ok().flatten();
                    base_images.push(BaseImage {
                        image,
                        digest: local.as_ref().and_then(|l| l.repo_digest.clone()),
                        image_id: local.map(|l| l.id),
                    });
                }
                Attempt {
                    status: Status::Succeeded,
                    exit_code: Some(0),
                    error: None,
                    pushed: Vec::new(),
                    built: Some(BuiltImage {
                        tags: b.tags,
                        image_id: out.image_id,
                        base_images,
                    }),
                }
            }
            Err(e) => Attempt::failed(e),
        }
    }

    async fn push(&self, images: &[String], log: &LogSink) -> Attempt {
        let mut pushed = Vec::new();
        for image in images {
            let login = self.login_for(image).await;
            match self
                .rt
                .push(image, login.as_ref(), log)
                .await
                .map_err(|e| login_hint(e, image, login.is_some()))
            {
                Ok(digest) => {
                    if let Some(t) = &self.cfg.trust {
                        match t.sign(image, &digest, login.clone()).await {
                            Ok(Some(sig)) => log(format!("signed {image} ({digest}): {sig}")),
                            Ok(None) => {}
                            Err(e) => {
                                let mut a = Attempt::failed(format!("signing {image}: {e}"));
                                a.pushed = pushed;
                                return a;
                            }
                        }
                    }
                    pushed.push(PushedImage {
                        image: image.clone(),
                        digest,
                    })
                }
                Err(e) => {
                    let mut a = Attempt::failed(e);
                    a.pushed = pushed;
                    return a;
                }
            }
        }
        Attempt {
            status: Status::Succeeded,
            exit_code: None,
            error: None,
            pushed,
            built: None,
        }
    }
}

/// Says what to do when a registry refused a push or pull for want of a login.
fn login_hint(e: RuntimeError, image: &str, had_login: bool) -> RuntimeError {
    let refused = |m: &str| {
        let m = m.to_ascii_lowercase();
        m.contains("unauthorized") || m.contains("authentication required") || m.contains("denied")
    };
    let host = ImageRef::parse(image)
        .map(|r| r.registry)
        .unwrap_or_default();
    let hint = if had_login {
        format!(" (the login for {host} was refused or may not do this)")
    } else {
        format!(
            " (no login for {host}: `docker login {host}` for `acr-task run`, or \
             `acr-task task credential add NAME --login-server {host} ...` for a stored task)"
        )
    };
    match e {
        RuntimeError::Push { image, message } if refused(&message) => RuntimeError::Push {
            image,
            message: message + &hint,
        },
        RuntimeError::ImageNotFound { image, reason } if refused(&reason) => {
            RuntimeError::ImageNotFound {
                image,
                reason: reason + &hint,
            }
        }
        other => other,
    }
}

/// A path in the workspace, relative to its root, without `.` parts (`""` is the root).
/// `/workspace/...` is accepted; paths leaving the workspace are refused.
fn workspace_path(p: &str) -> Result<String, String> {
    let rel = match p.strip_prefix(WORKSPACE) {
        Some(r) if r.is_empty() || r.starts_with('/') => r,
        _ if p.starts_with('/') => return Err(format!("path {p} is outside {WORKSPACE}")),
        _ => p,
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in rel.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("path {p} leaves the workspace"));
                }
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Sleeps; false when cancelled first.
async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = cancel.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let mut s = Step::default();
        assert!(exit_ok(&s, 0) && !exit_ok(&s, 1));
        s.exited_with = vec![0, 3];
        assert!(exit_ok(&s, 3) && !exit_ok(&s, 1));
        s.exited_with.clear();
        s.exited_without = vec![2];
        assert!(exit_ok(&s, 1) && !exit_ok(&s, 2));
    }

    #[test]
    fn workspace_paths() {
        assert_eq!(workspace_path(".").unwrap(), "");
        assert_eq!(workspace_path("./app/").unwrap(), "app");
        assert_eq!(workspace_path("/workspace/app/../web").unwrap(), "web");
        assert!(workspace_path("../etc").is_err());
        assert!(workspace_path("/etc/passwd").is_err());
    }

    #[test]
    fn base64() {
        use crate::task::b64decode;
        assert_eq!(b64decode("aGVsbG8gd29ybGQ=").unwrap(), b"hello world");
        assert_eq!(b64decode("YQ==").unwrap(), b"a");
        assert_eq!(b64decode("YQ").unwrap(), b"a");
        assert!(b64decode("a*b").is_none());
    }

    #[test]
    fn container_names_are_valid() {
        assert_eq!(container_name("r1", "build app"), "r1_build_app");
    }

    #[test]
    fn a_build_cache_lives_beside_the_first_tag_with_a_registry() {
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            cache_ref(
                &tags(&["app:1", "reg.io:5000/team/app:2"]),
                Some("run:5000"),
                "t",
                "b"
            ),
            Some("reg.io:5000/team/app:cache_t_b".into())
        );
        // No tag names a registry: the run's, with the first tag's repository.
        assert_eq!(
            cache_ref(
                &tags(&["team/app:1"]),
                Some("127.0.0.1:5000"),
                "quickrun",
                "build app"
            ),
            Some("127.0.0.1:5000/team/app:cache_quickrun_build_app".into())
        );
        assert_eq!(cache_ref(&tags(&["app"]), None, "t", "b"), None);
        assert_eq!(cache_ref(&[], Some("r:1"), "t", "b"), None);
        let long = "s".repeat(300);
        let r = cache_ref(&tags(&["localhost/app@sha256:ab"]), None, "t", &long).unwrap();
        assert!(
            r.starts_with("localhost/app:cache_t_s") && r.len() == "localhost/app:".len() + 128
        );
    }
}
