//! `schemas/acb.schema.json` and `schemas/registry-template.schema.json` must match their
//! models. After changing the model, update it with
//! `ACR_TASK_UPDATE_SCHEMA=1 cargo test --test schema` and commit the result.

use std::path::Path;

use acr_task::task::schema::json_schema;

/// The schema committed at `rel` is `fresh` (or, with `ACR_TASK_UPDATE_SCHEMA`, becomes it).
fn check_committed(rel: &str, fresh: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    if std::env::var_os("ACR_TASK_UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{rel} is out of date; run `ACR_TASK_UPDATE_SCHEMA=1 cargo test --test schema`"
    );
}

#[test]
fn committed_schema_is_current() {
    check_committed("schemas/acb.schema.json", &json_schema());
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

/// `schemas/registry-template.schema.json` must match the template model (same update
/// switch).
#[test]
fn committed_template_schema_is_current() {
    check_committed(
        acr_task::template::SCHEMA_PATH,
        &acr_task::template::json_schema(),
    );
}

#[test]
fn template_schema_describes_an_export() {
    let v: serde_json::Value = serde_json::from_str(&acr_task::template::json_schema()).unwrap();
    assert_eq!(v["additionalProperties"], serde_json::json!(false));
    let required: Vec<&str> = v["required"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    assert_eq!(required, ["templateVersion", "name", "tier"]);
    for f in [
        "anonymousPull",
        "encryption",
        "retention",
        "scopeMaps",
        "tokens",
        "webhooks",
        "replications",
        "tasks",
    ] {
        assert!(v["properties"].get(f).is_some(), "the schema lacks {f}");
    }
    // Tokens carry no password field; the key is only referenced.
    assert!(v["$defs"]["TokenSpec"]["properties"]
        .get("password")
        .is_none());
    assert!(v["$defs"]["EncryptionRef"]["properties"]
        .get("keyId")
        .is_some());
    assert!(v["$defs"]["TaskSpec"]["properties"]
        .get("triggers")
        .is_some());
}
