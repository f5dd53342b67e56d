//! JSON bodies: [`FastJson`], an extractor that behaves exactly like `axum::Json` but is cheaper
//! when the body is well formed, and [`V1Json`], the same with rejections in the v1 envelope (the
//! session and access-token APIs). FastJson: it parses with `serde_json` directly and only replays a failed body through
//! `axum::Json` (which tracks the path of the error through `serde_path_to_error`) to produce
//! axum's own rejection, byte for byte.

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::http::error::ApiError;

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

/// The last second RFC 3339's four-digit years can write (9999-12-31T23:59:59Z).
const MAX_RFC3339_S: u64 = 253_402_300_799;

/// "00" to "99", two bytes each: a two-digit field is one lookup, not two divisions.
const TWO_DIGITS: [u8; 200] = {
    let mut table = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        table[2 * i] = b'0' + (i / 10) as u8;
        table[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    table
};

/// Writes `value` (< 100) as two digits at `out[at..at + 2]`.
fn put_two(out: &mut [u8], at: usize, value: u64) {
    let i = 2 * (value % 100) as usize;
    out[at..at + 2].copy_from_slice(&TWO_DIGITS[i..i + 2]);
}

/// `YYYY-MM-DD` of the day `days` after 1970-01-01.
fn date_bytes(days: u64) -> [u8; 10] {
    let (year, month, day) = civil_from_days(days);
    let mut out = *b"0000-00-00";
    put_two(&mut out, 0, year / 100);
    put_two(&mut out, 2, year % 100);
    put_two(&mut out, 5, month);
    put_two(&mut out, 8, day);
    out
}

/// `YYYY-MM-DDTHH:MM:SSZ` of second `secs` since the epoch, its date given (`date_bytes`).
fn with_time(date: [u8; 10], secs: u64) -> [u8; 20] {
    let of_day = secs % 86_400;
    let mut out = *b"0000-00-00T00:00:00Z";
    out[..10].copy_from_slice(&date);
    put_two(&mut out, 11, of_day / 3600);
    put_two(&mut out, 14, of_day / 60 % 60);
    put_two(&mut out, 17, of_day % 60);
    out
}

/// `YYYY-MM-DDTHH:MM:SSZ` of `ms` since the epoch (later than year 9999: its last second).
/// Written by hand because a page of tokens shows two per token: through `fmt` (humantime) they
/// were ~5% of a listing's CPU.
fn rfc3339_bytes(ms: u64) -> [u8; 20] {
    let secs = (ms / 1000).min(MAX_RFC3339_S);
    with_time(date_bytes(secs / 86_400), secs)
}

/// (year, month, day) of the proleptic Gregorian calendar, `days` after 1970-01-01: days are
/// counted from 0000-03-01 in 400-year eras of 146,097 days, years starting in March so that
/// the leap day ends each year.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// RFC 3339 UTC, whole seconds.
pub fn rfc3339(ms: u64) -> String {
    String::from_utf8_lossy(&rfc3339_bytes(ms)).into_owned()
}

/// A time (ms since the epoch) that serializes as [`rfc3339`] without building a `String`.
#[derive(Debug, Clone, Copy)]
pub struct Rfc3339(pub u64);

/// [`rfc3339_bytes`], with the text of the last two seconds written on this thread kept and
/// reused: a page shows each token's creation and expiry, often within the same few seconds (a
/// burst of creations).
pub fn rfc3339_memo(ms: u64) -> [u8; 20] {
    type Memo = [(u64, [u8; 20]); 2];
    thread_local! {
        static LAST: std::cell::Cell<Memo> = const { std::cell::Cell::new([(u64::MAX, [0; 20]); 2]) };
    }
    // Out of line, so that the reuse stays small enough to be inlined where it is called.
    #[inline(never)]
    fn write(secs: u64) -> [u8; 20] {
        with_time(date_memo(secs / 86_400), secs)
    }
    let secs = (ms / 1000).min(MAX_RFC3339_S);
    LAST.with(|last| {
        let memo = last.get();
        match memo.iter().find(|(at, _)| *at == secs) {
            Some((_, bytes)) => *bytes,
            None => {
                let bytes = write(secs);
                last.set([(secs, bytes), memo[0]]);
                bytes
            }
        }
    })
}

/// [`date_bytes`], with the dates of the last two days written on this thread kept and reused:
/// the times of a page that are not within the same seconds still fall mostly on a few days
/// (creations on one, expiries on another), in an order that says nothing of their times (the
/// calendar arithmetic, done for each, was 7.5% of a MariaDB page's instructions).
fn date_memo(days: u64) -> [u8; 10] {
    type Memo = [(u64, [u8; 10]); 2];
    thread_local! {
        static LAST_DAYS: std::cell::Cell<Memo> = const { std::cell::Cell::new([(u64::MAX, [0; 10]); 2]) };
    }
    LAST_DAYS.with(|last| {
        let memo = last.get();
        if let Some((_, date)) = memo.iter().find(|(at, _)| *at == days) {
            return *date;
        }
        let date = date_bytes(days);
        last.set([(days, date), memo[0]]);
        date
    })
}

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(std::str::from_utf8(&rfc3339_memo(self.0)).unwrap_or_default())
    }
}

/// Appends `s` as a JSON string, exactly as `serde_json` writes it: quoted, with `"`, `\` and
/// control characters escaped. Ids and tokens rarely need any, so the common case is one pass
/// over the bytes and a copy (serde_json's escaping, per string, was a fifth of a listing page).
pub fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    // No early exit, so that the check compiles to a vectorized pass.
    let plain = s.bytes().fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'));
    if plain {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else if serde_json::to_writer(&mut *buf, s).is_err() {
        // Writing to a Vec cannot fail; keep the document well formed regardless.
        buf.extend_from_slice(b"null");
    }
}

/// `Json<T>` whose rejections are v1 envelope errors, and whose body must be a JSON object.
pub struct V1Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for V1Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match FastJson::<Object<T>>::from_request(req, state).await {
            Ok(FastJson(Object(v))) => Ok(Self(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// A `T` read from a JSON object only. serde's derived structs also take an array of their
/// fields in declaration order (`["tok", "app", null, 60]` would create a token), which is no
/// part of the v1 APIs and which no client should come to depend on.
pub(crate) struct Object<T>(pub(crate) T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for Fields<T> {
            type Value = T;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }

        deserializer.deserialize_map(Fields(PhantomData)).map(Object)
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let text = r.body_text();
    match r {
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", text)
        }
        JsonRejection::JsonSyntaxError(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", text),
        JsonRejection::JsonDataError(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", text),
        _ => body_rejection(r.status(), text),
    }
}

/// A body that could not be read: over the route's limit (`DefaultBodyLimit`), or cut off.
fn body_rejection(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(status, "body_too_large", text);
    }
    ApiError::new(status, "invalid_body", text)
}

/// A raw request body for the v1 APIs, read within the route's limit (`DefaultBodyLimit`), whose
/// refusals are envelope errors as [`V1Json`]'s are (413 `body_too_large`).
pub struct V1Bytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for V1Bytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state).await.map(Self).map_err(|r| body_rejection(r.status(), r.body_text()))
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Create {
        token: Option<String>,
        app_id: String,
        ttl: Option<u64>,
    }

    #[test]
    fn v1_bodies_are_objects_only() {
        use super::Object;
        let read =
            |text: &str| serde_json::from_str::<Object<Create>>(text).map(|Object(b)| b).map_err(|e| e.to_string());
        let want = Create { token: None, app_id: "a".into(), ttl: Some(60) };
        assert_eq!(read(r#"{"app_id": "a", "ttl": 60}"#), Ok(want));
        // What the derived impl alone would take.
        assert!(serde_json::from_str::<Create>(r#"[null, "a", 60]"#).is_ok());
        for text in [r#"[null, "a", 60]"#, "[]", r#""a""#, "null", "60"] {
            let err = read(text).unwrap_err();
            assert!(err.contains("expected a JSON object"), "{text}: {err}");
        }
        // The struct's own rules still hold inside the object.
        assert!(read(r#"{"app_id": "a", "colour": 1}"#).unwrap_err().contains("unknown field `colour`"));
        assert!(read(r#"{"ttl": 1}"#).unwrap_err().contains("missing field `app_id`"));
        assert!(read(r#"{"app_id": "a", "app_id": "b"}"#).unwrap_err().contains("duplicate field `app_id`"));
    }

    #[test]
    fn rfc3339_matches_humantime_across_the_calendar() {
        use std::time::{Duration, UNIX_EPOCH};
        let humantime = |ms: u64| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string();
        let day = 86_400_000u64;
        // Every day of 1970-2200 (leap years, 2000 and 2100), at a time of day that moves.
        for d in 0..(231 * 366) {
            let ms = d * day + (d * 7_919_003) % day;
            assert_eq!(rfc3339(ms), humantime(ms), "{ms}");
            assert_eq!(rfc3339_memo(ms), rfc3339_bytes(ms), "{ms}");
        }
        // Then strides up to the end of 9999.
        let mut ms = 231 * 366 * day;
        while ms / 1000 <= MAX_RFC3339_S {
            assert_eq!(rfc3339(ms), humantime(ms), "{ms}");
            ms += 997 * day + 12_345_678;
        }
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_999), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(serde_json::to_string(&Rfc3339(1_000)).ok().as_deref(), Some("\"1970-01-01T00:00:01Z\""));
        // The texts kept for the last two seconds and the dates kept for the last two days are
        // reused within them, and only within them.
        let times = [
            1_999,
            1_000,
            86_399_999,
            86_400_000,
            2_000,
            0,
            951_782_400_999,
            951_782_401_000,
            86_400_000 + 3_723_000,
            MAX_RFC3339_S * 1000 - 86_400_000,
        ];
        let each: Vec<String> = times.iter().map(|ms| serde_json::to_string(&Rfc3339(*ms)).unwrap()).collect();
        let want: Vec<String> = times.iter().map(|ms| format!("\"{}\"", humantime(*ms))).collect();
        assert_eq!(each, want);
        // Past year 9999: its last second, through the memo too.
        assert_eq!(rfc3339_memo(u64::MAX), *b"9999-12-31T23:59:59Z");
    }

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
