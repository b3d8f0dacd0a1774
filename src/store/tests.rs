use super::*;
use sha2::{Digest, Sha256};

fn put_blob(store: &Store, repo: &str, data: &[u8]) -> String {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
    let up = store.begin_upload().unwrap();
    up.write_at(data, 0).unwrap();
    store
        .commit_blob(repo, up.as_ref(), &digest, data.len() as u64, &admit_all)
        .unwrap();
    digest
}

/// Where the filesystem blob storage keeps `digest` (the layout `FsBlobs` promises).
fn file_of(store: &Store, digest: &str) -> std::path::PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap();
    store
        .root()
        .join("blobs")
        .join(alg)
        .join(&hex[..2])
        .join(hex)
}

/// A manifest over `blobs`, each declared with its stored size (0 when absent).
fn manifest(
    store: &Store,
    repo: &str,
    blobs: Vec<String>,
    tag: Option<&str>,
    content: &[u8],
) -> NewManifest {
    let blobs = blobs
        .into_iter()
        .map(|digest| Descriptor {
            size: store.blob_in_repo(repo, &digest).unwrap().unwrap_or(0),
            digest,
        })
        .collect();
    NewManifest {
        repo: repo.to_string(),
        digest: format!("sha256:{}", hex::encode(Sha256::digest(content))),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        artifact_type: None,
        subject: None,
        content: content.to_vec(),
        blobs,
        children: vec![],
        tag: tag.map(str::to_string),
        sealed: None,
    }
}

#[test]
fn blob_commit_is_linked_per_repository_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let d = {
        let store = Store::open(dir.path(), true).unwrap();
        let d = put_blob(&store, "a/b", b"hello");
        assert_eq!(store.blob_in_repo("a/b", &d).unwrap(), Some(5));
        assert_eq!(store.blob_in_repo("other", &d).unwrap(), None);
        assert!(store.mount_blob("other", "a/b", &d).unwrap());
        assert!(!store.mount_blob("third", "nowhere", &d).unwrap());
        d
    };
    let store = Store::open(dir.path(), true).unwrap();
    assert_eq!(store.blob_in_repo("other", &d).unwrap(), Some(5));
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut store.blob_reader(&d, 0).unwrap(), &mut got).unwrap();
    assert_eq!(got, b"hello");
    assert!(file_of(&store, &d).exists());
    assert!(store.fsck().unwrap().is_clean());
}

#[test]
fn manifest_with_missing_blob_is_refused_and_gc_keeps_tagged_content() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), true).unwrap();
    let layer = put_blob(&store, "r", b"layer");
    let lonely = put_blob(&store, "r", b"unreferenced");
    let missing = format!("sha256:{}", "0".repeat(64));
    let bad = manifest(
        &store,
        "r",
        vec![missing.clone()],
        Some("x"),
        b"{\"bad\":1}",
    );
    assert!(
        matches!(store.put_manifest(&bad, &[], &admit_all), Err(StoreError::MissingRef(m)) if m == missing)
    );
    let mut lying = manifest(
        &store,
        "r",
        vec![layer.clone()],
        Some("x"),
        b"{\"lying\":1}",
    );
    lying.blobs[0].size += 1;
    assert!(matches!(
        store.put_manifest(&lying, &[], &admit_all),
        Err(StoreError::SizeMismatch {
            declared: 6,
            actual: 5,
            ..
        })
    ));
    let good = manifest(
        &store,
        "r",
        vec![layer.clone()],
        Some("v1"),
        b"{\"good\":1}",
    );
    store.put_manifest(&good, &[], &admit_all).unwrap();
    let untagged = manifest(&store, "r", vec![layer.clone()], None, b"{\"untagged\":1}");
    store.put_manifest(&untagged, &[], &admit_all).unwrap();

    let dry = store.gc(-1, true).unwrap();
    assert_eq!(dry.blobs, vec![lonely.clone()]);
    assert!(file_of(&store, &lonely).exists());

    let report = store.gc(-1, false).unwrap();
    assert_eq!(report.blobs, vec![lonely.clone()]);
    assert_eq!(report.manifests, vec![format!("r@{}", untagged.digest)]);
    assert!(!file_of(&store, &lonely).exists());
    assert!(file_of(&store, &layer).exists());
    let tagged = store
        .get_manifest("r", &Reference::Tag("v1".into()))
        .unwrap()
        .unwrap();
    assert_eq!(tagged.digest, good.digest);
    assert!(store.fsck().unwrap().is_clean());
}

#[test]
fn fsck_reports_a_corrupted_blob() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), true).unwrap();
    let d = put_blob(&store, "r", b"original");
    std::fs::write(file_of(&store, &d), b"tampered").unwrap();
    let report = store.fsck().unwrap();
    assert_eq!(report.issues.len(), 1);
    assert_eq!(report.issues[0].kind, "blob-digest");
}

#[test]
fn tags_and_repositories_paginate_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), true).unwrap();
    let layer = put_blob(&store, "r", b"l");
    for (i, t) in ["b", "a", "c"].iter().enumerate() {
        let m = manifest(
            &store,
            "r",
            vec![layer.clone()],
            Some(t),
            format!("{{\"i\":{i}}}").as_bytes(),
        );
        store.put_manifest(&m, &[], &admit_all).unwrap();
    }
    assert_eq!(
        store.list_tags("r", Some(2), None).unwrap().unwrap(),
        vec!["a", "b"]
    );
    assert_eq!(
        store.list_tags("r", Some(2), Some("b")).unwrap().unwrap(),
        vec!["c"]
    );
    assert_eq!(store.list_tags("nope", None, None).unwrap(), None);
    put_blob(&store, "a/z", b"x");
    assert_eq!(
        store.list_repositories(None, None).unwrap(),
        vec!["a/z", "r"]
    );
    assert_eq!(
        store.list_repositories(Some(1), Some("a/z")).unwrap(),
        vec!["r"]
    );
}

#[test]
fn one_serving_process_per_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(dir.path(), true).unwrap();
    match Store::open(dir.path(), true) {
        Err(StoreError::InUse(p)) => assert_eq!(p, dir.path()),
        other => panic!("expected InUse, got {other:?}"),
    }
    // Maintenance (gc, fsck, repository --data) does not need to own the directory.
    Store::open(dir.path(), false).unwrap();
    drop(first);
    Store::open(dir.path(), true).unwrap();
}

#[test]
fn outbox_rows_commit_with_their_change_and_old_ones_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), true).unwrap();
    assert_eq!(store.outbox_last().unwrap(), 0);
    let m = manifest(&store, "r", vec![], Some("v1"), b"{}");
    store
        .put_manifest(&m, &["first".into()], &admit_all)
        .unwrap();
    // A refused manifest leaves no event behind.
    let bad = manifest(
        &store,
        "r",
        vec!["sha256:missing".into()],
        Some("v2"),
        b"{\"x\":1}",
    );
    assert!(store
        .put_manifest(&bad, &["never".into()], &admit_all)
        .is_err());
    store
        .delete_tag("r", "v1", |d| vec![format!("deleted {d}")])
        .unwrap();
    let rows = store.outbox_after(0, 10).unwrap();
    let payloads: Vec<&str> = rows.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(payloads, ["first", &format!("deleted {}", m.digest)]);
    assert_eq!(store.outbox_after(rows[0].0, 10).unwrap().len(), 1);
    assert_eq!(store.outbox_last().unwrap(), rows[1].0);
    // Rows go by their age: none is a week old, and all are older than a second from now.
    assert_eq!(
        store
            .outbox_prune(std::time::Duration::from_secs(7 * 86400))
            .unwrap(),
        0
    );
    // All are, but the newest stays: a consumer at 0 sees that it missed the first.
    assert_eq!(store.now().meta.outbox_prune(now() + 1).unwrap(), 1);
    assert_eq!(store.outbox_after(0, 10).unwrap(), rows[1..]);
    assert_eq!(store.outbox_last().unwrap(), rows[1].0);
    // Sequence numbers never go back, even after a prune.
    let m2 = manifest(&store, "r", vec![], Some("v2"), b"{\"v\":2}");
    store
        .put_manifest(&m2, &["third".into()], &admit_all)
        .unwrap();
    assert!(store.outbox_last().unwrap() > rows[1].0);
}

/// Every metadata backend, opened fresh in `dir`: the bodies below run against each
/// (PostgreSQL joins this list).
fn meta_backends(dir: &std::path::Path) -> Vec<(&'static str, Box<dyn RegistryMeta>)> {
    let mut out: Vec<(&'static str, Box<dyn RegistryMeta>)> = vec![(
        "sqlite",
        Box::new(SqliteMeta::open(&dir.join("meta.db")).unwrap()),
    )];
    // PostgreSQL too when `ACR_TASK_TEST_POSTGRES` names a server (scripts/with-postgres).
    if let Ok(url) = std::env::var("ACR_TASK_TEST_POSTGRES") {
        let db = crate::pg::fresh_database(&url).unwrap();
        out.push((
            "postgres",
            Box::new(super::postgres::PgMeta::open(&db).unwrap()),
        ));
    }
    out
}

#[test]
fn every_meta_backend_links_a_blob_only_when_its_content_is_there() {
    let dir = tempfile::tempdir().unwrap();
    for (name, meta) in meta_backends(dir.path()) {
        let d = format!("sha256:{}", "a".repeat(64));
        // No row and no size: nothing to link; content gone: nothing changes.
        assert!(
            !meta
                .link_blob("r", &d, None, &admit_all, &mut || Ok(true))
                .unwrap(),
            "{name}"
        );
        assert!(
            !meta
                .link_blob("r", &d, Some(3), &admit_all, &mut || Ok(false))
                .unwrap(),
            "{name}"
        );
        assert_eq!(meta.blob_size(&d).unwrap(), None, "{name}");
        assert!(!meta.repository_exists("r").unwrap(), "{name}");
        // The content check runs inside the call (under the write lock), once.
        let mut asked = 0;
        assert!(meta
            .link_blob("r", &d, Some(3), &admit_all, &mut || {
                asked += 1;
                Ok(true)
            })
            .unwrap());
        assert_eq!(asked, 1, "{name}");
        assert_eq!(meta.blob_in_repo("r", &d).unwrap(), Some(3), "{name}");
        // An existing row keeps its size; a second repository links it without one.
        assert!(meta
            .link_blob("s", &d, None, &admit_all, &mut || Ok(true))
            .unwrap());
        assert_eq!(meta.blob_in_repo("s", &d).unwrap(), Some(3), "{name}");
        assert!(meta.mount_blob("t", "s", &d).unwrap(), "{name}");
        assert!(!meta.mount_blob("u", "nowhere", &d).unwrap(), "{name}");
        assert!(meta.unlink_blob("t", &d).unwrap(), "{name}");
        assert!(!meta.unlink_blob("t", &d).unwrap(), "{name}");
        assert_eq!(meta.blob_in_repo("t", &d).unwrap(), None, "{name}");
        assert_eq!(
            meta.list_repositories(None, None).unwrap(),
            ["r", "s", "t"],
            "{name}"
        );
    }
}

#[test]
fn every_meta_backend_writes_delete_events_with_the_delete() {
    let dir = tempfile::tempdir().unwrap();
    for (name, meta) in meta_backends(dir.path()) {
        let content = b"{\"m\":1}".to_vec();
        let digest = crate::digest::of_bytes(crate::digest::Algorithm::Sha256, &content);
        let m = NewManifest {
            repo: "r".into(),
            digest: digest.clone(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            artifact_type: None,
            subject: None,
            content,
            blobs: vec![],
            children: vec![],
            tag: Some("v1".into()),
            sealed: None,
        };
        meta.put_manifest(&m, &["push".into()], &admit_all).unwrap();
        let mut tagged = m.clone();
        tagged.tag = Some("v2".into());
        meta.put_manifest(&tagged, &[], &admit_all).unwrap();
        let (row, tags) = meta
            .delete_manifest("r", &digest, &mut |row, tags| {
                tags.iter().map(|t| format!("{}:{t}", row.digest)).collect()
            })
            .unwrap()
            .unwrap();
        assert_eq!(row.digest, digest, "{name}");
        assert_eq!(tags, ["v1", "v2"], "{name}");
        let payloads: Vec<String> = meta
            .outbox_after(0, 10)
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        assert_eq!(
            payloads,
            [
                "push".to_string(),
                format!("{digest}:v1"),
                format!("{digest}:v2")
            ],
            "{name}"
        );
        // Deleting what is not there writes nothing.
        let mut called = false;
        assert!(meta
            .delete_tag("r", "v1", &mut |_| {
                called = true;
                vec!["never".into()]
            })
            .unwrap()
            .is_none());
        assert!(!called, "{name}");
        assert_eq!(meta.outbox_after(0, 10).unwrap().len(), 3, "{name}");
        assert_eq!(meta.list_manifests("r").unwrap(), Some(vec![]), "{name}");
        assert!(meta.delete_repository("r").unwrap(), "{name}");
        assert_eq!(meta.list_manifests("r").unwrap(), None, "{name}");
    }
}

#[test]
fn every_meta_backend_counts_storage_as_repositories_link_it() {
    let dir = tempfile::tempdir().unwrap();
    for (name, meta) in meta_backends(dir.path()) {
        let d = format!("sha256:{}", "b".repeat(64));
        let yes = || -> Result<bool, StoreError> { Ok(true) };
        assert_eq!(meta.storage_used().unwrap(), 0, "{name}");
        assert!(meta
            .link_blob("r", &d, Some(1000), &admit_all, &mut { yes })
            .unwrap());
        assert_eq!(meta.storage_used().unwrap(), 1000, "{name}");
        // A second repository's link costs nothing, and is not asked about.
        let never = |_: u64, _: u64| -> Result<(), StoreError> { panic!("asked") };
        assert!(meta.link_blob("s", &d, None, &never, &mut { yes }).unwrap());
        assert!(meta.mount_blob("t", "s", &d).unwrap());
        assert_eq!(meta.storage_used().unwrap(), 1000, "{name}");
        // A refusal writes nothing.
        let full = |used: u64, adds: u64| -> Result<(), StoreError> {
            Err(StoreError::Properties(format!("{used}+{adds}")))
        };
        let e = format!("sha256:{}", "c".repeat(64));
        let r = meta.link_blob("r", &e, Some(5), &full, &mut { yes });
        assert!(
            matches!(r, Err(StoreError::Properties(m)) if m == "1000+5"),
            "{name}"
        );
        assert_eq!(meta.blob_size(&e).unwrap(), None, "{name}");
        let m = NewManifest {
            repo: "r".into(),
            digest: format!("sha256:{}", "d".repeat(64)),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            artifact_type: None,
            subject: None,
            content: vec![b'x'; 24],
            blobs: vec![Descriptor {
                digest: d.clone(),
                size: 1000,
            }],
            children: vec![],
            tag: Some("v1".into()),
            sealed: None,
        };
        assert!(meta.put_manifest(&m, &[], &full).is_err(), "{name}");
        assert_eq!(
            meta.list_tags("r", None, None).unwrap(),
            Some(vec![]),
            "{name}"
        );
        meta.put_manifest(&m, &[], &admit_all).unwrap();
        assert_eq!(meta.storage_used().unwrap(), 1024, "{name}");
        // The blob counts until its last link goes; the manifest until its row does.
        for repo in ["r", "s", "t"] {
            meta.unlink_blob(repo, &d).unwrap();
        }
        assert_eq!(meta.storage_used().unwrap(), 24, "{name}");
        meta.delete_manifest("r", &m.digest, &mut |_, _| vec![])
            .unwrap();
        assert_eq!(meta.storage_used().unwrap(), 0, "{name}");
    }
}

#[test]
fn every_meta_backend_keeps_properties_and_changes_them_under_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    for (name, meta) in meta_backends(dir.path()) {
        assert_eq!(meta.properties().unwrap(), None, "{name}");
        let set = meta
            .set_properties(&mut |now, used| {
                assert_eq!((now, used), (None, 0));
                Ok("{\"sku\":\"Basic\"}".into())
            })
            .unwrap();
        assert_eq!(meta.properties().unwrap().as_deref(), Some(set.as_str()));
        let refused = meta.set_properties(&mut |_, _| Err(StoreError::Properties("no".into())));
        assert!(refused.is_err(), "{name}");
        assert_eq!(meta.properties().unwrap(), Some(set), "{name}: unchanged");
    }
}

#[test]
fn the_storage_limit_refuses_a_blob_and_leaves_nothing_visible() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), true).unwrap();
    let small = crate::tier::Overrides {
        storage_bytes: Some(crate::tier::Override::Count(10)),
        ..Default::default()
    };
    let p = store
        .update_properties(|p, used| {
            let ch = crate::tier::Change {
                sku: Some(crate::tier::Sku::Basic),
                overrides: small.clone(),
                ..Default::default()
            };
            Ok(p.change(&ch, used)?)
        })
        .unwrap();
    assert_eq!(p.limits().storage_bytes, Some(10));
    put_blob(&store, "r", b"12345678");
    let data = b"too much";
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
    let up = store.begin_upload().unwrap();
    up.write_at(data, 0).unwrap();
    let admit = |used: u64, adds: u64| Ok(p.check_storage(used, adds)?);
    let e = store
        .commit_blob("r", up.as_ref(), &digest, 8, &admit)
        .unwrap_err();
    assert!(
        e.to_string().contains("storage limit is 10 B (Basic)"),
        "{e}"
    );
    assert_eq!(store.blob_in_repo("r", &digest).unwrap(), None);
    // A tier too small for what is stored is refused, and nothing changes.
    let tiny = crate::tier::Overrides {
        storage_bytes: Some(crate::tier::Override::Count(4)),
        ..Default::default()
    };
    let r = store.update_properties(|p, used| {
        let ch = crate::tier::Change {
            overrides: tiny.clone(),
            ..Default::default()
        };
        Ok(p.change(&ch, used)?)
    });
    assert!(matches!(
        r,
        Err(StoreError::Limit(crate::tier::LimitError::TooSmall { .. }))
    ));
    assert_eq!(store.properties().unwrap(), p);
}

#[test]
fn a_new_store_is_encrypted_and_a_key_rotation_rewrites_no_content() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), true).unwrap();
    let e = store.properties().unwrap().encryption.unwrap();
    assert!(e.complete && e.key_source == crate::tier::KeySource::Managed);
    let keys = dir.path().join(encryption::MANAGED_KEY_FILE);
    assert_eq!(
        std::fs::metadata(&keys).unwrap().mode() & 0o777,
        0o600,
        "the key is the owner's only"
    );
    let d = put_blob(&store, "r", b"layer bytes in the clear");
    let m = manifest(
        &store,
        "r",
        vec![d.clone()],
        Some("v1"),
        b"{\"secret\":\"manifest\"}",
    );
    store.put_manifest(&m, &[], &admit_all).unwrap();
    let raw = std::fs::read(dir.path().join("meta.db")).unwrap_or_default();
    let wal = std::fs::read(dir.path().join("meta.db-wal")).unwrap_or_default();
    for bytes in [&raw, &wal] {
        assert!(
            !bytes.windows(6).any(|w| w == b"secret"),
            "manifest in the clear"
        );
    }
    let before = std::fs::read(file_of(&store, &d)).unwrap();
    let inode = std::fs::metadata(file_of(&store, &d)).unwrap().ino();
    let old = store.properties().unwrap().encryption.unwrap().key_id;
    store.rotate_key().unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let r = store
        .rewrap_keys(std::time::Duration::ZERO, &stop, &|_| {})
        .unwrap()
        .unwrap();
    assert_eq!(r.changed, 2, "one data key, one manifest");
    let now = store.properties().unwrap().encryption.unwrap();
    assert!(now.key_id != old && now.rotating_from.is_none());
    assert_eq!(
        std::fs::read(file_of(&store, &d)).unwrap(),
        before,
        "content untouched"
    );
    assert_eq!(std::fs::metadata(file_of(&store, &d)).unwrap().ino(), inode);
    assert_eq!(std::fs::read_to_string(&keys).unwrap().lines().count(), 1);
    let row = store
        .get_manifest("r", &Reference::Tag("v1".into()))
        .unwrap()
        .unwrap();
    assert_eq!(row.content, b"{\"secret\":\"manifest\"}");
    assert!(store.fsck().unwrap().is_clean());
    drop(store);
    // Reopened with the key it holds: fine. With another key: refused, with the reason.
    Store::open(dir.path(), true).unwrap();
    std::fs::write(
        &keys,
        format!("{}\n", crypt::KeyRing::generate_line().unwrap()),
    )
    .unwrap();
    let e = Store::open(dir.path(), true).unwrap_err().to_string();
    assert!(
        e.contains(&now.key_id) && e.contains("does not hold"),
        "{e}"
    );
    std::fs::remove_file(&keys).unwrap();
    let e = Store::open(dir.path(), true).unwrap_err().to_string();
    assert!(e.contains("cannot be read"), "{e}");
}

/// A manifest of repository `r` whose content is `body` (no blobs).
fn manifest_in_r(
    body: &str,
    tag: Option<&str>,
    children: Vec<Descriptor>,
    subject: Option<&str>,
) -> NewManifest {
    let content = body.as_bytes().to_vec();
    NewManifest {
        repo: "r".into(),
        digest: crate::digest::of_bytes(crate::digest::Algorithm::Sha256, &content),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        artifact_type: None,
        subject: subject.map(str::to_string),
        content,
        blobs: vec![],
        children,
        tag: tag.map(str::to_string),
        sealed: None,
    }
}

#[test]
fn every_meta_backend_deletes_for_a_purge_only_what_is_still_as_planned() {
    let dir = tempfile::tempdir().unwrap();
    for (name, meta) in meta_backends(dir.path()) {
        let new = manifest_in_r;
        let (a, b) = (
            new("{\"a\":1}", Some("v1"), vec![], None),
            new("{\"b\":1}", None, vec![], None),
        );
        let child = Descriptor {
            digest: b.digest.clone(),
            size: b.content.len() as u64,
        };
        for m in [&a, &b] {
            meta.put_manifest(m, &[], &admit_all).unwrap();
        }
        // v1 moves to b after the plan read it at a: the planned delete leaves it.
        let mut moved = b.clone();
        moved.tag = Some("v1".into());
        meta.put_manifest(&moved, &[], &admit_all).unwrap();
        let plan = |tag: &str, d: &str| vec![(tag.to_string(), d.to_string())];
        let none = meta
            .delete_tags("r", &plan("v1", &a.digest), &mut |_, _, _| vec![])
            .unwrap();
        assert!(none.is_empty(), "{name}");
        // b is tagged now: not unreferenced.
        let gone = |ds: &[&String]| {
            let ds: Vec<String> = ds.iter().map(|d| d.to_string()).collect();
            meta.delete_unreferenced("r", &ds, &mut |_| vec!["event".into()])
                .unwrap()
        };
        assert!(gone(&[&b.digest]).is_empty(), "{name}");
        let events = meta.outbox_last().unwrap();
        let done = meta
            .delete_tags("r", &plan("v1", &b.digest), &mut |t, d, row| {
                vec![format!("{t} {d} {}", row.map(|r| r.size).unwrap_or(0))]
            })
            .unwrap();
        assert_eq!(done, ["v1"], "{name}");
        let (_, p) = meta.outbox_after(events, 10).unwrap().pop().unwrap();
        assert_eq!(p, format!("v1 {} {}", b.digest, b.content.len()), "{name}");
        // An index names b, and a referrer points at a: both stay, and the referrer too;
        // the index goes, and then b, in one call, in that order.
        let index = new("{\"index\":1}", None, vec![child], None);
        let sig = new("{\"sig\":1}", None, vec![], Some(&a.digest));
        meta.put_manifest(&index, &[], &admit_all).unwrap();
        meta.put_manifest(&sig, &[], &admit_all).unwrap();
        assert!(
            gone(&[&b.digest, &a.digest, &sig.digest]).is_empty(),
            "{name}"
        );
        assert_eq!(
            gone(&[&index.digest, &b.digest]),
            [index.digest.clone(), b.digest.clone()],
            "{name}"
        );
        let view = meta.repo_view("r").unwrap().unwrap();
        let left: Vec<&str> = view.manifests.iter().map(|m| m.digest.as_str()).collect();
        assert_eq!(left.len(), 2, "{name}: {left:?}");
        assert!(
            left.contains(&a.digest.as_str()) && left.contains(&sig.digest.as_str()),
            "{name}"
        );
        assert_eq!(meta.repo_view("nope").unwrap(), None, "{name}");
        // A prune of every event keeps the newest: how far the outbox went.
        let last = meta.outbox_last().unwrap();
        assert!(meta.outbox_prune(now() + 1).unwrap() > 0, "{name}");
        let left = meta.outbox_after(0, 10).unwrap();
        assert_eq!(
            left.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [last],
            "{name}"
        );
        assert_eq!(meta.outbox_last().unwrap(), last, "{name}");
    }
}

#[test]
fn every_meta_backend_checks_locks_in_the_change_itself() {
    let dir = tempfile::tempdir().unwrap();
    for (name, meta) in meta_backends(dir.path()) {
        let new = |body: &str, tag: Option<&str>| manifest_in_r(body, tag, vec![], None);
        let v1 = new("{\"v\":1}", Some("v1"));
        meta.put_manifest(&v1, &[], &admit_all).unwrap();
        let locked = Attributes {
            write_enabled: false,
            delete_enabled: true,
        };
        assert!(meta.set_lock("r", Some("v1"), locked).unwrap(), "{name}");
        assert!(!meta.set_lock("r", Some("nope"), locked).unwrap(), "{name}");
        fn is_locked<T>(r: Result<T, StoreError>) -> bool {
            matches!(
                r,
                Err(StoreError::Limit(crate::tier::LimitError::Locked { .. }))
            )
        }
        // A push over the tag, its delete, the manifest's delete: refused.
        assert!(
            is_locked(meta.put_manifest(&new("{\"v\":2}", Some("v1")), &[], &admit_all)),
            "{name}"
        );
        assert!(
            is_locked(meta.delete_tag("r", "v1", &mut |_| vec![])),
            "{name}"
        );
        let r = meta.delete_manifest("r", &v1.digest, &mut |_, _| vec![]);
        let shown = format!("{:?}", r.as_ref().map(|_| ()));
        assert!(is_locked(r), "{name}: {shown}");
        // Another tag still takes pushes; a purge's batch leaves the locked tag.
        meta.put_manifest(&new("{\"v\":3}", Some("v3")), &[], &admit_all)
            .unwrap();
        let batch = vec![("v1".to_string(), v1.digest.clone())];
        assert!(
            meta.delete_tags("r", &batch, &mut |_, _, _| vec![])
                .unwrap()
                .is_empty(),
            "{name}"
        );
        // The repository locked against deletes: pushes go on, deletes stop.
        let no_deletes = Attributes {
            write_enabled: true,
            delete_enabled: false,
        };
        assert!(meta.set_lock("r", None, no_deletes).unwrap(), "{name}");
        meta.put_manifest(&new("{\"v\":4}", Some("v4")), &[], &admit_all)
            .unwrap();
        assert!(
            is_locked(meta.delete_tag("r", "v4", &mut |_| vec![])),
            "{name}"
        );
        assert!(is_locked(meta.delete_repository("r")), "{name}");
        assert!(
            is_locked(meta.delete_unreferenced("r", &[], &mut |_| vec![])),
            "{name}"
        );
        // Unlocked: the lock rows go, and so may everything.
        meta.set_lock("r", None, Attributes::default()).unwrap();
        meta.set_lock("r", Some("v1"), Attributes::default())
            .unwrap();
        assert!(meta.locks("r").unwrap().is_empty(), "{name}");
        assert!(meta.delete_repository("r").unwrap(), "{name}");
    }
}

/// A registry whose metadata is in a shared PostgreSQL database: what one server stores,
/// another (its own directory) reads, the managed key kept in the database with the rows
/// it opens; a directory open of either is refused.
#[test]
fn a_shared_registry_is_one_registry_for_every_server() {
    let Ok(url) = std::env::var("ACR_TASK_TEST_POSTGRES") else {
        return; // Runs under scripts/with-postgres (make test).
    };
    let place = MetaPlace::Shared(Box::new(crate::pg::fresh_database(&url).unwrap()));
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let one = Store::open_at(a.path(), true, &place).unwrap();
    let e = one.properties().unwrap().encryption.unwrap();
    assert!(e.complete && e.key_source == crate::tier::KeySource::Managed);
    assert!(
        !a.path().join(encryption::MANAGED_KEY_FILE).exists(),
        "the key is in the database, not one server's directory"
    );
    let d = put_blob(&one, "r", b"layer");
    let m = manifest(&one, "r", vec![d.clone()], Some("v1"), b"{\"secret\":1}");
    one.put_manifest(&m, &[], &admit_all).unwrap();
    let two = Store::open_at(b.path(), true, &place).unwrap();
    let row = two
        .get_manifest("r", &Reference::Tag("v1".into()))
        .unwrap()
        .unwrap();
    assert_eq!(row.content, b"{\"secret\":1}", "opened with the shared key");
    assert_eq!(two.blob_in_repo("r", &d).unwrap(), Some(5));
    assert_eq!(two.storage_used().unwrap(), one.storage_used().unwrap());
    drop(two);
    // A rotation through one server is read by the other at its next look.
    one.rotate_key().unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    one.rewrap_keys(std::time::Duration::ZERO, &stop, &|_| {})
        .unwrap()
        .unwrap();
    let two = Store::open_at(b.path(), true, &place).unwrap();
    let row = two
        .get_manifest("r", &Reference::Tag("v1".into()))
        .unwrap()
        .unwrap();
    assert_eq!(row.content, b"{\"secret\":1}");
    let e = Store::open(a.path(), false).unwrap_err().to_string();
    assert!(e.contains("PostgreSQL") && e.contains("--database"), "{e}");
    // A directory holding a registry of its own is not quietly left behind.
    let own = tempfile::tempdir().unwrap();
    put_blob(&Store::open(own.path(), true).unwrap(), "mine", b"kept");
    let e = Store::open_at(own.path(), true, &place)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("registry of its own") && e.contains("relocate"),
        "{e}"
    );
}

/// An upload session of a registry servers share (rows in PostgreSQL, sealed blobs in
/// S3): checkpointed by one server, taken over once by another when the first is gone,
/// finished there byte for byte; the first can then neither save nor finish it; an
/// abandoned one is expired with its checkpoint.
#[test]
fn a_shared_upload_is_carried_on_by_another_server() {
    let (Ok(url), Ok(bucket)) = (
        std::env::var("ACR_TASK_TEST_POSTGRES"),
        std::env::var("ACR_TASK_TEST_STORAGE"),
    ) else {
        return; // Runs under scripts/with-s3 scripts/with-postgres (make test).
    };
    let place = MetaPlace::Shared(Box::new(crate::pg::fresh_database(&url).unwrap()));
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let storage = format!("{bucket}/{}", uuid::Uuid::new_v4().simple());
    choose_object_storage(a.path(), &place, &storage, None, true).unwrap();
    let one = Store::open_at(a.path(), true, &place).unwrap();
    let two = Store::open_at(b.path(), true, &place).unwrap();
    // More than a part (8 MiB) of sealed chunks, and bytes short of a chunk after them.
    let data: Vec<u8> = (0..9_000_123u32).map(|i| (i % 241) as u8).collect();
    let cut = 8_500_000;
    let up = one.begin_upload().unwrap();
    assert!(up.sealed());
    up.write_at(&data[..cut], 0).unwrap();
    let state = up.checkpoint(cut as u64).unwrap().unwrap();
    assert!(
        !state.contains(&hex::encode(&data[cut - 64..cut])),
        "the bytes short of a chunk are saved sealed"
    );
    let saved = |server: &Store, id: &str, owner: &str, size: u64, state: &str| {
        server.save_upload(id, owner, size, state).unwrap()
    };
    assert_eq!(
        saved(&one, "u1", "http://one#1", cut as u64, &state),
        UploadRow::Missing,
        "a session never recorded is not saved"
    );
    one.record_upload("u1", "r", "http://one#1").unwrap();
    assert_eq!(
        saved(&one, "u1", "http://one#1", cut as u64, &state),
        UploadRow::Mine
    );
    drop(up); // its server dies
    let (carried, size) = two
        .take_upload("u1", "r", "http://one#1", "http://two#1")
        .unwrap()
        .unwrap();
    assert_eq!(size, cut as u64);
    assert!(
        two.take_upload("u1", "r", "http://one#1", "http://three#1")
            .unwrap()
            .is_none(),
        "taken over once"
    );
    assert_eq!(
        saved(&one, "u1", "http://one#1", cut as u64, &state),
        UploadRow::Moved,
        "the first server can no longer save it"
    );
    assert_eq!(
        one.forget_upload("u1", "http://one#1").unwrap(),
        UploadRow::Moved
    );
    carried.write_at(&data[cut..], cut as u64).unwrap();
    let mut back = Vec::new();
    carried.reader().unwrap().read_to_end(&mut back).unwrap();
    assert!(back == data, "read back whole");
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
    two.commit_blob(
        "r",
        carried.as_ref(),
        &digest,
        data.len() as u64,
        &admit_all,
    )
    .unwrap();
    carried.cancel();
    assert_eq!(
        two.forget_upload("u1", "http://two#1").unwrap(),
        UploadRow::Mine
    );
    assert_eq!(
        one.forget_upload("u1", "http://one#1").unwrap(),
        UploadRow::Missing
    );
    let mut stored = Vec::new();
    one.blob_reader(&digest, 0)
        .unwrap()
        .read_to_end(&mut stored)
        .unwrap();
    assert!(stored == data, "the blob committed is what was sent");

    // A session with no chunk yet is carried on as a new upload.
    one.record_upload("u0", "r", "http://one#1").unwrap();
    let (fresh, size) = two
        .take_upload("u0", "r", "http://one#1", "http://two#1")
        .unwrap()
        .unwrap();
    assert_eq!(size, 0);
    fresh.write_at(b"x", 0).unwrap();

    let up = one.begin_upload().unwrap();
    one.record_upload("u2", "r", "http://one#1").unwrap();
    up.write_at(b"abandoned", 0).unwrap();
    let state = up.checkpoint(9).unwrap().unwrap();
    assert_eq!(
        saved(&one, "u2", "http://one#1", 9, &state),
        UploadRow::Mine
    );
    drop(up);
    // Its server restarted at the same address (another boot) carries it on, once; in
    // use, it stays.
    let (again, size) = one
        .take_upload("u2", "r", "http://one#1", "http://one#2")
        .unwrap()
        .unwrap();
    assert_eq!(size, 9);
    assert!(one
        .take_upload("u2", "r", "http://one#1", "http://one#3")
        .unwrap()
        .is_none());
    drop(again);
    one.touch_uploads("http://one#2", &["u2".to_string()])
        .unwrap();
    assert_eq!(two.expire_uploads(std::time::SystemTime::now()).unwrap(), 0);
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(10);
    assert_eq!(two.expire_uploads(later).unwrap(), 1);
    assert!(two
        .take_upload("u2", "r", "http://one#2", "http://two#1")
        .unwrap()
        .is_none());
}
