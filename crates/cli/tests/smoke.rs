#![allow(clippy::unwrap_used)]
mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_gets_an_echo() {
    let app = common::spawn_app(|_| {}).await;
    let s = app
        .client
        .create_session(serde_json::json!({"message": "hi"}))
        .await;
    let id = s["id"].as_str().unwrap();
    app.client.wait_idle(id).await;
    let entries = app.client.entries(id).await;
    assert_eq!(entries[2]["content"], "echo: hi");
    app.stop().await;
}
