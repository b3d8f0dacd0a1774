//! Task files: model, templating (Go text/template over `.Run` and `.Values`, `$` aliases),
//! parsing with line/column diagnostics, and validation. Knows nothing about Docker.

pub mod alias;
pub mod args;
mod budget;
mod convert;
mod fields;
mod funcs;
pub mod graph;
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

use tree::Node;

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

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The file cannot be used.
    #[default]
    Error,
    /// Accepted (as ACR accepts it), but likely a mistake.
    Warning,
}

/// A diagnostic about a task file, pointing at a place in it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[error("{file}:{line}:{column}: {}{message}", if *.severity == Severity::Warning { "warning: " } else { "" })]
pub struct Diagnostic {
    pub file: String,
    /// 1-based; 0 when the problem has no single place.
    pub line: usize,
    /// 1-based; 0 when the problem has no single place.
    pub column: usize,
    pub message: String,
    pub severity: Severity,
}

/// A task that loaded, with what looked like mistakes in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub task: Task,
    pub warnings: Vec<Diagnostic>,
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

/// How a task file is loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Warnings (what ACR accepts but is likely a mistake) are errors.
    pub strict: bool,
    /// The directory relative alias `src` files are read from (the run's context, as in
    /// ACR); `None`: the task file's directory.
    pub alias_dir: Option<std::path::PathBuf>,
    /// Files the task file names (alias `src`) must be inside this directory (a stored
    /// task's context); `None`: anywhere.
    pub files_root: Option<std::path::PathBuf>,
    /// Whether an alias `src` may be fetched from a URL, and from where.
    pub remote_alias: RemoteAlias,
    /// What rendering the templates may cost.
    pub budget: RenderBudget,
    /// Values of `{{.Secrets.ID}}`, rendered in as ACR renders them.
    pub secrets: BTreeMap<String, String>,
    /// A declared secret without a value is an error (a run); otherwise it renders as a
    /// placeholder (`validate`, `--dry-run`).
    pub secrets_required: bool,
}

/// Where alias `src` URLs may be fetched from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RemoteAlias {
    /// Anywhere (a user's own machine).
    #[default]
    Any,
    /// Only public addresses (a server: a task must not reach into its network).
    PublicOnly,
}

/// What a declared secret renders as when no value is given (`validate`, `--dry-run`).
pub fn secret_placeholder(id: &str) -> String {
    format!("<secret:{id}>")
}

/// [`load_str`] with [`LoadOptions`] (warnings dropped).
pub fn load_str_with(
    file: &str,
    text: &str,
    run: &RunInfo,
    values: &Values,
    options: &LoadOptions,
) -> Result<Task, Diagnostics> {
    load_str_checked(file, text, run, values, options, &|_| Vec::new()).map(|l| l.task)
}

/// [`load_str_with`], then `check` on the valid task: its findings are diagnostics at
/// their places in the file, like the loader's own. The task comes with its warnings;
/// when it does not load, the warnings come with the errors.
pub fn load_str_checked(
    file: &str,
    text: &str,
    run: &RunInfo,
    values: &Values,
    options: &LoadOptions,
    check: &dyn Fn(&Task) -> Vec<Finding>,
) -> Result<Loaded, Diagnostics> {
    let needs_placeholders = !options.secrets_required && text.contains(".Secrets");
    let mut diags = Vec::new();
    let mut task = load_inner(file, text, run, values, options, check, &mut diags);
    if needs_placeholders {
        // As acb does, in two passes: the declared secrets are known once the file has
        // been read; without values (`validate`) they render as placeholders.
        if let Some(t) = &task {
            let missing: Vec<String> = t
                .secrets
                .iter()
                .map(|s| s.id.clone())
                .filter(|id| !options.secrets.contains_key(id))
                .collect();
            if !missing.is_empty() {
                let mut with = options.clone();
                for id in missing {
                    with.secrets.insert(id.clone(), secret_placeholder(&id));
                }
                diags.clear();
                task = load_inner(file, text, run, values, &with, check, &mut diags);
            }
        }
    }
    if options.strict {
        for d in &mut diags {
            d.severity = Severity::Error;
        }
    }
    diags.sort_by_key(|d| (d.line, d.column));
    match task {
        Some(t) if !diags.iter().any(|d| !d.is_warning()) => Ok(Loaded {
            task: t,
            warnings: diags,
        }),
        _ => Err(Diagnostics(diags)),
    }
}

/// The file with every line whose trimmed text starts with `#` removed, as acb removes
/// them before anything else (inside block scalars too), and for each line kept, its
/// 1-based line number in the file.
fn strip_comments(text: &str) -> (String, Vec<usize>) {
    let mut out = String::with_capacity(text.len());
    let mut keep = Vec::new();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        out.push_str(line);
        keep.push(i + 1);
    }
    (out, keep)
}

/// The version as acb sniffs it before parsing: the first line that (after leading
/// quotes) starts with `version`, split at its first `:`, quotes and spaces trimmed.
fn sniff_version(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let l = l.trim_start_matches(['"', '\'']);
        if !l.starts_with("version") {
            return None;
        }
        let (key, value) = l.split_once(':')?;
        if key.trim().trim_matches(['"', '\'']) != "version" {
            return None;
        }
        Some(value.trim().trim_matches(['"', '\'', ' ']).to_string())
    })
}

/// Aliases apply only from v1.1.0 on, compared as acb compares: as strings (so `V1.1.0`
/// and `1.0-preview-1` have none).
fn aliases_apply(text: &str) -> bool {
    sniff_version(text).is_some_and(|v| v.as_str() >= "v1.1.0")
}

/// Built-in aliases written in a file whose version has none (`$Registry` in a v1.0.0
/// file stays as written, as in ACR): one warning per name, at its first use.
fn unapplied_aliases(file: &str, text: &str, lines: &[usize]) -> Vec<Diagnostic> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        for (p, _) in line.match_indices('$') {
            let name: String = line[p + 1..]
                .chars()
                .take_while(char::is_ascii_alphanumeric)
                .collect();
            let known = BUILTIN_ALIASES.iter().any(|(k, _)| *k == name);
            if known && seen.insert(name.clone()) {
                out.push(Diagnostic::warning(
                    file,
                    lines.get(i).copied().unwrap_or(i + 1),
                    line[..p].chars().count() + 1,
                    format!(
                        "`${name}` is left as written: aliases apply from `version: v1.1.0` on, as \
                         in ACR (or write `{}`)",
                        BUILTIN_ALIASES
                            .iter()
                            .find(|(k, _)| *k == name)
                            .map_or("", |(_, v)| *v)
                    ),
                ));
            }
        }
    }
    out
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
    let (kept, lines) = strip_comments(text);
    // Diagnostics from before the YAML parse are at lines of the comment-free text.
    let remap = |d: &mut Diagnostic| {
        if d.line > 0 {
            d.line = lines.get(d.line - 1).copied().unwrap_or(d.line);
        }
    };
    let with_aliases = aliases_apply(&kept);
    if !with_aliases {
        diags.extend(unapplied_aliases(file, &kept, &lines));
    }
    let split = if with_aliases {
        alias::split(&kept)
    } else {
        alias::Split {
            alias_text: String::new(),
            rest: kept.clone(),
            has_alias: false,
        }
    };
    let mut alias_node = None;
    let before = diags.len();
    if split.has_alias {
        match alias::parse_section(&split.alias_text) {
            Ok(n) => alias_node = n,
            Err(e) => {
                diags.push(parse::syntax_error(file, &e, None));
                diags[before..].iter_mut().for_each(remap);
                return None;
            }
        }
    }
    if let Some(Node {
        raw: tree::Raw::Map(entries),
        ..
    }) = &alias_node
    {
        const ALIAS_FIELDS: [&str; 3] = ["values", "directive", "src"];
        let names: Vec<String> = ALIAS_FIELDS.iter().map(|f| f.to_string()).collect();
        for (k, _) in entries {
            if !ALIAS_FIELDS.contains(&k.name.as_str()) {
                let hint = fields::suggest(&k.name, &names)
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                let mut d = Diagnostic::warning(
                    file,
                    k.line,
                    k.column,
                    format!(
                        "unknown field `{}` in `alias` is ignored, as ACR ignores it{hint}",
                        k.name
                    ),
                );
                remap(&mut d);
                diags.push(d);
            }
        }
    }
    let base = match &options.alias_dir {
        Some(d) => d.clone(),
        None => Path::new(file)
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf(),
    };
    let (aliases, alias_model) = alias::Aliases::from_section(
        file,
        &base,
        options.files_root.as_deref(),
        options.remote_alias,
        alias_node.as_ref(),
        diags,
    );
    let expanded = if with_aliases {
        match aliases.apply(&split.rest, options.budget.max_output) {
            Some(e) => e,
            None => {
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
            }
        }
    } else {
        split.rest.clone()
    };
    let data = render::Data {
        run,
        values,
        secrets: &options.secrets,
    };
    let rendered = match render::render(file, &expanded, &split.rest, &data, options.budget) {
        Ok((r, warnings)) => {
            diags.extend(warnings);
            r
        }
        Err(d) => {
            diags.push(d);
            diags[before..].iter_mut().for_each(remap);
            return None;
        }
    };
    diags[before..].iter_mut().for_each(remap);
    let map = parse::LineMap::new(&split.rest, &rendered).with_lines(lines.clone());
    let (root, yaml_warnings) = match tree::parse(&rendered) {
        Ok(r) => r,
        Err(e) => {
            diags.push(parse::syntax_error(file, &e, Some(&map)));
            return None;
        }
    };
    for w in yaml_warnings {
        let (line, column) = map.locate(w.line, w.column, None);
        diags.push(Diagnostic::warning(file, line, column, w.message));
    }
    if !matches!(root.raw, tree::Raw::Map(_) | tree::Raw::Null) {
        let (line, column) = map.locate(root.line, root.column, None);
        diags.push(Diagnostic::new(
            file,
            line,
            column,
            "a task file must be a mapping (of `version`, `steps`, ...)".into(),
        ));
        return None;
    }
    let mut conv = convert::Converter::new();
    let json = conv.part(&root, fields::Part::Task);
    for p in conv.problems {
        let (line, column) = map.locate(p.line, p.column, None);
        diags.push(if p.warning {
            Diagnostic::warning(file, line, column, p.message)
        } else {
            Diagnostic::new(file, line, column, p.message)
        });
    }
    let json = json?;
    if diags.iter().any(|d| !d.is_warning()) {
        return None;
    }
    let mut task: Task = match serde_json::from_value(json) {
        Ok(t) => t,
        Err(e) => {
            // The converter gives every field its model type, so this is a bug of ours:
            // say so rather than show serde's words as the user's mistake.
            diags.push(Diagnostic::new(
                file,
                0,
                0,
                format!("internal error reading the task file ({e}); please report it"),
            ));
            return None;
        }
    };
    task.alias = alias_model;
    normalize(&mut task, &aliases, with_aliases);
    let loc = validate::Locator {
        file,
        root: &root,
        map: &map,
        rendered: &rendered,
    };
    validate::validate(&task, &loc, diags);
    // The renderer could not know which secrets are declared; a declared one without a
    // value is reported below (at run) or was given a placeholder (validate).
    diags.retain(|d| {
        !task.secrets.iter().any(|s| {
            d.message.starts_with(&format!(
                "secret `{}` has no value and is not declared",
                s.id
            ))
        })
    });
    if options.secrets_required {
        for (i, sec) in task.secrets.iter().enumerate() {
            if !options.secrets.contains_key(&sec.id) {
                diags.push(loc.finding(&Finding {
                    item: Some(("secrets", i)),
                    field: "id",
                    token: None,
                    message: format!(
                        "secret `{0}` has no value; pass it with --secret {0}=VALUE \
                         (acr-task does not read Key Vault)",
                        sec.id
                    ),
                }));
            }
        }
    }
    if !diags.iter().any(|d| !d.is_warning()) {
        diags.extend(check(&task).iter().map(|f| loc.finding(f)));
    }
    Some(task)
}

/// acr-builder's post-parse defaults (`Task.initialize`): empty actions count as absent,
/// missing ids become `acb_step_N`, a step without `timeout` (or with 0) gets the task's
/// `stepTimeout` (600 when that is 0), one without `workingDirectory` the task's, an unset
/// (or 0) `retryDelay` becomes 5 s, `when` loses repeated entries, images to push without
/// a tag or digest get `:latest` (and repeats go), and with aliases on a `cmd` whose image
/// is an alias (a user's, or `bash`, `az`, `acr`, ...) gets the image it names.
fn normalize(task: &mut Task, aliases: &alias::Aliases, with_aliases: bool) {
    if task.step_timeout == 0 {
        task.step_timeout = DEFAULT_STEP_TIMEOUT;
    }
    if task.total_timeout == 0 {
        task.total_timeout = DEFAULT_TOTAL_TIMEOUT;
    }
    let step_timeout = task.step_timeout;
    let workdir = task.working_directory.clone().filter(|w| !w.is_empty());
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
        if s.timeout.is_none_or(|t| t == 0) {
            s.timeout = Some(step_timeout);
        }
        if s.working_directory.as_deref().is_none_or(str::is_empty) {
            s.working_directory = workdir.clone();
        }
        if s.retry_delay == 0 {
            s.retry_delay = DEFAULT_RETRY_DELAY;
        }
        if let Some(when) = &mut s.when {
            let mut seen = std::collections::HashSet::new();
            when.retain(|w| seen.insert(w.clone()));
        }
        if let Some(push) = &mut s.push {
            let mut seen = std::collections::HashSet::new();
            *push = push
                .iter()
                .map(|p| {
                    if p.contains(':') || p.contains('@') {
                        p.clone()
                    } else {
                        format!("{p}:latest")
                    }
                })
                .filter(|p| seen.insert(p.clone()))
                .collect();
        }
        if let Some(cmd) = &s.cmd {
            let trimmed = cmd.trim_start();
            let image = trimmed.split(' ').next().unwrap_or("");
            let real = aliases
                .user
                .get(image)
                .map(String::as_str)
                .or_else(|| with_aliases.then(|| alias::image_alias(image)).flatten());
            if let Some(real) = real {
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
            severity: Severity::Error,
        }
    }

    pub fn warning(file: &str, line: usize, column: usize, message: String) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::new(file, line, column, message)
        }
    }

    pub fn is_warning(&self) -> bool {
        self.severity == Severity::Warning
    }
}
