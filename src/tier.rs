//! Registry tiers (ACR's SKUs) and their limits, as plain data: what each tier allows, the
//! operator's overrides, and the checks that compare a use against a limit. No I/O: the
//! store keeps a registry's [`Properties`], the registry's service layer and the
//! management paths enforce what [`Limits`] says.
//!
//! The figures are ACR's published ones (Azure Container Registry service tiers):
//! included storage 10/100/500 GiB, 1,000/3,000/10,000 read and 100/500/2,000 write
//! operations a minute, 2/10/500 webhooks, 100/500/50,000 tokens and scope maps;
//! geo-replication, content trust and customer-managed keys on Premium only. Here the
//! included storage is the limit: there is no bill to grow, so running out is what the
//! operator should hear about (`--storage-limit` moves it).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A registry's service tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Sku {
    /// Storage the customer owns, in the distribution layout; upgraded one way only.
    Classic,
    Basic,
    Standard,
    Premium,
}

impl Sku {
    /// A registry replicated to `replications` other regions stays on a tier that has
    /// geo-replication (ACR refuses the downgrade of a geo-replicated registry too).
    pub fn check_replicated(self, replications: u64) -> Result<(), LimitError> {
        if replications > 0 && !self.limits().geo_replication {
            return Err(LimitError::Replicated {
                sku: self,
                replications,
            });
        }
        Ok(())
    }

    pub const MANAGED: [Sku; 3] = [Sku::Basic, Sku::Standard, Sku::Premium];

    pub fn as_str(self) -> &'static str {
        match self {
            Sku::Classic => "Classic",
            Sku::Basic => "Basic",
            Sku::Standard => "Standard",
            Sku::Premium => "Premium",
        }
    }

    /// The tier's own limits, before any override.
    pub fn limits(self) -> Limits {
        const GIB: u64 = 1 << 30;
        // Classic's storage (and its throughput) is the customer's own: no included amount
        // to run out of, no rate of ours.
        let (storage, read, write, webhooks, identities) = match self {
            Sku::Classic => (None, None, None, 0, 0),
            Sku::Basic => (Some(10 * GIB), Some(1_000), Some(100), 2, 100),
            Sku::Standard => (Some(100 * GIB), Some(3_000), Some(500), 10, 500),
            Sku::Premium => (Some(500 * GIB), Some(10_000), Some(2_000), 500, 50_000),
        };
        let premium = self == Sku::Premium;
        Limits {
            storage_bytes: storage,
            read_ops_per_minute: read,
            write_ops_per_minute: write,
            webhooks: Some(webhooks),
            tokens: Some(identities),
            scope_maps: Some(identities),
            // ACR names no number for Premium's replications: a region each, as needed.
            replications: if premium { None } else { Some(0) },
            geo_replication: premium,
            content_trust: premium,
            customer_managed_keys: premium,
            anonymous_pull: matches!(self, Sku::Standard | Sku::Premium),
        }
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Sku {
    type Err = String;

    /// Case-insensitive, as `az acr --sku` reads it.
    fn from_str(s: &str) -> Result<Sku, String> {
        [Sku::Classic, Sku::Basic, Sku::Standard, Sku::Premium]
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown tier {s:?}: use Basic, Standard or Premium"))
    }
}

/// What a registry may hold and do. `None` is unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    pub storage_bytes: Option<u64>,
    pub read_ops_per_minute: Option<u64>,
    pub write_ops_per_minute: Option<u64>,
    pub webhooks: Option<u64>,
    pub tokens: Option<u64>,
    pub scope_maps: Option<u64>,
    pub replications: Option<u64>,
    pub geo_replication: bool,
    pub content_trust: bool,
    pub customer_managed_keys: bool,
    pub anonymous_pull: bool,
}

/// An operator's setting of one limit: a number, or none at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Override {
    Count(u64),
    /// Kept as the word, so a template or `-o json` reads as it was set.
    Unlimited(Unlimited),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unlimited {
    Unlimited,
}

impl Override {
    fn value(self) -> Option<u64> {
        match self {
            Override::Count(n) => Some(n),
            Override::Unlimited(_) => None,
        }
    }
}

/// The operator's overrides of a tier's limits (`registry update --storage-limit ...`).
/// An absent field keeps the tier's figure; they survive a change of tier.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Overrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_bytes: Option<Override>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_ops_per_minute: Option<Override>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_ops_per_minute: Option<Override>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<Override>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Override>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope_maps: Option<Override>,
}

impl Overrides {
    /// `other`'s settings over these (a field `other` leaves out stays).
    pub fn merge(&mut self, other: &Overrides) {
        let pairs = [
            (&mut self.storage_bytes, other.storage_bytes),
            (&mut self.read_ops_per_minute, other.read_ops_per_minute),
            (&mut self.write_ops_per_minute, other.write_ops_per_minute),
            (&mut self.webhooks, other.webhooks),
            (&mut self.tokens, other.tokens),
            (&mut self.scope_maps, other.scope_maps),
        ];
        for (mine, theirs) in pairs {
            if theirs.is_some() {
                *mine = theirs;
            }
        }
    }
}

/// A registry's settings as the store keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Properties {
    pub sku: Sku,
    #[serde(default)]
    pub overrides: Overrides,
    /// The Classic storage this registry serves (or served, before its upgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classic: Option<Classic>,
    /// Encryption at rest of the managed store (`None`: a store from before it, until
    /// `registry encryption enable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// The registry's name as a template named it (`registry deploy`); else the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Pulls need no credentials (`registry update --anonymous-pull-enabled`; Standard and
    /// Premium, as ACR).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub anonymous_pull: bool,
    /// How long untagged manifests are kept (`registry config retention`; Premium).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionPolicy>,
    /// Content trust: which repositories need signed images, by which keys (Premium).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_trust: Option<ContentTrust>,
    /// Where the blob bytes are when not in the data directory: `s3://BUCKET/PREFIX`
    /// (`serve --storage`, set when the registry is made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_storage: Option<String>,
}

/// Content trust (`registry update --content-trust`, `registry config content-trust`):
/// while enabled, a pull by tag of an image in a repository a policy names is refused
/// unless one of the policy's keys signed it, and runs refuse such images too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContentTrust {
    pub status: PolicyStatus,
    #[serde(default)]
    pub policies: Vec<TrustPolicy>,
}

impl Default for ContentTrust {
    fn default() -> Self {
        ContentTrust {
            status: PolicyStatus::Disabled,
            policies: Vec::new(),
        }
    }
}

/// Images of the repositories `repository` names (`name`, `prefix/*` or `*`) must be
/// signed by one of `keys` (PEM public keys, cosign's format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrustPolicy {
    pub repository: String,
    pub keys: Vec<String>,
}

impl ContentTrust {
    pub fn enabled(&self) -> bool {
        self.status == PolicyStatus::Enabled
    }

    /// The policy guarding `repo` while enabled: the first whose pattern matches.
    pub fn policy_for(&self, repo: &str) -> Option<&TrustPolicy> {
        if !self.enabled() {
            return None;
        }
        self.policies
            .iter()
            .find(|p| crate::names::pattern_matches(&p.repository, repo))
    }

    /// The keys of a policy, parsed (stored keys were checked when set).
    pub fn keys(p: &TrustPolicy) -> Vec<crate::signature::PublicKey> {
        p.keys
            .iter()
            .filter_map(|k| crate::signature::PublicKey::from_pem("policy key", k.as_bytes()).ok())
            .collect()
    }

    /// Every policy names a valid repository pattern and keys that read.
    pub fn check(&self) -> Result<(), LimitError> {
        for p in &self.policies {
            if !crate::names::valid_pattern(&p.repository) {
                return Err(LimitError::TrustPolicy {
                    repository: p.repository.clone(),
                    why: "is no repository pattern: give a name, `prefix/*` or `*`".into(),
                });
            }
            if p.keys.is_empty() {
                return Err(LimitError::TrustPolicy {
                    repository: p.repository.clone(),
                    why: "has no key: give at least one --key".into(),
                });
            }
            for k in &p.keys {
                crate::signature::PublicKey::from_pem("its key", k.as_bytes()).map_err(|e| {
                    LimitError::TrustPolicy {
                        repository: p.repository.clone(),
                        why: e.to_string(),
                    }
                })?;
            }
        }
        Ok(())
    }
}

/// A retention policy for untagged manifests (ACR's `az acr config retention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetentionPolicy {
    pub status: PolicyStatus,
    /// Days an untagged manifest is kept, 0 to 365 (ACR's default: 7).
    #[serde(default = "RetentionPolicy::default_days")]
    pub days: u32,
}

impl RetentionPolicy {
    pub const MAX_DAYS: u32 = 365;

    fn default_days() -> u32 {
        7
    }

    /// Its days are within what ACR allows.
    pub fn check(&self) -> Result<(), LimitError> {
        if self.days > RetentionPolicy::MAX_DAYS {
            return Err(LimitError::RetentionDays { days: self.days });
        }
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.status == PolicyStatus::Enabled
    }
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            status: PolicyStatus::Disabled,
            days: RetentionPolicy::default_days(),
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum PolicyStatus {
    Enabled,
    Disabled,
}

/// A change of a registry's settings (`PATCH /api/registry`, `registry update`,
/// `registry deploy`): each field left out stays as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Change {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<Sku>,
    #[serde(default)]
    pub overrides: Overrides,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_pull: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionPolicy>,
    /// The whole content-trust setting, replacing the stored one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_trust: Option<ContentTrust>,
}

impl Change {
    /// A move to `sku`, nothing else.
    pub fn to(sku: Sku) -> Change {
        Change {
            sku: Some(sku),
            ..Change::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Change::default()
    }
}

/// ACR's rule for a registry name: 5 to 50 letters and digits.
pub fn check_name(name: &str) -> Result<(), LimitError> {
    let ok = (5..=50).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(LimitError::Name {
            name: name.to_string(),
        })
    }
}

/// Who holds the registry key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum KeySource {
    /// Generated and kept by acr-task in the registry's directory (mode 0600).
    Managed,
    /// The operator's key file (`--encryption-key-file`, `ACR_TASK_ENCRYPTION_KEY_FILE`).
    CustomerManaged,
}

/// The managed store's encryption at rest (envelope encryption: a data key per blob,
/// wrapped by the registry key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Encryption {
    pub key_source: KeySource,
    /// The current registry key's fingerprint (never the key).
    pub key_id: String,
    /// Every blob and manifest is sealed (false while a store is encrypted in place).
    pub complete: bool,
    /// While a rotation re-wraps data keys: the key it moves away from (still needed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotating_from: Option<String>,
    /// The in-place encryption or rotation under way (objects are blobs and manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Why the last attempt stopped (it is retried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Encryption {
    /// Work left to do: sealing what is stored, or re-wrapping data keys.
    pub fn pending(&self) -> bool {
        !self.complete || self.rotating_from.is_some()
    }
}

impl Default for Properties {
    /// A registry made without a tier is Premium: every feature, the largest limits.
    fn default() -> Self {
        Properties::new(Sku::Premium)
    }
}

/// A Classic registry's storage: a directory in the CNCF distribution layout, which the
/// customer owns; and its one-way upgrade to a managed tier, once asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Classic {
    pub storage: std::path::PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<Upgrade>,
}

/// The copy of a Classic registry into managed storage. While it runs the registry stays
/// Classic (pulls served from the Classic directory, pushes refused); when everything is
/// copied and verified the tier becomes `to` in one change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Upgrade {
    pub to: Sku,
    /// Unix seconds.
    #[serde(with = "crate::timefmt::secs")]
    pub started: i64,
    #[serde(
        default,
        with = "crate::timefmt::opt_secs",
        skip_serializing_if = "Option::is_none"
    )]
    pub finished: Option<i64>,
    #[serde(default)]
    pub progress: Progress,
    /// Why the last attempt stopped (it is retried; the message says what to fix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How far an upgrade is: objects are blobs and manifests (with their tags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub objects_total: u64,
    pub objects_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Bytes actually copied (the rest of `bytes_done` was found already there: a resumed
    /// upgrade copies nothing twice).
    pub bytes_copied: u64,
    /// Over the current attempt.
    pub bytes_per_second: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
}

impl Properties {
    /// A tier with no overrides.
    pub fn new(sku: Sku) -> Properties {
        Properties {
            sku,
            overrides: Overrides::default(),
            classic: None,
            encryption: None,
            name: None,
            anonymous_pull: false,
            retention: None,
            content_trust: None,
            object_storage: None,
        }
    }

    /// The upgrade under way, if one is.
    pub fn upgrading(&self) -> Option<&Upgrade> {
        match (&self.sku, &self.classic) {
            (Sku::Classic, Some(c)) => c.upgrade.as_ref().filter(|u| u.finished.is_none()),
            _ => None,
        }
    }

    /// Pushes are refused while an upgrade runs (pulls go on, from the Classic storage).
    pub fn check_writable(&self) -> Result<(), LimitError> {
        match self.upgrading() {
            Some(u) => Err(LimitError::Upgrading { to: u.to }),
            None => Ok(()),
        }
    }

    /// What only a managed tier does (deletes, gc, encryption), refused on Classic.
    pub fn check_managed(&self, what: &'static str) -> Result<(), LimitError> {
        if self.sku == Sku::Classic {
            return Err(LimitError::NeedsManaged { what });
        }
        Ok(())
    }
}

impl Properties {
    /// The tier's limits with the overrides applied.
    pub fn limits(&self) -> Limits {
        let mut l = self.sku.limits();
        let o = &self.overrides;
        let pairs = [
            (&mut l.storage_bytes, o.storage_bytes),
            (&mut l.read_ops_per_minute, o.read_ops_per_minute),
            (&mut l.write_ops_per_minute, o.write_ops_per_minute),
            (&mut l.webhooks, o.webhooks),
            (&mut l.tokens, o.tokens),
            (&mut l.scope_maps, o.scope_maps),
        ];
        for (limit, set) in pairs {
            if let Some(v) = set {
                *limit = v.value();
            }
        }
        l
    }
}

/// A refused change, in the user's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "the registry's storage limit is {limit} ({sku}) and {used} is stored: this needs {needed} \
         more. Delete images you no longer need (`acr-task repository delete`), or raise the \
         limit (`acr-task registry update --sku <higher tier>` or `--storage-limit SIZE`)",
        limit = human(*limit), used = human(*used), needed = human(*needed)
    )]
    Storage {
        sku: Sku,
        limit: u64,
        used: u64,
        needed: u64,
    },
    #[error(
        "the {sku} tier allows {limit} {what} and the registry has {current}: delete one, or \
         change the tier (`acr-task registry update --sku <higher tier>`) or the limit \
         (`acr-task registry update --{flag}-limit N`)"
    )]
    Count {
        sku: Sku,
        what: &'static str,
        flag: &'static str,
        limit: u64,
        current: u64,
    },
    #[error("{what} needs the Premium tier (this registry is {sku}): `acr-task registry update --sku Premium`")]
    Feature { sku: Sku, what: &'static str },
    #[error(
        "the registry has {replications} geo-replication(s), which need the Premium tier: \
         remove them first (`acr-task replication list`, then `acr-task replication delete \
         NAME` each) to move it to {sku}"
    )]
    Replicated { sku: Sku, replications: u64 },
    #[error(
        "{to} allows {limit} of storage but {used} is stored: delete images first \
         (`acr-task repository delete`, then `acr-task registry gc`), or choose a larger \
         tier or `--storage-limit`",
        limit = human(*limit), used = human(*used)
    )]
    TooSmall { to: Sku, limit: u64, used: u64 },
    #[error("a {from} registry cannot become Classic: the move to a managed tier is one-way")]
    BackToClassic { from: Sku },
    #[error(
        "{what} need a managed tier: this registry is Classic. Upgrade it with \
         `acr-task registry update --sku Basic|Standard|Premium` (one-way; pulls go on \
         while it runs)"
    )]
    NeedsManaged { what: &'static str },
    #[error(
        "the registry is being upgraded from Classic to {to}: pushes resume when the upgrade \
         completes (pulls go on meanwhile; `acr-task registry show` shows its progress)"
    )]
    Upgrading { to: Sku },
    #[error("the registry is already being upgraded to {to}: wait for it to complete")]
    AlreadyUpgrading { to: Sku },
    #[error(
        "anonymous pull needs the Standard or Premium tier (this registry is {sku}): \
         `acr-task registry update --sku Standard`, or turn it off first \
         (`--anonymous-pull-enabled false`)"
    )]
    AnonymousPull { sku: Sku },
    #[error("{name:?} is not a registry name: use 5 to 50 letters and digits")]
    Name { name: String },
    #[error("--days {days}: a retention policy keeps untagged manifests 0 to 365 days")]
    RetentionDays { days: u32 },
    #[error("content-trust policy {repository:?} {why}")]
    TrustPolicy { repository: String, why: String },
    #[error("{item} is locked ({attribute} is false): unlock it first with `{unlock}`")]
    Locked {
        item: String,
        attribute: &'static str,
        unlock: String,
    },
}

impl LimitError {
    /// The refusal of a lock on `repo` (or its `tag`): `attribute` is the one set to false.
    pub fn locked(repo: &str, tag: Option<&str>, attribute: &'static str) -> LimitError {
        let (item, image) = match tag {
            None => (repo.to_string(), String::new()),
            Some(t) => (format!("{repo}:{t}"), format!(" --image {repo}:{t}")),
        };
        LimitError::Locked {
            item,
            attribute,
            unlock: format!("acr-task repository update --name {repo}{image} --{attribute} true"),
        }
    }
}

/// Countable things a tier limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Webhooks,
    Tokens,
    ScopeMaps,
    Replications,
}

impl Counted {
    fn words(self) -> (&'static str, &'static str) {
        match self {
            Counted::Webhooks => ("webhooks", "webhook"),
            Counted::Tokens => ("tokens", "token"),
            Counted::ScopeMaps => ("scope maps", "scope-map"),
            Counted::Replications => ("replications", "replication"),
        }
    }
}

impl Properties {
    /// Whether `extra` more bytes fit beside `used`.
    pub fn check_storage(&self, used: u64, extra: u64) -> Result<(), LimitError> {
        match self.limits().storage_bytes {
            Some(limit) if used.saturating_add(extra) > limit => Err(LimitError::Storage {
                sku: self.sku,
                limit,
                used,
                needed: extra,
            }),
            _ => Ok(()),
        }
    }

    /// Whether one more of `what` may be made, `current` existing.
    pub fn check_count(&self, what: Counted, current: u64) -> Result<(), LimitError> {
        let l = self.limits();
        let limit = match what {
            Counted::Webhooks => l.webhooks,
            Counted::Tokens => l.tokens,
            Counted::ScopeMaps => l.scope_maps,
            Counted::Replications => l.replications,
        };
        if self.sku == Sku::Classic {
            let what = match what {
                Counted::Webhooks => "webhooks",
                Counted::Tokens => "tokens",
                Counted::ScopeMaps => "scope maps",
                Counted::Replications => "replications",
            };
            return Err(LimitError::NeedsManaged { what });
        }
        match limit {
            Some(limit) if current >= limit => {
                let (what, flag) = what.words();
                Err(LimitError::Count {
                    sku: self.sku,
                    what,
                    flag,
                    limit,
                    current,
                })
            }
            _ => Ok(()),
        }
    }

    /// These properties changed to `to` and `overrides`, checked against what is stored:
    /// never back to Classic, never below what is stored. (Leaving Classic starts its
    /// migration; the caller owns that.)
    pub fn change(&self, ch: &Change, used: u64) -> Result<Properties, LimitError> {
        let sku = ch.sku.unwrap_or(self.sku);
        if sku == Sku::Classic && self.sku != Sku::Classic {
            return Err(LimitError::BackToClassic { from: self.sku });
        }
        let mut next = self.clone();
        next.overrides.merge(&ch.overrides);
        if let Some(name) = &ch.name {
            check_name(name)?;
            next.name = Some(name.clone());
        }
        if let Some(on) = ch.anonymous_pull {
            next.anonymous_pull = on;
        }
        if let Some(r) = ch.retention {
            r.check()?;
            next.retention = Some(r);
        }
        if let Some(ct) = &ch.content_trust {
            ct.check()?;
            next.content_trust = Some(ct.clone());
        }
        if self.sku == Sku::Classic && sku != Sku::Classic {
            // Leaving Classic is an upgrade: the tier stays Classic until the copy is done.
            if let Some(u) = self.upgrading() {
                // Asking again for the same target changes nothing (and follows it).
                if u.to == sku {
                    return Ok(next);
                }
                return Err(LimitError::AlreadyUpgrading { to: u.to });
            }
            let target = Properties {
                sku,
                ..next.clone()
            };
            target.check_fits(used)?;
            let storage = self
                .classic
                .as_ref()
                .map(|c| c.storage.clone())
                .unwrap_or_default();
            next.classic = Some(Classic {
                storage,
                upgrade: Some(Upgrade {
                    to: sku,
                    started: chrono::Utc::now().timestamp(),
                    finished: None,
                    progress: Progress::default(),
                    error: None,
                }),
            });
            return Ok(next);
        }
        next.sku = sku;
        next.check_fits(used)?;
        next.check_key_source()?;
        Ok(next)
    }

    /// A customer-managed key needs a tier that has them (Premium).
    pub fn check_key_source(&self) -> Result<(), LimitError> {
        let customer = self
            .encryption
            .as_ref()
            .is_some_and(|e| e.key_source == KeySource::CustomerManaged);
        if customer && !self.limits().customer_managed_keys {
            return Err(LimitError::Feature {
                sku: self.sku,
                what: "a customer-managed key",
            });
        }
        Ok(())
    }

    /// Whether `used` bytes fit this tier's storage limit.
    fn check_fits(&self, used: u64) -> Result<(), LimitError> {
        self.check_features()?;
        match self.limits().storage_bytes {
            Some(limit) if used > limit => Err(LimitError::TooSmall {
                to: self.sku,
                limit,
                used,
            }),
            _ => Ok(()),
        }
    }

    /// The settings turned on are ones the tier has (anonymous pull, a retention policy,
    /// content trust).
    pub fn check_features(&self) -> Result<(), LimitError> {
        if self.anonymous_pull && !self.limits().anonymous_pull {
            return Err(LimitError::AnonymousPull { sku: self.sku });
        }
        if self.retention.is_some_and(|r| r.enabled()) && self.sku != Sku::Premium {
            return Err(LimitError::Feature {
                sku: self.sku,
                what: "a retention policy",
            });
        }
        if self.content_trust.as_ref().is_some_and(|c| c.enabled()) && !self.limits().content_trust
        {
            return Err(LimitError::Feature {
                sku: self.sku,
                what: "content trust",
            });
        }
        Ok(())
    }

    /// The upgrade done: the registry is its target tier from now on.
    pub fn upgraded(&self, now: i64) -> Properties {
        let mut next = self.clone();
        if let Some(u) = next.classic.as_mut().and_then(|c| c.upgrade.as_mut()) {
            u.finished = Some(now);
            u.error = None;
            u.progress.eta_seconds = Some(0);
            next.sku = u.to;
        }
        next
    }
}

/// One line of `registry show-usage`, as `az acr show-usage` prints it. A limit of -1
/// is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub name: String,
    pub limit: i64,
    pub current_value: u64,
    pub unit: String,
}

impl Usage {
    pub fn new(name: &str, limit: Option<u64>, current: u64, unit: &str) -> Usage {
        Usage {
            name: name.to_string(),
            limit: limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX)),
            current_value: current,
            unit: unit.to_string(),
        }
    }
}

/// What a registry holds now, for [`usage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub storage_bytes: u64,
    pub webhooks: u64,
    pub tokens: u64,
    pub scope_maps: u64,
    pub replications: u64,
}

/// Each limit against its current use.
pub fn usage(limits: &Limits, now: &Counts) -> Vec<Usage> {
    vec![
        Usage::new("Size", limits.storage_bytes, now.storage_bytes, "Bytes"),
        Usage::new("Webhooks", limits.webhooks, now.webhooks, "Count"),
        Usage::new(
            "Geo-replications",
            limits.replications,
            now.replications,
            "Count",
        ),
        Usage::new("ScopeMaps", limits.scope_maps, now.scope_maps, "Count"),
        Usage::new("Tokens", limits.tokens, now.tokens, "Count"),
    ]
}

/// A byte count as people read it: `9.5 GiB`, `512 MiB`, `0 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v.fract() == 0.0 {
        format!("{} {}", v as u64, UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_carry_acrs_figures() {
        let b = Sku::Basic.limits();
        assert_eq!(b.storage_bytes, Some(10 << 30));
        assert_eq!(
            (b.read_ops_per_minute, b.write_ops_per_minute),
            (Some(1000), Some(100))
        );
        assert_eq!((b.webhooks, b.tokens), (Some(2), Some(100)));
        assert!(!b.geo_replication && !b.content_trust && !b.anonymous_pull);
        let s = Sku::Standard.limits();
        assert_eq!((s.storage_bytes, s.webhooks), (Some(100 << 30), Some(10)));
        assert!(s.anonymous_pull && !s.content_trust);
        let p = Sku::Premium.limits();
        assert_eq!(p.storage_bytes, Some(500 << 30));
        assert_eq!(p.write_ops_per_minute, Some(2000));
        assert!(p.geo_replication && p.content_trust && p.customer_managed_keys);
        let c = Sku::Classic.limits();
        assert_eq!(
            (c.webhooks, c.tokens, c.replications),
            (Some(0), Some(0), Some(0))
        );
    }

    #[test]
    fn names_read_as_az_reads_them() {
        assert_eq!("standard".parse::<Sku>(), Ok(Sku::Standard));
        assert_eq!(" PREMIUM ".parse::<Sku>(), Ok(Sku::Premium));
        assert!("gold"
            .parse::<Sku>()
            .unwrap_err()
            .contains("Basic, Standard or Premium"));
    }

    #[test]
    fn overrides_win_and_survive_a_tier_change() {
        let p = Properties::default();
        let o = Overrides {
            storage_bytes: Some(Override::Count(200 << 30)),
            write_ops_per_minute: Some(Override::Unlimited(Unlimited::Unlimited)),
            ..Overrides::default()
        };
        let p = p
            .change(
                &Change {
                    sku: Some(Sku::Basic),
                    overrides: o.clone(),
                    ..Change::default()
                },
                0,
            )
            .unwrap();
        assert_eq!(p.limits().storage_bytes, Some(200 << 30));
        assert_eq!(p.limits().write_ops_per_minute, None);
        assert_eq!(p.limits().webhooks, Some(2), "the tier's own figure stays");
        let p = p.change(&Change::to(Sku::Standard), 0).unwrap();
        assert_eq!(p.limits().storage_bytes, Some(200 << 30));
        // The JSON keeps `unlimited` as the word.
        let json = serde_json::to_string(&p).unwrap();
        assert!(
            json.contains(r#""writeOpsPerMinute":"unlimited""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Properties>(&json).unwrap(), p);
    }

    #[test]
    fn storage_is_checked_with_the_sizes_in_the_message() {
        let p = Properties::new(Sku::Basic);
        assert!(
            p.check_storage(10 << 30, 0).is_ok(),
            "exactly full is allowed"
        );
        let e = p.check_storage((10 << 30) - 100, 1 << 20).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("10 GiB (Basic)") && m.contains("1 MiB more"),
            "{m}"
        );
        assert!(
            m.contains("repository delete") && m.contains("--sku"),
            "{m}"
        );
    }

    #[test]
    fn a_replicated_registry_stays_premium() {
        assert!(Sku::Premium.check_replicated(2).is_ok());
        assert!(Sku::Standard.check_replicated(0).is_ok());
        let e = Sku::Standard.check_replicated(2).unwrap_err();
        assert_eq!(
            e,
            LimitError::Replicated {
                sku: Sku::Standard,
                replications: 2
            }
        );
        assert!(e.to_string().contains("replication delete"), "{e}");
    }

    #[test]
    fn a_smaller_tier_is_refused_before_anything_changes() {
        let p = Properties::default();
        let e = p.change(&Change::to(Sku::Basic), 11 << 30).unwrap_err();
        assert_eq!(
            e,
            LimitError::TooSmall {
                to: Sku::Basic,
                limit: 10 << 30,
                used: 11 << 30
            }
        );
        assert!(e
            .to_string()
            .contains("10 GiB of storage but 11 GiB is stored"));
        assert!(p.change(&Change::to(Sku::Standard), 11 << 30).is_ok());
    }

    #[test]
    fn classic_is_one_way() {
        let e = Properties::default()
            .change(&Change::to(Sku::Classic), 0)
            .unwrap_err();
        assert!(e.to_string().contains("one-way"), "{e}");
        let classic = Properties {
            classic: Some(Classic {
                storage: "/srv/classic".into(),
                upgrade: None,
            }),
            ..Properties::new(Sku::Classic)
        };
        // Leaving Classic starts an upgrade: still Classic, pushes refused until it ends.
        let up = classic.change(&Change::to(Sku::Basic), 5 << 30).unwrap();
        assert_eq!(up.sku, Sku::Classic);
        assert_eq!(up.upgrading().map(|u| u.to), Some(Sku::Basic));
        let m = up.check_writable().unwrap_err().to_string();
        assert!(m.contains("being upgraded from Classic to Basic"), "{m}");
        assert!(matches!(
            up.change(&Change::to(Sku::Premium), 0),
            Err(LimitError::AlreadyUpgrading { to: Sku::Basic })
        ));
        assert_eq!(
            up.change(&Change::to(Sku::Basic), 0).as_ref(),
            Ok(&up),
            "asking again changes nothing"
        );
        // The target's capacity is checked first.
        assert!(matches!(
            classic.change(&Change::to(Sku::Basic), 11 << 30),
            Err(LimitError::TooSmall { to: Sku::Basic, .. })
        ));
        let done = up.upgraded(42);
        assert_eq!(done.sku, Sku::Basic);
        assert!(done.upgrading().is_none() && done.check_writable().is_ok());
        assert_eq!(
            done.classic.as_ref().unwrap().storage,
            classic.classic.unwrap().storage
        );
        assert!(matches!(
            done.change(&Change::to(Sku::Classic), 0),
            Err(LimitError::BackToClassic { from: Sku::Basic })
        ));
        // What Classic lacks says it needs a managed tier.
        let m = Properties::new(Sku::Classic)
            .check_count(Counted::Webhooks, 0)
            .unwrap_err()
            .to_string();
        assert!(m.contains("webhooks need a managed tier"), "{m}");
        assert!(Properties::new(Sku::Classic)
            .check_managed("deletes")
            .is_err());
    }

    #[test]
    fn counts_stop_at_the_limit() {
        let p = Properties::new(Sku::Basic);
        assert!(p.check_count(Counted::Webhooks, 1).is_ok());
        let m = p.check_count(Counted::Webhooks, 2).unwrap_err().to_string();
        assert!(m.contains("Basic tier allows 2 webhooks"), "{m}");
        assert!(m.contains("--webhook-limit"), "{m}");
        assert!(p.check_count(Counted::Replications, 0).is_err());
        assert!(Properties::default()
            .check_count(Counted::Replications, 9)
            .is_ok());
    }

    #[test]
    fn usage_reads_as_az_prints_it() {
        let u = usage(
            &Sku::Basic.limits(),
            &Counts {
                storage_bytes: 42,
                webhooks: 1,
                ..Counts::default()
            },
        );
        assert_eq!(u[0], Usage::new("Size", Some(10 << 30), 42, "Bytes"));
        assert_eq!(u[1].limit, 2);
        let p = usage(&Sku::Premium.limits(), &Counts::default());
        assert_eq!(p[2].limit, -1, "Premium's replications have no number");
        let json = serde_json::to_value(&u[0]).unwrap();
        assert_eq!(json["currentValue"], 42);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(10 << 30), "10 GiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
    }
}
