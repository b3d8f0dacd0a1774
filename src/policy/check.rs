//! The rules themselves, over the plain container and build specs the engine receives, and
//! the check of a whole task file that points each breach at its place.

use std::collections::{BTreeMap, HashSet};

use super::Policy;
use crate::exec::container;
use crate::runtime::{BuildSpec, ContainerSpec};
use crate::task::{args, Finding, StepKind, Task, BUILTIN_NETWORKS, DEFAULT_NETWORK};

/// One thing a container or build asks for that the policy does not allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The policy's name for it (`privileged`, `hostNetwork`, `mounts`, ...).
    pub rule: &'static str,
    /// The step field it comes from when set there (`privileged`, `network`, `ports`);
    /// otherwise it came from docker flags in `cmd`.
    pub field: &'static str,
    /// The value asked for, as written.
    pub token: String,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (policy rule `{}`; the operator can allow it with `serve --allow {}`)",
            self.message,
            self.rule,
            flag_name(self.rule)
        )
    }
}

/// `hostNetwork` → `host-network`, as `serve --allow` spells the rules.
pub(crate) fn flag_name(rule: &str) -> String {
    let mut out = String::new();
    for c in rule.chars() {
        if c.is_ascii_uppercase() {
            out.push('-');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn violation(rule: &'static str, field: &'static str, token: &str, message: String) -> Violation {
    Violation {
        rule,
        field,
        token: token.to_string(),
        message,
    }
}

/// `host` or another container's namespace (`container:NAME`).
fn shares_host(mode: &str) -> bool {
    mode == "host" || mode.starts_with("container:")
}

fn is_docker_socket(src: &str) -> bool {
    src.ends_with("docker.sock") || src.ends_with("docker.sock/")
}

impl Policy {
    /// What `spec` asks for that this policy does not allow (empty: all allowed).
    pub fn check_container(&self, spec: &ContainerSpec) -> Vec<Violation> {
        let a = &self.allow;
        let mut out = Vec::new();
        if spec.privileged && !a.privileged {
            out.push(violation(
                "privileged",
                "privileged",
                "--privileged",
                "privileged containers are not allowed on this server".into(),
            ));
        }
        if let Some(n) = spec.network.as_deref().filter(|n| shares_host(n)) {
            if !a.host_network {
                out.push(violation(
                    "hostNetwork",
                    "network",
                    n,
                    format!("network `{n}` shares the host's (or another container's) network"),
                ));
            }
        }
        for (what, mode) in [
            ("--pid", &spec.pid_mode),
            ("--ipc", &spec.ipc_mode),
            ("--uts", &spec.uts_mode),
            ("--userns", &spec.userns_mode),
        ] {
            if let Some(m) = mode.as_deref().filter(|m| shares_host(m)) {
                if !a.host_network {
                    out.push(violation(
                        "hostNetwork",
                        "cmd",
                        what,
                        format!(
                            "`{what} {m}` shares the host's (or another container's) namespace"
                        ),
                    ));
                }
            }
        }
        for b in &spec.binds {
            let src = b.split(':').next().unwrap_or(b);
            let protected = std::path::Path::new(src).is_absolute()
                && self
                    .touches_protected(&std::fs::canonicalize(src).unwrap_or_else(|_| src.into()));
            if protected {
                out.push(violation(
                    "mounts",
                    "cmd",
                    b,
                    format!("volume `{b}` would expose the server's own data"),
                ));
            } else if is_docker_socket(src) && !(a.docker_socket && a.mounts) {
                out.push(violation(
                    "dockerSocket",
                    "cmd",
                    b,
                    format!("volume `{b}` hands the task the Docker Engine (root on the host)"),
                ));
            } else if !a.mounts {
                out.push(violation(
                    "mounts",
                    "cmd",
                    b,
                    format!(
                        "volume `{b}` mounts a host path or a volume outside the run; use the \
                         task's `volumes:` and `volumeMounts:` instead"
                    ),
                ));
            }
        }
        if !a.extra_privileges {
            for (flag, items) in [
                ("--cap-add", &spec.cap_add),
                ("--device", &spec.devices),
                ("--security-opt", &spec.security_opt),
            ] {
                for v in items {
                    out.push(violation(
                        "extraPrivileges",
                        "cmd",
                        v,
                        format!("`{flag} {v}` gives the container more than an ordinary one"),
                    ));
                }
            }
        }
        if !a.publish_ports {
            for p in &spec.ports {
                out.push(violation(
                    "publishPorts",
                    "ports",
                    p,
                    format!("port `{p}` would be published on the host"),
                ));
            }
        }
        out
    }

    /// What a build asks for that this policy does not allow.
    pub fn check_build(&self, spec: &BuildSpec) -> Vec<Violation> {
        match spec.network.as_deref().filter(|n| shares_host(n)) {
            Some(n) if !self.allow.host_network => vec![violation(
                "hostNetwork",
                "build",
                n,
                format!("a build on network `{n}` shares the host's network"),
            )],
            _ => Vec::new(),
        }
    }
}

/// Everything in `task` that `policy` refuses, plus `cmd` and `build` lines that would fail
/// at run time, each as a finding at its place.
pub fn check_task(policy: &Policy, task: &Task) -> Vec<Finding> {
    let mut out = Vec::new();
    let created: HashSet<&str> = task
        .networks
        .iter()
        .filter(|n| !n.skip_creation)
        .map(|n| n.name.as_str())
        .collect();
    if !policy.allow.join_networks {
        for (i, n) in task.networks.iter().enumerate() {
            if n.skip_creation {
                out.push(Finding {
                    item: Some(("networks", i)),
                    field: "skipCreation",
                    token: None,
                    message: format!(
                        "network `{}` would join a network this run did not create (policy \
                         rule `joinNetworks`; the operator can allow it with `serve --allow \
                         join-networks`)",
                        n.name
                    ),
                });
            }
        }
    }
    let cfg = crate::exec::RunConfig::for_run("check", std::path::PathBuf::new(), 1);
    let labels = BTreeMap::new();
    for (i, step) in task.steps.iter().enumerate() {
        let at = |field: &'static str, token: Option<String>, message: String| Finding {
            item: Some(("steps", i)),
            field,
            token,
            message: format!("step `{}`: {message}", step.id),
        };
        if let Some(n) = step.network.as_deref() {
            let known = created.contains(n)
                || n == DEFAULT_NETWORK
                || n == "default"
                || n == "none"
                || shares_host(n);
            if !known && !policy.allow.join_networks && BUILTIN_NETWORKS.contains(&n) {
                out.push(at(
                    "network",
                    None,
                    format!(
                        "network `{n}` is shared with other containers on the host (policy \
                         rule `joinNetworks`; the operator can allow it with `serve --allow \
                         join-networks`)"
                    ),
                ));
            }
        }
        match step.kind() {
            Some(StepKind::Cmd(cmd)) => {
                let line = match args::parse_cmd_line(cmd) {
                    Ok(l) => l,
                    Err(e) => {
                        let token = match &e {
                            args::ArgsError::UnknownRunFlag(f) => Some(f.clone()),
                            args::ArgsError::RunFlag { flag, .. } => Some(flag.clone()),
                            _ => None,
                        };
                        out.push(at("cmd", token, e.to_string()));
                        continue;
                    }
                };
                let spec = container::spec(&container::Setting {
                    task,
                    cfg: &cfg,
                    default_network: DEFAULT_NETWORK,
                    labels: &labels,
                    step,
                    name: &step.id,
                    cmd: line,
                });
                for v in policy.check_container(&spec) {
                    // A field the step itself sets is where to point; else the cmd flag.
                    let own = match v.field {
                        "privileged" => step.privileged,
                        "network" => step.network.is_some(),
                        "ports" => !step.ports.is_empty(),
                        _ => false,
                    };
                    let field = if own { v.field } else { "cmd" };
                    out.push(at(field, Some(v.token.clone()), v.to_string()));
                }
            }
            Some(StepKind::Build(build)) => match args::parse_build(build) {
                Err(e) => out.push(at("build", None, e.to_string())),
                Ok(b) => {
                    let spec = BuildSpec {
                        network: b.network,
                        ..BuildSpec::default()
                    };
                    for v in policy.check_build(&spec) {
                        out.push(at("build", Some(v.token.clone()), v.to_string()));
                    }
                }
            },
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            network: Some("acb_default_network_r1".into()),
            ..ContainerSpec::default()
        }
    }

    #[test]
    fn server_default_refuses_each_escape_and_permissive_allows_them() {
        let strict = Policy::server_default();
        let open = Policy::permissive();
        let cases: Vec<(&str, ContainerSpec)> = vec![
            (
                "privileged",
                ContainerSpec {
                    privileged: true,
                    ..spec()
                },
            ),
            (
                "hostNetwork",
                ContainerSpec {
                    network: Some("host".into()),
                    ..spec()
                },
            ),
            (
                "hostNetwork",
                ContainerSpec {
                    network: Some("container:db".into()),
                    ..spec()
                },
            ),
            (
                "hostNetwork",
                ContainerSpec {
                    pid_mode: Some("host".into()),
                    ..spec()
                },
            ),
            (
                "mounts",
                ContainerSpec {
                    binds: vec!["/etc:/host-etc".into()],
                    ..spec()
                },
            ),
            (
                "mounts",
                ContainerSpec {
                    binds: vec!["cache:/cache".into()],
                    ..spec()
                },
            ),
            (
                "dockerSocket",
                ContainerSpec {
                    binds: vec!["/var/run/docker.sock:/var/run/docker.sock".into()],
                    ..spec()
                },
            ),
            (
                "extraPrivileges",
                ContainerSpec {
                    cap_add: vec!["SYS_ADMIN".into()],
                    ..spec()
                },
            ),
            (
                "extraPrivileges",
                ContainerSpec {
                    devices: vec!["/dev/kvm".into()],
                    ..spec()
                },
            ),
            (
                "publishPorts",
                ContainerSpec {
                    ports: vec!["8080:80".into()],
                    ..spec()
                },
            ),
        ];
        for (rule, s) in cases {
            let v = strict.check_container(&s);
            assert_eq!(v.len(), 1, "{rule}: {v:?}");
            assert_eq!(v[0].rule, rule);
            assert!(v[0].to_string().contains("serve --allow"), "{}", v[0]);
            assert!(open.check_container(&s).is_empty(), "{rule}");
        }
        assert!(strict.check_container(&spec()).is_empty());
        assert_eq!(flag_name("extraPrivileges"), "extra-privileges");
    }

    #[test]
    fn the_servers_data_is_never_mountable() {
        let data = tempfile::tempdir().unwrap();
        let p = Policy {
            protected: vec![data.path().to_path_buf()],
            ..Policy::permissive()
        };
        let s = ContainerSpec {
            binds: vec![format!("{}/registry:/x", data.path().display())],
            ..spec()
        };
        assert_eq!(p.check_container(&s)[0].rule, "mounts");
    }
}
