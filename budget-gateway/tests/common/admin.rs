//! Gateways with a database, in process on loopback ports, and the admin
//! API spoken over real HTTP.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agent_budget::BudgetManager;
use budget_gateway::catalog::Catalog;
use budget_gateway::config;
use budget_gateway::db::Database;
use budget_gateway::gateway::{Gateway, GatewayError, Limiter};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::ADMIN_KEY;

/// A gateway serving in process until stopped (or dropped).
pub struct Served {
    pub url: String,
    pub client: reqwest::Client,
    pub catalog: Catalog,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), GatewayError>>>,
}

impl Served {
    /// Serves `gateway` on a free loopback port.
    pub async fn serve(gateway: Gateway) -> Self {
        let catalog = gateway.catalog().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(gateway.serve(listener, async {
            let _ = stopped.await;
        }));
        Served {
            url,
            client: reqwest::Client::new(),
            catalog,
            stop: Some(stop),
            served: Some(served),
        }
    }

    /// Stops it as SIGTERM stops the binary, and waits until it has.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            tokio::time::timeout(Duration::from_secs(10), served)
                .await
                .expect("stopped within 10 s")
                .unwrap()
                .unwrap();
        }
    }

    /// `method path` with the admin key and `body`: the status and the
    /// body (`null` if none, or not JSON).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        self.call_as(Some(ADMIN_KEY), method, path, body).await
    }

    /// The same, with `key` (or none) as the bearer key.
    pub async fn call_as(
        &self,
        key: Option<&str>,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.url));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let bytes = response.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// `method path` with the admin key and `body` sent as it is, as JSON.
    pub async fn call_raw(&self, method: Method, path: &str, body: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(ADMIN_KEY)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// `POST /v1/agents` with `body`, which must succeed: the agent.
    pub async fn create_agent(&self, body: Value) -> Value {
        let (status, agent) = self.call(Method::POST, "/v1/agents", Some(&body)).await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "POST /v1/agents {body}: {agent}"
        );
        agent
    }

    /// `POST /v1/agents/{agent}/keys`, which must succeed: the key's id
    /// and the key.
    pub async fn create_key(&self, agent: &str) -> (String, String) {
        let (status, key) = self
            .call(
                Method::POST,
                &format!("/v1/agents/{agent}/keys"),
                Some(&json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "POST keys of {agent}: {key}");
        (
            key["key_id"].as_str().unwrap().to_owned(),
            key["api_key"].as_str().unwrap().to_owned(),
        )
    }

    /// `GET path` with the admin key, which must answer `200`.
    pub async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    /// A small chat completion with `key`: its status.
    pub async fn chat(&self, key: &str) -> StatusCode {
        let response = self
            .client
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(key)
            .json(&json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}))
            .send()
            .await
            .unwrap();
        let status = response.status();
        response.bytes().await.unwrap();
        status
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(served) = &self.served {
            served.abort();
        }
    }
}

/// A local gateway with the configuration `text` and the database `db`
/// (a SQLite path or a PostgreSQL URL), in front of `upstream`, keeping
/// usage in `state` if given.
pub async fn start_with_db(text: &str, db: &str, upstream: &str, state: Option<&Path>) -> Served {
    let config = config::parse(Path::new("admin.toml"), text).unwrap();
    let db = Database::open(db).await.unwrap();
    let gateway = Gateway::with_database(
        config,
        Arc::new(BudgetManager::new()),
        upstream,
        Duration::from_secs(10),
        Limiter::Budget,
        state.map(Path::to_owned),
        Some(db),
    )
    .await
    .unwrap();
    Served::serve(gateway).await
}
