//! The JSON Schema of the task file, generated from the model (`schemas/acb.schema.json`).

use super::Task;

/// The schema as pretty JSON text with a trailing newline, exactly as committed.
pub fn json_schema() -> String {
    let mut schema = schemars::schema_for!(Task);
    schema.insert(
        "title".into(),
        "ACR Tasks multi-step task file (acb.yaml), as read by acr-task".into(),
    );
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}
