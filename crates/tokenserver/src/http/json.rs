//! A JSON body extractor that behaves exactly like `axum::Json` but is cheaper when the body is
//! well formed: it parses with `serde_json` directly and only replays a failed body through
//! `axum::Json` (which tracks the path of the error through `serde_path_to_error`) to produce
//! axum's own rejection, byte for byte.

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;

/// `axum::Json<T>` with a fast path; same rejections.
pub struct FastJson<T>(pub T);

/// `application/json`, with or without parameters: the content types on the fast path. Anything
/// else (including the `+json` types axum also accepts) takes axum's own path.
fn plain_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for FastJson<T> {
    type Rejection = JsonRejection;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !plain_json(req.headers()) {
            return axum::Json::<T>::from_request(req, state).await.map(|axum::Json(v)| Self(v));
        }
        let bytes = Bytes::from_request(req, state).await?;
        match serde_json::from_slice(&bytes) {
            Ok(v) => Ok(Self(v)),
            // Rare: let axum describe the error as it always has.
            Err(_) => axum::Json::<T>::from_bytes(&bytes).map(|axum::Json(v)| Self(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::response::IntoResponse;
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Payload {
        token: String,
        n: Option<u32>,
    }

    fn request(content_type: Option<&str>, body: &'static str) -> Request {
        let mut b = axum::http::Request::builder().method("POST").uri("/");
        if let Some(ct) = content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        b.body(Body::from(body)).unwrap()
    }

    async fn both(
        content_type: Option<&str>,
        body: &'static str,
    ) -> (Result<Payload, String>, Result<Payload, String>) {
        let render = |r: JsonRejection| {
            let resp = r.into_response();
            format!("{} {:?}", resp.status(), resp.headers().get(header::CONTENT_TYPE))
        };
        let fast = match FastJson::<Payload>::from_request(request(content_type, body), &()).await {
            Ok(FastJson(v)) => Ok(v),
            Err(r) => Err(format!("{} {}", r.body_text(), render(r))),
        };
        let axum = match axum::Json::<Payload>::from_request(request(content_type, body), &()).await {
            Ok(axum::Json(v)) => Ok(v),
            Err(r) => Err(format!("{} {}", r.body_text(), render(r))),
        };
        (fast, axum)
    }

    #[tokio::test]
    async fn answers_exactly_as_axum_json() {
        let cases: [(Option<&str>, &'static str); 9] = [
            (Some("application/json"), r#"{"token":"a","n":1}"#),
            (Some("Application/JSON; charset=utf-8"), r#"{"token":"a"}"#),
            (Some("application/vnd.api+json"), r#"{"token":"a"}"#),
            (Some("application/json"), r#"{"token":1}"#),
            (Some("application/json"), r#"{"token":"a","n":-1}"#),
            (Some("application/json"), r#"{"token":"a""#),
            (Some("application/json"), r#"{"token":"a"} x"#),
            (Some("text/plain"), r#"{"token":"a"}"#),
            (None, r#"{"token":"a"}"#),
        ];
        for (ct, body) in cases {
            let (fast, axum) = both(ct, body).await;
            assert_eq!(fast, axum, "{ct:?} {body}");
        }
        let (fast, _) = both(Some("application/json"), r#"{"token":"a","n":7}"#).await;
        assert_eq!(fast, Ok(Payload { token: "a".into(), n: Some(7) }));
    }
}
