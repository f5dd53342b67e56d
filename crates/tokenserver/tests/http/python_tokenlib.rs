//! Tokens checked by Mozilla's own Python `tokenlib` (from PyPI), as storage nodes do.
//! Runs when `TOKENSERVER_TEST_PYTHON` names a Python with `tokenlib` installed (CI sets it).

use std::process::Command;

use crate::common::*;

const CHECK: &str = r#"
import json, sys, tokenlib
token, key, secret = sys.argv[1], sys.argv[2], sys.argv[3]
data = tokenlib.parse_token(token, secret=secret)
assert tokenlib.get_derived_secret(token, secret=secret) == key, "derived secret differs"
print(json.dumps(data, sort_keys=True))
"#;

#[tokio::test]
async fn python_tokenlib_accepts_our_tokens() {
    let Ok(python) = std::env::var("TOKENSERVER_TEST_PYTHON") else {
        eprintln!("skipped: TOKENSERVER_TEST_PYTHON is not set (a Python with tokenlib installed)");
        return;
    };
    let s = TestServer::start(&[]).await;
    s.add_node(NODE, 100, 100).await;
    for (user, kid) in
        [("u1", "1234-qqo"), ("u2", "0-"), ("3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c", "1700000000000-ASNFZ4mrze8BI0VniavN7w")]
    {
        let body = s.token(&Jwt::new(user, Some(1700000000000)).sign(), kid).await.json();
        let out = Command::new(&python)
            .args(["-c", CHECK, body["id"].as_str().unwrap(), body["key"].as_str().unwrap(), SECRET])
            .output()
            .unwrap();
        assert!(out.status.success(), "tokenlib refused: {}", String::from_utf8_lossy(&out.stderr));
        let data: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(data["uid"], body["uid"]);
        assert_eq!(data["fxa_uid"], user);
        assert_eq!(data["node"], NODE);
        assert_eq!(data["tokenserver_origin"], "rust");
        // A wrong secret is refused by tokenlib.
        let out = Command::new(&python)
            .args(["-c", CHECK, body["id"].as_str().unwrap(), body["key"].as_str().unwrap(), "wrong"])
            .output()
            .unwrap();
        assert!(!out.status.success());
    }
}
