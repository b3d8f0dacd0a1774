//! The execution plan, scheduled from a task's step graph ([`crate::task::graph`]):
//! topological order, levels, ready sets and the critical path. A validated task always
//! plans; `Plan::new` reports the graph's first problem otherwise.

use crate::task::graph::build;
pub use crate::task::graph::{check, Issue, PlanError};
use crate::task::Task;

/// Steps are identified by their index in `Task::steps`.
#[derive(Debug, Clone)]
pub struct Plan {
    deps: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
    order: Vec<usize>,
    levels: Vec<Vec<usize>>,
    level_of: Vec<usize>,
}

impl Plan {
    pub fn new(task: &Task) -> Result<Plan, PlanError> {
        let (deps, issues) = build(task);
        if let Some(first) = issues.into_iter().next() {
            return Err(first.error);
        }
        Ok(Plan::from_deps(deps))
    }

    /// Builds a plan from dependency lists that are known to be acyclic and in range.
    fn from_deps(deps: Vec<Vec<usize>>) -> Plan {
        let n = deps.len();
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, ds) in deps.iter().enumerate() {
            for &d in ds {
                dependents[d].push(i);
            }
        }
        // Kahn's algorithm, smallest index first, so ties follow file order.
        let mut indegree: Vec<usize> = deps.iter().map(Vec::len).collect();
        let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<usize>> = indegree
            .iter()
            .enumerate()
            .filter(|(_, d)| **d == 0)
            .map(|(i, _)| std::cmp::Reverse(i))
            .collect();
        let mut order = Vec::with_capacity(n);
        let mut level_of = vec![0usize; n];
        while let Some(std::cmp::Reverse(i)) = heap.pop() {
            order.push(i);
            for &j in &dependents[i] {
                level_of[j] = level_of[j].max(level_of[i] + 1);
                indegree[j] -= 1;
                if indegree[j] == 0 {
                    heap.push(std::cmp::Reverse(j));
                }
            }
        }
        let depth = level_of.iter().copied().max().map_or(0, |m| m + 1);
        let mut levels = vec![Vec::new(); if n == 0 { 0 } else { depth }];
        for (i, &l) in level_of.iter().enumerate() {
            levels[l].push(i);
        }
        Plan {
            deps,
            dependents,
            order,
            levels,
            level_of,
        }
    }

    pub fn len(&self) -> usize {
        self.deps.len()
    }
    pub fn is_empty(&self) -> bool {
        self.deps.is_empty()
    }
    /// Steps that `step` waits for, in file order.
    pub fn deps(&self, step: usize) -> &[usize] {
        &self.deps[step]
    }
    /// Steps that wait for `step`, in file order.
    pub fn dependents(&self, step: usize) -> &[usize] {
        &self.dependents[step]
    }
    /// A topological order; among steps ready at the same time, file order.
    pub fn topo_order(&self) -> &[usize] {
        &self.order
    }
    /// Steps grouped by depth: level 0 waits for nothing; level k waits for at least one
    /// step of level k-1. Each level is in file order.
    pub fn levels(&self) -> &[Vec<usize>] {
        &self.levels
    }
    /// The level of `step` (see [`Plan::levels`]).
    pub fn level_of(&self, step: usize) -> usize {
        self.level_of[step]
    }
    /// Steps that wait for nothing.
    pub fn roots(&self) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| self.deps[i].is_empty())
            .collect()
    }
    /// The ready set: steps not yet `started` whose dependencies have all `finished`,
    /// in file order. Both slices are indexed by step.
    pub fn ready(&self, started: &[bool], finished: &[bool]) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| !started.get(i).copied().unwrap_or(false))
            .filter(|&i| {
                self.deps[i]
                    .iter()
                    .all(|&d| finished.get(d).copied().unwrap_or(false))
            })
            .collect()
    }
    /// The heaviest chain of dependent steps under `weight` (e.g. each step's timeout),
    /// and its total. Ties go to the chain that starts and ends earliest in the file.
    pub fn critical_path(&self, weight: impl Fn(usize) -> u64) -> (Vec<usize>, u64) {
        let n = self.len();
        if n == 0 {
            return (Vec::new(), 0);
        }
        let mut best = vec![0u64; n];
        let mut from: Vec<Option<usize>> = vec![None; n];
        for &i in &self.order {
            let mut b = 0u64;
            let mut f = None;
            for &d in &self.deps[i] {
                if f.is_none() || best[d] > b {
                    b = best[d];
                    f = Some(d);
                }
            }
            best[i] = b.saturating_add(weight(i));
            from[i] = f;
        }
        let mut end = 0;
        for i in 1..n {
            if best[i] > best[end] {
                end = i;
            }
        }
        let mut path = vec![end];
        let mut cur = end;
        while let Some(p) = from[cur] {
            path.push(p);
            cur = p;
        }
        path.reverse();
        (path, best[end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Step;

    fn task(steps: &[(&str, Option<&[&str]>)]) -> Task {
        Task {
            version: "v1.1.0".into(),
            alias: None,
            step_timeout: 600,
            total_timeout: 3600,
            working_directory: None,
            env: vec![],
            secrets: vec![],
            networks: vec![],
            volumes: vec![],
            steps: steps
                .iter()
                .map(|(id, when)| Step {
                    id: (*id).into(),
                    cmd: Some("busybox true".into()),
                    when: when.map(|w| w.iter().map(|s| (*s).to_string()).collect()),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn sequential_by_default_and_fan_out_in() {
        let t = task(&[
            ("a", None),
            ("b", Some(&["-"])),
            ("c", Some(&["a", "b"])),
            ("d", None),
            ("e", Some(&["a"])),
        ]);
        let p = Plan::new(&t).unwrap();
        assert_eq!(p.deps(0), &[] as &[usize]);
        assert_eq!(p.deps(1), &[] as &[usize]);
        assert_eq!(p.deps(2), &[0, 1]);
        assert_eq!(p.deps(3), &[2]);
        assert_eq!(p.dependents(0), &[2, 4]);
        assert_eq!(p.levels(), &[vec![0, 1], vec![2, 4], vec![3]]);
        assert_eq!(p.topo_order(), &[0, 1, 2, 3, 4]);
        assert_eq!(
            p.ready(
                &[true, true, false, false, false],
                &[true, false, false, false, false]
            ),
            vec![4]
        );
        let (path, total) = p.critical_path(|i| [5, 1, 2, 3, 100][i]);
        assert_eq!((path, total), (vec![0, 4], 105));
        let (path, total) = p.critical_path(|_| 1);
        assert_eq!((path, total), (vec![0, 2, 3], 3));
    }

    #[test]
    fn errors() {
        let t = task(&[
            ("a", Some(&["c"])),
            ("b", Some(&["a"])),
            ("c", Some(&["b"])),
            ("a", Some(&["-"])),
            ("d", Some(&["nope", "d", "-"])),
        ]);
        let msgs: Vec<String> = check(&t).iter().map(|i| i.error.to_string()).collect();
        assert_eq!(
            msgs,
            vec![
                "duplicate step id `a`",
                "step `d` waits for unknown step `nope`",
                "step `d` waits for itself",
                "step `d` mixes `-` (start at once) with other ids in `when`",
                "dependency cycle: a -> b -> c -> a",
            ]
        );
        assert_eq!(check(&t)[4].when_index, Some(0));
        assert!(matches!(Plan::new(&t), Err(PlanError::DuplicateId(_))));
    }
}
