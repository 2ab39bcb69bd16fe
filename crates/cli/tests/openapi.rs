//! The API document: complete and exact. Each route's possible error
//! statuses, derived from its handler's signature (`baton_api::routes`, the
//! same table the router is built from), are declared; the document and the
//! router have the same routes; protected routes declare bearer security;
//! every success has a typed body. Then a client generated from the served
//! document by openapi-python-client drives a session, error paths
//! included, and never meets an answer the document does not declare.
//! The generator lives in `target/openapi-venv` (installed by `.ci/run`);
//! without it the test fails under `BATON_REQUIRE_OPENAPI_CLIENT=1`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::spawn_app;
use reqwest::{Method, StatusCode};
use serde_json::Value;

async fn served_document() -> (common::TestServer, Value) {
    let app = spawn_app(|c| c.tokens = vec![("alice".into(), "s3cret".into())]).await;
    let (status, doc) = app
        .client
        .send(app.client.req(Method::GET, "/openapi.json"))
        .await;
    assert_eq!(status, StatusCode::OK);
    (app, doc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_of_every_route_is_in_the_document() {
    let (app, doc) = served_document().await;
    let routes = baton_api::routes();
    let bearer = doc.pointer("/components/securitySchemes/bearer").unwrap();
    assert_eq!(bearer["type"], "http");
    assert_eq!(bearer["scheme"], "bearer");
    assert_eq!(doc["security"], serde_json::json!([{"bearer": []}]));

    // The document has exactly the router's routes.
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push((method.clone(), path.clone()));
        }
    }
    let mut routed: Vec<(String, String)> = routes
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    documented.sort();
    routed.sort();
    assert_eq!(
        documented, routed,
        "the document's operations are the router's"
    );

    let mut ids = std::collections::HashSet::new();
    for r in &routes {
        let what = format!("{} {}", r.method, r.path);
        let op = &doc["paths"][r.path][r.method];
        // Every status the handler can answer, with the error body.
        for status in r.answers.keys() {
            let response = &op["responses"][status.to_string()];
            assert!(response.is_object(), "{what}: {status} is not declared");
            assert_eq!(
                response.pointer("/content/application~1json/schema/$ref"),
                Some(&Value::from("#/components/schemas/ErrorBody")),
                "{what}: {status} has the error body"
            );
        }
        // A route that checks the token says so; the others need none.
        if r.answers.contains_key(&401) {
            assert!(
                op.get("security").is_none(),
                "{what}: bearer security (the default)"
            );
        } else {
            assert_eq!(
                op["security"],
                serde_json::json!([]),
                "{what}: no token needed"
            );
        }
        // Every success has a typed body (204 has none).
        for (status, response) in op["responses"].as_object().unwrap() {
            if status.starts_with('2') && status != "204" {
                let content = response["content"].as_object();
                assert!(
                    content.is_some_and(|c| c.values().all(|m| m["schema"].is_object())),
                    "{what}: {status} has a typed body: {response}"
                );
            }
        }
        // Stable camelCase operation ids, one per operation.
        let id = op["operationId"].as_str().unwrap();
        assert!(
            id.chars().next().unwrap().is_ascii_lowercase()
                && id.chars().all(|c| c.is_ascii_alphanumeric()),
            "{what}: operationId {id:?}"
        );
        assert!(ids.insert(id.to_owned()), "{what}: operationId {id} twice");
    }
    for (id, method, path) in [
        ("createSession", "post", "/v1/sessions"),
        ("listSessions", "get", "/v1/sessions"),
        ("getSession", "get", "/v1/sessions/{id}"),
        ("postMessage", "post", "/v1/sessions/{id}/messages"),
        ("cancelTurn", "post", "/v1/sessions/{id}/cancel"),
    ] {
        assert_eq!(doc["paths"][path][method]["operationId"], id);
    }

    // The router answers every route of the table (not its 404 or 405).
    let c = app.client.with_token("s3cret");
    let id = "00000000-0000-4000-8000-000000000000";
    for r in &routes {
        let path = r.path.replace("{id}", id).replace("{request_id}", "r");
        let method = Method::from_bytes(r.method.to_uppercase().as_bytes()).unwrap();
        let (status, body) = c
            .send(
                c.req(method, &path)
                    .header("Content-Type", "application/json")
                    .body("{}"),
            )
            .await;
        let code = body["error"]["code"].as_str().unwrap_or("");
        assert!(
            code != "method_not_allowed" && body["error"]["message"] != "no such route",
            "{} {path}: not routed: {status} {body}",
            r.method
        );
        if !status.is_success() {
            let declared = r.answers.get(&status.as_u16());
            assert!(
                declared.is_some_and(|codes| codes.contains(code)),
                "{} {path}: answered {status} {code}, which its handler's types do not say: {:?}",
                r.method,
                r.answers
            );
        }
    }

    // Exact types: no schema named after a Rust integer; `Entry` a union on
    // `type`; the stream an event stream; real parameter bounds.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    assert!(!schemas.contains_key("u64"));
    assert!(!doc.to_string().contains("schemas/u64"));
    let entry = &schemas["Entry"];
    assert_eq!(entry["discriminator"]["propertyName"], "type");
    assert_eq!(entry["oneOf"].as_array().unwrap().len(), 8);
    assert_eq!(
        schemas["TurnEndedEntry"]["properties"]["type"]["enum"],
        serde_json::json!(["turn_ended"])
    );
    let stream = &doc["paths"]["/v1/sessions/{id}/stream"]["get"]["responses"]["200"]["content"];
    assert!(
        stream["text/event-stream"]["schema"]["oneOf"].is_array(),
        "{stream}"
    );
    // An event's data is a string holding JSON (what an SSE client gets),
    // described by `contentSchema`.
    let data = &schemas["StreamEntryEvent"]["properties"]["data"];
    assert_eq!(data["type"], "string");
    assert_eq!(data["contentMediaType"], "application/json");
    assert_eq!(data["contentSchema"]["$ref"], "#/components/schemas/Entry");
    let data = &schemas["StreamDeltaEvent"]["properties"]["data"];
    assert_eq!(data["type"], "string");
    assert_eq!(
        data["contentSchema"]["required"],
        serde_json::json!(["turn_id", "text"])
    );
    let param = |path: &str, name: &str| -> Value {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap()
    };
    for path in ["/v1/sessions", "/v1/sessions/{id}/entries"] {
        let limit = param(path, "limit");
        assert_eq!(limit["schema"]["minimum"], 1, "{path}");
        assert_eq!(limit["schema"]["maximum"], 1000, "{path}");
        assert_eq!(limit["schema"]["default"], 100, "{path}");
    }
    assert!(param("/v1/sessions", "cursor").is_object());
    let format = param("/v1/sessions/{id}/export", "format");
    assert_eq!(format["required"], false);
    assert_eq!(format["schema"]["default"], "openai");
    app.stop().await;
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_generated_python_client_drives_a_session_without_surprises() {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let venv = target.join("openapi-venv");
    let generator = venv.join("bin/openapi-python-client");
    if !generator.exists() {
        assert!(
            std::env::var("BATON_REQUIRE_OPENAPI_CLIENT").as_deref() != Ok("1"),
            "openapi-python-client is missing at {} (.ci/run installs it)",
            generator.display()
        );
        eprintln!(
            "skipped: no openapi-python-client at {}",
            generator.display()
        );
        return;
    }
    let app = spawn_app(|c| {
        c.tokens = vec![("alice".into(), "s3cret".into())];
        c.queue_capacity = 1;
    })
    .await;
    let resp = app
        .client
        .http
        .get(format!("{}/openapi.json", app.client.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let doc = resp.bytes().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let doc_path = dir.path().join("openapi.json");
    std::fs::write(&doc_path, &doc).unwrap();
    let here = workspace().join("tests/openapi-client");
    let out = tokio::process::Command::new(&generator)
        .arg("generate")
        .arg("--path")
        .arg(&doc_path)
        .arg("--output-path")
        .arg(dir.path().join("baton_client"))
        .arg("--meta")
        .arg("none")
        .arg("--config")
        .arg(here.join("config.yaml"))
        .output()
        .await
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "generating the client: {log}");
    assert!(
        !log.contains("WARNING"),
        "the generator skipped parts of the document: {log}"
    );
    let out = tokio::process::Command::new(venv.join("bin/python"))
        .arg(here.join("drive.py"))
        .arg(&app.client.base)
        .arg("s3cret")
        .env("PYTHONPATH", dir.path())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "the generated client: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    app.stop().await;
}
