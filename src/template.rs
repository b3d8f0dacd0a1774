//! Registry templates: everything that describes a registry but its content, as plain data
//! (`registry export` writes one, `registry deploy` applies one), and the plan that takes a
//! registry from what it is to what a template says, refused as a whole before anything
//! changes when the target cannot honour it. No I/O: `cli::template` reads the target and
//! carries the plan out through the management paths every other command uses.
//!
//! A template never holds a secret: token passwords are left out, webhook secrets and
//! header values and a task's commit-trigger secret read `***` (given at deploy time with
//! `--set`), a task's own secrets and logins are references (`env:`, `file:`), and the
//! encryption key is named by its fingerprint.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::auth::{Permission, ScopeRule, TokenStatus};
use crate::server::api::REDACTED;
use crate::server::model::TaskSpec;
use crate::tier::{Change, Counted, KeySource, Properties, RetentionPolicy, Sku};

/// The template format this version writes and reads.
pub const VERSION: u32 = 1;

/// Where the schema sits in the source tree (editors follow `$schema`).
pub const SCHEMA_PATH: &str = "schemas/registry-template.schema.json";

/// A registry's settings (`acr-task registry export`, `acr-task registry deploy`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "acr-task registry template")]
pub struct Template {
    /// The JSON Schema of this file, for editors.
    #[serde(rename = "$schema", default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// The template format's version (1).
    pub template_version: u32,
    /// The registry's name: 5 to 50 letters and digits.
    pub name: String,
    /// The service tier: Basic, Standard or Premium.
    pub tier: Sku,
    /// Pulls need no credentials (Standard and Premium).
    #[serde(default)]
    pub anonymous_pull: bool,
    #[serde(default)]
    pub encryption: EncryptionRef,
    #[serde(default)]
    pub retention: Retention,
    #[serde(default)]
    pub scope_maps: Vec<ScopeMapSpec>,
    /// Tokens without their passwords (a deployed token has none until `token credential
    /// generate`).
    #[serde(default)]
    pub tokens: Vec<TokenSpec>,
    #[serde(default)]
    pub webhooks: Vec<WebhookSpec>,
    /// Geo-replications (Premium).
    #[serde(default)]
    pub replications: Vec<Replication>,
    /// Stored tasks with their triggers, values and secret references.
    #[serde(default)]
    pub tasks: Vec<TaskSpec>,
}

/// Encryption at rest, by reference: never key material.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EncryptionRef {
    /// Content is encrypted at rest.
    #[serde(default)]
    pub enabled: bool,
    /// Who holds the registry key: `managed` (acr-task) or `customerManaged` (the
    /// operator's key file; Premium).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_source: Option<KeySource>,
    /// The registry key's fingerprint. A customer-managed key must be this one on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// Retention policies (ACR's `registry config retention`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retention {
    /// How long untagged manifests are kept.
    #[serde(default)]
    pub untagged_manifests: RetentionPolicy,
}

/// A replica of the registry in another place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Replication {
    pub location: String,
}

/// A scope map: the actions it grants on repository patterns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ScopeMapSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub rules: Vec<ScopeRule>,
}

/// A token: its scope map, status and expiry; never a password.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenSpec {
    pub name: String,
    pub scope_map: String,
    #[serde(default = "enabled")]
    pub status: TokenStatus,
    /// RFC 3339 time; absent: never expires.
    #[serde(
        default,
        with = "crate::timefmt::opt_secs",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub expiry: Option<i64>,
}

fn enabled() -> TokenStatus {
    TokenStatus::Enabled
}

/// A registry webhook. Its secret and header values read `***` in an export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WebhookSpec {
    pub name: String,
    pub uri: String,
    /// `push`, `delete`.
    pub actions: Vec<String>,
    /// `repository[:tag]` pattern; absent: every repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Headers sent with each delivery.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The HMAC key of the deliveries' signature; absent: unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Loopback and private receivers allowed.
    #[serde(default)]
    pub allow_private_destination: bool,
}

/// `url` without what may be a credential (a user and password, a query such as
/// `?code=...`), each as `***`; anything else as it is.
pub fn redact_url(url: &str) -> String {
    let Ok(mut u) = reqwest::Url::parse(url) else {
        return url.to_string();
    };
    let mut hidden = false;
    if !u.username().is_empty() || u.password().is_some() {
        hidden = u.set_password(None).is_ok() && u.set_username(REDACTED).is_ok();
    }
    if u.query().is_some() {
        u.set_query(Some(REDACTED));
        hidden = true;
    }
    if hidden {
        u.to_string()
    } else {
        url.to_string()
    }
}

/// A template that cannot be read, in the user's words.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{file}:{line}:{column}: {message}")]
    At {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl Template {
    /// Reads a template (`file` names it in errors), with `sets` (`PATH=VALUE`) applied.
    pub fn parse(text: &str, file: &str, sets: &[String]) -> Result<Template, TemplateError> {
        let at = |e: serde_json::Error| TemplateError::At {
            file: file.to_string(),
            line: e.line(),
            column: e.column(),
            message: plain(&e),
        };
        let t: Template = if sets.is_empty() {
            serde_json::from_str(text).map_err(at)?
        } else {
            let mut v: Value = serde_json::from_str(text).map_err(at)?;
            for s in sets {
                apply_set(&mut v, s)?;
            }
            // A value given by --set has no place in the file: name the flag instead.
            serde_json::from_value(v)
                .map_err(|e| TemplateError::Invalid(format!("{file} with --set: {}", plain(&e))))?
        };
        if t.template_version != VERSION {
            return Err(TemplateError::Invalid(format!(
                "{file}: templateVersion {} is not one this acr-task reads (it reads {VERSION})",
                t.template_version
            )));
        }
        Ok(t)
    }

    /// The template as written by `registry export`: pretty JSON, a line at the end.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// serde's message without its internal words.
fn plain(e: &serde_json::Error) -> String {
    let m = e.to_string();
    // serde_json appends " at line L column C"; the caller places it.
    let m = match m.rfind(" at line ") {
        Some(i) => m[..i].to_string(),
        None => m,
    };
    let m = m
        .replace("invalid type: ", "wrong type: found ")
        .replace("invalid value: ", "wrong value: found ")
        .replace("unknown variant", "unknown value")
        .replace("unknown field", "unknown key")
        .replace("missing field", "missing key");
    format!("{m} (see {SCHEMA_PATH})")
}

/// `--set PATH=VALUE`: a dotted path into the template; in a list of named items
/// (`scopeMaps`, `tokens`, `webhooks`, `tasks`) a segment names the item. The value is
/// JSON where the template holds a number, a flag or a list there, else text.
pub fn apply_set(v: &mut Value, set: &str) -> Result<(), TemplateError> {
    let bad = |why: String| TemplateError::Invalid(format!("--set {set}: {why}"));
    let (path, value) = set
        .split_once('=')
        .ok_or_else(|| bad("give PATH=VALUE, e.g. --set name=myregistry".into()))?;
    let segments: Vec<&str> = path.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(bad(format!("{path:?} is not a path")));
    }
    let mut here = v;
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        here = match here {
            Value::Array(items) => items
                .iter_mut()
                .find(|it| it["name"].as_str() == Some(seg))
                .ok_or_else(|| {
                    bad(format!(
                        "the template has no {:?} in {}",
                        seg,
                        segments[..i].join(".")
                    ))
                })?,
            Value::Object(map) => {
                if last {
                    let typed = map
                        .get(*seg)
                        .is_some_and(|old| !old.is_string() && !old.is_null());
                    let new = if typed {
                        serde_json::from_str(value)
                            .map_err(|_| bad(format!("{path} takes a {} here", kind(&map[*seg]))))?
                    } else {
                        Value::String(value.to_string())
                    };
                    map.insert(seg.to_string(), new);
                    return Ok(());
                }
                map.entry(seg.to_string())
                    .or_insert_with(|| Value::Object(Default::default()))
            }
            _ => return Err(bad(format!("{} is not an object", segments[..i].join(".")))),
        };
    }
    Err(bad(format!("{path} names a list item, not a value")))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Bool(_) => "true or false",
        Value::Number(_) => "number",
        Value::Array(_) => "JSON list",
        Value::Object(_) => "JSON object",
        _ => "value",
    }
}

/// What a deploy reads of its target beside the target's own template.
#[derive(Debug, Clone)]
pub struct Target {
    /// The target as a template (secrets redacted as an export has them).
    pub now: Template,
    /// Its stored settings (tier, overrides, Classic, encryption).
    pub properties: Properties,
    pub storage_used: u64,
    /// Stored tasks can be deployed (a server keeps them, and checks them against its
    /// policy).
    pub keeps_tasks: bool,
}

/// One change a deploy makes, in the order it makes them.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Tier, anonymous pull, name: one change of the registry's settings.
    Settings(Change),
    EnableEncryption,
    CreateScopeMap(ScopeMapSpec),
    UpdateScopeMap {
        name: String,
        add: Vec<ScopeRule>,
        remove: Vec<ScopeRule>,
        description: Option<String>,
    },
    CreateToken(TokenSpec),
    SetTokenStatus {
        name: String,
        enabled: bool,
    },
    CreateWebhook(WebhookSpec),
    CreateTask(TaskSpec),
    /// The task as the template has it, and the fields that differ.
    UpdateTask(TaskSpec, Vec<String>),
}

impl Step {
    /// The change in a line, as `--dry-run` and the deploy print it.
    pub fn describe(&self, before: &Template) -> String {
        match self {
            Step::Settings(c) => {
                let mut parts = Vec::new();
                if let Some(s) = c.sku {
                    parts.push(format!("tier {} -> {}", before.tier.as_str(), s.as_str()));
                }
                if let Some(a) = c.anonymous_pull {
                    parts.push(format!("anonymous pull {} -> {a}", before.anonymous_pull));
                }
                if let Some(n) = &c.name {
                    parts.push(format!("name {} -> {n}", before.name));
                }
                if let Some(r) = &c.retention {
                    let was = &before.retention.untagged_manifests;
                    parts.push(format!(
                        "untagged retention {} -> {}",
                        retention(was),
                        retention(r)
                    ));
                }
                format!("~ registry: {}", parts.join(", "))
            }
            Step::EnableEncryption => "~ encryption: enable (sealed in place, online)".into(),
            Step::CreateScopeMap(m) => format!(
                "+ scope map {} ({} rule{})",
                m.name,
                m.rules.len(),
                plural(m.rules.len())
            ),
            Step::UpdateScopeMap {
                name,
                add,
                remove,
                description,
            } => {
                let mut parts: Vec<String> = Vec::new();
                for r in add {
                    parts.push(format!("+{} {}", r.repository, actions(&r.actions)));
                }
                for r in remove {
                    parts.push(format!("-{} {}", r.repository, actions(&r.actions)));
                }
                if description.is_some() {
                    parts.push("description".into());
                }
                format!("~ scope map {name}: {}", parts.join(", "))
            }
            Step::CreateToken(t) => format!(
                "+ token {} (scope map {}, {}, no passwords)",
                t.name,
                t.scope_map,
                status(t.status)
            ),
            Step::SetTokenStatus { name, enabled } => format!(
                "~ token {name}: {}",
                if *enabled { "enable" } else { "disable" }
            ),
            Step::CreateWebhook(w) => format!(
                "+ webhook {} ({} on {})",
                w.name,
                w.actions.join(","),
                w.uri
            ),
            Step::CreateTask(t) => format!("+ task {}", t.name),
            Step::UpdateTask(t, fields) => format!("~ task {}: {}", t.name, fields.join(", ")),
        }
    }
}

fn retention(r: &RetentionPolicy) -> String {
    if r.enabled() {
        format!("{} days", r.days)
    } else {
        "disabled".into()
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn actions(a: &[Permission]) -> String {
    a.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(",")
}

fn status(s: TokenStatus) -> &'static str {
    match s {
        TokenStatus::Enabled => "enabled",
        TokenStatus::Disabled => "disabled",
    }
}

/// What a deploy does: its steps, and what it leaves as it is.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Items of the target the template does not name (a deploy adds and changes, never
    /// deletes).
    pub kept: Vec<String>,
    /// What the reader should know (a target that stays encrypted, ...).
    pub notes: Vec<String>,
}

/// Why a template cannot be deployed on a target: every reason, before anything changed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the template cannot be deployed here, and nothing was changed:\n  - {}", .0.join("\n  - "))]
pub struct Refused(pub Vec<String>);

/// The steps that take `target` to `want`, or every reason it cannot be done.
pub fn plan(want: &Template, target: &Target) -> Result<Plan, Refused> {
    let now = &target.now;
    let mut p = Plan::default();
    let mut why: Vec<String> = Vec::new();

    // The registry's settings, checked as the change itself will be.
    let props = &target.properties;
    let classic = props.sku == Sku::Classic;
    if want.tier == Sku::Classic {
        why.push(
            "tier Classic cannot be deployed: a registry's storage is managed from its first \
             start (use --set tier=Basic|Standard|Premium)"
                .into(),
        );
    } else if classic {
        why.push(format!(
            "the target is a Classic registry: upgrade it first (`acr-task registry update --sku {}`)",
            want.tier.as_str()
        ));
    }
    let retention = want.retention.untagged_manifests;
    let change = Change {
        sku: (want.tier != props.sku).then_some(want.tier),
        retention: (retention != props.retention.unwrap_or_default()).then_some(retention),
        anonymous_pull: (want.anonymous_pull != props.anonymous_pull)
            .then_some(want.anonymous_pull),
        name: (want.name != now.name).then(|| want.name.clone()),
        ..Change::default()
    };
    // The settings the target will have: the counts below are checked against them.
    let after = if classic || want.tier == Sku::Classic {
        props.clone()
    } else {
        match props.change(&change, target.storage_used) {
            Ok(a) => a,
            Err(e) => {
                why.push(e.to_string());
                // Counted against the tier asked for all the same.
                Properties {
                    sku: want.tier,
                    ..props.clone()
                }
            }
        }
    };
    if !change.is_empty() {
        p.steps.push(Step::Settings(change));
    }

    encryption(want, target, &after, &mut p, &mut why);

    if !want.replications.is_empty() {
        if !after.limits().geo_replication {
            why.push(format!(
                "{} replication(s) need the Premium tier (the target will be {})",
                want.replications.len(),
                after.sku.as_str()
            ));
        } else {
            why.push(
                "replications are made with `acr-task replication create NAME --url URL` \
                 (each needs the replica's admin login, which a template does not carry): \
                 remove them from the template"
                    .into(),
            );
        }
    }

    scope_maps(want, now, &after, &mut p, &mut why);
    tokens(want, now, &after, &mut p, &mut why);
    webhooks(want, now, &after, &mut p, &mut why);
    tasks(want, target, &mut p, &mut why);

    if why.is_empty() {
        Ok(p)
    } else {
        Err(Refused(why))
    }
}

fn encryption(
    want: &Template,
    target: &Target,
    after: &Properties,
    p: &mut Plan,
    why: &mut Vec<String>,
) {
    let have = &target.properties.encryption;
    let w = &want.encryption;
    if !w.enabled {
        if have.is_some() {
            p.notes
                .push("the target stays encrypted at rest (encryption is never turned off)".into());
        }
        return;
    }
    match w.key_source.unwrap_or(KeySource::Managed) {
        KeySource::Managed => {
            if have.is_none() && target.properties.sku != Sku::Classic {
                p.steps.push(Step::EnableEncryption);
            }
        }
        KeySource::CustomerManaged => {
            if !after.limits().customer_managed_keys {
                why.push(format!(
                    "a customer-managed key needs the Premium tier (the target will be {})",
                    after.sku.as_str()
                ));
                return;
            }
            let same = have.as_ref().is_some_and(|e| {
                e.key_source == KeySource::CustomerManaged
                    && w.key_id.as_deref().is_none_or(|id| id == e.key_id)
            });
            if !same {
                why.push(format!(
                    "the template's registry key is customer-managed ({}): start the target \
                     with --encryption-key-file holding that key, then deploy again",
                    w.key_id.as_deref().unwrap_or("no key id given")
                ));
            }
        }
    }
}

/// A scope map's rules as (repository, action) pairs, which is how they are stored.
fn pairs(rules: &[ScopeRule]) -> BTreeSet<(String, Permission)> {
    rules
        .iter()
        .flat_map(|r| r.actions.iter().map(|a| (r.repository.clone(), *a)))
        .collect()
}

fn rules_of(pairs: impl Iterator<Item = (String, Permission)>) -> Vec<ScopeRule> {
    let mut by: BTreeMap<String, Vec<Permission>> = BTreeMap::new();
    for (repo, a) in pairs {
        by.entry(repo).or_default().push(a);
    }
    by.into_iter()
        .map(|(repository, actions)| ScopeRule {
            repository,
            actions,
        })
        .collect()
}

/// An item of a template's lists, known by its name.
trait Named {
    fn name(&self) -> &str;
}

macro_rules! named {
    ($($t:ty),*) => {$(
        impl Named for $t {
            fn name(&self) -> &str {
                &self.name
            }
        }
    )*};
}
named!(ScopeMapSpec, TokenSpec, WebhookSpec, TaskSpec);

/// What every list shares: a name given twice is refused, and what the target has
/// beyond the template is kept (and listed).
fn names<T: Named>(what: &str, want: &[T], now: &[T], p: &mut Plan, why: &mut Vec<String>) {
    let mut seen = BTreeSet::new();
    for n in want.iter().map(Named::name) {
        if !seen.insert(n) {
            why.push(format!("the template names {what} {n:?} twice"));
        }
    }
    for n in now.iter().map(Named::name) {
        if !seen.contains(n) {
            p.kept.push(format!("{what} {n}"));
        }
    }
}

/// One more of `what` past `current`, on the settings the target will have.
fn count(after: &Properties, what: Counted, current: usize, adding: usize, why: &mut Vec<String>) {
    if adding == 0 {
        return;
    }
    if let Err(e) = after.check_count(what, (current + adding - 1) as u64) {
        why.push(format!("{adding} more: {e}"));
    }
}

fn scope_maps(
    want: &Template,
    now: &Template,
    after: &Properties,
    p: &mut Plan,
    why: &mut Vec<String>,
) {
    names("scope map", &want.scope_maps, &now.scope_maps, p, why);
    let mut new = 0;
    for m in &want.scope_maps {
        match now.scope_maps.iter().find(|x| x.name == m.name) {
            None => {
                new += 1;
                p.steps.push(Step::CreateScopeMap(m.clone()));
            }
            Some(have) => {
                let (w, h) = (pairs(&m.rules), pairs(&have.rules));
                let add = rules_of(w.difference(&h).cloned());
                let remove = rules_of(h.difference(&w).cloned());
                let description =
                    (m.description != have.description).then(|| m.description.clone());
                if !add.is_empty() || !remove.is_empty() || description.is_some() {
                    p.steps.push(Step::UpdateScopeMap {
                        name: m.name.clone(),
                        add,
                        remove,
                        description,
                    });
                }
            }
        }
    }
    count(after, Counted::ScopeMaps, now.scope_maps.len(), new, why);
}

fn tokens(
    want: &Template,
    now: &Template,
    after: &Properties,
    p: &mut Plan,
    why: &mut Vec<String>,
) {
    names("token", &want.tokens, &now.tokens, p, why);
    let mut new = 0;
    for t in &want.tokens {
        let known = |m: &str| {
            want.scope_maps.iter().any(|x| x.name == m)
                || now.scope_maps.iter().any(|x| x.name == m)
        };
        if !known(&t.scope_map) {
            why.push(format!(
                "token {} names scope map {:?}, which neither the template nor the target has",
                t.name, t.scope_map
            ));
            continue;
        }
        match now.tokens.iter().find(|x| x.name == t.name) {
            None => {
                new += 1;
                p.steps.push(Step::CreateToken(t.clone()));
            }
            Some(have) => {
                if have.scope_map != t.scope_map || have.expiry != t.expiry {
                    why.push(format!(
                        "token {} exists on the target with {}: a deploy does not rebind or \
                         re-date a token; delete it there (`acr-task token delete --name {}`) \
                         or change the template",
                        t.name,
                        if have.scope_map != t.scope_map {
                            format!("scope map {:?}, not {:?}", have.scope_map, t.scope_map)
                        } else {
                            "another expiry".to_string()
                        },
                        t.name
                    ));
                } else if have.status != t.status {
                    p.steps.push(Step::SetTokenStatus {
                        name: t.name.clone(),
                        enabled: t.status == TokenStatus::Enabled,
                    });
                }
            }
        }
    }
    count(after, Counted::Tokens, now.tokens.len(), new, why);
}

fn webhooks(
    want: &Template,
    now: &Template,
    after: &Properties,
    p: &mut Plan,
    why: &mut Vec<String>,
) {
    names("webhook", &want.webhooks, &now.webhooks, p, why);
    let mut new = 0;
    for w in &want.webhooks {
        match now.webhooks.iter().find(|x| x.name == w.name) {
            None => {
                let mut missing: Vec<String> = Vec::new();
                if w.uri.contains(REDACTED) {
                    missing.push(format!("--set webhooks.{}.uri=URL", w.name));
                }
                if w.secret.as_deref() == Some(REDACTED) {
                    missing.push(format!("--set webhooks.{}.secret=VALUE", w.name));
                }
                for (h, v) in &w.headers {
                    if v == REDACTED {
                        missing.push(format!("--set webhooks.{}.headers.{h}=VALUE", w.name));
                    }
                }
                if missing.is_empty() {
                    new += 1;
                    p.steps.push(Step::CreateWebhook(w.clone()));
                } else {
                    why.push(format!(
                        "webhook {}'s secrets are not in the template: give them with {}",
                        w.name,
                        missing.join(" ")
                    ));
                }
            }
            Some(have) => {
                // Secrets cannot be compared (the target shows them as `***`): their
                // presence can.
                let same = have.uri == w.uri
                    && have.actions == w.actions
                    && have.scope == w.scope
                    && have.allow_private_destination == w.allow_private_destination
                    && have.secret.is_some() == w.secret.is_some()
                    && have.headers.keys().eq(w.headers.keys());
                if !same {
                    why.push(format!(
                        "webhook {} exists on the target with other settings: a deploy does \
                         not replace a webhook (its delivery history would go); delete it \
                         there (`acr-task webhook delete --name {}`) or change the template",
                        w.name, w.name
                    ));
                }
            }
        }
    }
    count(after, Counted::Webhooks, now.webhooks.len(), new, why);
}

fn tasks(want: &Template, target: &Target, p: &mut Plan, why: &mut Vec<String>) {
    let now = &target.now;
    names("task", &want.tasks, &now.tasks, p, why);
    if !want.tasks.is_empty() && !target.keeps_tasks {
        why.push(format!(
            "the template has {} stored task(s), which a running server keeps (and checks \
             against its policy): start `acr-task serve` on the target's data, or deploy \
             with --registry URL",
            want.tasks.len()
        ));
        return;
    }
    for t in &want.tasks {
        let secret = t.triggers.commit.as_ref().and_then(|c| c.secret.as_deref());
        let have = now.tasks.iter().find(|x| x.name == t.name);
        let has_secret = have
            .and_then(|h| h.triggers.commit.as_ref())
            .is_some_and(|c| c.secret.is_some());
        if secret == Some(REDACTED) && !has_secret {
            why.push(format!(
                "task {}'s commit-trigger secret is not in the template: give it with --set \
                 tasks.{}.triggers.commit.secret=VALUE",
                t.name, t.name
            ));
            continue;
        }
        let step = match have {
            None => Some(Step::CreateTask(t.clone())),
            Some(h) => {
                let fields = differing(t, h);
                (!fields.is_empty()).then(|| Step::UpdateTask(t.clone(), fields))
            }
        };
        if step.is_some() && t.context.contains(REDACTED) {
            why.push(format!(
                "task {}'s context URL holds credentials the template does not: give it with \
                 --set tasks.{}.context=URL",
                t.name, t.name
            ));
            continue;
        }
        p.steps.extend(step);
    }
}

/// The top-level fields of a task that differ (`triggers.*` one level down).
fn differing(want: &TaskSpec, have: &TaskSpec) -> Vec<String> {
    let (w, h) = (
        serde_json::to_value(want).unwrap_or_default(),
        serde_json::to_value(have).unwrap_or_default(),
    );
    let mut out = Vec::new();
    let keys: BTreeSet<&String> = w
        .as_object()
        .into_iter()
        .chain(h.as_object())
        .flat_map(|m| m.keys())
        .collect();
    for k in keys {
        if k == "triggers" {
            for sub in ["commit", "baseImage", "timers"] {
                if w[k][sub] != h[k][sub] {
                    out.push(format!("triggers.{sub}"));
                }
            }
        } else if w[k] != h[k] {
            out.push(k.clone());
        }
    }
    out
}

/// The JSON Schema of templates, as committed in `schemas/`.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(Template);
    let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::model::{CommitTrigger, Triggers};

    fn base() -> Template {
        Template {
            schema: None,
            template_version: VERSION,
            name: "source1".into(),
            tier: Sku::Standard,
            anonymous_pull: false,
            encryption: EncryptionRef::default(),
            retention: Retention::default(),
            scope_maps: vec![ScopeMapSpec {
                name: "ci".into(),
                description: "CI pushes".into(),
                rules: vec![ScopeRule {
                    repository: "app/*".into(),
                    actions: vec![Permission::ContentRead, Permission::ContentWrite],
                }],
            }],
            tokens: vec![TokenSpec {
                name: "ci".into(),
                scope_map: "ci".into(),
                status: TokenStatus::Enabled,
                expiry: None,
            }],
            webhooks: vec![WebhookSpec {
                name: "hook1".into(),
                uri: "https://example.com/hook".into(),
                actions: vec!["push".into()],
                scope: None,
                headers: BTreeMap::new(),
                secret: None,
                allow_private_destination: false,
            }],
            replications: Vec::new(),
            tasks: vec![TaskSpec {
                name: "build".into(),
                context: "https://example.com/app.git".into(),
                ..TaskSpec::default()
            }],
        }
    }

    fn empty_target(sku: Sku) -> Target {
        Target {
            now: Template {
                name: "target1".into(),
                tier: sku,
                scope_maps: vec![],
                tokens: vec![],
                webhooks: vec![],
                tasks: vec![],
                ..base()
            },
            properties: Properties::new(sku),
            storage_used: 0,
            keeps_tasks: true,
        }
    }

    /// The target after a deploy: what the template says, as an export would read it.
    fn deployed(want: &Template, sku: Sku) -> Target {
        let mut props = Properties::new(sku);
        props.sku = want.tier;
        Target {
            now: want.clone(),
            properties: props,
            storage_used: 0,
            keeps_tasks: true,
        }
    }

    #[test]
    fn a_new_target_gets_everything_then_nothing() {
        let want = base();
        let p = plan(&want, &empty_target(Sku::Basic)).unwrap();
        let lines: Vec<String> = p
            .steps
            .iter()
            .map(|s| s.describe(&empty_target(Sku::Basic).now))
            .collect();
        assert_eq!(
            lines,
            [
                "~ registry: tier Basic -> Standard, name target1 -> source1",
                "+ scope map ci (1 rule)",
                "+ token ci (scope map ci, enabled, no passwords)",
                "+ webhook hook1 (push on https://example.com/hook)",
                "+ task build",
            ]
        );
        let again = plan(&want, &deployed(&want, Sku::Basic)).unwrap();
        assert!(again.steps.is_empty(), "{:?}", again.steps);
    }

    #[test]
    fn scope_map_rules_are_compared_as_pairs() {
        let want = base();
        let mut t = deployed(&want, Sku::Standard);
        t.now.scope_maps[0].rules = vec![
            ScopeRule {
                repository: "app/*".into(),
                actions: vec![Permission::ContentWrite],
            },
            ScopeRule {
                repository: "app/*".into(),
                actions: vec![Permission::ContentRead, Permission::ContentDelete],
            },
        ];
        let p = plan(&want, &t).unwrap();
        assert_eq!(
            p.steps,
            [Step::UpdateScopeMap {
                name: "ci".into(),
                add: vec![],
                remove: vec![ScopeRule {
                    repository: "app/*".into(),
                    actions: vec![Permission::ContentDelete]
                }],
                description: None,
            }]
        );
    }

    #[test]
    fn what_a_lower_tier_cannot_hold_is_refused_whole() {
        let mut want = base();
        want.tier = Sku::Basic;
        want.anonymous_pull = true;
        want.replications = vec![Replication {
            location: "westeurope".into(),
        }];
        want.retention.untagged_manifests = RetentionPolicy {
            status: crate::tier::PolicyStatus::Enabled,
            days: 30,
        };
        for i in 0..3 {
            let mut w = want.webhooks[0].clone();
            w.name = format!("hook{}", i + 2);
            want.webhooks.push(w);
        }
        let e = plan(&want, &empty_target(Sku::Premium)).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("anonymous pull needs the Standard or Premium tier"),
            "{text}"
        );
        assert!(
            text.contains("replication(s) need the Premium tier"),
            "{text}"
        );
        assert!(text.contains("the Basic tier allows 2 webhooks"), "{text}");
        assert!(text.contains("nothing was changed"), "{text}");
    }

    #[test]
    fn redacted_secrets_must_be_given_unless_the_target_has_them() {
        let mut want = base();
        want.webhooks[0].secret = Some(REDACTED.into());
        want.tasks[0].triggers = Triggers {
            commit: Some(CommitTrigger {
                secret: Some(REDACTED.into()),
                ..CommitTrigger::default()
            }),
            ..Triggers::default()
        };
        let e = plan(&want, &empty_target(Sku::Standard))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--set webhooks.hook1.secret=VALUE"), "{e}");
        assert!(
            e.contains("--set tasks.build.triggers.commit.secret=VALUE"),
            "{e}"
        );
        // A target that has them keeps them: nothing to do.
        assert!(plan(&want, &deployed(&want, Sku::Standard))
            .unwrap()
            .steps
            .is_empty());
        // Given with --set, the template deploys.
        let mut v = serde_json::to_value(&want).unwrap();
        apply_set(&mut v, "webhooks.hook1.secret=s3cr3t").unwrap();
        apply_set(&mut v, "tasks.build.triggers.commit.secret=t0ps3cret").unwrap();
        let given: Template = serde_json::from_value(v).unwrap();
        assert_eq!(given.webhooks[0].secret.as_deref(), Some("s3cr3t"));
        assert_eq!(
            plan(&given, &empty_target(Sku::Standard))
                .unwrap()
                .steps
                .len(),
            5
        );
    }

    #[test]
    fn sets_follow_the_template_types_and_name_bad_paths() {
        let mut v = serde_json::to_value(base()).unwrap();
        apply_set(&mut v, "name=target2").unwrap();
        apply_set(&mut v, "anonymousPull=true").unwrap();
        apply_set(&mut v, "tokens.ci.status=disabled").unwrap();
        apply_set(&mut v, "webhooks.hook1.headers.Authorization=Bearer x=y").unwrap();
        let t: Template = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(t.name, "target2");
        assert!(t.anonymous_pull);
        assert_eq!(t.tokens[0].status, TokenStatus::Disabled);
        assert_eq!(t.webhooks[0].headers["Authorization"], "Bearer x=y");
        let e = apply_set(&mut v, "tasks.nosuch.timeout=5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no \"nosuch\" in tasks"), "{e}");
        let e = apply_set(&mut v, "anonymousPull=maybe")
            .unwrap_err()
            .to_string();
        assert!(e.contains("takes a true or false"), "{e}");
        assert!(apply_set(&mut v, "name").is_err());
    }

    #[test]
    fn credentials_in_urls_are_redacted_and_asked_for() {
        assert_eq!(
            redact_url("https://ci:ghp_secret@git.example.com/app.git"),
            "https://***@git.example.com/app.git"
        );
        assert_eq!(
            redact_url("https://hooks.example.com/x?code=abc&y=1"),
            "https://hooks.example.com/x?***"
        );
        assert_eq!(redact_url("https://example.com"), "https://example.com");
        assert_eq!(redact_url("/srv/app"), "/srv/app");
        let mut want = base();
        want.webhooks[0].uri = redact_url("https://hooks.example.com/x?code=abc");
        want.tasks[0].context = redact_url("https://u:p@git.example.com/app.git");
        let e = plan(&want, &empty_target(Sku::Standard))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--set webhooks.hook1.uri=URL"), "{e}");
        assert!(e.contains("--set tasks.build.context=URL"), "{e}");
        // Unchanged on a target that has them: nothing asked.
        assert!(plan(&want, &deployed(&want, Sku::Standard))
            .unwrap()
            .steps
            .is_empty());
    }

    #[test]
    fn a_bad_template_is_named_by_file_line_and_column() {
        let e = Template::parse(
            "{\n  \"templateVersion\": 1,\n  \"tiers\": \"Basic\"\n}",
            "reg.json",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("reg.json:3:"), "{e}");
        assert!(e.contains("unknown key `tiers`"), "{e}");
        let e = Template::parse(
            "{\"templateVersion\": 2, \"name\": \"abcde\", \"tier\": \"Basic\"}",
            "t.json",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("templateVersion 2"), "{e}");
    }

    #[test]
    fn a_token_rebound_on_the_target_is_a_conflict_not_a_change() {
        let want = base();
        let mut t = deployed(&want, Sku::Standard);
        t.now.scope_maps.push(ScopeMapSpec {
            name: "other".into(),
            description: String::new(),
            rules: vec![],
        });
        t.now.tokens[0].scope_map = "other".into();
        let e = plan(&want, &t).unwrap_err().to_string();
        assert!(
            e.contains("token ci exists on the target with scope map \"other\""),
            "{e}"
        );
    }
}
