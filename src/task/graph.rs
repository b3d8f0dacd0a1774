//! The step graph of a task file: which step waits for which (`when`, ids), and what is
//! wrong with it (duplicate and unknown ids, self-waits, cycles). Part of the file's
//! meaning, so validation reports it at its place; `plan` schedules from it.
//!
//! A step with no `when` (or an empty one) waits for the step before it in the file;
//! `when: ["-"]` starts at once; otherwise it waits for the named steps. Ids may name
//! steps later in the file, which is why cycles are possible and reported.

use std::collections::{HashMap, VecDeque};

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use super::{Task, IMMEDIATE};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("duplicate step id `{0}`")]
    DuplicateId(String),
    #[error("step `{step}` waits for unknown step `{missing}`")]
    UnknownId { step: String, missing: String },
    #[error("step `{0}` waits for itself")]
    SelfDependency(String),
    #[error("dependency cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    #[error("step `{0}` mixes `-` (start at once) with other ids in `when`")]
    ImmediateWithOthers(String),
}

/// A plan error with the place it comes from: the step and, when it is about one entry
/// of `when`, that entry's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub step: usize,
    pub when_index: Option<usize>,
    pub error: PlanError,
}

/// Every problem with the step graph of `task`, in file order (cycles last).
pub fn check(task: &Task) -> Vec<Issue> {
    build(task).1
}

/// Each step's dependencies (indices, sorted) and the graph's problems.
pub fn build(task: &Task) -> (Vec<Vec<usize>>, Vec<Issue>) {
    let n = task.steps.len();
    let mut issues = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(n);
    for (i, s) in task.steps.iter().enumerate() {
        if index.contains_key(s.id.as_str()) {
            issues.push(Issue {
                step: i,
                when_index: None,
                error: PlanError::DuplicateId(s.id.clone()),
            });
        } else {
            index.insert(s.id.as_str(), i);
        }
    }
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, s) in task.steps.iter().enumerate() {
        let when = s.when.as_deref().unwrap_or(&[]);
        if when.is_empty() {
            if i > 0 {
                deps[i].push(i - 1);
            }
            continue;
        }
        if when.len() == 1 && when[0] == IMMEDIATE {
            continue;
        }
        for (w, id) in when.iter().enumerate() {
            let error = if id == IMMEDIATE {
                Some(PlanError::ImmediateWithOthers(s.id.clone()))
            } else if *id == s.id {
                Some(PlanError::SelfDependency(s.id.clone()))
            } else {
                match index.get(id.as_str()) {
                    Some(&d) => {
                        deps[i].push(d);
                        None
                    }
                    None => Some(PlanError::UnknownId {
                        step: s.id.clone(),
                        missing: id.clone(),
                    }),
                }
            };
            if let Some(error) = error {
                issues.push(Issue {
                    step: i,
                    when_index: Some(w),
                    error,
                });
            }
        }
        deps[i].sort_unstable();
        deps[i].dedup();
    }
    issues.extend(cycles(task, &deps));
    (deps, issues)
}

/// One issue per strongly connected component with more than one step: the shortest
/// cycle through its first step (in file order), printed in execution direction.
fn cycles(task: &Task, deps: &[Vec<usize>]) -> Vec<Issue> {
    let n = deps.len();
    if is_acyclic(deps) {
        return Vec::new();
    }
    let mut g: DiGraph<usize, ()> = DiGraph::with_capacity(n, n);
    let nodes: Vec<NodeIndex> = (0..n).map(|i| g.add_node(i)).collect();
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            g.add_edge(nodes[d], nodes[i], ());
        }
    }
    let mut out = Vec::new();
    let mut sccs: Vec<Vec<usize>> = tarjan_scc(&g)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|c| {
            let mut v: Vec<usize> = c.into_iter().map(|x| g[x]).collect();
            v.sort_unstable();
            v
        })
        .collect();
    sccs.sort();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            dependents[d].push(i);
        }
    }
    for comp in sccs {
        let start = comp[0];
        let in_comp = |x: usize| comp.binary_search(&x).is_ok();
        // BFS from start along "is waited for by" edges until start comes round again.
        let mut prev: HashMap<usize, usize> = HashMap::new();
        let mut queue = VecDeque::from([start]);
        let mut last = None;
        'bfs: while let Some(x) = queue.pop_front() {
            for &y in &dependents[x] {
                if !in_comp(y) {
                    continue;
                }
                if y == start {
                    last = Some(x);
                    break 'bfs;
                }
                if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(y) {
                    e.insert(x);
                    queue.push_back(y);
                }
            }
        }
        let Some(last) = last else { continue };
        let mut path = vec![last];
        let mut cur = last;
        while cur != start {
            match prev.get(&cur) {
                Some(&p) => {
                    path.push(p);
                    cur = p;
                }
                None => break,
            }
        }
        path.reverse();
        let mut names: Vec<String> = path.iter().map(|&i| task.steps[i].id.clone()).collect();
        names.push(task.steps[start].id.clone());
        // The cycle closes where `start` waits for `last`: point at that `when` entry.
        let when_index = task.steps[start]
            .when
            .as_ref()
            .and_then(|w| w.iter().position(|id| *id == task.steps[last].id));
        out.push(Issue {
            step: start,
            when_index,
            error: PlanError::Cycle(names),
        });
    }
    out
}

/// Kahn's algorithm without ordering: cheap proof that there is no cycle, so the SCC
/// search only runs when there is one to report.
fn is_acyclic(deps: &[Vec<usize>]) -> bool {
    let n = deps.len();
    let mut indegree: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            dependents[d].push(i);
        }
    }
    let mut stack: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut seen = 0;
    while let Some(i) = stack.pop() {
        seen += 1;
        for &j in &dependents[i] {
            indegree[j] -= 1;
            if indegree[j] == 0 {
                stack.push(j);
            }
        }
    }
    seen == n
}
