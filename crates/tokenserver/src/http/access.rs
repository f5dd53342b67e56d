//! The v1 access-token API on the internal listener, under `/v1/services/{service_id}/…`: JSON,
//! the v1 error envelope, `access.api_key`. apisonator's own routes are in [`super::apisonator`].
//!
//! | route | answer |
//! |---|---|
//! | `POST …/tokens` `{token?, app_id, user_id?, ttl?}` | 201, the token |
//! | `GET …/tokens/{token}` | `{app_id, user_id, expires_at}` |
//! | `DELETE …/tokens/{token}` | 204 |
//! | `DELETE …/tokens` | `{revoked}`: every token of the service |
//! | `GET …/applications/{app_id}/tokens?user_id&limit&cursor` | `{tokens, next_cursor}` |
//! | `DELETE …/applications/{app_id}/tokens` | `{revoked}` |
//! | `POST …/authorize` `{access_token?, app_id?, user_id?}` | `{app_id, user_id}` |

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokenserver_core::access::Named;
use tokenserver_store::access::AccessToken;

use crate::access::{AccessTokens, CreateRequest};
use crate::http::error::ApiError;
use crate::http::extract::V1Path;
use crate::http::guard::{Guarded, Keyed};
use crate::http::json::{push_json_str, rfc3339_memo, Rfc3339, V1Json};
use crate::state::AppState;

/// The v1 routes, when access tokens are enabled.
pub fn router(state: &AppState) -> Option<Router<AppState>> {
    let tokens = state.access.clone()?;
    let router = Router::new()
        .route("/v1/services/{service}/tokens", post(create).delete(revoke_service))
        .route("/v1/services/{service}/tokens/{token}", get(read).delete(remove))
        .route("/v1/services/{service}/applications/{app}/tokens", get(list).delete(revoke_app))
        .route("/v1/services/{service}/authorize", post(authorize))
        .with_state(Guarded::new(tokens, state.access_access.clone(), "access.api_key", None));
    Some(Router::new().merge(router))
}

/// The service, handed to a handler once `access.api_key` is checked.
type Access = Keyed<Arc<AccessTokens>>;

/// A token as the v1 API (and the CLI) shows it: `{token, app_id, user_id, expires_at,
/// created_at}`, times RFC 3339, `expires_at` `null` when permanent. Serialized straight from the
/// stored record (a page holds up to a thousand of them: no `serde_json::Value` in between).
#[derive(Debug, Serialize)]
pub struct TokenView<'a> {
    token: &'a str,
    app_id: &'a str,
    user_id: Option<&'a str>,
    expires_at: Option<Rfc3339>,
    created_at: Rfc3339,
}

impl<'a> TokenView<'a> {
    /// The view of `t`.
    pub fn of(t: &'a AccessToken) -> Self {
        Self {
            token: &t.token,
            app_id: &t.grant.app_id,
            user_id: t.grant.user_id.as_deref(),
            expires_at: t.grant.expires_at.map(Rfc3339),
            created_at: Rfc3339(t.created_at),
        }
    }
}

/// One token read by its text: `{app_id, user_id, expires_at}`.
#[derive(Serialize)]
struct GrantView<'a> {
    app_id: &'a str,
    user_id: Option<&'a str>,
    expires_at: Option<Rfc3339>,
}

/// A page of a listing as `{"tokens":[…],"next_cursor":…}`: byte for byte what `serde_json`
/// makes of `{tokens: [TokenView], next_cursor}`, written directly (the keys are fixed text and
/// the times plain digits; through serde, escaping each key and value was a fifth of a page's
/// instructions: bench/results/access-sqlite.md).
fn page_json(tokens: &[AccessToken], next_cursor: Option<&str>) -> Vec<u8> {
    fn time(buf: &mut Vec<u8>, ms: u64) {
        buf.push(b'"');
        buf.extend_from_slice(&rfc3339_memo(ms));
        buf.push(b'"');
    }
    fn or_null<T>(buf: &mut Vec<u8>, value: Option<T>, write: impl FnOnce(&mut Vec<u8>, T)) {
        match value {
            Some(v) => write(buf, v),
            None => buf.extend_from_slice(b"null"),
        }
    }
    // ~130 bytes a token with short ids; a longer page grows the buffer once or twice.
    let mut buf = Vec::with_capacity(64 + 160 * tokens.len());
    buf.extend_from_slice(b"{\"tokens\":[");
    for (i, t) in tokens.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(b"{\"token\":");
        push_json_str(&mut buf, &t.token);
        buf.extend_from_slice(b",\"app_id\":");
        push_json_str(&mut buf, &t.grant.app_id);
        buf.extend_from_slice(b",\"user_id\":");
        or_null(&mut buf, t.grant.user_id.as_deref(), push_json_str);
        buf.extend_from_slice(b",\"expires_at\":");
        or_null(&mut buf, t.grant.expires_at, time);
        buf.extend_from_slice(b",\"created_at\":");
        time(&mut buf, t.created_at);
        buf.push(b'}');
    }
    buf.extend_from_slice(b"],\"next_cursor\":");
    or_null(&mut buf, next_cursor, push_json_str);
    buf.push(b'}');
    buf
}

/// Who a call is.
#[derive(Serialize)]
struct WhoView<'a> {
    app_id: &'a str,
    user_id: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    token: Option<String>,
    app_id: String,
    user_id: Option<String>,
    /// Seconds; absent: `access.default_ttl`; 0: permanent.
    ttl: Option<u64>,
}

async fn create(
    Keyed(access): Access,
    V1Path(service): V1Path<String>,
    V1Json(body): V1Json<CreateBody>,
) -> Result<Response, ApiError> {
    let req = CreateRequest {
        token: body.token.as_deref(),
        app_id: &body.app_id,
        user_id: body.user_id.as_deref(),
        ttl_s: body.ttl,
    };
    let created = access.create(&service, &req).await?;
    Ok((StatusCode::CREATED, Json(TokenView::of(&created))).into_response())
}

async fn read(Keyed(access): Access, V1Path((service, token)): V1Path<(String, String)>) -> Result<Response, ApiError> {
    let t = access.get(&service, &token).await?;
    let g = &t.grant;
    let view = GrantView { app_id: &g.app_id, user_id: g.user_id.as_deref(), expires_at: g.expires_at.map(Rfc3339) };
    Ok(Json(view).into_response())
}

async fn remove(
    Keyed(access): Access,
    V1Path((service, token)): V1Path<(String, String)>,
) -> Result<Response, ApiError> {
    access.delete(&service, &token).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    user_id: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list(
    Keyed(access): Access,
    V1Path((service, app)): V1Path<(String, String)>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query
        .map_err(|_| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_limit", "limit must be a number"))?;
    let user = q.user_id.as_deref().filter(|u| !u.is_empty());
    let page = access.list(&service, &app, user, q.cursor.as_deref(), q.limit).await?;
    let body = page_json(&page.tokens, page.next.as_deref());
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn revoke_app(
    Keyed(access): Access,
    V1Path((service, app)): V1Path<(String, String)>,
) -> Result<Response, ApiError> {
    let revoked = access.revoke_app(&service, &app).await?;
    Ok(Json(json!({ "revoked": revoked })).into_response())
}

async fn revoke_service(Keyed(access): Access, V1Path(service): V1Path<String>) -> Result<Response, ApiError> {
    let revoked = access.revoke_service(&service).await?;
    Ok(Json(json!({ "revoked": revoked })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizeBody {
    access_token: Option<String>,
    app_id: Option<String>,
    user_id: Option<String>,
}

async fn authorize(
    Keyed(access): Access,
    V1Path(service): V1Path<String>,
    V1Json(body): V1Json<AuthorizeBody>,
) -> Result<Response, ApiError> {
    let named = Named::new(body.access_token.as_deref(), body.app_id.as_deref(), body.user_id.as_deref());
    let who = access.authorize(&service, &named).await?;
    Ok(Json(WhoView { app_id: &who.app_id, user_id: who.user_id.as_deref() }).into_response())
}

#[cfg(test)]
mod tests {
    use tokenserver_core::access::Grant;

    use super::*;

    /// The reference: what serde makes of the same page.
    #[derive(Serialize)]
    struct PageView<'a> {
        tokens: Vec<TokenView<'a>>,
        next_cursor: Option<&'a str>,
    }

    #[test]
    fn a_page_is_written_exactly_as_serde_json_writes_it() {
        let token = |token: &str, app: &str, user: Option<&str>, expires: Option<u64>, created: u64| AccessToken {
            token: token.into(),
            grant: Grant { app_id: app.into(), user_id: user.map(Into::into), expires_at: expires },
            created_at: created,
        };
        let odd: String = (0u8..0x30).map(char::from).chain("\"\\/ü€😀\u{7f}".chars()).collect();
        let tokens = [
            token("big-000000001", "big", None, Some(1_764_000_000_123), 1_763_999_999_999),
            token("tok \"quoted\" \\ back", "app\n1", Some("user\t1"), None, 0),
            token(&odd, &odd, Some(&odd), Some(u64::MAX), u64::MAX),
            token("ü/β", "2001", Some(""), Some(951_782_400_999), 951_782_400_999),
        ];
        for (page, next) in [
            (&tokens[..], Some("00000190a2b3c4d5\"x")),
            (&tokens[..1], None),
            (&tokens[..0], None),
            (&tokens[2..], Some(odd.as_str())),
        ] {
            let view = PageView { tokens: page.iter().map(TokenView::of).collect(), next_cursor: next };
            let want = serde_json::to_string(&view).unwrap();
            assert_eq!(String::from_utf8(page_json(page, next)).unwrap(), want);
        }
    }
}
