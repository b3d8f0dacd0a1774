//! The routes other members call (with the group's secret), and the gate in front of
//! the registry while this server's region endpoint is disabled.

use std::sync::Arc;

use super::*;

impl Replication {
    /// The group's secret, if `headers` carry it (compared in constant time).
    pub(super) async fn peer(&self, headers: &HeaderMap, from: &str) -> Result<Member, Response> {
        use subtle::ConstantTimeEq;
        let denied = |m: &str| {
            (
                StatusCode::UNAUTHORIZED,
                Json(serde_json::json!({"error": m})),
            )
                .into_response()
        };
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let (g, m) = {
            let f = from.to_string();
            self.db(move |s| Ok((s.group()?, s.member(&f)?)))
                .await
                .map_err(|e| refusal(&e))?
        };
        let Some(g) = g else {
            return Err(denied("this server is in no replication group"));
        };
        if !bool::from(given.as_bytes().ct_eq(g.secret.as_bytes())) {
            return Err(denied("wrong replication credential"));
        }
        match m {
            Some(m) => Ok(m.member),
            None => Err((
                StatusCode::FORBIDDEN,
                Json(serde_json::json!({"error": format!("{from:?} is not a member of this server's group")})),
            )
                .into_response()),
        }
    }
}

/// The routes other members call, each with the group's secret.
pub fn peer_router(r: Arc<Replication>) -> Router {
    Router::new()
        .route("/acr-task/replication/v1/events", post(events))
        .route("/acr-task/replication/v1/members", post(members))
        .route("/acr-task/replication/v1/config", post(config))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_PEER_BODY))
        // The secret is checked before any body is read: an outsider gets nothing parsed.
        .route_layer(axum::middleware::from_fn_with_state(r.clone(), peer_gate))
        .with_state(r)
}

/// In front of the peer routes: 404 while this server is in no group, 401 without the
/// group's secret (constant-time compare).
async fn peer_gate(
    State(r): State<Arc<Replication>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use subtle::ConstantTimeEq;
    let secret = r.secret.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(secret) = secret else {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "this server is in no replication group"})),
        )
            .into_response();
    };
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !bool::from(given.as_bytes().ct_eq(secret.as_bytes())) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"error": "wrong replication credential"})),
        )
            .into_response();
    }
    next.run(req).await
}

async fn events(
    State(r): State<Arc<Replication>>,
    headers: HeaderMap,
    Json(b): Json<Batch>,
) -> Response {
    let from = match r.peer(&headers, &b.from).await {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    match r.apply_batch(&from, b.events).await {
        Ok(n) => Json(serde_json::json!({ "applied": n })).into_response(),
        Err(e) => {
            tracing::warn!(from = %from.name, error = %e, "applying replicated changes");
            refusal(&e)
        }
    }
}

async fn members(
    State(r): State<Arc<Replication>>,
    headers: HeaderMap,
    Json(b): Json<Members>,
) -> Response {
    if let Err(resp) = r.peer(&headers, &b.from).await {
        return resp;
    }
    let done = async {
        let g = r.db(|s| s.group()).await?;
        let Some(mut g) = g else { return Ok(()) };
        if b.version <= g.version {
            return Ok(()); // what it knows already, or older
        }
        let Some(me) = b.members.iter().find(|m| m.name == g.me.name) else {
            // Removed from the group.
            r.db(|s| s.leave()).await?;
            r.follow(None);
            return r.clone().spawn_senders().await;
        };
        g.me.region_endpoint_enabled = me.region_endpoint_enabled;
        g.version = b.version.clone();
        if !b.secret.is_empty() && b.secret != g.secret {
            g.previous_secret = Some(std::mem::replace(&mut g.secret, b.secret.clone()));
        }
        let last = r.registry.last_event_seq().await.unwrap_or(0);
        let list = b.members.clone();
        r.follow(Some(&g));
        r.db(move |s| {
            let indexed = s.indexed()?;
            s.set_group(&g, indexed)?;
            for m in s.members()? {
                if !list.iter().any(|l| l.name == m.member.name) {
                    s.remove_member(&m.member.name)?;
                }
            }
            for m in list.iter().filter(|m| m.name != g.me.name) {
                s.add_member(m, last)?;
            }
            Ok(())
        })
        .await?;
        r.clone().spawn_senders().await
    }
    .await;
    match done {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => refusal(&e),
    }
}

/// In front of the registry's routes (`/v2/`, ACR's `/acr/v1/`): while this server's region endpoint is
/// disabled it serves the other replicas only (their pull login, by basic credentials or
/// a bearer token issued to it); a client gets 503 saying so. A request with no
/// credentials is challenged, so a replica's client answers with its login.
pub async fn endpoint_gate(
    State(r): State<Arc<Replication>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !r.endpoint_off.load(std::sync::atomic::Ordering::Relaxed)
        || !(req.uri().path().starts_with("/v2") || req.uri().path().starts_with("/acr/"))
    {
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let peer = if let Some(token) = header.strip_prefix("Bearer ") {
        r.auth
            .verify(token)
            .is_ok_and(|c| c.sub == REPLICATION_USER)
    } else if let Some(b) = header.strip_prefix("Basic ") {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
            .and_then(|up| {
                let (u, p) = up.split_once(':')?;
                Some(u == REPLICATION_USER && r.auth.is_replication_secret(p))
            })
            .unwrap_or(false)
    } else {
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Basic realm=\"acr-task replica\"")],
            Json(serde_json::json!({"errors": [{"code": "UNAUTHORIZED",
                "message": "authentication required", "detail": null}]})),
        )
            .into_response();
    };
    if peer {
        return next.run(req).await;
    }
    let name = r
        .region
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(
            serde_json::json!({"errors": [{"code": "UNAVAILABLE", "message": format!(
            "this replica ({name}) does not serve clients: its region endpoint is disabled; \
             use another replica of the registry, or `acr-task replication update {name} \
             --region-endpoint-enabled true`"), "detail": null}]}),
        ),
    )
        .into_response()
}

async fn config(
    State(r): State<Arc<Replication>>,
    headers: HeaderMap,
    Json(b): Json<ConfigBatch>,
) -> Response {
    let from = match r.peer(&headers, &b.from).await {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    let _one = r.apply.lock().await;
    let me = r
        .region
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default();
    let done = r
        .on_settings(move |at, rs| crate::replication::config::apply(at, rs, &me, b.items))
        .await;
    match done {
        Ok(n) => {
            if n > 0 {
                // What a member sent goes on to the others (one may not reach another).
                r.settings_moved();
            }
            Json(serde_json::json!({ "applied": n })).into_response()
        }
        Err(e) => {
            tracing::warn!(from = %from.name, error = %e, "applying replicated settings");
            refusal(&e)
        }
    }
}
