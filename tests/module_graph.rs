//! The shape of the crate: which top-level modules use which (`crate::NAME` in their
//! non-test code), and no import circles between them but the one still listed below.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Circles that exist today and are to be removed (none).
const KNOWN_CIRCLES: &[(&str, &str)] = &[];

fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            let file = rel.file_name().unwrap().to_string_lossy();
            if ["lib", "main"].contains(&top.as_str())
                || file == "tests.rs"
                || file.ends_with("_tests.rs")
            {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            // Unit tests at the end of a file may use anything.
            let code = match text.find("#[cfg(test)]\nmod ") {
                Some(i) => &text[..i],
                None => &text[..],
            };
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    out.entry(top.clone()).or_default().insert(name);
                }
            }
        }
    }
    out
}

fn reaches(g: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_string()];
    while let Some(n) = todo.pop() {
        for m in g.get(&n).into_iter().flatten() {
            if m == to {
                return true;
            }
            if seen.insert(m.clone()) {
                todo.push(m.clone());
            }
        }
    }
    false
}

#[test]
fn no_new_import_circles() {
    let g = edges();
    let mut circles = BTreeSet::new();
    for (a, uses) in &g {
        for b in uses {
            if reaches(&g, b, a) {
                let (x, y) = if a < b { (a, b) } else { (b, a) };
                circles.insert((x.clone(), y.clone()));
            }
        }
    }
    let known: BTreeSet<(String, String)> = KNOWN_CIRCLES
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let new: Vec<_> = circles.difference(&known).collect();
    assert!(
        new.is_empty(),
        "import circles between modules: {new:?}\n{g:#?}"
    );
    // The leaves stay leaves: the grammar, the logins and the time format use nothing of
    // ours, and access control does not reach into the registry server.
    for leaf in [
        "digest",
        "names",
        "credentials",
        "timefmt",
        "netaddr",
        "source",
    ] {
        assert!(
            g.get(leaf).is_none_or(|u| u.is_empty()),
            "{leaf} uses {:?}",
            g[leaf]
        );
    }
    assert!(
        !g["auth"].contains("registry"),
        "auth uses the registry: {:?}",
        g["auth"]
    );
}

/// ARCHITECTURE.md's module table says what each module uses: every `crate::` edge of a
/// module with a row of its own is named in that row's last column (or it says
/// "everything").
#[test]
fn the_architecture_table_names_every_edge() {
    let g = edges();
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md"))
            .unwrap();
    let ticked = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(|s| s.split("::").next().unwrap_or(s).to_string())
            .collect()
    };
    let mut rows = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
        let first: Vec<&str> = cells[0].split('`').skip(1).step_by(2).collect();
        if first.len() == 1 && !first[0].contains("::") {
            rows.insert(first[0].to_string(), cells[cells.len() - 1].to_string());
        }
    }
    let mut wrong = Vec::new();
    for (module, uses) in &g {
        let Some(row) = rows.get(module) else {
            wrong.push(format!("{module} has no row in the module table"));
            continue;
        };
        if row.contains("everything") {
            continue;
        }
        let named: BTreeSet<String> = ticked(row).into_iter().collect();
        for u in uses.difference(&named) {
            wrong.push(format!(
                "{module} uses {u}, which its row does not say: {row}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Every change to the registry's content goes through `registry::service` (events,
/// quotas, locks and read-only modes live there): no other code outside the store calls
/// the store's changing methods.
#[test]
fn registry_changes_go_through_the_service_layer() {
    const CHANGES: &[&str] = &[
        ".put_manifest(",
        ".commit_blob(",
        ".mount_blob(",
        ".unlink_blob(",
        ".delete_manifest(",
        ".delete_tag(",
        ".delete_repository(",
        ".gc(",
    ];
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src.clone()];
    let mut offenders = Vec::new();
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(&src).unwrap().to_string_lossy().to_string();
            if p.extension().is_none_or(|x| x != "rs")
                || rel.starts_with("store/")
                || rel == "registry/service.rs"
            {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let code = match text.find("#[cfg(test)]\nmod ") {
                Some(i) => &text[..i],
                None => &text[..],
            };
            for (n, line) in code.lines().enumerate() {
                // The service's own functions and a remote registry's client share names.
                let called = CHANGES.iter().any(|c| line.contains(c))
                    && !line.contains("service::")
                    && !line.contains("client.");
                if called && line.contains("store") {
                    offenders.push(format!("src/{rel}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "registry changes outside registry::service:\n{}",
        offenders.join("\n")
    );
}
