//! What a run produced, as plain data: rendered by the CLI, stored by the server.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
    TimedOut,
    /// Never started because the run failed or was canceled first.
    Skipped,
}

impl std::str::FromStr for Status {
    type Err = String;

    fn from_str(s: &str) -> Result<Status, String> {
        Status::RUN
            .into_iter()
            .chain([Status::Skipped])
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a run status"))
    }
}

impl Status {
    /// The statuses a run can have (a step can also be Skipped).
    pub const RUN: [Status; 6] = [
        Status::Queued,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Canceled,
        Status::TimedOut,
    ];

    /// A run (or step) in this status will not change again.
    pub fn is_final(self) -> bool {
        !matches!(self, Status::Queued | Status::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "Queued",
            Status::Running => "Running",
            Status::Succeeded => "Succeeded",
            Status::Failed => "Failed",
            Status::Canceled => "Canceled",
            Status::TimedOut => "TimedOut",
            Status::Skipped => "Skipped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushedImage {
    pub image: String,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseImage {
    pub image: String,
    /// The registry digest it was pulled or pushed by; `None` for an image made locally,
    /// which no registry can tell a new version of.
    pub digest: Option<String>,
    /// The engine's image id.
    #[serde(alias = "image_id")]
    pub image_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuiltImage {
    pub tags: Vec<String>,
    #[serde(alias = "image_id")]
    pub image_id: String,
    /// The `FROM` images (multi-stage aware) with the digests actually used.
    #[serde(alias = "base_images")]
    pub base_images: Vec<BaseImage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepReport {
    pub id: String,
    /// `build`, `cmd` or `push`.
    pub kind: String,
    pub status: Status,
    /// When the step started, in ms after the run started.
    #[serde(alias = "started_ms")]
    pub started_ms: u64,
    #[serde(alias = "duration_ms")]
    pub duration_ms: u64,
    #[serde(alias = "exit_code")]
    pub exit_code: Option<i64>,
    /// Attempts made, retries and repeats included.
    pub attempts: u32,
    /// A failure that was ignored (`ignoreErrors`) still reads `Failed` here.
    #[serde(alias = "ignored_error")]
    pub ignored_error: bool,
    pub error: Option<String>,
    pub pushed: Vec<PushedImage>,
    pub built: Option<BuiltImage>,
    /// The ids of the steps it waited for (its `when`, resolved): the run's graph.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    #[serde(alias = "run_id")]
    pub run_id: String,
    pub status: Status,
    #[serde(alias = "started_at")]
    pub started_at: String,
    #[serde(alias = "duration_ms")]
    pub duration_ms: u64,
    pub error: Option<String>,
    pub steps: Vec<StepReport>,
}

impl RunReport {
    pub fn succeeded(&self) -> bool {
        self.status == Status::Succeeded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_read_back_in_both_spellings() {
        let r = RunReport {
            run_id: "cab1".into(),
            status: Status::Succeeded,
            started_at: "2026-12-03T07:00:00Z".into(),
            duration_ms: 5,
            error: None,
            steps: vec![StepReport {
                id: "b".into(),
                kind: "build".into(),
                status: Status::Succeeded,
                started_ms: 1,
                duration_ms: 2,
                exit_code: Some(0),
                attempts: 1,
                ignored_error: false,
                error: None,
                pushed: vec![],
                built: Some(BuiltImage {
                    tags: vec!["x".into()],
                    image_id: "sha256:1".into(),
                    base_images: vec![],
                }),
                needs: vec![],
            }],
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["runId"], "cab1");
        assert_eq!(v["steps"][0]["built"]["imageId"], "sha256:1");
        assert_eq!(serde_json::from_value::<RunReport>(v).unwrap(), r);
        // Runs recorded before the camelCase names still read.
        let old = serde_json::json!({
            "run_id": "cab1", "status": "Succeeded", "started_at": "2026-12-03T07:00:00Z",
            "duration_ms": 5, "error": null,
            "steps": [{"id": "b", "kind": "build", "status": "Succeeded", "started_ms": 1,
                       "duration_ms": 2, "exit_code": 0, "attempts": 1, "ignored_error": false,
                       "error": null, "pushed": [],
                       "built": {"tags": ["x"], "image_id": "sha256:1", "base_images": []}}]
        });
        assert_eq!(serde_json::from_value::<RunReport>(old).unwrap(), r);
        assert_eq!("TimedOut".parse::<Status>(), Ok(Status::TimedOut));
        assert!("Done".parse::<Status>().is_err());
    }
}
