//! 3scale apisonator's access-token routes, unchanged for its clients (reference §6): form
//! parameters, `provider_key` / `service_token` authentication against the keys configured per
//! service (`[access.services."<id>"]`), XML bodies and `<error code="…">` errors, and apisonator's
//! order of checks (content type, required parameters, authentication, application, storage).
//!
//! Deliberate differences, each documented in docs/access-tokens.md: the listing pages (an
//! optional `cursor`, a `next_cursor` attribute while more remain, never more than one page);
//! "already exists" is still 403 here (as apisonator) but 409 in the v1 API; applications are
//! not registered anywhere, so listing an application without tokens is an empty list rather
//! than `application_not_found`; a read of a user's token nests `<user><user_id>` inside
//! `<application>` (apisonator 2.94 wrote a second root element).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokenserver_core::access::{parse_ttl, FormatError};
use tokenserver_core::clock::now_ms;

use crate::access::{AccessError, AccessTokens, CreateRequest};
use crate::keys::BearerKey;
use crate::state::AppState;

/// apisonator's content type, on every answer.
const XML: &str = "application/vnd.3scale-v2.0+xml";

/// The keys one service accepts.
#[derive(Debug, Clone, Default)]
pub struct ServiceKeys {
    provider_key: Option<BearerKey>,
    service_tokens: Vec<BearerKey>,
}

/// What the routes need.
#[derive(Clone)]
pub struct ApisonatorState {
    access: Arc<AccessTokens>,
    services: Arc<HashMap<String, ServiceKeys>>,
}

/// The routes, when access tokens are enabled.
pub fn router(state: &AppState) -> Option<Router<AppState>> {
    let access = state.access.clone()?;
    let services = access
        .config()
        .services
        .iter()
        .map(|(id, keys)| {
            let keys = ServiceKeys {
                provider_key: keys.provider_key.as_ref().map(|k| BearerKey::new(k.expose())),
                service_tokens: keys.service_tokens.iter().map(|k| BearerKey::new(k.expose())).collect(),
            };
            (id.clone(), keys)
        })
        .collect();
    // Nested, so that the fallback covers every other path under /services (matchit cannot
    // hold a catch-all beside these routes); each route's own fallback answers other methods
    // (OPTIONS: the pre-flight; the rest: the empty 404 apisonator gives for unknown routes).
    let routes = Router::new()
        .route("/{service}/oauth_access_tokens.xml", post(create).fallback(unknown_or_preflight))
        .route("/{service}/oauth_access_tokens/{token}", get(read).delete(remove).fallback(unknown_or_preflight))
        .route("/{service}/applications/{app}/oauth_access_tokens.xml", get(list).fallback(unknown_or_preflight))
        .fallback(unknown_or_preflight)
        .with_state(ApisonatorState { access, services: Arc::new(services) });
    Some(Router::new().nest("/services", routes))
}

/// One of apisonator's errors: its `code`, status and message.
#[derive(Debug)]
struct XmlError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

fn err(status: StatusCode, code: &'static str, message: impl Into<String>) -> XmlError {
    XmlError { status, code, message: message.into() }
}

/// `&`, `<` and `>` escaped (quotes are left as they are, as apisonator's Builder does in text).
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Attribute values also escape `"`.
fn escape_attr(text: &str) -> String {
    escape(text).replace('"', "&quot;")
}

/// The answer's headers: the content type and CORS.
fn xml_response(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(XML));
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    resp
}

/// Request parameters: the query string, then (POST) the form body; a later value wins.
#[derive(Debug, Default)]
struct Params {
    values: HashMap<String, String>,
    /// Names sent as arrays or hashes (`token[]=…`, `token[a]=…`).
    structured: Vec<String>,
    /// apisonator's `no_body`: answer with an empty body.
    no_body: bool,
}

impl Params {
    fn add(&mut self, pairs: Vec<(String, String)>) {
        for (name, value) in pairs {
            match name.split_once('[') {
                Some((base, _)) => self.structured.push(base.to_string()),
                None => {
                    if name == "no_body" {
                        self.no_body = true;
                    }
                    self.values.insert(name, value);
                }
            }
        }
    }

    /// A parameter's value, `None` when absent or blank.
    fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str).filter(|v| !v.trim().is_empty())
    }

    /// A parameter's value as sent, even blank.
    fn raw(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    fn structured(&self, name: &str) -> bool {
        self.structured.iter().any(|n| n == name)
    }
}

fn parse_pairs(text: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(text).unwrap_or_default()
}

/// A request as the routes read it.
struct Call {
    params: Params,
}

impl Call {
    /// Reads the query and, for a form body, the form. `Err` for a content type apisonator refuses.
    fn read(headers: &HeaderMap, query: Option<&str>, body: Option<&Bytes>) -> Result<Self, (XmlError, bool)> {
        let mut params = Params::default();
        params.add(parse_pairs(query.unwrap_or("")));
        if let Some(options) = headers.get("3scale-options").and_then(|v| v.to_str().ok()) {
            if options.split(['&', ';', ',']).any(|o| o.trim() == "no_body=1" || o.trim() == "no_body=true") {
                params.no_body = true;
            }
        }
        if let Some(body) = body {
            let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            match essence.as_str() {
                "" | "application/x-www-form-urlencoded" => {
                    params.add(parse_pairs(&String::from_utf8_lossy(body)));
                }
                "multipart/form-data" => params.add(multipart_fields(ct, body)),
                _ => {
                    let e = err(StatusCode::BAD_REQUEST, "content_type_invalid", format!("invalid Content-Type: {ct}"));
                    return Err((e, params.no_body));
                }
            }
        }
        Ok(Self { params })
    }

    /// A 200 with `body`, or with none when the caller asked for `no_body`.
    fn ok(&self, body: String) -> Response {
        xml_response(StatusCode::OK, if self.params.no_body { String::new() } else { body })
    }

    /// apisonator's `ensure_authenticated!`: the provider key, when given, must own the service
    /// (and wins over a service token); otherwise a service token of the service is needed.
    fn authenticate(&self, state: &ApisonatorState, service: &str) -> Result<(), XmlError> {
        let keys = state.services.get(service);
        let presented = |k: &str| {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer {k}")) {
                h.insert(header::AUTHORIZATION, v);
            }
            h
        };
        if let Some(provider_key) = self.params.get("provider_key") {
            let owns = keys.and_then(|k| k.provider_key.as_ref()).is_some_and(|k| k.matches(&presented(provider_key)));
            if owns {
                return Ok(());
            }
            return Err(err(
                StatusCode::FORBIDDEN,
                "provider_key_invalid",
                format!("provider key \"{provider_key}\" is invalid"),
            ));
        }
        let Some(token) = self.params.get("service_token") else {
            return Err(err(
                StatusCode::FORBIDDEN,
                "provider_key_or_service_token_required",
                "Provider key or service token are required",
            ));
        };
        let headers = presented(token);
        if keys.is_some_and(|k| k.service_tokens.iter().any(|t| t.matches(&headers))) {
            return Ok(());
        }
        Err(err(
            StatusCode::FORBIDDEN,
            "service_token_invalid",
            format!("service token \"{token}\" or service id \"{service}\" is invalid"),
        ))
    }
}

fn render_error(e: &XmlError, no_body: bool) -> Response {
    let body = if no_body {
        String::new()
    } else {
        format!(r#"<?xml version="1.0" encoding="UTF-8"?><error code="{}">{}</error>"#, e.code, escape(&e.message))
    };
    xml_response(e.status, body)
}

/// A multipart form's text fields (files are not parameters here).
fn multipart_fields(content_type: &str, body: &Bytes) -> Vec<(String, String)> {
    let Some(boundary) =
        content_type.split(';').map(str::trim).find_map(|p| p.strip_prefix("boundary=")).map(|b| b.trim_matches('"'))
    else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(body);
    let delimiter = format!("--{boundary}");
    let mut fields = Vec::new();
    for part in text.split(delimiter.as_str()).skip(1) {
        if part.starts_with("--") {
            break;
        }
        let Some((head, value)) = part.split_once("\r\n\r\n") else { continue };
        let name = head
            .split("\r\n")
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))
            .and_then(|l| l.split(';').map(str::trim).find_map(|p| p.strip_prefix("name=")))
            .map(|n| n.trim_matches('"').to_string());
        if let Some(name) = name {
            fields.push((name, value.strip_suffix("\r\n").unwrap_or(value).to_string()));
        }
    }
    fields
}

/// The storage's errors, as apisonator names them.
fn access_error(e: AccessError) -> XmlError {
    let message = e.to_string();
    match e {
        AccessError::Format(_) => err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "access_token_format_invalid",
            "token is either too big or has an invalid format",
        ),
        AccessError::Ttl(_) => err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "access_token_invalid_ttl",
            "the specified TTL should be a positive integer",
        ),
        AccessError::AlreadyExists(_) => err(StatusCode::FORBIDDEN, "access_token_already_exists", message),
        AccessError::NotFound(_) => err(StatusCode::NOT_FOUND, "access_token_invalid", message),
        AccessError::Id { which: "app_id", .. } => {
            err(StatusCode::NOT_FOUND, "application_not_found", "application with id=\"\" was not found")
        }
        AccessError::Id { .. } => err(StatusCode::UNPROCESSABLE_ENTITY, "invalid_id", message),
        AccessError::InvalidLimit => err(StatusCode::UNPROCESSABLE_ENTITY, "invalid_limit", message),
        AccessError::Store(tokenserver_store::StoreError::InvalidInput(m)) => {
            err(StatusCode::UNPROCESSABLE_ENTITY, "invalid_cursor", m)
        }
        AccessError::Authorize(_) | AccessError::Store(_) => {
            tracing::warn!(error = %message, "access-token store failed");
            err(StatusCode::SERVICE_UNAVAILABLE, "access_token_storage_error", "the access-token store is unavailable")
        }
    }
}

/// What every route does around its own steps: read the parameters (a refused content type is
/// answered at once), run the route, and render its error as apisonator does.
async fn respond(
    headers: &HeaderMap,
    query: Option<&str>,
    body: Option<&Bytes>,
    route: impl AsyncFnOnce(&Call) -> Result<Response, XmlError>,
) -> Response {
    let call = match Call::read(headers, query, body) {
        Ok(call) => call,
        Err((e, no_body)) => return render_error(&e, no_body),
    };
    match route(&call).await {
        Ok(resp) => resp,
        Err(e) => render_error(&e, call.params.no_body),
    }
}

/// A form body over the internal listener's limit ([`crate::http::MAX_BODY_BYTES`], whether its
/// size is announced or found while reading), or one that could not be read, answered as
/// apisonator answers its own errors (it had no limit: the code is the v1 API's), so a client
/// that reads `<error code>` reads this one too.
fn body_refused(headers: &HeaderMap, query: Option<&str>, refused: &BytesRejection) -> Response {
    let code = if refused.status() == StatusCode::PAYLOAD_TOO_LARGE { "body_too_large" } else { "bad_request" };
    let no_body = Call::read(headers, query, None).is_ok_and(|call| call.params.no_body);
    render_error(&err(refused.status(), code, refused.body_text()), no_body)
}

/// `hello.xml.xml.xml` → `hello.xml.xml`; a path without `.xml` is no route.
fn peel_xml(segment: &str) -> Option<&str> {
    segment.strip_suffix(".xml").filter(|t| !t.is_empty())
}

async fn create(
    State(state): State<ApisonatorState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Ok(Path(service)) = path else { return unknown().await };
    let body = match body {
        Ok(body) => body,
        Err(refused) => return body_refused(&headers, query.as_deref(), &refused),
    };
    respond(&headers, query.as_deref(), Some(&body), async |call: &Call| {
        let p = &call.params;
        if p.get("token").is_none() && !p.structured("token") {
            return Err(err(
                StatusCode::UNPROCESSABLE_ENTITY,
                "required_params_missing",
                "missing required parameters",
            ));
        }
        call.authenticate(&state, &service)?;
        let Some(app_id) = p.get("app_id") else {
            return Err(err(StatusCode::NOT_FOUND, "application_not_found", "application with id=\"\" was not found"));
        };
        if p.structured("token") && p.raw("token").is_none() {
            return Err(access_error(AccessError::Format(FormatError::Empty)));
        }
        let token = p.raw("token").unwrap_or_default();
        state.access.check_token(token).map_err(access_error)?;
        let ttl_s = parse_ttl(p.raw("ttl")).map_err(|e| access_error(AccessError::Ttl(e)))?;
        let req = CreateRequest { token: Some(token), app_id, user_id: p.get("user_id"), ttl_s };
        state.access.create(&service, &req).await.map_err(access_error)?;
        Ok(xml_response(StatusCode::OK, String::new()))
    })
    .await
}

async fn read(
    State(state): State<ApisonatorState>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Ok(Path((service, segment))) = path else { return unknown().await };
    let Some(token) = peel_xml(&segment) else { return unknown().await };
    respond(&headers, query.as_deref(), None, async |call: &Call| {
        call.authenticate(&state, &service)?;
        let t = state.access.get(&service, token).await.map_err(access_error)?;
        let user = t
            .grant
            .user_id
            .as_deref()
            .map(|u| format!("  <user>\n    <user_id>{}</user_id>\n  </user>\n", escape(u)))
            .unwrap_or_default();
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<application>\n  <app_id>{}</app_id>\n{user}</application>\n",
            escape(&t.grant.app_id)
        );
        Ok(call.ok(body))
    })
    .await
}

async fn remove(
    State(state): State<ApisonatorState>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Ok(Path((service, segment))) = path else { return unknown().await };
    let Some(token) = peel_xml(&segment) else { return unknown().await };
    respond(&headers, query.as_deref(), None, async |call: &Call| {
        call.authenticate(&state, &service)?;
        state.access.delete(&service, token).await.map_err(access_error)?;
        Ok(xml_response(StatusCode::OK, String::new()))
    })
    .await
}

async fn list(
    State(state): State<ApisonatorState>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Ok(Path((service, app))) = path else { return unknown().await };
    respond(&headers, query.as_deref(), None, async |call: &Call| {
        call.authenticate(&state, &service)?;
        let p = &call.params;
        let limit = match p.get("count").or(p.get("limit")) {
            Some(n) => Some(n.trim().parse().map_err(|_| access_error(AccessError::InvalidLimit))?),
            None => None,
        };
        let page =
            state.access.list(&service, &app, p.get("user_id"), p.get("cursor"), limit).await.map_err(access_error)?;
        let now = now_ms();
        let mut body = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<oauth_access_tokens");
        if let Some(next) = &page.next {
            body.push_str(&format!(" next_cursor=\"{}\"", escape_attr(next)));
        }
        body.push_str(">\n");
        for t in &page.tokens {
            // Whole seconds remaining, rounded up (so a live token never shows 0); -1 permanent.
            let ttl = t
                .grant
                .expires_at
                .map_or(-1, |e| i64::try_from(e.saturating_sub(now).div_ceil(1000)).unwrap_or(i64::MAX));
            let user =
                t.grant.user_id.as_deref().map(|u| format!(" user_id=\"{}\"", escape_attr(u))).unwrap_or_default();
            body.push_str(&format!(
                "  <oauth_access_token ttl=\"{ttl}\"{user}>{}</oauth_access_token>\n",
                escape(&t.token)
            ));
        }
        body.push_str("</oauth_access_tokens>\n");
        Ok(call.ok(body))
    })
    .await
}

/// `OPTIONS`: CORS pre-flight.
async fn preflight() -> Response {
    let mut resp = xml_response(StatusCode::NO_CONTENT, String::new());
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, DELETE, OPTIONS"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("Content-Type, 3scale-options"));
    resp
}

/// Other paths under `/services/`: apisonator's empty 404 (an `OPTIONS` is still a pre-flight).
async fn unknown_or_preflight(method: Method) -> Response {
    if method == Method::OPTIONS {
        return preflight().await;
    }
    unknown().await
}

/// No such route; also a path segment that does not decode (percent-encoded bytes that are not
/// UTF-8), which names nothing.
async fn unknown() -> Response {
    xml_response(StatusCode::NOT_FOUND, String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_text_is_escaped_like_builders() {
        assert_eq!(escape(r#"a & <b> "c""#), r#"a &amp; &lt;b&gt; "c""#);
        assert_eq!(escape_attr(r#"a"b"#), "a&quot;b");
    }

    #[test]
    fn the_last_xml_suffix_is_peeled() {
        assert_eq!(peel_xml("hello.xml.xml.xml"), Some("hello.xml.xml"));
        assert_eq!(peel_xml("tok.xml"), Some("tok"));
        assert_eq!(peel_xml("tok"), None);
        assert_eq!(peel_xml(".xml"), None);
    }

    #[test]
    fn form_parameters_and_structured_ones() {
        let mut p = Params::default();
        p.add(parse_pairs("token%5B%5D=x&app_id=a&ttl=&no_body=1"));
        assert!(p.structured("token") && p.raw("token").is_none());
        assert_eq!((p.get("app_id"), p.raw("ttl"), p.get("ttl")), (Some("a"), Some(""), None));
        assert!(p.no_body);
        let body = Bytes::from_static(b"--XYZ\r\nContent-Disposition: form-data; name=\"token\"\r\n\r\nabc\r\n--XYZ\r\nContent-Disposition: form-data; name=\"app_id\"\r\n\r\n2001\r\n--XYZ--\r\n");
        assert_eq!(
            multipart_fields("multipart/form-data; boundary=XYZ", &body),
            [("token".to_string(), "abc".to_string()), ("app_id".to_string(), "2001".to_string())]
        );
    }
}
