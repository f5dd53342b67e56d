//! The baseline: a trivial axum server with one route answering a fixed ~150-byte JSON body.
//! Every tokenserver figure is reported as a ratio to this server, measured in the same run.

use axum::routing::get;
use axum::Router;

const BODY: &str = r#"{"id":"hello","key":"0123456789abcdef0123456789abcdef","uid":42,"api_endpoint":"https://example.com/1.5/42","duration":3600,"hashalg":"sha256"}"#;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".into());
    let app =
        Router::new().route("/", get(|| async { ([(axum::http::header::CONTENT_TYPE, "application/json")], BODY) }));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("{}", listener.local_addr()?);
    axum::serve(listener, app).await
}
