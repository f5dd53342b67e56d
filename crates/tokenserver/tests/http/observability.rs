//! Per-request observability: request ids and the route/status series on `/metrics`.

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_are_counted_by_route_and_status_and_carry_a_request_id() {
    let s = TestServer::start(&[]).await;
    s.add_node(NODE, 100, 10).await;
    let ok = s.token(&Jwt::new("u1", Some(1)).sign(), "1-qqo").await;
    assert_eq!(ok.status, 200);
    let id = ok.headers["x-request-id"].to_str().unwrap().to_string();
    assert!(id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    let r = s.request(reqwest::Method::GET, "/1.0/sync/1.5", &[("x-request-id", b"lb-42.a_b")]).await;
    assert_eq!((r.status, r.headers["x-request-id"].to_str().unwrap()), (401, "lb-42.a_b"));
    let r = s.request(reqwest::Method::GET, "/1.0/sync/1.5", &[("x-request-id", b"no spaces \"here\"")]).await;
    assert_ne!(r.headers["x-request-id"], "no spaces \"here\"");
    assert_eq!(s.request(reqwest::Method::GET, "/nowhere/at/all", &[]).await.status, 404);

    let metrics = s.admin.get(format!("{}/metrics", s.internal)).send().await.unwrap().text().await.unwrap();
    let series = |needle: &str| metrics.lines().find(|l| l.starts_with(needle)).map(str::to_string);
    let route = r#"route="/1.0/{application}/{version}""#;
    // Label order is the exporter's; match each label.
    let find = |status: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("tokenserver_http_requests_total{")
                    && l.contains(r#"listener="public""#)
                    && l.contains(route)
                    && l.contains(&format!(r#"status="{status}""#))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
    };
    // The recorder is the test process's, shared with the tests running beside this one: at least.
    assert!(find("200").is_some_and(|n| n >= 1), "{metrics}");
    assert!(find("401").is_some_and(|n| n >= 2), "{metrics}");
    assert!(
        metrics.lines().any(|l| l.starts_with("tokenserver_http_requests_total{")
            && l.contains(r#"route="unmatched""#)
            && l.contains(r#"status="404""#)),
        "{metrics}"
    );
    assert!(series("tokenserver_http_request_duration_seconds_bucket{").is_some(), "{metrics}");
    assert!(metrics.contains(r#"le="0.005""#), "histogram buckets: {metrics}");
    s.finish().await;
}

per_backend!(sql: database_gauges_are_set_at_scrape_time);

async fn database_gauges_are_set_at_scrape_time(backend: tokenserver_store::Backend) {
    let Some(s) = TestServer::start_on(backend, &[]).await else { return };
    s.add_node(NODE, 100, 10).await;
    assert_eq!(s.token(&Jwt::new("u1", Some(1)).sign(), "1-qqo").await.status, 200);
    let metrics = s.admin.get(format!("{}/metrics", s.internal)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("tokenserver_db_requests_in_flight ")), "{metrics}");
    let pooled = !matches!(backend, tokenserver_store::Backend::Sqlite);
    if pooled {
        assert!(metrics.lines().any(|l| l.starts_with("tokenserver_db_pool_connections{state=\"idle\"}")), "{metrics}");
    }
    s.finish().await;
}
