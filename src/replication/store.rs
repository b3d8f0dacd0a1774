//! The replication group as this server keeps it: `replication.db` in the registry
//! directory. Its own name, URL and the group's secret; the other members with how far
//! each has been sent this server's events (a cursor into the registry's outbox) and its
//! backfill; every tag's winning change (its stamp and digest, or none when the winner is
//! a delete) and the manifests' delete tombstones, which the last-writer rule reads.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

use super::{Member, ReplicationError, Stamp};
use crate::hlc::Hlc;

const MIGRATIONS: &[crate::store::migrate::Migration] = &[
    crate::store::migrate::Migration::Sql(
        "CREATE TABLE grp(id INTEGER PRIMARY KEY CHECK (id = 1), name TEXT NOT NULL,
            url TEXT NOT NULL, secret TEXT NOT NULL, endpoint_enabled INTEGER NOT NULL,
            indexed INTEGER NOT NULL, created INTEGER NOT NULL);
         CREATE TABLE members(name TEXT PRIMARY KEY, url TEXT NOT NULL,
            endpoint_enabled INTEGER NOT NULL, cursor INTEGER NOT NULL,
            backfill_done INTEGER NOT NULL DEFAULT 0, backfill_total INTEGER,
            backfilled INTEGER NOT NULL DEFAULT 0, last_ok INTEGER, last_error TEXT,
            created INTEGER NOT NULL);
         CREATE TABLE tag_clocks(repo TEXT NOT NULL, tag TEXT NOT NULL, hlc TEXT NOT NULL,
            origin TEXT NOT NULL, digest TEXT, PRIMARY KEY(repo, tag));
         CREATE TABLE tombstones(repo TEXT NOT NULL, digest TEXT NOT NULL, hlc TEXT NOT NULL,
            origin TEXT NOT NULL, created INTEGER NOT NULL, PRIMARY KEY(repo, digest));",
    ),
    // The registry-wide settings' clocks: each token, scope map and webhook with the
    // fingerprint of its record as last seen here and the stamp of its last change.
    crate::store::migrate::Migration::Sql(
        "CREATE TABLE config_clocks(kind TEXT NOT NULL, name TEXT NOT NULL,
            fingerprint TEXT NOT NULL, hlc TEXT NOT NULL, origin TEXT NOT NULL,
            deleted INTEGER NOT NULL, PRIMARY KEY(kind, name));",
    ),
    // The member list's version (the clock time of its last change: an older list is
    // not taken), the secret before the last rotation (offered to a member that missed
    // it), and where a member's backfill goes on from (repository and digest).
    crate::store::migrate::Migration::Sql(
        "ALTER TABLE grp ADD COLUMN version TEXT NOT NULL DEFAULT '';
         ALTER TABLE grp ADD COLUMN previous_secret TEXT;
         ALTER TABLE members ADD COLUMN backfill_after TEXT;",
    ),
];

/// A registry-wide setting's clock: what its record looked like here when last seen
/// (a fingerprint), and the stamp of its last change (or delete) anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigClock {
    /// `scopeMap`, `token` or `webhook`.
    pub kind: String,
    pub name: String,
    pub fingerprint: String,
    pub stamp: Stamp,
    pub deleted: bool,
}

/// The group, as this server is in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub me: Member,
    pub secret: String,
    /// When this server joined (Unix seconds; 0 until it is kept).
    pub created: i64,
    /// The member list's version: the clock time of its last change.
    pub version: String,
    /// The secret before the last rotation: offered to a member that missed it.
    pub previous_secret: Option<String>,
}

/// Another member and how far it is.
#[derive(Debug, Clone)]
pub struct MemberState {
    pub member: Member,
    /// The last outbox sequence number sent to it (and applied there).
    pub cursor: i64,
    pub backfill_done: u64,
    pub backfill_total: Option<u64>,
    /// The last (repository, digest) its backfill sent; it goes on after it.
    pub backfill_after: Option<(String, String)>,
    pub backfilled: bool,
    /// Unix seconds.
    pub last_ok: Option<i64>,
    pub last_error: Option<String>,
    pub created: i64,
}

pub struct ReplicationStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn stamp(hlc: String, origin: String) -> Result<Stamp, rusqlite::Error> {
    let hlc: Hlc = hlc.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
    })?;
    Ok(Stamp { hlc, origin })
}

const MEMBER_COLS: &str = "name, url, endpoint_enabled, cursor, backfill_done, backfill_total, \
                           backfilled, last_ok, last_error, created, backfill_after";

fn member_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MemberState> {
    Ok(MemberState {
        member: Member {
            name: r.get(0)?,
            url: r.get(1)?,
            region_endpoint_enabled: r.get(2)?,
        },
        cursor: r.get(3)?,
        backfill_done: r.get::<_, i64>(4)? as u64,
        backfill_total: r.get::<_, Option<i64>>(5)?.map(|n| n as u64),
        backfilled: r.get(6)?,
        last_ok: r.get(7)?,
        last_error: r.get(8)?,
        created: r.get(9)?,
        backfill_after: r.get::<_, Option<String>>(10)?.and_then(|a| {
            a.split_once('\n')
                .map(|(r, d)| (r.to_string(), d.to_string()))
        }),
    })
}

impl ReplicationStore {
    /// Opens (making it if needed) `dir/replication.db`, readable by this user only (it
    /// keeps the group's secret).
    pub fn open(dir: &Path) -> Result<ReplicationStore, ReplicationError> {
        let (path, conn) = crate::store::migrate::open_private(dir, "replication.db", MIGRATIONS)?;
        Ok(ReplicationStore {
            path,
            conn: Mutex::new(conn),
        })
    }

    /// How many other members the group of the registry in `dir` has (0 when it is in
    /// none, or has no `replication.db`, as a shared registry's directory).
    pub fn members_in(dir: &Path) -> Result<u64, ReplicationError> {
        if !dir.join("replication.db").exists() {
            return Ok(0);
        }
        Ok(ReplicationStore::open(dir)?.members()?.len() as u64)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn group(&self) -> Result<Option<Group>, ReplicationError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT name, url, secret, endpoint_enabled, created, version, previous_secret
                 FROM grp WHERE id = 1",
                [],
                |r| {
                    Ok(Group {
                        me: Member {
                            name: r.get(0)?,
                            url: r.get(1)?,
                            region_endpoint_enabled: r.get(3)?,
                        },
                        secret: r.get(2)?,
                        created: r.get(4)?,
                        version: r.get(5)?,
                        previous_secret: r.get(6)?,
                    })
                },
            )
            .optional()?)
    }

    /// Makes this server a member (or changes how it is named), its own events indexed
    /// from outbox sequence `indexed` on (kept when it was a member already).
    pub fn set_group(&self, g: &Group, indexed: i64) -> Result<(), ReplicationError> {
        self.conn().execute(
            "INSERT INTO grp(id, name, url, secret, endpoint_enabled, indexed, created, version,
                previous_secret)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(id) DO UPDATE SET name = excluded.name, url = excluded.url,
                secret = excluded.secret, endpoint_enabled = excluded.endpoint_enabled,
                version = excluded.version, previous_secret = excluded.previous_secret",
            params![
                g.me.name,
                g.me.url,
                g.secret,
                g.me.region_endpoint_enabled,
                indexed,
                now(),
                g.version,
                g.previous_secret
            ],
        )?;
        Ok(())
    }

    /// Leaves the group: forgets it and its members (the clocks stay, harmless).
    pub fn leave(&self) -> Result<(), ReplicationError> {
        let c = self.conn();
        c.execute("DELETE FROM members", [])?;
        c.execute("DELETE FROM grp", [])?;
        Ok(())
    }

    pub fn members(&self) -> Result<Vec<MemberState>, ReplicationError> {
        let c = self.conn();
        let mut s = c.prepare(&format!("SELECT {MEMBER_COLS} FROM members ORDER BY name"))?;
        let rows = s.query_map([], member_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn member(&self, name: &str) -> Result<Option<MemberState>, ReplicationError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {MEMBER_COLS} FROM members WHERE name = ?1"),
                params![name],
                member_row,
            )
            .optional()?)
    }

    /// Adds a member, to be sent this server's events after outbox sequence `cursor` once
    /// its backfill is done; one known already only has its URL and flag changed.
    pub fn add_member(&self, m: &Member, cursor: i64) -> Result<(), ReplicationError> {
        self.conn().execute(
            "INSERT INTO members(name, url, endpoint_enabled, cursor, created)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(name) DO UPDATE SET url = excluded.url,
                endpoint_enabled = excluded.endpoint_enabled",
            params![m.name, m.url, m.region_endpoint_enabled, cursor, now()],
        )?;
        Ok(())
    }

    pub fn remove_member(&self, name: &str) -> Result<bool, ReplicationError> {
        Ok(self
            .conn()
            .execute("DELETE FROM members WHERE name = ?1", params![name])?
            > 0)
    }

    pub fn set_cursor(&self, name: &str, seq: i64) -> Result<(), ReplicationError> {
        self.conn().execute(
            "UPDATE members SET cursor = MAX(cursor, ?2), last_ok = ?3, last_error = NULL
             WHERE name = ?1",
            params![name, seq, now()],
        )?;
        Ok(())
    }

    /// Backfills a member again from the start, then sends events after `cursor`.
    pub fn restart_backfill(&self, name: &str, cursor: i64) -> Result<(), ReplicationError> {
        self.conn().execute(
            "UPDATE members SET cursor = ?2, backfill_done = 0, backfill_total = NULL,
                backfill_after = NULL, backfilled = 0 WHERE name = ?1",
            params![name, cursor],
        )?;
        Ok(())
    }

    /// A member's backfill sent `done` of `total` manifests, the last `after`.
    pub fn set_backfill(
        &self,
        name: &str,
        done: u64,
        total: u64,
        after: Option<(&str, &str)>,
        finished: bool,
    ) -> Result<(), ReplicationError> {
        self.conn().execute(
            "UPDATE members SET backfill_done = ?2, backfill_total = ?3, backfilled = ?4,
                backfill_after = ?6, last_ok = ?5, last_error = NULL WHERE name = ?1",
            params![
                name,
                done as i64,
                total as i64,
                finished,
                now(),
                after.map(|(r, d)| format!("{r}\n{d}"))
            ],
        )?;
        Ok(())
    }

    pub fn set_error(&self, name: &str, error: &str) -> Result<(), ReplicationError> {
        self.conn().execute(
            "UPDATE members SET last_error = ?2 WHERE name = ?1",
            params![name, error],
        )?;
        Ok(())
    }

    /// Where this server's own events are indexed into the tag clocks up to.
    pub fn indexed(&self) -> Result<i64, ReplicationError> {
        Ok(self
            .conn()
            .query_row("SELECT indexed FROM grp WHERE id = 1", [], |r| r.get(0))
            .optional()?
            .unwrap_or(0))
    }

    pub fn set_indexed(&self, seq: i64) -> Result<(), ReplicationError> {
        self.conn()
            .execute("UPDATE grp SET indexed = ?1 WHERE id = 1", params![seq])?;
        Ok(())
    }

    /// A tag's winning change: its stamp and digest (`None`: the winner deleted it).
    pub fn tag_clock(
        &self,
        repo: &str,
        tag: &str,
    ) -> Result<Option<(Stamp, Option<String>)>, ReplicationError> {
        let c = self.conn();
        let row = c
            .query_row(
                "SELECT hlc, origin, digest FROM tag_clocks WHERE repo = ?1 AND tag = ?2",
                params![repo, tag],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?,
                    ))
                },
            )
            .optional()?;
        Ok(match row {
            Some((h, o, d)) => Some((stamp(h, o)?, d)),
            None => None,
        })
    }

    /// Records `s` as the tag's winner unless the one kept is later (see
    /// [`super::wins`]); false when it lost. The same change again is the winner still.
    pub fn offer_tag(
        &self,
        repo: &str,
        tag: &str,
        s: &Stamp,
        digest: Option<&str>,
    ) -> Result<bool, ReplicationError> {
        // One connection under its mutex: the read and the write are not interleaved.
        let c = self.conn();
        let kept = c
            .query_row(
                "SELECT hlc, origin FROM tag_clocks WHERE repo = ?1 AND tag = ?2",
                params![repo, tag],
                |r| stamp(r.get(0)?, r.get(1)?),
            )
            .optional()?;
        if kept.as_ref().is_some_and(|k| s < k) {
            return Ok(false);
        }
        c.execute(
            "INSERT OR REPLACE INTO tag_clocks(repo, tag, hlc, origin, digest)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![repo, tag, s.hlc.to_string(), s.origin, digest],
        )?;
        Ok(true)
    }

    /// Whether a tag's winning change points at `digest` of `repo` and is later than `s`
    /// (a push after that delete).
    pub fn named_after(
        &self,
        repo: &str,
        digest: &str,
        s: &Stamp,
    ) -> Result<bool, ReplicationError> {
        let c = self.conn();
        let mut q =
            c.prepare("SELECT hlc, origin FROM tag_clocks WHERE repo = ?1 AND digest = ?2")?;
        let stamps = q.query_map(params![repo, digest], |r| stamp(r.get(0)?, r.get(1)?))?;
        for k in stamps {
            if k? > *s {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The greatest clock time kept (tags, tombstones, settings): where this server's
    /// clock starts after a restart.
    pub fn max_hlc(&self) -> Result<Option<Hlc>, ReplicationError> {
        let c = self.conn();
        let mut best: Option<Hlc> = None;
        for table in ["tag_clocks", "tombstones", "config_clocks"] {
            let h: Option<String> =
                c.query_row(&format!("SELECT MAX(hlc) FROM {table}"), [], |r| r.get(0))?;
            if let Some(h) = h.and_then(|h| h.parse::<Hlc>().ok()) {
                best = best.max(Some(h));
            }
        }
        Ok(best)
    }

    /// The time a manifest was deleted at, if it was.
    pub fn tombstone(&self, repo: &str, digest: &str) -> Result<Option<Stamp>, ReplicationError> {
        let c = self.conn();
        Ok(c.query_row(
            "SELECT hlc, origin FROM tombstones WHERE repo = ?1 AND digest = ?2",
            params![repo, digest],
            |r| stamp(r.get(0)?, r.get(1)?),
        )
        .optional()?)
    }

    /// Records a manifest's delete (the later of two is kept).
    pub fn bury(&self, repo: &str, digest: &str, s: &Stamp) -> Result<(), ReplicationError> {
        let c = self.conn();
        let kept = c
            .query_row(
                "SELECT hlc, origin FROM tombstones WHERE repo = ?1 AND digest = ?2",
                params![repo, digest],
                |r| stamp(r.get(0)?, r.get(1)?),
            )
            .optional()?;
        if super::wins(s, kept.as_ref()) {
            c.execute(
                "INSERT OR REPLACE INTO tombstones(repo, digest, hlc, origin, created)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![repo, digest, s.hlc.to_string(), s.origin, now()],
            )?;
        }
        Ok(())
    }

    pub fn config_clocks(&self) -> Result<Vec<ConfigClock>, ReplicationError> {
        let c = self.conn();
        let mut q = c.prepare(
            "SELECT kind, name, fingerprint, hlc, origin, deleted FROM config_clocks
             ORDER BY kind, name",
        )?;
        let rows = q.query_map([], |r| {
            Ok(ConfigClock {
                kind: r.get(0)?,
                name: r.get(1)?,
                fingerprint: r.get(2)?,
                stamp: stamp(r.get(3)?, r.get(4)?)?,
                deleted: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn set_config_clock(&self, k: &ConfigClock) -> Result<(), ReplicationError> {
        put_config_clock(&self.conn(), k)
    }

    /// Replaces every settings clock with `clocks`, in one transaction (a server joining
    /// a group forgets what it knew of another's).
    pub fn reset_config_clocks(&self, clocks: &[ConfigClock]) -> Result<(), ReplicationError> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute("DELETE FROM config_clocks", [])?;
        for k in clocks {
            put_config_clock(&tx, k)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every delete kept here: manifests' tombstones (`tag` none) and tags whose winning
    /// change deleted them (`digest` none), in (repository, tag or digest) order. A
    /// backfill sends them, so a replica that was away longer than the outbox keeps events
    /// still learns what was deleted meanwhile.
    pub fn deletes(&self) -> Result<Vec<Gone>, ReplicationError> {
        let c = self.conn();
        let mut q = c.prepare(
            "SELECT repo, tag, digest, hlc, origin FROM (
                SELECT repo, NULL AS tag, digest, hlc, origin FROM tombstones
                UNION ALL
                SELECT repo, tag, NULL, hlc, origin FROM tag_clocks WHERE digest IS NULL)
             ORDER BY repo, tag IS NOT NULL, tag, digest",
        )?;
        let rows = q.query_map([], |r| {
            Ok(Gone {
                repo: r.get(0)?,
                tag: r.get(1)?,
                digest: r.get(2)?,
                stamp: stamp(r.get(3)?, r.get(4)?)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets deletes older than Unix second `before` (kept long enough for a replica
    /// that was away: the outbox's week and more): manifests' tombstones by when they
    /// were made, deleted tags' clocks by their clock time (so a backfill does not send
    /// every tag ever deleted). Deleted settings' clocks are kept: they are few, and a
    /// revoked token or webhook secret held by a replica away for longer must lose to
    /// its delete, not come back.
    pub fn prune_deletes(&self, before: i64) -> Result<usize, ReplicationError> {
        let c = self.conn();
        let ms = u64::try_from(before).unwrap_or(0).saturating_mul(1000);
        let tags = c.execute(
            "DELETE FROM tag_clocks WHERE digest IS NULL AND hlc < ?1",
            params![Hlc { ms, n: 0 }.to_string()],
        )?;
        Ok(tags + c.execute("DELETE FROM tombstones WHERE created < ?1", params![before])?)
    }
}

fn put_config_clock(c: &Connection, k: &ConfigClock) -> Result<(), ReplicationError> {
    c.execute(
        "INSERT OR REPLACE INTO config_clocks(kind, name, fingerprint, hlc, origin, deleted)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            k.kind,
            k.name,
            k.fingerprint,
            k.stamp.hlc.to_string(),
            k.stamp.origin,
            k.deleted
        ],
    )?;
    Ok(())
}

/// A delete kept here (see [`ReplicationStore::deletes`]): of a manifest (`digest`) or of
/// a tag (`tag`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gone {
    pub repo: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
    pub stamp: Stamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(ms: u64, origin: &str) -> Stamp {
        Stamp {
            hlc: Hlc { ms, n: 0 },
            origin: origin.into(),
        }
    }

    #[test]
    fn a_tag_keeps_its_latest_change_whatever_order_they_come_in() {
        let d = tempfile::tempdir().unwrap();
        let s = ReplicationStore::open(d.path()).unwrap();
        assert!(s
            .offer_tag("app", "v1", &st(20, "b"), Some("sha256:b"))
            .unwrap());
        // An older change arriving late loses; the same one again is still the winner.
        assert!(!s
            .offer_tag("app", "v1", &st(10, "a"), Some("sha256:a"))
            .unwrap());
        assert!(s
            .offer_tag("app", "v1", &st(20, "b"), Some("sha256:b"))
            .unwrap());
        assert!(s.named_after("app", "sha256:b", &st(15, "a")).unwrap());
        assert!(!s.named_after("app", "sha256:b", &st(25, "a")).unwrap());
        let (kept, digest) = s.tag_clock("app", "v1").unwrap().unwrap();
        assert_eq!((kept, digest.as_deref()), (st(20, "b"), Some("sha256:b")));
        // A later delete wins and is kept as no digest.
        assert!(s.offer_tag("app", "v1", &st(30, "a"), None).unwrap());
        assert_eq!(s.tag_clock("app", "v1").unwrap().unwrap().1, None);
        // Reopened: it is all still there.
        drop(s);
        let s = ReplicationStore::open(d.path()).unwrap();
        assert_eq!(s.tag_clock("app", "v1").unwrap().unwrap().0, st(30, "a"));
        s.bury("app", "sha256:x", &st(40, "a")).unwrap();
        s.bury("app", "sha256:x", &st(35, "b")).unwrap();
        assert_eq!(s.tombstone("app", "sha256:x").unwrap(), Some(st(40, "a")));
        assert_eq!(s.max_hlc().unwrap(), Some(Hlc { ms: 40, n: 0 }));
        // The deletes a backfill sends: the manifest's and the tag's; a tag that is
        // there is not one.
        s.offer_tag("app", "v2", &st(5, "b"), Some("sha256:b"))
            .unwrap();
        let gone = s.deletes().unwrap();
        assert_eq!(
            gone,
            [
                Gone {
                    repo: "app".into(),
                    tag: None,
                    digest: Some("sha256:x".into()),
                    stamp: st(40, "a"),
                },
                Gone {
                    repo: "app".into(),
                    tag: Some("v1".into()),
                    digest: None,
                    stamp: st(30, "a"),
                },
            ]
        );
        // Past their keep, deleted tags' clocks go (by clock time, here 30 ms after the
        // epoch) and tombstones (by when they were made, now); a tag that is there stays.
        assert_eq!(s.prune_deletes(1).unwrap(), 1);
        assert_eq!(s.deletes().unwrap(), gone[..1]);
        assert!(s.tag_clock("app", "v2").unwrap().is_some());
        assert_eq!(s.prune_deletes(i64::MAX / 1000).unwrap(), 1);
        assert!(s.deletes().unwrap().is_empty());
    }

    #[test]
    fn deleted_settings_clocks_outlive_every_prune_and_a_join_starts_afresh() {
        let d = tempfile::tempdir().unwrap();
        let s = ReplicationStore::open(d.path()).unwrap();
        let clock = |name: &str, ms: u64, deleted: bool| ConfigClock {
            kind: "token".into(),
            name: name.into(),
            fingerprint: if deleted { String::new() } else { "f".into() },
            stamp: st(ms, "a"),
            deleted,
        };
        // A token revoked long ago: its delete stays, so an old copy never wins back.
        s.set_config_clock(&clock("revoked", 10_000, true)).unwrap();
        s.set_config_clock(&clock("kept", 1, false)).unwrap();
        s.prune_deletes(i64::MAX / 1000).unwrap();
        let names = |s: &ReplicationStore| {
            s.config_clocks()
                .unwrap()
                .into_iter()
                .map(|c| (c.name, c.stamp))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(&s),
            [
                ("kept".into(), st(1, "a")),
                ("revoked".into(), st(10_000, "a"))
            ]
        );
        // A join replaces them all.
        s.reset_config_clocks(&[clock("mine", 0, false)]).unwrap();
        assert_eq!(names(&s), [("mine".into(), st(0, "a"))]);
    }

    #[test]
    fn members_keep_their_cursor_and_backfill() {
        let d = tempfile::tempdir().unwrap();
        let s = ReplicationStore::open(d.path()).unwrap();
        assert!(s.group().unwrap().is_none());
        let me = Member {
            name: "home".into(),
            url: "http://127.0.0.1:1".into(),
            region_endpoint_enabled: true,
        };
        s.set_group(
            &Group {
                me: me.clone(),
                secret: "s".into(),
                created: 0,
                version: String::new(),
                previous_secret: None,
            },
            7,
        )
        .unwrap();
        assert_eq!(s.indexed().unwrap(), 7);
        let west = Member {
            name: "west".into(),
            ..me.clone()
        };
        s.add_member(&west, 7).unwrap();
        s.set_cursor("west", 9).unwrap();
        s.set_cursor("west", 8).unwrap();
        s.set_backfill("west", 2, 3, Some(("app", "sha256:b")), false)
            .unwrap();
        let m = s.member("west").unwrap().unwrap();
        assert_eq!(m.backfill_after, Some(("app".into(), "sha256:b".into())));
        s.set_backfill("west", 3, 3, None, true).unwrap();
        let m = s.member("west").unwrap().unwrap();
        assert_eq!((m.cursor, m.backfill_done, m.backfilled), (9, 3, true));
        s.leave().unwrap();
        assert!(s.group().unwrap().is_none() && s.members().unwrap().is_empty());
    }
}
