//! Task files: model, templating (Go text/template over `.Run` and `.Values`, `$` aliases),
//! parsing with line/column diagnostics, and validation. Knows nothing about Docker.

pub mod alias;
pub mod args;
mod budget;
mod fields;
mod funcs;
pub mod model;
mod parse;
mod platform;
mod render;
pub mod schema;
mod tree;
mod validate;
mod values;

pub use alias::BUILTIN_ALIASES;
pub use budget::RenderBudget;
pub use model::*;
pub use platform::Platform;

/// Seconds between retries when `retryDelay` is absent or 0 (acr-builder
/// `defaultStepRetryDelayInSeconds`).
pub const DEFAULT_RETRY_DELAY: u64 = 5;
pub use validate::{BUILTIN_NETWORKS, VERSIONS};

use std::collections::BTreeMap;
use std::path::Path;

/// What `.Run` exposes to templates (ACR's run context).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RunInfo {
    /// Run id, e.g. `ca1` or a short uuid.
    pub id: String,
    /// Registry host[:port] images are pushed to, e.g. `127.0.0.1:5000`.
    pub registry: String,
    /// Registry name without domain (ACR: the part before `.azurecr.io`).
    pub registry_name: String,
    /// UTC start time, ACR format `20060102-150405z`.
    pub date: String,
    pub os: String,
    pub architecture: String,
    pub commit: String,
    pub branch: String,
    pub task_name: String,
    /// Name of the volume shared by all steps of the run.
    pub shared_volume: String,
}

impl RunInfo {
    /// Stand-in run values for checking a file without running it (`validate`,
    /// `--dry-run`): run id `dryrun`, registry `localhost:5000`, the current time, and the
    /// host's OS and architecture in Docker's names.
    pub fn placeholder(task_file: &Path) -> RunInfo {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        RunInfo {
            id: "dryrun".into(),
            registry: "localhost:5000".into(),
            registry_name: "localhost".into(),
            date: chrono::Utc::now().format("%Y%m%d-%H%M%Sz").to_string(),
            os: std::env::consts::OS.into(),
            architecture: arch.into(),
            commit: String::new(),
            branch: String::new(),
            task_name: task_file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            shared_volume: "acb_shared_volume".into(),
        }
    }
}

impl RunInfo {
    /// `.Run.OS` and `.Run.Architecture` of a run that targets `platform`.
    pub fn set_platform(&mut self, platform: &Platform) {
        self.os = platform.os.clone();
        self.architecture = platform.architecture.clone();
    }
}

/// `.Values`: a values file plus `--set key=value` overrides (later wins).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Values(pub BTreeMap<String, serde_json::Value>);

/// A diagnostic about a task file, pointing at a place in it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct Diagnostic {
    pub file: String,
    /// 1-based; 0 when the problem has no single place.
    pub line: usize,
    /// 1-based; 0 when the problem has no single place.
    pub column: usize,
    pub message: String,
}

/// Everything wrong with one task file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct Diagnostics(pub Vec<Diagnostic>);

/// Reads, renders, parses and validates a task file.
pub fn load_file(path: &Path, run: &RunInfo, values: &Values) -> Result<Task, Diagnostics> {
    let text = read_text(path)?;
    load_str(&path.display().to_string(), &text, run, values)
}

/// Reads a task (or values) file as text; invalid UTF-8 is reported where it is.
pub fn read_text(path: &Path) -> Result<String, Diagnostics> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| {
        Diagnostics(vec![Diagnostic::new(
            &name,
            0,
            0,
            format!("cannot read {name}: {e}"),
        )])
    })?;
    text_of(&name, bytes)
}

/// `bytes` as text, or a diagnostic at the line and column of the first byte that is not
/// UTF-8 (the column counts characters before it on its line).
pub fn text_of(file: &str, bytes: Vec<u8>) -> Result<String, Diagnostics> {
    match String::from_utf8(bytes) {
        Ok(t) => Ok(t),
        Err(e) => {
            let bytes = e.as_bytes();
            let at = e.utf8_error().valid_up_to();
            let before = String::from_utf8_lossy(&bytes[..at]);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            Err(Diagnostics(vec![Diagnostic::new(
                file,
                line,
                column,
                format!(
                    "invalid UTF-8 (byte 0x{:02x}): save the file as UTF-8",
                    bytes[at]
                ),
            )]))
        }
    }
}

/// Renders, parses and validates task-file text; `file` names it in diagnostics and its
/// directory is where relative `alias.src` files are read from.
///
/// The order is acr-builder's: `$` aliases are expanded in the raw text, then templates
/// are rendered, then the YAML is parsed. Diagnostics are sorted by position.
pub fn load_str(
    file: &str,
    text: &str,
    run: &RunInfo,
    values: &Values,
) -> Result<Task, Diagnostics> {
    load_str_with(file, text, run, values, &LoadOptions::default())
}

/// Standard base64 as task files carry it (volume secrets, `b64dec`): whitespace and
/// padding optional. `None` on anything else.
pub fn b64decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let clean: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(clean.trim_end_matches('='))
        .ok()
}

/// A problem found by a caller's own check of a loaded task (the server's policy), put at
/// its place in the file by [`load_str_checked`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The list item it is about (`("steps", 2)`, `("networks", 0)`); `None`: top level.
    pub item: Option<(&'static str, usize)>,
    /// The field of that item (`privileged`, `cmd`, ...).
    pub field: &'static str,
    /// Text inside the field's value to point at (a flag inside `cmd`).
    pub token: Option<String>,
    pub message: String,
}

/// Parses a small YAML file of settings (a policy, say) with the task files' error style:
/// `file:line:column` and plain words, not the parser's.
pub fn from_yaml<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, Diagnostic> {
    serde_saphyr::from_str(text).map_err(|e| parse::yaml_error(file, &e, None, Some(text)))
}

/// Choices that differ between ACR and acr-task's stricter default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Print a missing `.Values.x` as nothing, as ACR does, instead of reporting it
    /// (missing values in `if`, `default`, ... are fine either way).
    pub empty_missing_values: bool,
    /// Files the task file names (alias `src`) must be inside this directory (a stored
    /// task's context); `None`: anywhere, relative to the task file.
    pub files_root: Option<std::path::PathBuf>,
    /// What rendering the templates may cost.
    pub budget: RenderBudget,
}

/// [`load_str`] with [`LoadOptions`].
pub fn load_str_with(
    file: &str,
    text: &str,
    run: &RunInfo,
    values: &Values,
    options: &LoadOptions,
) -> Result<Task, Diagnostics> {
    load_str_checked(file, text, run, values, options, &|_| Vec::new())
}

/// [`load_str_with`], then `check` on the valid task: its findings are diagnostics at
/// their places in the file, like the loader's own.
pub fn load_str_checked(
    file: &str,
    text: &str,
    run: &RunInfo,
    values: &Values,
    options: &LoadOptions,
    check: &dyn Fn(&Task) -> Vec<Finding>,
) -> Result<Task, Diagnostics> {
    let mut diags = Vec::new();
    let task = load_inner(file, text, run, values, options, check, &mut diags);
    match task {
        Some(t) if diags.is_empty() => Ok(t),
        _ => {
            diags.sort_by_key(|d| (d.line, d.column));
            Err(Diagnostics(diags))
        }
    }
}

fn load_inner(
    file: &str,
    text: &str,
    run: &RunInfo,
    values: &Values,
    options: &LoadOptions,
    check: &dyn Fn(&Task) -> Vec<Finding>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Task> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let split = alias::split(text);
    let mut alias_node = None;
    if split.has_alias {
        match alias::parse_section(&split.alias_text) {
            Ok(n) => alias_node = n,
            Err(e) => {
                diags.push(parse::syntax_error(file, &e, None));
                return None;
            }
        }
    }
    if let Some(n) = &alias_node {
        let mut scratch = n.to_json();
        fields::check(file, n, fields::Part::Alias, &mut scratch, diags);
    }
    // Relative `alias.src` files live next to the task file.
    let base = Path::new(file).parent().unwrap_or(Path::new("."));
    let (aliases, alias_model) = alias::Aliases::from_section(
        file,
        base,
        options.files_root.as_deref(),
        alias_node.as_ref(),
        diags,
    );
    let Some(expanded) = aliases.apply(&split.rest, options.budget.max_output) else {
        diags.push(Diagnostic::new(
            file,
            0,
            0,
            format!(
                "aliases expand the file to more than {} bytes (the render budget)",
                options.budget.max_output
            ),
        ));
        return None;
    };
    let rendered = match render::render(
        file,
        &expanded,
        &split.rest,
        run,
        values,
        options.empty_missing_values,
        options.budget,
    ) {
        Ok(r) => r,
        Err(d) => {
            diags.push(d);
            return None;
        }
    };
    let map = parse::LineMap::new(&split.rest, &rendered);
    let root = match tree::parse(&rendered) {
        Ok(r) => r,
        Err(e) => {
            diags.push(parse::syntax_error(file, &e, Some(&map)));
            return None;
        }
    };
    if !matches!(root.raw, tree::Raw::Map(_)) {
        let (line, column) = map.locate(root.line, root.column, None);
        diags.push(Diagnostic::new(
            file,
            line,
            column,
            "a task file must be a mapping with at least `steps`".into(),
        ));
        return None;
    }
    let mut json = root.to_json();
    let before = diags.len();
    fields::check(file, &root, fields::Part::Task, &mut json, diags);
    let clean = diags.len() == before;
    let mut task: Task = match serde_json::from_value(json) {
        Ok(t) => t,
        Err(e) => {
            // The YAML deserializer is more lenient with scalars (`user: 1000` into a
            // string) and knows where a problem is; JSON is only the fast path.
            match serde_saphyr::from_str::<Task>(&rendered) {
                Ok(t) if clean => t,
                Err(ye) if clean => {
                    diags.push(parse::yaml_error(file, &ye, Some(&map), Some(&rendered)));
                    return None;
                }
                _ if clean => {
                    diags.push(Diagnostic::new(file, 1, 1, e.to_string()));
                    return None;
                }
                _ => return None,
            }
        }
    };
    task.alias = alias_model;
    normalize(&mut task, &aliases);
    let loc = validate::Locator {
        file,
        root: &root,
        map: &map,
        rendered: &rendered,
    };
    validate::validate(&task, &loc, diags);
    if diags.is_empty() {
        diags.extend(check(&task).iter().map(|f| loc.finding(f)));
    }
    Some(task)
}

/// acr-builder's post-parse defaults: empty actions count as absent, missing ids become
/// `acb_step_N`, an unset (or 0) `retryDelay` becomes 5 s, and a user alias naming a `cmd`'s image applies without the directive.
fn normalize(task: &mut Task, aliases: &alias::Aliases) {
    for (i, s) in task.steps.iter_mut().enumerate() {
        if s.build.as_deref().is_some_and(|b| b.trim().is_empty()) {
            s.build = None;
        }
        if s.cmd.as_deref().is_some_and(|c| c.trim().is_empty()) {
            s.cmd = None;
        }
        if s.push.as_ref().is_some_and(Vec::is_empty) {
            s.push = None;
        }
        if s.id.is_empty() {
            s.id = format!("{STEP_ID_PREFIX}{i}");
        }
        if s.retry_delay == 0 {
            s.retry_delay = DEFAULT_RETRY_DELAY;
        }
        if let Some(cmd) = &s.cmd {
            let trimmed = cmd.trim_start();
            let image = trimmed.split(' ').next().unwrap_or("");
            if let Some(real) = aliases.user.get(image) {
                s.cmd = Some(format!("{real}{}", &trimmed[image.len()..]));
            }
        }
    }
}

impl Diagnostic {
    pub fn new(file: &str, line: usize, column: usize, message: String) -> Diagnostic {
        Diagnostic {
            file: file.to_string(),
            line,
            column,
            message,
        }
    }
}
