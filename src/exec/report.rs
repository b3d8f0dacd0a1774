//! What a run produced, as plain data: rendered by the CLI, stored by the server.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

impl Status {
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PushedImage {
    pub image: String,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseImage {
    pub image: String,
    /// The registry digest it was pulled or pushed by; `None` for an image made locally,
    /// which no registry can tell a new version of.
    pub digest: Option<String>,
    /// The engine's image id.
    pub image_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuiltImage {
    pub tags: Vec<String>,
    pub image_id: String,
    /// The `FROM` images (multi-stage aware) with the digests actually used.
    pub base_images: Vec<BaseImage>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepReport {
    pub id: String,
    /// `build`, `cmd` or `push`.
    pub kind: &'static str,
    pub status: Status,
    /// When the step started, in ms after the run started.
    pub started_ms: u64,
    pub duration_ms: u64,
    pub exit_code: Option<i64>,
    /// Attempts made, retries and repeats included.
    pub attempts: u32,
    /// A failure that was ignored (`ignoreErrors`) still reads `Failed` here.
    pub ignored_error: bool,
    pub error: Option<String>,
    pub pushed: Vec<PushedImage>,
    pub built: Option<BuiltImage>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    pub run_id: String,
    pub status: Status,
    pub started_at: String,
    pub duration_ms: u64,
    pub error: Option<String>,
    pub steps: Vec<StepReport>,
}

impl RunReport {
    pub fn succeeded(&self) -> bool {
        self.status == Status::Succeeded
    }
}
