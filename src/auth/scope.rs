//! Permissions: scope-map actions (`content/read`, ...) on repository patterns, the
//! distribution `access` entries they grant, and parsing of requested `scope=` strings.

use serde::{Deserialize, Serialize};

use super::AuthError;

/// A scope-map action, ACR's vocabulary.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
pub enum Permission {
    #[serde(rename = "content/read")]
    ContentRead,
    #[serde(rename = "content/write")]
    ContentWrite,
    #[serde(rename = "content/delete")]
    ContentDelete,
    #[serde(rename = "metadata/read")]
    MetadataRead,
    #[serde(rename = "metadata/write")]
    MetadataWrite,
    /// acr-task's own: list and show stored tasks, runs and logs (registry-wide, `*`).
    #[serde(rename = "tasks/read")]
    TasksRead,
    /// Create, change, delete and run tasks, cancel runs (registry-wide, `*`).
    #[serde(rename = "tasks/write")]
    TasksWrite,
}

impl Permission {
    pub const ALL: [Permission; 7] = [
        Permission::ContentRead,
        Permission::ContentWrite,
        Permission::ContentDelete,
        Permission::MetadataRead,
        Permission::MetadataWrite,
        Permission::TasksRead,
        Permission::TasksWrite,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::ContentRead => "content/read",
            Permission::ContentWrite => "content/write",
            Permission::ContentDelete => "content/delete",
            Permission::MetadataRead => "metadata/read",
            Permission::MetadataWrite => "metadata/write",
            Permission::TasksRead => "tasks/read",
            Permission::TasksWrite => "tasks/write",
        }
    }

    /// The distribution token action this permission grants on a repository (ACR's names
    /// for metadata); `None` for the task permissions, which are not about repositories.
    pub fn token_action(self) -> Option<&'static str> {
        match self {
            Permission::ContentRead => Some("pull"),
            Permission::ContentWrite => Some("push"),
            Permission::ContentDelete => Some("delete"),
            Permission::MetadataRead => Some("metadata_read"),
            Permission::MetadataWrite => Some("metadata_write"),
            Permission::TasksRead | Permission::TasksWrite => None,
        }
    }

    /// Whether this permission is about the whole registry (its rule must be for `*`).
    pub fn registry_wide(self) -> bool {
        matches!(self, Permission::TasksRead | Permission::TasksWrite)
    }
}

impl std::str::FromStr for Permission {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Self, AuthError> {
        Permission::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                AuthError::Invalid(format!(
                    "unknown action {s:?} (expected one of content/read, content/write, \
                     content/delete, metadata/read, metadata/write, tasks/read, tasks/write)"
                ))
            })
    }
}

/// Every action a token may carry for a repository.
pub const REPO_ACTIONS: [&str; 5] = ["pull", "push", "delete", "metadata_read", "metadata_write"];

pub use crate::names::{pattern_matches, valid_pattern};

/// One requested or granted resource access, as in the JWT `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Access {
    pub fn repo(name: &str, actions: &[&str]) -> Access {
        Access {
            kind: "repository".into(),
            name: name.into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }
    }
    pub fn catalog() -> Access {
        Access {
            kind: "registry".into(),
            name: "catalog".into(),
            actions: vec!["*".into()],
        }
    }
}

/// Parse `repository:samples/hello:pull,push` (the name is everything between the first
/// and the last colon). Unknown resource types are kept; they just never get granted.
pub fn parse_scope(s: &str) -> Option<Access> {
    let (kind, rest) = s.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    if kind.is_empty() || name.is_empty() {
        return None;
    }
    let actions = actions
        .split(',')
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect();
    Some(Access {
        kind: kind.to_string(),
        name: name.to_string(),
        actions,
    })
}

/// Who asked, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grants {
    /// The admin user: everything.
    All,
    /// A token's scope map: (pattern, permissions) rules.
    Rules(Vec<(String, Vec<Permission>)>),
    /// No identity: pull everywhere if anonymous pull is on, else nothing.
    Anonymous { pull: bool },
}

impl Grants {
    /// The actions on `repo` these grants allow.
    pub fn repo_actions(&self, repo: &str) -> Vec<&'static str> {
        match self {
            Grants::All => REPO_ACTIONS.to_vec(),
            Grants::Anonymous { pull: true } => vec!["pull"],
            Grants::Anonymous { pull: false } => vec![],
            Grants::Rules(rules) => {
                let mut out: Vec<&'static str> = Vec::new();
                for (pat, perms) in rules {
                    if pattern_matches(pat, repo) {
                        for a in perms.iter().filter_map(|p| p.token_action()) {
                            if !out.contains(&a) {
                                out.push(a);
                            }
                        }
                    }
                }
                out
            }
        }
    }

    /// Listing all repositories: the admin, or a token with metadata/read on `*`.
    pub fn catalog(&self) -> bool {
        match self {
            Grants::All => true,
            Grants::Anonymous { .. } => false,
            Grants::Rules(rules) => rules
                .iter()
                .any(|(p, perms)| p == "*" && perms.contains(&Permission::MetadataRead)),
        }
    }

    /// The task API: `Some(true)` may manage (tasks/write), `Some(false)` only look
    /// (tasks/read), `None` nothing. The admin may do everything; registry permissions
    /// (metadata/write included) give nothing here.
    pub fn tasks(&self) -> Option<bool> {
        match self {
            Grants::All => Some(true),
            Grants::Anonymous { .. } => None,
            Grants::Rules(rules) => {
                let has = |want: Permission| {
                    rules
                        .iter()
                        .any(|(p, perms)| p == "*" && perms.contains(&want))
                };
                if has(Permission::TasksWrite) {
                    Some(true)
                } else if has(Permission::TasksRead) {
                    Some(false)
                } else {
                    None
                }
            }
        }
    }

    /// The intersection of what was requested and what is allowed; entries left with no
    /// action are dropped (distribution does the same).
    pub fn grant(&self, requested: &[Access]) -> Vec<Access> {
        let mut out: Vec<Access> = Vec::new();
        for r in requested {
            let allowed: Vec<String> = match r.kind.as_str() {
                "repository" if crate::names::valid_name(&r.name) => {
                    let can = self.repo_actions(&r.name);
                    r.actions
                        .iter()
                        .filter(|a| {
                            a.as_str() == "*" && can.len() == REPO_ACTIONS.len()
                                || can.contains(&a.as_str())
                        })
                        .cloned()
                        .collect()
                }
                "registry" if r.name == "catalog" && self.catalog() => r
                    .actions
                    .iter()
                    .filter(|a| a.as_str() == "*")
                    .cloned()
                    .collect(),
                // `registry:tasks:read,write`: the task API.
                "registry" if r.name == "tasks" => {
                    let level = self.tasks();
                    r.actions
                        .iter()
                        .filter(|a| match a.as_str() {
                            "read" => level.is_some(),
                            "write" | "*" => level == Some(true),
                            _ => false,
                        })
                        .cloned()
                        .collect()
                }
                _ => Vec::new(),
            };
            if allowed.is_empty() {
                continue;
            }
            match out
                .iter_mut()
                .find(|o| o.kind == r.kind && o.name == r.name)
            {
                Some(o) => {
                    for a in allowed {
                        if !o.actions.contains(&a) {
                            o.actions.push(a);
                        }
                    }
                }
                None => out.push(Access {
                    kind: r.kind.clone(),
                    name: r.name.clone(),
                    actions: allowed,
                }),
            }
        }
        out
    }
}

/// True if `granted` carries `action` on (`kind`, `name`); `*` stands for every action.
pub fn allows(granted: &[Access], kind: &str, name: &str, action: &str) -> bool {
    granted.iter().any(|g| {
        g.kind == kind && g.name == name && g.actions.iter().any(|a| a == action || a == "*")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "a/b"));
        assert!(pattern_matches("samples/*", "samples/hello"));
        assert!(pattern_matches("samples/*", "samples/a/b"));
        assert!(!pattern_matches("samples/*", "samples"));
        assert!(!pattern_matches("samples/*", "samplesx/a"));
        assert!(pattern_matches("hello", "hello"));
        assert!(!pattern_matches("hello", "hello2"));
        assert!(valid_pattern("samples/*"));
        assert!(valid_pattern("*"));
        assert!(!valid_pattern("Samples/*"));
        assert!(!valid_pattern("sam*ples"));
    }

    #[test]
    fn scopes_parse_with_colons_in_names() {
        let a = parse_scope("repository:samples/hello:pull,push").unwrap();
        assert_eq!(a, Access::repo("samples/hello", &["pull", "push"]));
        let a = parse_scope("repository:host:5000/x:pull").unwrap();
        assert_eq!(a.name, "host:5000/x");
        assert_eq!(
            parse_scope("registry:catalog:*").unwrap(),
            Access::catalog()
        );
        assert!(parse_scope("nonsense").is_none());
    }

    #[test]
    fn grant_is_the_intersection() {
        let g = Grants::Rules(vec![
            ("samples/*".into(), vec![Permission::ContentRead]),
            ("samples/hello".into(), vec![Permission::ContentWrite]),
        ]);
        let req = vec![
            Access::repo("samples/hello", &["pull", "push", "delete"]),
            Access::repo("samples/other", &["pull", "push"]),
            Access::repo("private", &["pull"]),
            Access::catalog(),
        ];
        let got = g.grant(&req);
        assert_eq!(
            got,
            vec![
                Access::repo("samples/hello", &["pull", "push"]),
                Access::repo("samples/other", &["pull"]),
            ]
        );
        assert!(allows(&got, "repository", "samples/other", "pull"));
        assert!(!allows(&got, "repository", "samples/other", "push"));
        assert_eq!(
            Grants::All.grant(&[Access::catalog()]),
            vec![Access::catalog()]
        );
        assert!(Grants::Anonymous { pull: false }.grant(&req).is_empty());
        let api = parse_scope("registry:tasks:read,write").unwrap();
        assert!(g.grant(std::slice::from_ref(&api)).is_empty());
        assert_eq!(
            Grants::All.grant(std::slice::from_ref(&api)),
            vec![api.clone()]
        );
        // metadata/write is a registry permission: it does not manage tasks.
        let ops = Grants::Rules(vec![("*".into(), vec![Permission::MetadataWrite])]);
        assert!(ops.grant(std::slice::from_ref(&api)).is_empty());
        assert!(!ops.catalog());
        let viewer = Grants::Rules(vec![("*".into(), vec![Permission::TasksRead])]);
        assert_eq!(
            viewer.grant(std::slice::from_ref(&api)),
            vec![parse_scope("registry:tasks:read").unwrap()]
        );
        let manager = Grants::Rules(vec![("*".into(), vec![Permission::TasksWrite])]);
        assert_eq!(manager.grant(std::slice::from_ref(&api)), vec![api]);
        assert!(manager.repo_actions("any/repo").is_empty());
        assert_eq!(
            Grants::Anonymous { pull: true }.grant(&req[..1]),
            vec![Access::repo("samples/hello", &["pull"])]
        );
    }
}
