//! Checks beyond the YAML shape, as acr-builder makes them (and a few it leaves to run
//! time), each pointed at the offending place in the file.

use std::collections::HashSet;

use super::graph::{self, PlanError};
use super::parse::LineMap;
use super::tree::Node;
use super::{Diagnostic, Task};

/// Versions acr-builder accepts (compared case-insensitively).
pub const VERSIONS: &[&str] = &["v1.0.0", "v1.1.0", "1.0-preview-1"];

/// Networks a step may name without declaring them.
pub const BUILTIN_NETWORKS: &[&str] =
    &["host", "none", "bridge", "default", super::DEFAULT_NETWORK];

/// Where diagnostics point: the parsed tree and the rendered-to-original line map.
pub(crate) struct Locator<'a> {
    pub file: &'a str,
    pub root: &'a Node,
    pub map: &'a LineMap,
    /// The rendered text the tree was parsed from.
    pub rendered: &'a str,
}

impl Locator<'_> {
    fn at(&self, node: Option<&Node>, token: Option<&str>, message: String) -> Diagnostic {
        let (line, column) = match node {
            Some(n) => self.map.locate(n.line, n.column, token),
            None => (0, 0),
        };
        Diagnostic::new(self.file, line, column, message)
    }

    /// The position of `key` in the mapping `node` (the key itself), else of `node`.
    fn key(&self, node: Option<&Node>, key: &str, message: String) -> Diagnostic {
        match node.and_then(|n| n.entry(key)) {
            Some((k, _)) => {
                let (line, column) = self.map.locate(k.line, k.column, Some(key));
                Diagnostic::new(self.file, line, column, message)
            }
            None => self.at(node, None, message),
        }
    }

    fn value(&self, node: Option<&Node>, key: &str, message: String) -> Diagnostic {
        match node.and_then(|n| n.get(key)) {
            Some(v) => self.at(Some(v), v.as_str(), message),
            None => self.key(node, key, message),
        }
    }

    fn item(&self, list: &str, i: usize) -> Option<&Node> {
        self.root.get(list).and_then(|l| l.at(i))
    }

    /// A caller's finding, at the token inside the field's value when it can be found on
    /// the value's line, else at the value (or the field's key, or the item).
    pub(crate) fn finding(&self, f: &super::Finding) -> Diagnostic {
        let node = match f.item {
            Some((list, i)) => self.item(list, i),
            None => Some(self.root),
        };
        let value = node.and_then(|n| n.get(f.field));
        if let (Some(v), Some(token)) = (value, f.token.as_deref()) {
            let line = self.rendered.lines().nth(v.line.saturating_sub(1));
            let start = v.column.saturating_sub(1);
            let col = line.and_then(|l| {
                let from: String = l.chars().skip(start).collect();
                from.find(token)
                    .map(|p| start + from[..p].chars().count() + 1)
            });
            if let Some(c) = col {
                let (line, column) = self.map.locate(v.line, c, Some(token));
                return Diagnostic::new(self.file, line, column, f.message.clone());
            }
        }
        if value.is_some() {
            return self.value(node, f.field, f.message.clone());
        }
        self.at(node, None, f.message.clone())
    }
}

pub(crate) fn validate(task: &Task, loc: &Locator<'_>, out: &mut Vec<Diagnostic>) {
    let root = Some(loc.root);
    if !VERSIONS
        .iter()
        .any(|v| v.eq_ignore_ascii_case(&task.version))
    {
        out.push(loc.value(
            root,
            "version",
            format!(
                "unsupported version `{}`; use v1.0.0 or v1.1.0",
                task.version
            ),
        ));
    }
    // acb splits the task's entries at commas, and checks them only when there are steps.
    if !task.steps.is_empty() {
        check_env(&task.env, true, true, root, loc, out);
    }

    let mut seen = HashSet::new();
    for (i, s) in task.secrets.iter().enumerate() {
        let node = loc.item("secrets", i);
        if s.id.trim().is_empty() {
            out.push(loc.value(node, "id", "a secret needs an `id`".into()));
        } else if s.id.chars().any(char::is_whitespace) {
            out.push(loc.value(
                node,
                "id",
                format!(
                    "secret id `{}` cannot contain spaces (it is used as `{{{{.Secrets.ID}}}}`)",
                    s.id
                ),
            ));
        } else if !seen.insert(s.id.as_str()) {
            out.push(loc.value(node, "id", format!("duplicate secret id `{}`", s.id)));
        }
        if let Some(c) = &s.client_id {
            if uuid::Uuid::parse_str(c.trim()).is_err() {
                out.push(loc.value(
                    node,
                    "clientID",
                    format!(
                        "secret `{}`: `clientID` must be the managed identity's client id, a GUID \
                         like 00000000-0000-0000-0000-000000000000, not `{c}`",
                        s.id
                    ),
                ));
            }
        }
        if s.keyvault.as_deref().is_none_or(|k| k.trim().is_empty()) {
            out.push(loc.at(
                node,
                None,
                format!("secret `{}` needs a `keyvault` reference", s.id),
            ));
        }
    }

    let mut networks = HashSet::new();
    for (i, n) in task.networks.iter().enumerate() {
        let node = loc.item("networks", i);
        if n.name.trim().is_empty() {
            out.push(loc.value(node, "name", "a network needs a `name`".into()));
        } else if !networks.insert(n.name.as_str()) {
            out.push(loc.value(node, "name", format!("duplicate network `{}`", n.name)));
        }
    }
    let mut volumes = HashSet::new();
    for (i, v) in task.volumes.iter().enumerate() {
        let node = loc.item("volumes", i);
        let word = |t: &str, extra: &str| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || extra.contains(c))
        };
        if v.name.trim().is_empty() {
            out.push(loc.value(node, "name", "a volume needs a `name`".into()));
        } else if !word(&v.name, "") {
            out.push(loc.value(
                node,
                "name",
                format!(
                    "volume name `{}` may only have letters, digits, `-` and `_`",
                    v.name
                ),
            ));
        } else if !volumes.insert(v.name.as_str()) {
            out.push(loc.value(node, "name", format!("duplicate volume `{}`", v.name)));
        }
        if v.secret.is_empty() {
            out.push(loc.at(
                node,
                None,
                format!(
                    "volume `{}` needs `secret:` files (`secret: {{file: BASE64}}`): that is the \
                     only kind of volume ACR Tasks has",
                    v.name
                ),
            ));
        }
        let secrets = node.and_then(|n| n.get("secret"));
        for file in v.secret.keys() {
            if !word(file, ".") {
                let at = secrets.and_then(|m| m.entry(file)).map(|(k, _)| k);
                let (line, column) =
                    at.map_or((0, 0), |k| loc.map.locate(k.line, k.column, Some(file)));
                out.push(Diagnostic::new(
                    loc.file,
                    line,
                    column,
                    format!(
                        "file name `{file}` in volume `{}` may only have letters, digits, `-`, `_` \
                         and `.`",
                        v.name
                    ),
                ));
            }
        }
    }

    if task.steps.is_empty() {
        out.push(Diagnostic::warning(
            loc.file,
            0,
            0,
            "the task has no steps: nothing will run".into(),
        ));
    }
    for (i, s) in task.steps.iter().enumerate() {
        let node = loc.item("steps", i);
        let name = &s.id;
        if s.id.chars().any(char::is_whitespace) {
            out.push(loc.value(
                node,
                "id",
                format!("step id `{name}` cannot contain spaces"),
            ));
        } else if s.id == super::IMMEDIATE || s.id == "acb_root" {
            out.push(loc.value(node, "id", format!("step id `{name}` is reserved")));
        }
        let actions: Vec<&str> = [
            ("build", s.build.is_some()),
            ("cmd", s.cmd.is_some()),
            ("push", s.push.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(k, _)| k)
        .collect();
        match actions.as_slice() {
            [] => out.push(loc.at(
                node,
                None,
                format!("step `{name}` needs one of `build`, `cmd` or `push`"),
            )),
            [_] => {}
            [first, second, ..] => out.push(loc.key(
                node,
                second,
                format!("step `{name}` has both `{first}` and `{second}`; a step does exactly one of build, cmd or push"),
            )),
        }
        if s.timeout == Some(0) {
            out.push(loc.value(
                node,
                "timeout",
                format!("step `{name}`: `timeout` must be greater than 0 seconds"),
            ));
        }
        if let Some(c) = &s.cache {
            if !c.eq_ignore_ascii_case("enabled") && !c.eq_ignore_ascii_case("disabled") {
                out.push(loc.value(
                    node,
                    "cache",
                    format!("step `{name}`: `cache` must be `enabled` or `disabled`, not `{c}`"),
                ));
            }
        }
        if let Some(net) = &s.network {
            if !networks.contains(net.as_str()) && !BUILTIN_NETWORKS.contains(&net.as_str()) {
                out.push(loc.value(
                    node,
                    "network",
                    format!("step `{name}` uses network `{net}`, which is not declared under `networks`"),
                ));
            }
        }
        // An entry without `=` is refused only when the task has env of its own (acb's
        // merge then fails); alone it is passed on as written.
        check_env(&s.env, false, !task.env.is_empty(), node, loc, out);
        if !s.volume_mounts.is_empty() && s.cmd.is_none() {
            out.push(loc.key(
                node,
                "volumeMounts",
                format!("step `{name}`: `volumeMounts` can only be used on `cmd` steps"),
            ));
        }
        let mut paths = HashSet::new();
        for (j, m) in s.volume_mounts.iter().enumerate() {
            let mnode = node
                .and_then(|n| n.get("volumeMounts"))
                .and_then(|l| l.at(j));
            if m.name.starts_with('/') || m.name.starts_with('.') || m.name.starts_with('~') {
                out.push(loc.value(
                    mnode,
                    "name",
                    format!(
                        "step `{name}` mounts `{}`, a host path: `volumeMounts` name volumes \
                         declared under `volumes` (with their files under `secret`); host paths \
                         are not mounted",
                        m.name
                    ),
                ));
            } else if !volumes.contains(m.name.as_str()) {
                out.push(loc.value(
                    mnode,
                    "name",
                    format!(
                        "step `{name}` mounts volume `{}`, which is not declared under `volumes`",
                        m.name
                    ),
                ));
            }
            if !m.mount_path.starts_with('/') {
                out.push(loc.value(
                    mnode,
                    "mountPath",
                    format!(
                        "step `{name}`: mount path `{}` must be absolute",
                        m.mount_path
                    ),
                ));
            } else if !paths.insert(m.mount_path.as_str()) {
                out.push(loc.value(
                    mnode,
                    "mountPath",
                    format!("step `{name}` mounts two volumes at `{}`", m.mount_path),
                ));
            }
        }
    }

    // acb adds steps to its graph in file order and refuses a `when` naming a later one;
    // acr-task runs such a file (the plan orders it), and says ACR would not.
    let first_index: std::collections::HashMap<&str, usize> = task
        .steps
        .iter()
        .enumerate()
        .rev()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    for (i, step) in task.steps.iter().enumerate() {
        for (w, dep) in step.when.iter().flatten().enumerate() {
            if first_index.get(dep.as_str()).is_some_and(|&j| j > i) {
                let node = loc.item("steps", i);
                let entry = node.and_then(|n| n.get("when")).and_then(|l| l.at(w));
                let mut d = loc.at(
                    entry,
                    Some(dep),
                    format!(
                        "step `{}` waits for `{dep}`, which comes later in the file: acr-task \
                         runs this, ACR refuses it (`{dep} does not exist as a vertex`); move \
                         `{dep}` above `{}` to run on both",
                        step.id, step.id
                    ),
                );
                d.severity = super::Severity::Warning;
                out.push(d);
            }
        }
    }

    for issue in graph::check(task) {
        let node = loc.item("steps", issue.step);
        let d = match (&issue.error, issue.when_index) {
            (PlanError::DuplicateId(_), _) => loc.value(node, "id", issue.error.to_string()),
            (_, Some(w)) => {
                let entry = node.and_then(|n| n.get("when")).and_then(|l| l.at(w));
                match entry {
                    Some(e) => loc.at(Some(e), e.as_str(), issue.error.to_string()),
                    None => loc.key(node, "when", issue.error.to_string()),
                }
            }
            (_, None) => loc.key(node, "when", issue.error.to_string()),
        };
        out.push(d);
    }
}

/// `KEY=value` entries; the task-level list may also hold comma-separated pairs.
fn check_env(
    env: &[String],
    task_level: bool,
    strict: bool,
    node: Option<&Node>,
    loc: &Locator<'_>,
    out: &mut Vec<Diagnostic>,
) {
    let list = node.and_then(|n| n.get("env"));
    for (i, e) in env.iter().enumerate() {
        let parts: Vec<&str> = if task_level {
            e.split(',').collect()
        } else {
            vec![e.as_str()]
        };
        let bad = parts
            .iter()
            .find(|p| p.split_once('=').is_none_or(|(k, _)| k.trim().is_empty()));
        if let Some(bad) = bad {
            let item = list.and_then(|l| l.at(i));
            let mut d = loc.at(
                item,
                Some(e),
                if task_level && parts.len() > 1 {
                    format!(
                        "task environment entry `{e}` is split at its commas (as ACR does), and \
                         `{bad}` is not KEY=value"
                    )
                } else {
                    format!("environment entry `{e}` must be KEY=value")
                },
            );
            if !strict {
                d.severity = super::Severity::Warning;
                d.message =
                    format!("environment entry `{e}` has no `=`; it is passed on as written");
            }
            out.push(d);
        }
    }
}
