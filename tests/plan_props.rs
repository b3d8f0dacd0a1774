//! Property tests of the planner: any DAG plans in a valid order; a cycle is always found.

use acr_task::plan::{self, Plan, PlanError};
use acr_task::task::{self, RunInfo, Step, Task, Values};
use proptest::prelude::*;

/// A random DAG over `n` steps: `deps[v]` are nodes before `v` in a hidden topological
/// order; `pos[v]` is where node `v` sits in the file (so `when` may point forwards).
#[derive(Debug, Clone)]
struct Dag {
    deps: Vec<Vec<usize>>,
    pos: Vec<usize>,
}

fn dag() -> impl Strategy<Value = Dag> {
    (1usize..40).prop_flat_map(|n| {
        let deps = (0..n)
            .map(|v| proptest::collection::vec(0..v.max(1), 0..4.min(v + 1)))
            .collect::<Vec<_>>();
        let perm = Just((0..n).collect::<Vec<usize>>()).prop_shuffle();
        (deps, perm).prop_map(move |(deps, pos)| {
            let deps = deps
                .into_iter()
                .enumerate()
                .map(|(v, mut d)| {
                    d.retain(|&u| u < v);
                    d.sort_unstable();
                    d.dedup();
                    d
                })
                .collect();
            Dag { deps, pos }
        })
    })
}

fn to_task(d: &Dag) -> Task {
    let n = d.deps.len();
    let mut steps = vec![Step::default(); n];
    for v in 0..n {
        let when: Vec<String> = if d.deps[v].is_empty() {
            vec!["-".into()]
        } else {
            d.deps[v].iter().map(|u| format!("s{u}")).collect()
        };
        steps[d.pos[v]] = Step {
            id: format!("s{v}"),
            cmd: Some("busybox true".into()),
            when: Some(when),
            ..Default::default()
        };
    }
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
        steps,
    }
}

fn to_yaml(t: &Task) -> String {
    let mut s = String::from("version: v1.1.0\nsteps:\n");
    for st in &t.steps {
        let when: Vec<String> = st
            .when
            .as_ref()
            .unwrap()
            .iter()
            .map(|w| format!("\"{w}\""))
            .collect();
        s.push_str(&format!(
            "  - id: {}\n    cmd: busybox true\n    when: [{}]\n",
            st.id,
            when.join(", ")
        ));
    }
    s
}

proptest! {
    #[test]
    fn random_dags_plan_in_topological_order(d in dag()) {
        let t = to_task(&d);
        let p = Plan::new(&t).unwrap();
        let order = p.topo_order();
        prop_assert_eq!(order.len(), t.steps.len());
        let mut at = vec![usize::MAX; order.len()];
        for (k, &i) in order.iter().enumerate() {
            at[i] = k;
        }
        for i in 0..p.len() {
            for &dep in p.deps(i) {
                prop_assert!(at[dep] < at[i], "dep {} after {}", dep, i);
                prop_assert!(p.level_of(dep) < p.level_of(i));
                prop_assert!(p.dependents(dep).contains(&i));
            }
            let expected: Vec<usize> = {
                let v: usize = t.steps[i].id[1..].parse().unwrap();
                let mut e: Vec<usize> = d.deps[v].iter().map(|&u| d.pos[u]).collect();
                e.sort_unstable();
                e
            };
            prop_assert_eq!(p.deps(i), &expected[..]);
        }
        // Levels partition the steps and each level is in file order.
        let mut all: Vec<usize> = p.levels().concat();
        for l in p.levels() {
            prop_assert!(l.windows(2).all(|w| w[0] < w[1]));
        }
        all.sort_unstable();
        prop_assert_eq!(all, (0..p.len()).collect::<Vec<_>>());
        // The critical path is a chain of dependencies.
        let (path, total) = p.critical_path(|_| 1);
        prop_assert_eq!(total as usize, path.len());
        prop_assert_eq!(path.len(), p.levels().len());
        for w in path.windows(2) {
            prop_assert!(p.deps(w[1]).contains(&w[0]));
        }
        // Ready sets: replaying them in waves finishes every step.
        let mut started = vec![false; p.len()];
        let mut finished = vec![false; p.len()];
        let mut waves = 0;
        while finished.iter().any(|f| !f) {
            let ready = p.ready(&started, &finished);
            prop_assert!(!ready.is_empty());
            for &i in &ready {
                started[i] = true;
                finished[i] = true;
            }
            waves += 1;
        }
        prop_assert_eq!(waves, p.levels().len());
        // The same DAG as text loads to the same plan.
        let loaded = task::load_str("p.yaml", &to_yaml(&t), &RunInfo::default(), &Values::default()).unwrap();
        let p2 = Plan::new(&loaded).unwrap();
        for i in 0..p.len() {
            prop_assert_eq!(p.deps(i), p2.deps(i));
        }
    }

    #[test]
    fn an_inserted_cycle_is_always_reported(d in dag(), a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>()) {
        prop_assume!(d.deps.len() >= 2);
        let mut d = d;
        let n = d.deps.len();
        let (mut u, mut v) = (a.index(n), b.index(n));
        if u == v {
            v = (u + 1) % n;
        }
        if u > v {
            std::mem::swap(&mut u, &mut v);
        }
        // v waits for u, and u now waits for v.
        if !d.deps[v].contains(&u) {
            d.deps[v].push(u);
        }
        d.deps[u].push(v);
        let t = to_task(&d);
        let err = Plan::new(&t).unwrap_err();
        prop_assert!(matches!(err, PlanError::Cycle(_)), "{}", err);
        let issues = plan::check(&t);
        let cycle = issues.iter().find_map(|i| match &i.error {
            PlanError::Cycle(c) => Some(c.clone()),
            _ => None,
        });
        let cycle = cycle.unwrap();
        prop_assert!(cycle.len() >= 3);
        prop_assert_eq!(cycle.first(), cycle.last());
        // Each step in the printed cycle waits for the one before it.
        for w in cycle.windows(2) {
            let step = t.steps.iter().find(|s| s.id == w[1]).unwrap();
            prop_assert!(step.when.as_ref().unwrap().contains(&w[0]), "{:?}", cycle);
        }
        let diags = task::load_str("c.yaml", &to_yaml(&t), &RunInfo::default(), &Values::default()).unwrap_err();
        prop_assert!(diags.0.iter().any(|x| x.message.starts_with("dependency cycle: ") && x.line > 0));
    }
}
