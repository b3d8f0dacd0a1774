//! `schemas/acb.schema.json` must match the model. After changing the model, update it with
//! `ACR_TASK_UPDATE_SCHEMA=1 cargo test --test schema` and commit the result.

use std::path::Path;

use acr_task::task::schema::json_schema;

#[test]
fn committed_schema_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/acb.schema.json");
    let fresh = json_schema();
    if std::env::var_os("ACR_TASK_UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "schemas/acb.schema.json is out of date; run `ACR_TASK_UPDATE_SCHEMA=1 cargo test --test schema`"
    );
}

#[test]
fn schema_describes_the_task_file() {
    let v: serde_json::Value = serde_json::from_str(&json_schema()).unwrap();
    // A file with no steps is valid (nothing runs), as in ACR.
    assert!(v.get("required").is_none());
    assert_eq!(v["additionalProperties"], serde_json::json!(false));
    let step = &v["$defs"]["Step"]["properties"];
    for f in [
        "id",
        "build",
        "cmd",
        "push",
        "when",
        "ignoreErrors",
        "volumeMounts",
        "exitedWithout",
        "cpus",
        "retryOnErrors",
        "cmdDownloadRetries",
    ] {
        assert!(step.get(f).is_some(), "Step lacks {f}");
    }
    assert!(v["$defs"]["Secret"]["properties"].get("clientID").is_some());
}
