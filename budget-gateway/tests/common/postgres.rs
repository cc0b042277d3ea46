//! A PostgreSQL database of the test's own, on the machine's server
//! (127.0.0.1:5432, trust auth, user `postgres`; `.ci/run` starts it):
//! created with a unique name, dropped when dropped. Another server can be
//! named by `BUDGET_GATEWAY_TEST_POSTGRES` (a URL to its `postgres`
//! database).

use sqlx::Connection;

const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database created for one test; dropped (with its connections) when
/// this is dropped.
pub struct TestDb {
    server: String,
    name: String,
}

fn server() -> String {
    std::env::var("BUDGET_GATEWAY_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_SERVER.to_owned())
}

async fn connect(server: &str) -> sqlx::PgConnection {
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        sqlx::PgConnection::connect(server),
    )
    .await
    .unwrap_or_else(|_| panic!("PostgreSQL at {server} did not answer within 10 s"))
    .unwrap_or_else(|e| {
        panic!(
            "cannot connect to PostgreSQL at {server} ({e}): these tests need it \
             (`.ci/run` starts it: pg_ctlcluster --skip-systemctl-redirect <version> main start)"
        )
    })
}

impl TestDb {
    /// Creates `ab_test_<random>` on the server.
    pub async fn create() -> Self {
        let server = server();
        let name = format!("ab_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = connect(&server).await;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let _ = admin.close().await;
        TestDb { server, name }
    }

    /// Its URL, for `--db`.
    pub fn url(&self) -> String {
        match self.server.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{}", self.name),
            None => panic!("{} is not a URL to a database", self.server),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Dropped inside a runtime, perhaps a single-threaded one: the
        // drop runs on a thread of its own, with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let mut admin = connect(&server).await;
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await
                })
        })
        .join();
        if !matches!(dropped, Ok(Ok(_))) && !std::thread::panicking() {
            panic!("cannot drop the test database {}", self.name);
        }
    }
}
