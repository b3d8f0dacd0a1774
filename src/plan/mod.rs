//! The execution plan: a DAG of step indices built from `when` (petgraph).

use crate::task::Task;

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
}

/// Steps are identified by their index in `Task::steps`.
#[derive(Debug, Clone)]
pub struct Plan {
    deps: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
}

impl Plan {
    pub fn new(task: &Task) -> Result<Plan, PlanError> {
        let _ = task;
        unimplemented!("plan::Plan::new: owned by the task-file work")
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
}
