//! A `cmd` step's container, as plain data: the step's fields, the task's defaults and the
//! docker flags written at the start of its `cmd` (which come last, so they win, as in
//! ACR where `cmd` is appended to `docker run <acb's flags>`). Pure, so the policy can
//! check a task's containers before anything runs.

use std::collections::BTreeMap;

use super::RunConfig;
use crate::runtime::{ContainerSpec, Limits, Mount};
use crate::task::args::CmdLine;
use crate::task::{Step, Task, DEFAULT_NETWORK, WORKSPACE};

/// What a step's container is made from.
pub struct Setting<'a> {
    pub task: &'a Task,
    pub cfg: &'a RunConfig,
    /// The network steps join when they name none.
    pub default_network: &'a str,
    /// The run's labels (not put on `keep: true` containers).
    pub labels: &'a BTreeMap<String, String>,
    /// The step, with its secrets substituted and the task's env before its own.
    pub step: &'a Step,
    pub name: &'a str,
    pub cmd: CmdLine,
}

/// The docker volume of a task volume in this run.
pub fn volume_name(cfg: &RunConfig, name: &str) -> String {
    format!("{name}_{}", cfg.run_id)
}

pub fn spec(s: &Setting<'_>) -> ContainerSpec {
    let (step, flags) = (s.step, &s.cmd.flags);
    let mut env = step.env.clone();
    env.extend(flags.env.iter().cloned());
    let wd = flags
        .workdir
        .clone()
        .or_else(|| step.working_directory.clone())
        .or_else(|| s.task.working_directory.clone());
    let working_dir = match wd {
        Some(w) if w.starts_with('/') => Some(w),
        Some(w) => Some(format!("{WORKSPACE}/{w}")),
        None if step.disable_working_directory_override => None,
        None => Some(WORKSPACE.to_string()),
    };
    let network = match flags.network.as_deref().or(step.network.as_deref()) {
        None | Some(DEFAULT_NETWORK) => s.default_network.to_string(),
        Some(n) => n.to_string(),
    };
    let aliases =
        if matches!(network.as_str(), "host" | "none") || network.starts_with("container:") {
            Vec::new()
        } else {
            vec![step.id.clone()]
        };
    let mut mounts = vec![Mount {
        volume: s.cfg.shared_volume.clone(),
        target: WORKSPACE.into(),
    }];
    for m in &step.volume_mounts {
        mounts.push(Mount {
            volume: volume_name(s.cfg, &m.name),
            target: m.mount_path.clone(),
        });
    }
    // Kept containers outlive the run, so they must escape the run's cleanup sweep.
    let mut labels = if step.keep {
        BTreeMap::new()
    } else {
        s.labels.clone()
    };
    for l in &flags.labels {
        let (k, v) = l.split_once('=').unwrap_or((l, ""));
        labels.entry(k.to_string()).or_insert_with(|| v.to_string());
    }
    let mut ports = step.ports.clone();
    ports.extend(flags.publish.iter().cloned());
    let mut expose = step.expose.clone();
    expose.extend(flags.expose.iter().cloned());
    ContainerSpec {
        name: s.name.to_string(),
        image: s.cmd.image.clone(),
        args: s.cmd.args.clone(),
        entrypoint: flags
            .entrypoint
            .as_ref()
            .or(step.entry_point.as_ref())
            .map(|e| vec![e.clone()]),
        env,
        working_dir,
        user: flags.user.clone().or_else(|| step.user.clone()),
        privileged: step.privileged || flags.privileged,
        network: Some(network),
        network_aliases: aliases,
        ports,
        expose,
        mounts,
        isolation: step.isolation.clone(),
        labels,
        platform: s.cfg.platform.as_ref().map(ToString::to_string),
        binds: flags.volumes.clone(),
        cap_add: flags.cap_add.clone(),
        cap_drop: flags.cap_drop.clone(),
        security_opt: flags.security_opt.clone(),
        devices: flags.devices.clone(),
        pid_mode: flags.pid.clone(),
        ipc_mode: flags.ipc.clone(),
        uts_mode: flags.uts.clone(),
        userns_mode: flags.userns.clone(),
        hostname: flags.hostname.clone(),
        extra_hosts: flags.add_hosts.clone(),
        init: flags.init,
        read_only: flags.read_only,
        tty: flags.tty,
        limits: Limits {
            // `cpus: 1.5` on the step, unless `cmd` says `--cpus`.
            nano_cpus: flags.nano_cpus.or_else(|| {
                step.cpus
                    .as_deref()
                    .and_then(|c| c.trim().parse::<f64>().ok())
                    .filter(|c| *c > 0.0 && c.is_finite())
                    .map(|c| (c * 1e9) as i64)
            }),
            memory: flags.memory,
            pids: flags.pids_limit,
        },
    }
}
