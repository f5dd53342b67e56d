//! Access tokens over HTTP, black box: apisonator's four routes case by case (reference §6 and
//! the acceptance cases of §10.1), the v1 API route by route, the precedence rule of §7, and the
//! same flow on every backend.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokenserver_store::testing::fresh;
use tokenserver_store::Backend;

use crate::common::{chunked_request, Response, TestServer};

const SVC: &str = "svc1";
const PK: &str = "pk-1";
const ST: &str = "st-1";
const XML: &str = "application/vnd.3scale-v2.0+xml";

/// Keys of two services: svc1 (a provider key and a service token), svc2 (another provider key).
const KEYS: [(&str, &str); 3] = [
    ("TOKENSERVER_ACCESS__SERVICES__SVC1__PROVIDER_KEY", PK),
    ("TOKENSERVER_ACCESS__SERVICES__SVC1__SERVICE_TOKENS", ST),
    ("TOKENSERVER_ACCESS__SERVICES__SVC2__PROVIDER_KEY", "pk-2"),
];

async fn server(extra: &[(&str, &str)]) -> TestServer {
    let mut env: Vec<(&str, &str)> = KEYS.to_vec();
    env.extend_from_slice(extra);
    TestServer::start(&env).await
}

fn encode(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap()
}

async fn respond(req: reqwest::RequestBuilder) -> Response {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap();
    Response { status, headers, body }
}

/// apisonator's routes: `query` in the URL, `form` (POST) as an urlencoded body.
async fn xml(
    s: &TestServer,
    method: &str,
    path: &str,
    query: &[(&str, &str)],
    form: Option<&[(&str, &str)]>,
) -> Response {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut url = format!("{}{path}", s.internal);
    if !query.is_empty() {
        url = format!("{url}?{}", encode(query));
    }
    let mut req = s.http.request(method, url);
    if let Some(form) = form {
        req = req.header("content-type", "application/x-www-form-urlencoded").body(encode(form));
    }
    respond(req).await
}

async fn create(s: &TestServer, form: &[(&str, &str)]) -> Response {
    let mut all = vec![("provider_key", PK)];
    all.extend_from_slice(form);
    xml(s, "POST", &format!("/services/{SVC}/oauth_access_tokens.xml"), &[], Some(&all)).await
}

/// (ttl, user_id, token) of a listed token.
type Listed = (i64, Option<String>, String);
/// Form or query parameters.
type Params<'a> = &'a [(&'a str, &'a str)];

/// Each listed token, in the listing's order, and `next_cursor`.
fn parse_list(body: &str) -> (Vec<Listed>, Option<String>) {
    let attr = |tag: &str, name: &str| {
        tag.split(&format!(" {name}=\"")).nth(1).and_then(|rest| rest.split('"').next()).map(str::to_string)
    };
    let root = body.split("<oauth_access_tokens").nth(1).and_then(|r| r.split('>').next()).unwrap_or("");
    let next = attr(root, "next_cursor");
    let mut tokens = Vec::new();
    for item in body.split("<oauth_access_token ").skip(1) {
        let (tag, rest) = item.split_once('>').unwrap();
        let text = rest.split("</oauth_access_token>").next().unwrap();
        let ttl = attr(&format!(" {tag}"), "ttl").unwrap().parse().unwrap();
        tokens.push((
            ttl,
            attr(&format!(" {tag}"), "user_id"),
            text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"),
        ));
    }
    (tokens, next)
}

async fn list(s: &TestServer, app: &str, extra: &[(&str, &str)]) -> Response {
    let mut query = vec![("provider_key", PK)];
    query.extend_from_slice(extra);
    xml(s, "GET", &format!("/services/{SVC}/applications/{app}/oauth_access_tokens.xml"), &query, None).await
}

async fn listed(s: &TestServer, app: &str) -> Vec<Listed> {
    let r = list(s, app, &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    parse_list(&r.body).0
}

fn error_xml(code: &str, message: &str) -> String {
    format!(r#"<?xml version="1.0" encoding="UTF-8"?><error code="{code}">{message}</error>"#)
}

fn assert_xml_error(r: &Response, status: u16, code: &str, message: &str) {
    assert_eq!((r.status, r.body.as_str()), (status, error_xml(code, message).as_str()));
    assert_eq!(r.headers["content-type"], XML);
}

fn path_token(token: &str) -> String {
    url::form_urlencoded::byte_serialize(token.as_bytes()).collect::<String>().replace('+', "%20")
}

async fn read(s: &TestServer, token: &str) -> Response {
    let path = format!("/services/{SVC}/oauth_access_tokens/{}.xml", path_token(token));
    xml(s, "GET", &path, &[("provider_key", PK)], None).await
}

async fn delete(s: &TestServer, token: &str) -> Response {
    let path = format!("/services/{SVC}/oauth_access_tokens/{}.xml", path_token(token));
    xml(s, "DELETE", &path, &[("provider_key", PK)], None).await
}

#[tokio::test]
async fn apisonator_crud() {
    let s = server(&[]).await;
    let r = create(&s, &[("app_id", "2001"), ("token", "VALID-TOKEN"), ("ttl", "0")]).await;
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    assert_eq!(r.headers["content-type"], XML);
    assert_eq!(r.headers["access-control-allow-origin"], "*");
    assert_eq!(listed(&s, "2001").await, [(-1, None, "VALID-TOKEN".to_string())]);
    let r = read(&s, "VALID-TOKEN").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<application>\n  <app_id>2001</app_id>\n</application>\n"
    );
    let r = delete(&s, "VALID-TOKEN").await;
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    assert!(listed(&s, "2001").await.is_empty());
    assert_xml_error(
        &read(&s, "VALID-TOKEN").await,
        404,
        "access_token_invalid",
        r#"token "VALID-TOKEN" is invalid: expired or never defined"#,
    );
    assert_xml_error(
        &delete(&s, "VALID-TOKEN").await,
        404,
        "access_token_invalid",
        r#"token "VALID-TOKEN" is invalid: expired or never defined"#,
    );
    // An application with no tokens lists none (applications are not registered here).
    let r = list(&s, "no-such-app", &[]).await;
    assert_eq!(r.body, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<oauth_access_tokens>\n</oauth_access_tokens>\n");
    // No app_id: apisonator's ApplicationNotFound with an empty id.
    let r = create(&s, &[("token", "t")]).await;
    assert_xml_error(&r, 404, "application_not_found", r#"application with id="" was not found"#);
    s.finish().await;
}

#[tokio::test]
async fn apisonator_ttls() {
    let s = server(&[]).await;
    assert_eq!(create(&s, &[("app_id", "a"), ("token", "t1000"), ("ttl", "1000")]).await.status, 200);
    assert_eq!(create(&s, &[("app_id", "a"), ("token", "tdefault")]).await.status, 200);
    assert_eq!(create(&s, &[("app_id", "a"), ("token", "tone"), ("ttl", "1")]).await.status, 200);
    let tokens = listed(&s, "a").await;
    let ttl = |t: &str| tokens.iter().find(|(_, _, x)| x == t).unwrap().0;
    assert!((1..=1000).contains(&ttl("t1000")), "{tokens:?}");
    assert!((1000..=86_400).contains(&ttl("tdefault")), "absent: 24 h");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(!listed(&s, "a").await.iter().any(|(_, _, t)| t == "tone"), "expired after its second");
    // Re-created once expired; refused while live.
    let r = create(&s, &[("app_id", "b"), ("token", "t1000"), ("ttl", "10")]).await;
    assert_xml_error(&r, 403, "access_token_already_exists", r#"token "t1000" already exists"#);
    assert_eq!(create(&s, &[("app_id", "b"), ("token", "tone")]).await.status, 200);
    for bad in ["-666", "-1", "", " ", "80x", "x80", "adbc", "0x1A", "1.5"] {
        let r = create(&s, &[("app_id", "c"), ("token", "ttl-test"), ("ttl", bad)]).await;
        assert_xml_error(&r, 422, "access_token_invalid_ttl", "the specified TTL should be a positive integer");
    }
    assert!(listed(&s, "c").await.is_empty());
    s.finish().await;
}

#[tokio::test]
async fn apisonator_token_validation() {
    let s = server(&[]).await;
    for (form, code, message) in [
        (vec![("app_id", "a"), ("token", "")], "required_params_missing", "missing required parameters"),
        (vec![("app_id", "a")], "required_params_missing", "missing required parameters"),
        (
            vec![("app_id", "a"), ("token[]", "token")],
            "access_token_format_invalid",
            "token is either too big or has an invalid format",
        ),
        (
            vec![("app_id", "a"), ("token", " padded ")],
            "access_token_format_invalid",
            "token is either too big or has an invalid format",
        ),
    ] {
        let r = create(&s, &form).await;
        let status = if code == "required_params_missing" || code == "access_token_format_invalid" { 422 } else { 0 };
        assert_xml_error(&r, status, code, message);
    }
    let ascii = "Q".repeat(3583);
    for too_big in [format!("{ascii}AB"), format!("{ascii}β")] {
        let r = create(&s, &[("app_id", "a"), ("token", &too_big)]).await;
        assert_xml_error(&r, 422, "access_token_format_invalid", "token is either too big or has an invalid format");
    }
    let capitals = "C".repeat(255);
    let exactly = format!("{ascii}A");
    for ok in ["foo bar", "_*-/9090", "?---$$$$", capitals.as_str(), "6666", exactly.as_str()] {
        let r = create(&s, &[("app_id", "a"), ("token", ok), ("ttl", "0")]).await;
        assert_eq!(r.status, 200, "{ok}: {}", r.body);
    }
    let got: HashSet<String> = listed(&s, "a").await.into_iter().map(|(_, _, t)| t).collect();
    assert_eq!(got.len(), 6);
    assert!(got.contains("_*-/9090") && got.contains("foo bar"));
    // A token with `/` is read with it percent-encoded.
    let r = read(&s, "_*-/9090").await;
    assert_eq!(r.status, 200, "{}", r.body);
    s.finish().await;
}

#[tokio::test]
async fn apisonator_dotted_tokens_and_consistency() {
    let s = server(&[]).await;
    assert_eq!(create(&s, &[("app_id", "a"), ("token", "hello.xml.xml"), ("ttl", "0")]).await.status, 200);
    assert_eq!(listed(&s, "a").await, [(-1, None, "hello.xml.xml".to_string())]);
    let r = xml(
        &s,
        "GET",
        &format!("/services/{SVC}/oauth_access_tokens/hello.xml.xml.xml"),
        &[("provider_key", PK)],
        None,
    )
    .await;
    assert!(r.body.contains("<app_id>a</app_id>"), "{}", r.body);
    assert_eq!(delete(&s, "hello.xml.xml").await.status, 200);
    assert_eq!(read(&s, "hello.xml.xml").await.status, 404);
    // Tokens of different applications do not mix.
    for (app, token) in [("app1", "666"), ("app1", "667"), ("app2", "668")] {
        assert_eq!(create(&s, &[("app_id", app), ("token", token), ("ttl", "0")]).await.status, 200);
    }
    let app1: HashSet<String> = listed(&s, "app1").await.into_iter().map(|(_, _, t)| t).collect();
    assert_eq!(app1, HashSet::from(["666".to_string(), "667".to_string()]));
    assert_eq!(listed(&s, "app2").await.len(), 1);
    // Read consistency (§10.1 #17).
    assert_eq!(create(&s, &[("app_id", "rc"), ("token", "valid-token1"), ("ttl", "100")]).await.status, 200);
    assert_eq!(create(&s, &[("app_id", "rc"), ("token", "valid-token2")]).await.status, 200);
    let ttls: Vec<i64> = {
        let mut t = listed(&s, "rc").await;
        t.sort_by(|a, b| a.2.cmp(&b.2));
        t.into_iter().map(|(ttl, _, _)| ttl).collect()
    };
    assert!(ttls[0] <= 100 && ttls[0] > 0 && ttls[1] > 100, "{ttls:?}");
    assert_eq!(delete(&s, "valid-token1").await.status, 200);
    assert_eq!(read(&s, "valid-token1").await.status, 404);
    assert_eq!(read(&s, "valid-token2").await.status, 200);
    assert_eq!(listed(&s, "rc").await.len(), 1);
    // Unknown paths under /services: an empty 404 in XML; OPTIONS: a pre-flight.
    let r = xml(&s, "GET", "/services/svc1/nothing.xml", &[], None).await;
    assert_eq!((r.status, r.body.as_str(), r.headers["content-type"].to_str().unwrap()), (404, "", XML));
    let r = xml(&s, "OPTIONS", &format!("/services/{SVC}/oauth_access_tokens.xml"), &[], None).await;
    assert_eq!(r.status, 204);
    assert!(r.headers.contains_key("access-control-allow-methods"));
    let r =
        xml(&s, "PUT", &format!("/services/{SVC}/oauth_access_tokens/valid-token2.xml"), &[("provider_key", PK)], None)
            .await;
    assert_eq!((r.status, r.body.as_str()), (404, ""), "no update route");
    // A user's token: the user nested in <application> (one root element).
    assert_eq!(create(&s, &[("app_id", "2001"), ("token", "user-tok"), ("user_id", "alex")]).await.status, 200);
    let r = read(&s, "user-tok").await;
    assert_eq!(
        r.body,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<application>\n  <app_id>2001</app_id>\n  <user>\n    <user_id>alex</user_id>\n  </user>\n</application>\n"
    );
    // Text is escaped in bodies and errors.
    assert_eq!(create(&s, &[("app_id", "a&b"), ("token", "<t>")]).await.status, 200);
    assert_eq!(listed(&s, "a&b").await.len(), 1);
    assert!(list(&s, "a&b", &[]).await.body.contains(">&lt;t&gt;</oauth_access_token>"));
    assert_xml_error(
        &read(&s, "<x>").await,
        404,
        "access_token_invalid",
        r#"token "&lt;x&gt;" is invalid: expired or never defined"#,
    );
    s.finish().await;
}

#[tokio::test]
async fn apisonator_authentication_in_its_order() {
    let s = server(&[]).await;
    let token_path = format!("/services/{SVC}/oauth_access_tokens/t.xml");
    let list_path = format!("/services/{SVC}/applications/a/oauth_access_tokens.xml");
    // Provider keys: a fake one, or one of another service.
    let cases: [(Params, &str, &str); 6] = [
        (
            &[("provider_key", "fake-provider-key")],
            "provider_key_invalid",
            r#"provider key "fake-provider-key" is invalid"#,
        ),
        (&[("provider_key", "pk-2")], "provider_key_invalid", r#"provider key "pk-2" is invalid"#),
        (&[], "provider_key_or_service_token_required", "Provider key or service token are required"),
        (
            &[("service_token", "")],
            "provider_key_or_service_token_required",
            "Provider key or service token are required",
        ),
        (
            &[("service_token", "st-other")],
            "service_token_invalid",
            r#"service token "st-other" or service id "svc1" is invalid"#,
        ),
        // The provider key wins: an invalid one fails even beside a valid service token.
        (
            &[("provider_key", "INVALID-KEY"), ("service_token", ST)],
            "provider_key_invalid",
            r#"provider key "INVALID-KEY" is invalid"#,
        ),
    ];
    for (auth, code, message) in cases {
        let mut form = auth.to_vec();
        form.extend([("app_id", "a"), ("token", "t")]);
        assert_xml_error(
            &xml(&s, "POST", &format!("/services/{SVC}/oauth_access_tokens.xml"), &[], Some(&form)).await,
            403,
            code,
            message,
        );
        assert_xml_error(&xml(&s, "GET", &token_path, auth, None).await, 403, code, message);
        assert_xml_error(&xml(&s, "DELETE", &token_path, auth, None).await, 403, code, message);
        assert_xml_error(&xml(&s, "GET", &list_path, auth, None).await, 403, code, message);
    }
    // A service token of another service; an unknown service.
    let r = xml(&s, "GET", "/services/svc2/oauth_access_tokens/t.xml", &[("service_token", ST)], None).await;
    assert_xml_error(&r, 403, "service_token_invalid", r#"service token "st-1" or service id "svc2" is invalid"#);
    let r = xml(&s, "GET", "/services/fake-service/oauth_access_tokens/t.xml", &[("provider_key", PK)], None).await;
    assert_xml_error(&r, 403, "provider_key_invalid", r#"provider key "pk-1" is invalid"#);
    // The right keys: the service token, and a valid provider key beside a blank service token.
    let form = [("service_token", ST), ("app_id", "a"), ("token", "by-st")];
    assert_eq!(
        xml(&s, "POST", &format!("/services/{SVC}/oauth_access_tokens.xml"), &[], Some(&form)).await.status,
        200
    );
    let r = xml(&s, "GET", &list_path, &[("provider_key", PK), ("service_token", "")], None).await;
    assert_eq!(r.status, 200);
    // The same token in another service is another token.
    let form = [("provider_key", "pk-2"), ("app_id", "a"), ("token", "by-st")];
    assert_eq!(xml(&s, "POST", "/services/svc2/oauth_access_tokens.xml", &[], Some(&form)).await.status, 200);
    // Check order: a missing token is reported before the bad key, a bad key before the app.
    let r = xml(&s, "POST", &format!("/services/{SVC}/oauth_access_tokens.xml"), &[], Some(&[("provider_key", "bad")]))
        .await;
    assert_xml_error(&r, 422, "required_params_missing", "missing required parameters");
    let r = xml(
        &s,
        "POST",
        &format!("/services/{SVC}/oauth_access_tokens.xml"),
        &[],
        Some(&[("provider_key", "bad"), ("token", "x")]),
    )
    .await;
    assert_xml_error(&r, 403, "provider_key_invalid", r#"provider key "bad" is invalid"#);
    s.finish().await;
}

#[tokio::test]
async fn apisonator_content_types_and_no_body() {
    let s = server(&[]).await;
    let url = format!("{}/services/{SVC}/oauth_access_tokens.xml", s.internal);
    let body = encode(&[("provider_key", PK), ("app_id", "a"), ("token", "ct")]);
    for bad in ["text/plain", "image/invalid", "some_content_type", "application/xml+invalid", "application/json"] {
        let r = respond(s.http.post(&url).header("content-type", bad).body(body.clone())).await;
        assert_xml_error(&r, 400, "content_type_invalid", &format!("invalid Content-Type: {bad}"));
    }
    for (i, ok) in [
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=UTF-8",
        "APPLICATION/X-WWW-FORM-URLENCODED",
        "",
    ]
    .into_iter()
    .enumerate()
    {
        let body = encode(&[("provider_key", PK), ("app_id", "a"), ("token", &format!("ct-{i}"))]);
        let mut req = s.http.post(&url).body(body);
        if !ok.is_empty() {
            req = req.header("content-type", ok);
        }
        let r = respond(req).await;
        assert_eq!(r.status, 200, "{ok:?}: {}", r.body);
    }
    let multipart = "--XYZ\r\nContent-Disposition: form-data; name=\"provider_key\"\r\n\r\npk-1\r\n--XYZ\r\nContent-Disposition: form-data; name=\"app_id\"\r\n\r\na\r\n--XYZ\r\nContent-Disposition: form-data; name=\"token\"\r\n\r\nct-multi\r\n--XYZ--\r\n";
    let r =
        respond(s.http.post(&url).header("content-type", "multipart/form-data; boundary=XYZ").body(multipart)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(listed(&s, "a").await.len(), 5);
    // no_body: the status, no body (header or the deprecated query parameter).
    let path = format!("/services/{SVC}/oauth_access_tokens/boo.xml");
    let r =
        respond(s.http.get(format!("{}{path}?provider_key={PK}", s.internal)).header("3scale-options", "no_body=1"))
            .await;
    assert_eq!((r.status, r.body.as_str()), (404, ""));
    let r = xml(&s, "GET", &path, &[("provider_key", PK), ("no_body", "1")], None).await;
    assert_eq!((r.status, r.body.as_str()), (404, ""));
    s.finish().await;
}

#[tokio::test]
async fn apisonator_lists_one_page_at_a_time() {
    let s = server(&[]).await;
    for i in 0..250 {
        let token = format!("page-{i:03}");
        assert_eq!(
            create(
                &s,
                &[("app_id", "big"), ("token", &token), ("ttl", "0"), ("user_id", if i % 2 == 0 { "u" } else { "v" })]
            )
            .await
            .status,
            200
        );
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut q = vec![];
        if let Some(c) = &cursor {
            q.push(("cursor", c.as_str()));
        }
        let r = list(&s, "big", &q).await;
        let (tokens, next) = parse_list(&r.body);
        assert!(tokens.len() <= 100, "one page at most");
        seen.extend(tokens.into_iter().map(|(_, _, t)| t));
        pages += 1;
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!((seen.len(), unique.len()), (250, 250));
    // A user's tokens, with their user_id attribute.
    let r = list(&s, "big", &[("user_id", "u")]).await;
    let (tokens, _) = parse_list(&r.body);
    assert_eq!(tokens.len(), 100);
    assert!(tokens.iter().all(|(_, u, _)| u.as_deref() == Some("u")));
    let r = list(&s, "big", &[("cursor", "not-a-cursor")]).await;
    assert_eq!(r.status, 422, "{}", r.body);
    s.finish().await;
}

async fn v1(s: &TestServer, method: &str, path: &str, body: Option<Value>) -> Response {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = s.http.request(method, format!("{}/v1/services/{SVC}{path}", s.internal));
    if let Some(b) = body {
        req = req.json(&b);
    }
    respond(req).await
}

fn code(r: &Response) -> (u16, String) {
    (r.status, r.json()["error"].as_str().unwrap_or("").to_string())
}

#[tokio::test]
async fn v1_create_read_delete() {
    let s = server(&[]).await;
    let r = v1(&s, "POST", "/tokens", Some(json!({"app_id": "2001"}))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let created = r.json();
    let token = created["token"].as_str().unwrap().to_string();
    // 56 URL-safe characters: the issue time, 256 random bits, check bytes; the issue time is the
    // token's creation time.
    assert_eq!(token.len(), 56, "{token}");
    assert!(token.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'), "{token}");
    let issued = tokenserver_core::access::generated_at(&token).unwrap();
    let created_at = humantime::parse_rfc3339(created["created_at"].as_str().unwrap()).unwrap();
    assert_eq!(created_at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), issued / 1000);
    assert_eq!((created["app_id"].as_str(), created["user_id"].is_null()), (Some("2001"), true));
    let expires = humantime::parse_rfc3339(created["expires_at"].as_str().unwrap()).unwrap();
    let left = expires.duration_since(std::time::SystemTime::now()).unwrap().as_secs();
    assert!((86_390..=86_400).contains(&left), "default TTL: {left}");
    let r =
        v1(&s, "POST", "/tokens", Some(json!({"token": "mine", "app_id": "2001", "user_id": "alex", "ttl": 0}))).await;
    assert_eq!(r.status, 201);
    assert!(r.json()["expires_at"].is_null(), "0: permanent");
    let r = v1(&s, "GET", "/tokens/mine", None).await;
    assert_eq!(r.json(), json!({"app_id": "2001", "user_id": "alex", "expires_at": null}));
    assert_eq!(
        code(&v1(&s, "POST", "/tokens", Some(json!({"token": "mine", "app_id": "3001"}))).await),
        (409, "access_token_already_exists".into())
    );
    assert_eq!(v1(&s, "DELETE", "/tokens/mine", None).await.status, 204);
    assert_eq!(code(&v1(&s, "DELETE", "/tokens/mine", None).await), (404, "access_token_invalid".into()));
    let r = v1(&s, "GET", "/tokens/mine", None).await;
    assert_eq!(
        r.json(),
        json!({"error": "access_token_invalid", "message": "token \"mine\" is invalid: expired or never defined"})
    );
    // Validation: our own refusals, exactly.
    let long = "a".repeat(257);
    for (body, want) in [
        (
            json!({"token": " x", "app_id": "a"}),
            json!({"error": "access_token_format_invalid",
                   "message": "token is either too big or has an invalid format: it starts or ends with whitespace"}),
        ),
        (
            json!({"token": "x", "app_id": "a", "ttl": 400_000_000}),
            json!({"error": "access_token_invalid_ttl",
                   "message": "the TTL must be at most 31536000 seconds"}),
        ),
        (
            json!({"token": "x", "app_id": long}),
            json!({"error": "invalid_id", "message": "app_id is not acceptable: it is longer than 256 bytes"}),
        ),
        (
            json!({"token": "x", "app_id": ""}),
            json!({"error": "invalid_id", "message": "app_id is not acceptable: it is empty"}),
        ),
        (
            json!({"token": "x", "app_id": "a", "user_id": "u\u{7}"}),
            json!({"error": "invalid_id", "message": "user_id is not acceptable: it holds a control character"}),
        ),
    ] {
        let r = v1(&s, "POST", "/tokens", Some(body.clone())).await;
        assert_eq!((r.status, r.json()), (422, want), "{body}");
    }
    // Bodies serde refuses (its messages are its own).
    for (body, want) in [
        (json!({"token": "x"}), (422, "invalid_body")),
        (json!({"token": "x", "app_id": "a", "ttl": -1}), (422, "invalid_body")),
        (json!({"token": "x", "app_id": "a", "colour": 1}), (422, "invalid_body")),
        // serde would take a struct's fields in a row; the API takes an object only.
        (json!(["x", "a", null, 60]), (422, "invalid_body")),
    ] {
        let r = v1(&s, "POST", "/tokens", Some(body.clone())).await;
        assert_eq!(code(&r), (want.0, want.1.to_string()), "{body}: {}", r.body);
    }
    s.finish().await;
}

#[tokio::test]
async fn v1_lists_and_revokes() {
    let s = server(&[]).await;
    for i in 0..30 {
        let user = if i % 3 == 0 { Some("u") } else { None };
        let r = v1(
            &s,
            "POST",
            "/tokens",
            Some(json!({"token": format!("l-{i}"), "app_id": "app", "user_id": user, "ttl": 0})),
        )
        .await;
        assert_eq!(r.status, 201);
    }
    v1(&s, "POST", "/tokens", Some(json!({"token": "other", "app_id": "app2"}))).await;
    let mut seen = HashSet::new();
    let mut cursor = String::new();
    loop {
        let q = if cursor.is_empty() { "?limit=7".to_string() } else { format!("?limit=7&cursor={cursor}") };
        let r = v1(&s, "GET", &format!("/applications/app/tokens{q}"), None).await;
        let v = r.json();
        let page = v["tokens"].as_array().unwrap();
        assert!(page.len() <= 7);
        for t in page {
            assert!(seen.insert(t["token"].as_str().unwrap().to_string()), "duplicate");
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 30);
    let r = v1(&s, "GET", "/applications/app/tokens?user_id=u&limit=100", None).await;
    assert_eq!(r.json()["tokens"].as_array().unwrap().len(), 10);
    assert_eq!(code(&v1(&s, "GET", "/applications/app/tokens?limit=0", None).await), (422, "invalid_limit".into()));
    assert_eq!(code(&v1(&s, "GET", "/applications/app/tokens?limit=1001", None).await), (422, "invalid_limit".into()));
    assert_eq!(code(&v1(&s, "GET", "/applications/app/tokens?cursor=zz", None).await), (422, "invalid_cursor".into()));
    let r = v1(&s, "DELETE", "/applications/app/tokens", None).await;
    assert_eq!(r.json(), json!({"revoked": 30}));
    assert!(v1(&s, "GET", "/applications/app/tokens", None).await.json()["tokens"].as_array().unwrap().is_empty());
    assert_eq!(v1(&s, "DELETE", "/tokens", None).await.json(), json!({"revoked": 1}));
    assert_eq!(code(&v1(&s, "GET", "/tokens/other", None).await), (404, "access_token_invalid".into()));
    s.finish().await;
}

#[tokio::test]
async fn v1_authorize_follows_the_precedence_rule() {
    let s = server(&[]).await;
    v1(&s, "POST", "/tokens", Some(json!({"token": "valid-token", "app_id": "2001", "ttl": 60}))).await;
    v1(&s, "POST", "/tokens", Some(json!({"token": "user-token", "app_id": "2001", "user_id": "alex"}))).await;
    let auth = |body: Value| v1(&s, "POST", "/authorize", Some(body));
    let cases = [
        // §7.2: the token names the application.
        (json!({"access_token": "valid-token"}), json!({"app_id": "2001", "user_id": null})),
        (json!({"access_token": "  valid-token  "}), json!({"app_id": "2001", "user_id": null})),
        // A named application wins; a fake token beside it is no error.
        (json!({"access_token": "fake", "app_id": "3001"}), json!({"app_id": "3001", "user_id": null})),
        (json!({"access_token": "valid-token", "app_id": "3001"}), json!({"app_id": "3001", "user_id": null})),
        (json!({"app_id": "3001", "access_token": ""}), json!({"app_id": "3001", "user_id": null})),
        // §7.3: the token's user, unless one is named.
        (json!({"access_token": "user-token"}), json!({"app_id": "2001", "user_id": "alex"})),
        (json!({"access_token": "user-token", "user_id": "alex"}), json!({"app_id": "2001", "user_id": "alex"})),
        (json!({"access_token": "user-token", "user_id": "made-up"}), json!({"app_id": "2001", "user_id": "made-up"})),
        (json!({"access_token": "user-token", "app_id": "3001"}), json!({"app_id": "3001", "user_id": "alex"})),
    ];
    for (body, want) in cases {
        let r = auth(body.clone()).await;
        assert_eq!((r.status, r.json()), (200, want), "{body}");
    }
    let r = auth(json!({"access_token": "boo"})).await;
    assert_eq!(
        r.json(),
        json!({"error": "access_token_invalid", "message": "token \"boo\" is invalid: expired or never defined"})
    );
    assert_eq!(r.status, 404);
    let r = auth(json!({})).await;
    assert_eq!(
        r.json(),
        json!({"error": "application_not_found", "message": "application with id=\"\" was not found"})
    );
    assert_eq!(code(&auth(json!({"user_id": "alex"})).await), (404, "application_not_found".into()));
    assert_eq!(code(&auth(json!(["valid-token"])).await), (422, "invalid_body".into()));
    // An expired token names nobody.
    v1(&s, "POST", "/tokens", Some(json!({"token": "brief", "app_id": "2001", "ttl": 1}))).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(code(&auth(json!({"access_token": "brief"})).await), (404, "access_token_invalid".into()));
    // Another service does not see svc1's tokens.
    let r = respond(
        s.http.post(format!("{}/v1/services/svc2/authorize", s.internal)).json(&json!({"access_token": "valid-token"})),
    )
    .await;
    assert_eq!(code(&r), (404, "access_token_invalid".into()));
    s.finish().await;
}

/// Under `/v1/`, a path no route has is 404 and a method the route does not take 405, both in the
/// envelope and without echoing the path (it may hold a token); apisonator's and HaKr's routes
/// keep their empty answers.
#[tokio::test]
async fn v1_unknown_routes_and_methods_answer_in_the_envelope() {
    let s = server(&[]).await;
    let r = v1(&s, "PUT", "/tokens/secret-tok", None).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "GET,HEAD,DELETE");
    assert_eq!(
        r.json(),
        json!({"error": "method_not_allowed", "message": "PUT is not allowed here (see the Allow header)"})
    );
    let r = v1(&s, "GET", "/tokenz/secret-tok", None).await;
    assert_eq!((r.status, r.json()), (404, json!({"error": "not_found", "message": "no such route"})));
    let r = v1(&s, "GET", "/authorize", None).await;
    assert_eq!(code(&r), (405, "method_not_allowed".into()));
    assert_eq!(r.headers["allow"], "POST");
    for (method, path) in [("GET", "/services/svc1/nothing.xml"), ("GET", "/nothing"), ("GET", "/token")] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = respond(s.http.request(method, format!("{}{path}", s.internal))).await;
        assert!(matches!(r.status, 404 | 405), "{path}: {}", r.status);
        assert_eq!(r.body, "", "{path}");
    }
    // A path segment that does not decode names nothing: on apisonator's routes the empty 404 of
    // an unknown route, on the v1 API the envelope's (neither repeats the segment).
    for (method, path) in [
        ("GET", "/services/svc1/oauth_access_tokens/%FF.xml?provider_key=pk-1"),
        ("DELETE", "/services/svc1/oauth_access_tokens/%C3%28.xml?provider_key=pk-1"),
        ("GET", "/services/%FF/applications/a/oauth_access_tokens.xml?provider_key=pk-1"),
        ("POST", "/services/%FF/oauth_access_tokens.xml?provider_key=pk-1&app_id=a&token=t"),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = respond(s.http.request(method, format!("{}{path}", s.internal))).await;
        assert_eq!((r.status, r.body.as_str()), (404, ""), "{path}");
    }
    let not_utf8 = json!({"error": "not_found", "message": "a path segment is not valid UTF-8"});
    for (method, path) in [("GET", "/tokens/%FF"), ("DELETE", "/applications/%C3%28/tokens")] {
        let r = v1(&s, method, path, None).await;
        assert_eq!((r.status, r.json()), (404, not_utf8.clone()), "{path}");
    }
    s.finish().await;
}

/// apisonator's create reads a form body of at most 64 KiB as well; a larger one is refused in
/// apisonator's XML with the v1 API's code, whether its size is announced or found while reading,
/// `no_body` empties the answer, and nothing of it is stored.
#[tokio::test]
async fn apisonator_oversized_bodies_answer_in_xml() {
    let s = server(&[]).await;
    let path = format!("/services/{SVC}/oauth_access_tokens.xml");
    let url = format!("{}{path}", s.internal);
    let too_large = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><error code=\"body_too_large\">\
                     Failed to buffer the request body: length limit exceeded</error>";
    // A create of token `t-{app}`, padded to the limit plus `extra` bytes with a parameter
    // nobody reads.
    let form = |app: &str, extra: usize| {
        let token = format!("t-{app}");
        let base = encode(&[("provider_key", PK), ("app_id", app), ("token", &token)]);
        format!("{base}&pad={}", "x".repeat(64 * 1024 + extra - base.len() - "&pad=".len()))
    };
    let ct = ("content-type", "application/x-www-form-urlencoded");
    let r = respond(s.http.post(&url).header(ct.0, ct.1).body(form("over", 1))).await;
    assert_eq!((r.status, r.body.as_str()), (413, too_large));
    assert_eq!(r.headers["content-type"], XML);
    let (status, body) = chunked_request(&s.internal, "POST", &path, &[ct], form("over", 1).as_bytes()).await;
    assert_eq!((status, body.as_str()), (413, too_large));
    let quiet = s.http.post(&url).header(ct.0, ct.1).header("3scale-options", "no_body=1");
    let r = respond(quiet.body(form("over", 1))).await;
    assert_eq!((r.status, r.body.as_str()), (413, ""));
    let r = respond(s.http.post(&url).header(ct.0, ct.1).body(form("edge", 0))).await;
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    assert_eq!(read(&s, "t-edge").await.status, 200);
    assert_xml_error(
        &read(&s, "t-over").await,
        404,
        "access_token_invalid",
        r#"token "t-over" is invalid: expired or never defined"#,
    );
    s.finish().await;
}

/// The v1 API's body limit is 64 KiB; a larger body is refused in the envelope, whether its size
/// is announced (Content-Length) or found while reading (chunked), and nothing of it is stored.
#[tokio::test]
async fn v1_oversized_bodies_answer_in_the_envelope() {
    let s = server(&[]).await;
    let url = format!("{}/v1/services/{SVC}/tokens", s.internal);
    let too_large =
        json!({"error": "body_too_large", "message": "Failed to buffer the request body: length limit exceeded"});
    let over = json!({"app_id": "over", "token": "x".repeat(70_000)}).to_string();
    let r = respond(s.http.post(&url).header("content-type", "application/json").body(over.clone())).await;
    assert_eq!((r.status, r.json()), (413, too_large.clone()));
    let path = format!("/v1/services/{SVC}/tokens");
    let (status, body) =
        chunked_request(&s.internal, "POST", &path, &[("content-type", "application/json")], over.as_bytes()).await;
    assert_eq!((status, serde_json::from_str::<Value>(&body).unwrap()), (413, too_large.clone()));
    // One byte over and exactly at the limit (the JSON padded with spaces).
    let at_limit = |extra: usize| {
        let body = json!({"app_id": "edge", "token": "t-limit"}).to_string();
        format!("{body}{}", " ".repeat(64 * 1024 + extra - body.len()))
    };
    let r = respond(s.http.post(&url).header("content-type", "application/json").body(at_limit(1))).await;
    assert_eq!((r.status, r.json()), (413, too_large));
    let r = respond(s.http.post(&url).header("content-type", "application/json").body(at_limit(0))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    // Only the token at the limit was stored.
    let r = v1(&s, "GET", "/applications/over/tokens", None).await;
    assert_eq!(r.json(), json!({"tokens": [], "next_cursor": null}));
    let r = v1(&s, "GET", "/applications/edge/tokens", None).await;
    assert_eq!(r.json()["tokens"].as_array().map(Vec::len), Some(1));
    s.finish().await;
}

#[tokio::test]
async fn v1_api_key_guards_the_routes() {
    let s = server(&[("TOKENSERVER_ACCESS__API_KEY", "ak")]).await;
    let call = |method: &str, path: &str, body: Option<Value>, key: Option<&str>| {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = s.http.request(method, format!("{}/v1/services/{SVC}{path}", s.internal));
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        respond(req)
    };
    let r = call("POST", "/tokens", Some(json!({"token": "kept", "app_id": "a", "user_id": "u"})), Some("ak")).await;
    assert_eq!(r.status, 201);
    // Every route, without the key and with a wrong one: refused before anything is read or done.
    let refused = json!({"error": "unauthorized", "message": "a valid access.api_key is required"});
    for (method, path, body) in [
        ("POST", "/tokens", Some(json!({"app_id": "a"}))),
        ("GET", "/tokens/kept", None),
        ("DELETE", "/tokens/kept", None),
        ("GET", "/applications/a/tokens", None),
        ("DELETE", "/applications/a/tokens", None),
        ("DELETE", "/tokens", None),
        ("POST", "/authorize", Some(json!({"access_token": "kept"}))),
    ] {
        for key in [None, Some("wrong")] {
            let r = call(method, path, body.clone(), key).await;
            assert_eq!((r.status, r.json()), (401, refused.clone()), "{method} {path} {key:?}");
        }
    }
    let r = call("GET", "/tokens/kept", None, Some("ak")).await;
    assert_eq!((r.status, r.json()["user_id"].clone()), (200, json!("u")));
    // apisonator's routes keep their own per-service keys.
    assert_eq!(create(&s, &[("app_id", "a"), ("token", "t")]).await.status, 200);
    s.finish().await;
}

per_backend!(all: fifty_concurrent_creates_of_one_token_have_one_winner);

/// Fifty parallel creates of one token over HTTP: one 201, forty-nine 409, and the stored token is
/// the winner's, on every backend.
async fn fifty_concurrent_creates_of_one_token_have_one_winner(backend: Backend) {
    let Some(db) = fresh(backend).await else { return };
    let s = Arc::new(server(&[("TOKENSERVER_ACCESS__URL", db.url.as_str())]).await);
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let body = json!({"token": "contested", "app_id": format!("app-{i}")});
                respond(s.http.post(format!("{}/v1/services/{SVC}/tokens", s.internal)).json(&body)).await
            })
        })
        .collect();
    let mut winner = None;
    let mut conflicts = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        match r.status {
            201 => winner = Some(format!("app-{i}")),
            409 => {
                assert_eq!(r.json()["error"], "access_token_already_exists");
                conflicts += 1;
            }
            other => panic!("{other}: {}", r.body),
        }
    }
    assert_eq!(conflicts, 49);
    let r = v1(&s, "GET", "/tokens/contested", None).await;
    assert_eq!(r.json()["app_id"].as_str(), winner.as_deref());
    // And the whole flow on this backend.
    let r = create(&s, &[("app_id", "2001"), ("token", "compat"), ("ttl", "0")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(listed(&s, "2001").await, [(-1, None, "compat".to_string())]);
    assert_eq!(v1(&s, "POST", "/authorize", Some(json!({"access_token": "compat"}))).await.json()["app_id"], "2001");
    Arc::into_inner(s).unwrap().finish().await;
    db.drop_now().await;
}

per_backend!(all: ids_no_token_can_have_name_nothing);

/// A service, application or user id that creation refuses (here one holding NUL, which
/// PostgreSQL's text cannot even take as a parameter) names no token: reads answer 404, listings
/// an empty page, revocations 0, on every backend, and the tokens of valid ids are untouched.
async fn ids_no_token_can_have_name_nothing(backend: Backend) {
    let Some(db) = fresh(backend).await else { return };
    let s = server(&[("TOKENSERVER_ACCESS__URL", db.url.as_str())]).await;
    assert_eq!(
        v1(&s, "POST", "/tokens", Some(json!({"token": "kept", "app_id": "a", "user_id": "u", "ttl": 0}))).await.status,
        201
    );
    let call = |method: &str, path: &str, body: Option<Value>| {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = s.http.request(method, format!("{}/v1/services/{path}", s.internal));
        if let Some(b) = body {
            req = req.json(&b);
        }
        respond(req)
    };
    let empty = json!({"tokens": [], "next_cursor": null});
    for path in
        ["s%00/applications/a/tokens", "svc1/applications/a%00/tokens", "svc1/applications/a/tokens?user_id=u%00"]
    {
        let r = call("GET", path, None).await;
        assert_eq!((r.status, r.json()), (200, empty.clone()), "{path}");
    }
    for (method, path) in [("GET", "s%00/tokens/kept"), ("DELETE", "s%00/tokens/kept")] {
        assert_eq!(code(&call(method, path, None).await), (404, "access_token_invalid".into()), "{method} {path}");
    }
    let r = call("POST", "s%00/authorize", Some(json!({"access_token": "kept"}))).await;
    assert_eq!(code(&r), (404, "access_token_invalid".into()));
    for path in ["s%00/applications/a/tokens", "svc1/applications/a%00/tokens", "s%00/tokens"] {
        let r = call("DELETE", path, None).await;
        assert_eq!((r.status, r.json()), (200, json!({"revoked": 0})), "{path}");
    }
    let r = v1(&s, "GET", "/tokens/kept", None).await;
    assert_eq!(r.json(), json!({"app_id": "a", "user_id": "u", "expires_at": null}));
    s.finish().await;
    db.drop_now().await;
}

/// `tokenserver access …` on the default SQLite file: the import from an apisonator Redis (R1
/// and R2 values, TTLs kept, a refused token named only by fingerprint, idempotent, the source
/// untouched), then the CLI's own create / get / list / revoke / delete.
#[tokio::test]
async fn cli_imports_from_apisonator_and_manages_tokens() {
    let Ok(redis_url) = std::env::var("TOKENSERVER_TEST_REDIS_URL") else { return };
    let dir = crate::common::TempDir::new();
    let svc = format!("imp{}", std::process::id());
    let key = |token: &str| format!("oauth_access_tokens/service:{svc}/{token}");
    let mut redis = redis::Client::open(redis_url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys = [
        key("tok-perm"),
        key("tok/slash"),
        key(" padded"),
        key("app:2001/"),
        format!("oauth_access_tokens/service:{svc}x/other"),
    ];
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(&keys[0])
        .arg("2001")
        .ignore()
        .cmd("SET")
        .arg(&keys[1])
        .arg("user_len:4/alex/2001")
        .arg("EX")
        .arg(600)
        .ignore()
        .cmd("SET")
        .arg(&keys[2])
        .arg("2001")
        .arg("EX")
        .arg(600)
        .ignore()
        .cmd("SADD")
        .arg(&keys[3])
        .arg("tok-perm")
        .arg("tok/slash")
        .ignore()
        .cmd("SET")
        .arg(&keys[4])
        .arg("3001")
        .arg("EX")
        .arg(600)
        .ignore()
        .query_async(&mut redis)
        .await
        .unwrap();
    let import = ["access", "import-redis", "--from", redis_url.as_str(), "--service", svc.as_str()];
    let (code, out, err) = crate::common::cli(&dir.0, &import, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("imported 2 token(s); 0 already present, 1 refused, "), "{out}");
    assert!(err.contains(&format!("refused a token of service \"{svc}\" (sha256:")), "{err}");
    assert!(
        err.contains("starts or ends with whitespace") && !err.contains(" padded"),
        "the token itself is not printed: {err}"
    );
    let (code, out, err) = crate::common::cli(&dir.0, &import, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("imported 0 token(s); 2 already present, 1 refused, "), "idempotent: {out}");
    let exists: i64 = redis::cmd("EXISTS").arg(&keys[..]).query_async(&mut redis).await.unwrap();
    assert_eq!(exists, 5, "the source is only read");

    let get = |token: &str| {
        let (code, out, err) = crate::common::cli(&dir.0, &["access", "get", svc.as_str(), token], &[]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    let perm = get("tok-perm");
    assert_eq!(
        (perm["app_id"].as_str(), perm["user_id"].is_null(), perm["expires_at"].is_null()),
        (Some("2001"), true, true)
    );
    let user = get("tok/slash");
    assert_eq!((user["app_id"].as_str(), user["user_id"].as_str()), (Some("2001"), Some("alex")));
    let expires = humantime::parse_rfc3339(user["expires_at"].as_str().unwrap()).unwrap();
    let left = expires.duration_since(std::time::SystemTime::now()).unwrap().as_secs();
    // Wide: under a loaded test run the CLI calls in between take seconds.
    assert!((480..=600).contains(&left), "the key's TTL is the token's: {left}");

    let (code, out, err) = crate::common::cli(&dir.0, &["access", "create", svc.as_str(), "2001", "--ttl", "0"], &[]);
    assert_eq!(code, 0, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    assert!(tokenserver_core::access::generated_at(created["token"].as_str().unwrap()).is_some(), "{created}");
    let (code, out, _) = crate::common::cli(&dir.0, &["access", "list", svc.as_str(), "2001", "--all"], &[]);
    assert_eq!((code, out.lines().count()), (0, 3), "{out}");
    let (code, out, _) = crate::common::cli(&dir.0, &["access", "list", svc.as_str(), "2001", "--limit", "2"], &[]);
    let page: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((code, page["tokens"].as_array().unwrap().len(), page["next_cursor"].is_string()), (0, 2, true));
    let (code, out, _) = crate::common::cli(&dir.0, &["access", "delete", svc.as_str(), "tok-perm"], &[]);
    assert_eq!((code, out.trim()), (0, "deleted"));
    let (code, _, err) = crate::common::cli(&dir.0, &["access", "delete", svc.as_str(), "tok-perm"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains(r#"token "tok-perm" is invalid: expired or never defined"#), "{err}");
    let (code, out, _) = crate::common::cli(&dir.0, &["access", "revoke", svc.as_str(), "--app", "2001"], &[]);
    assert_eq!((code, out.trim()), (0, "revoked 2 token(s)"));
    let (code, _, err) = crate::common::cli(&dir.0, &["access", "create", svc.as_str(), "2001", "--token", " x"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("whitespace"), "{err}");
    let _: () = redis::cmd("DEL").arg(&keys[..]).query_async(&mut redis).await.unwrap();
}

/// An access-token store that goes away while creates arrive together (the network stores send
/// them in shared statements): every create answers 503 `store_unavailable` and stores nothing,
/// and once the store is back the same creates all succeed, as new tokens.
async fn store_outage_fails_each_create_and_stores_nothing(backend: Backend) {
    use crate::proxy::{target_of, Proxy};
    let Some(db) = fresh(backend).await else { return };
    let proxy = Proxy::start(target_of(&db.url)).await;
    let url = proxy.url_for(&db.url);
    let s = Arc::new(
        server(&[
            ("TOKENSERVER_ACCESS__URL", url.as_str()),
            ("SYNC_TOKENSERVER__DATABASE_POOL_CONNECTION_TIMEOUT", "1"),
        ])
        .await,
    );
    assert_eq!(v1(&s, "POST", "/tokens", Some(json!({"token": "before", "app_id": "a"}))).await.status, 201);
    let creates = |s: &Arc<TestServer>| -> Vec<_> {
        (0..16)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    v1(&s, "POST", "/tokens", Some(json!({"token": format!("t{i}"), "app_id": "a"}))).await
                })
            })
            .collect()
    };

    proxy.cut().await;
    for t in creates(&s) {
        let r = t.await.unwrap();
        assert_eq!(code(&r), (503, "store_unavailable".to_string()), "{}", r.body);
    }
    // An outage longer than the pools' ping-if-idle threshold (1 s): a pooled connection cut less
    // than that after its last use is found dead only by the call that next takes it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.restore();
    // Back: the first calls may still meet a connection cut while it was down.
    let mut attempts = 0;
    while v1(&s, "GET", "/tokens/before", None).await.status != 200 {
        attempts += 1;
        assert!(attempts < 50, "the store did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in creates(&s) {
        let r = t.await.unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = v1(&s, "GET", "/applications/a/tokens?limit=1000", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut listed: Vec<String> =
        r.json()["tokens"].as_array().unwrap().iter().map(|t| t["token"].as_str().unwrap().to_string()).collect();
    listed.sort();
    let mut want: Vec<String> = (0..16).map(|i| format!("t{i}")).chain(["before".to_string()]).collect();
    want.sort();
    assert_eq!(listed, want);
    Arc::into_inner(s).unwrap().finish().await;
    db.drop_now().await;
}

/// The store's connections cut and the store back within a second (a restart): the reads that
/// follow (a listing; gets and `authorize`s) find the pooled connections dead and run again on
/// new ones, so none of them fails.
async fn a_short_store_outage_costs_no_read(backend: Backend) {
    use crate::proxy::{target_of, Proxy};
    let Some(db) = fresh(backend).await else { return };
    let proxy = Proxy::start(target_of(&db.url)).await;
    let url = proxy.url_for(&db.url);
    let s = Arc::new(server(&[("TOKENSERVER_ACCESS__URL", url.as_str())]).await);
    for i in 0..16 {
        let r = v1(&s, "POST", "/tokens", Some(json!({"token": format!("t{i}"), "app_id": "a", "user_id": "u"}))).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let reads = |s: &Arc<TestServer>| -> Vec<_> {
        (0..16)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let got = v1(&s, "GET", &format!("/tokens/t{i}"), None).await;
                    let authorized = v1(&s, "POST", "/authorize", Some(json!({"access_token": format!("t{i}")}))).await;
                    (got, authorized)
                })
            })
            .collect()
    };
    let listed = |s: &Arc<TestServer>| {
        let s = s.clone();
        async move {
            let r = v1(&s, "GET", "/applications/a/tokens?limit=1000", None).await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["tokens"].as_array().unwrap().len()
        }
    };
    // Several pooled read connections, each used once, and one listing's.
    for t in reads(&s) {
        let (got, authorized) = t.await.unwrap();
        assert_eq!((got.status, authorized.status), (200, 200), "{} {}", got.body, authorized.body);
    }
    assert_eq!(listed(&s).await, 16);

    proxy.cut().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.restore();
    assert_eq!(listed(&s).await, 16);
    for t in reads(&s) {
        let (got, authorized) = t.await.unwrap();
        assert_eq!(got.status, 200, "{}", got.body);
        assert_eq!(got.json()["app_id"], "a");
        assert_eq!(authorized.status, 200, "{}", authorized.body);
        assert_eq!(authorized.json(), json!({"app_id": "a", "user_id": "u"}));
    }
    Arc::into_inner(s).unwrap().finish().await;
    db.drop_now().await;
}

mod a_short_store_outage_costs_no_read {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres() {
        super::a_short_store_outage_costs_no_read(tokenserver_store::Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn mysql() {
        super::a_short_store_outage_costs_no_read(tokenserver_store::Backend::MySql).await;
    }
}

/// A Redis store at its `maxmemory` (no eviction): creates answer 503 `store_full` and store
/// nothing, while reads of the tokens already there keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_redis_store_answers_store_full_and_keeps_serving_reads() {
    let Some(redis) = tokenserver_store::testing::CappedRedis::start("4mb").await else { return };
    let s = server(&[("TOKENSERVER_ACCESS__URL", redis.url.as_str())]).await;
    let r = v1(&s, "POST", "/tokens", Some(json!({"token": "before", "app_id": "a", "user_id": "u"}))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    redis.fill().await;
    let r = v1(&s, "POST", "/tokens", Some(json!({"token": "after", "app_id": "a"}))).await;
    assert_eq!(code(&r), (503, "store_full".to_string()), "{}", r.body);
    assert_eq!(r.json()["message"], "the access-token store is full");
    assert_eq!(v1(&s, "GET", "/tokens/after", None).await.status, 404);
    let r = v1(&s, "POST", "/authorize", Some(json!({"access_token": "before"}))).await;
    assert_eq!((r.status, r.json()), (200, json!({"app_id": "a", "user_id": "u"})));
    let r = v1(&s, "GET", "/applications/a/tokens", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["tokens"].as_array().map(Vec::len), Some(1));
    s.finish().await;
}

mod store_outage_fails_each_create_and_stores_nothing {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres() {
        super::store_outage_fails_each_create_and_stores_nothing(tokenserver_store::Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn mysql() {
        super::store_outage_fails_each_create_and_stores_nothing(tokenserver_store::Backend::MySql).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redis() {
        super::store_outage_fails_each_create_and_stores_nothing(tokenserver_store::Backend::Redis).await;
    }
}
