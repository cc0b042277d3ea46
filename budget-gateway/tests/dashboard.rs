//! The dashboard in a real browser: Debian's `chromium`, driven over the
//! W3C WebDriver protocol by `chromedriver`, against a gateway in process
//! on loopback. Signs in with a wrong key (the page says so) and the right
//! one (the agents appear), sends traffic and watches the numbers move,
//! exhausts a limit and sees its bar turn red, and saves screenshots at a
//! desktop and a phone size in `target/`.
//!
//! Without `/usr/bin/chromium` the test fails, unless
//! `DASHBOARD_TEST_OPTIONAL=1` is set, when it says loudly that it skipped.
//! `.ci/run` installs chromium, so CI always runs it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_budget::BudgetManager;
use common::*;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// `chromedriver` on a free loopback port, stopped when dropped.
struct Driver {
    child: Child,
    url: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Driver {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = driver
                .http
                .get(format!("{}/status", driver.url))
                .send()
                .await
                .ok();
            if let Some(r) = ready {
                let status: Value = r.json().await.unwrap_or(Value::Null);
                if status["value"]["ready"] == true {
                    return driver;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver never got ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("chromedriver answers");
        let status = response.status();
        let value: Value = response.json().await.expect("JSON from chromedriver");
        assert!(status.is_success(), "{method} {path}: {status} {value}");
        value["value"].clone()
    }

    async fn session(&self, width: u32, height: u32) -> Session<'_> {
        let mut args = vec![
            "--headless=new".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--no-first-run".to_owned(),
            format!("--window-size={width},{height}"),
        ];
        if rustix::process::geteuid().is_root() {
            args.push("--no-sandbox".to_owned());
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let value = self
            .call(reqwest::Method::POST, "/session", Some(caps))
            .await;
        Session {
            driver: self,
            id: value["sessionId"].as_str().unwrap().to_owned(),
        }
    }
}

/// A browser session.
struct Session<'d> {
    driver: &'d Driver,
    id: String,
}

impl Session<'_> {
    async fn post(&self, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.id);
        self.driver
            .call(reqwest::Method::POST, &path, Some(body))
            .await
    }

    async fn get(&self, path: &str) -> Value {
        let path = format!("/session/{}{path}", self.id);
        self.driver.call(reqwest::Method::GET, &path, None).await
    }

    async fn goto(&self, url: &str) {
        self.post("/url", json!({"url": url})).await;
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        found[ELEMENT].as_str().unwrap().to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.post(&format!("/element/{id}/clear"), json!({})).await;
        self.post(&format!("/element/{id}/value"), json!({"text": text}))
            .await;
    }

    async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.post(&format!("/element/{id}/click"), json!({})).await;
    }

    /// Runs `script` (a function body) in the page; its return value.
    async fn run(&self, script: &str) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": []}))
            .await
    }

    /// Polls `script` every 100 ms until `check` accepts its value, for
    /// at most 15 s; the accepted value.
    async fn wait_for(&self, what: &str, script: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let value = self.run(script).await;
            if check(&value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "never happened: {what} (last seen: {value})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn resize(&self, width: u32, height: u32) {
        self.post("/window/rect", json!({"width": width, "height": height}))
            .await;
    }

    async fn screenshot(&self, path: &Path) {
        let png = decode_base64(self.get("/screenshot").await.as_str().unwrap());
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
        eprintln!("dashboard test: screenshot saved to {}", path.display());
    }

    async fn close(self) {
        let path = format!("/session/{}", self.id);
        self.driver.call(reqwest::Method::DELETE, &path, None).await;
    }
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let digits: Vec<u32> = chunk
            .iter()
            .take_while(|&&c| c != b'=')
            .map(|&c| value(c))
            .collect();
        let word = digits
            .iter()
            .enumerate()
            .fold(0u32, |w, (i, d)| w | d << (18 - 6 * i));
        for i in 0..digits.len().saturating_sub(1) {
            out.push((word >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// Where screenshots go: the workspace's `target/`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Whether the browser is there; if not, fails, or with
/// `DASHBOARD_TEST_OPTIONAL=1` says loudly that the test is skipped.
fn browser_present() -> bool {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return true;
    }
    if std::env::var("DASHBOARD_TEST_OPTIONAL").as_deref() == Ok("1") {
        eprintln!(
            "\n\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !!! SKIPPED: the dashboard's browser test: {CHROMIUM} or {CHROMEDRIVER}\n\
             !!! is missing (apt-get install chromium chromium-driver), and\n\
             !!! DASHBOARD_TEST_OPTIONAL=1 allows that. CI runs it.\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        );
        return false;
    }
    panic!(
        "{CHROMIUM} and {CHROMEDRIVER} are needed by the dashboard's browser test: \
         apt-get install -y chromium chromium-driver (or set DASHBOARD_TEST_OPTIONAL=1 to skip it)"
    );
}

fn used_of(agent: &str, resource: &str) -> String {
    format!(
        "const e = document.querySelector('[data-agent-id=\"{agent}\"] [data-resource=\"{resource}\"]'); \
         return e ? [Number(e.dataset.used), e.dataset.level] : null;"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_agents_live_in_a_real_browser() {
    if !browser_present() {
        return;
    }
    // A: six calls a minute, so it can be used up; B: plenty.
    let g = start_with(BudgetManager::new(), &config_text(1_000_000, 6, ""), None).await;
    let driver = Driver::start().await;
    let browser = driver.session(1280, 900).await;
    browser.goto(&format!("{}/dashboard", g.url)).await;

    // A wrong key: said so, and no agent shown.
    browser.type_into("#admin-key", "not-the-admin-key").await;
    browser.click("#sign-in").await;
    let said = browser
        .wait_for(
            "the wrong key is reported",
            "return document.getElementById('message').textContent;",
            |v| v.as_str().is_some_and(|t| t.contains("Wrong admin key")),
        )
        .await;
    assert!(said.as_str().unwrap().contains("403"), "{said}");
    let shown = browser
        .run("return document.querySelectorAll('[data-agent-id]').length;")
        .await;
    assert_eq!(shown, 0);
    let kept = browser
        .run("return sessionStorage.length + localStorage.length + document.cookie.length;")
        .await;
    assert_eq!(kept, 0, "a wrong key is not kept");

    // The right key: both agents, nothing used yet.
    browser.type_into("#admin-key", ADMIN_KEY).await;
    browser.click("#sign-in").await;
    let ids = browser
        .wait_for(
            "both agents are shown",
            "return [...document.querySelectorAll('[data-agent-id]')].map(e => e.dataset.agentId).sort();",
            |v| v.as_array().is_some_and(|a| a.len() == 2),
        )
        .await;
    let mut expected = [AGENT_A, AGENT_B];
    expected.sort_unstable();
    assert_eq!(ids, json!(expected));
    assert_eq!(
        browser.run(&used_of(AGENT_A, "requests")).await,
        json!([0, "ok"])
    );
    let stored = browser
        .run("return [sessionStorage.length, localStorage.length, document.cookie];")
        .await;
    assert_eq!(
        stored,
        json!([1, 0, ""]),
        "the key is kept for the tab only"
    );
    let label = browser
        .run(&format!(
            "return document.querySelector('[data-agent-id=\"{AGENT_A}\"] h2').textContent;"
        ))
        .await;
    assert!(label.as_str().unwrap().starts_with("agent-a"), "{label}");

    // Traffic: the numbers move without a reload.
    let marker = browser.run("window.notReloaded = true; return 1;").await;
    assert_eq!(marker, 1);
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
    for _ in 0..4 {
        assert_eq!(g.chat(KEY_A, &body).await.status(), 200);
    }
    let started = Instant::now();
    browser
        .wait_for(
            "four requests shown, green",
            &used_of(AGENT_A, "requests"),
            |v| *v == json!([4, "ok"]),
        )
        .await;
    eprintln!(
        "dashboard test: traffic shown {} ms after it was sent",
        started.elapsed().as_millis()
    );
    // Past 80%: amber.
    assert_eq!(g.chat(KEY_A, &body).await.status(), 200);
    browser
        .wait_for(
            "five of six shown, amber",
            &used_of(AGENT_A, "requests"),
            |v| *v == json!([5, "warn"]),
        )
        .await;
    // The sixth uses it up, the seventh is refused: red, and counted.
    assert_eq!(g.chat(KEY_A, &body).await.status(), 200);
    assert_eq!(g.chat(KEY_A, &body).await.status(), 429);
    browser
        .wait_for("used up, red", &used_of(AGENT_A, "requests"), |v| {
            *v == json!([6, "bad"])
        })
        .await;
    let totals = format!(
        "const e = document.querySelector('[data-agent-id=\"{AGENT_A}\"] .totals'); \
         return e ? [Number(e.dataset.admitted), Number(e.dataset.refused)] : null;"
    );
    browser
        .wait_for("the chart counts 6 admitted, 1 refused", &totals, |v| {
            *v == json!([6, 1])
        })
        .await;
    let tokens = browser.run(&used_of(AGENT_A, "tokens")).await;
    assert!(tokens[0].as_u64().unwrap() > 0, "{tokens}");
    assert_eq!(
        browser.run("return window.notReloaded === true;").await,
        true,
        "refreshed in place"
    );
    browser
        .screenshot(&target_dir().join("dashboard.png"))
        .await;

    // A phone: one column, nothing wider than the screen.
    browser.resize(390, 844).await;
    let fits = browser
        .wait_for(
            "the page fits a phone's width",
            "return [document.documentElement.scrollWidth, window.innerWidth, \
             getComputedStyle(document.getElementById('agents')).gridTemplateColumns.split(' ').length];",
            |v| v[0].as_u64() <= v[1].as_u64() && v[2] == 1,
        )
        .await;
    eprintln!("dashboard test: phone layout {fits}");
    browser
        .screenshot(&target_dir().join("dashboard-phone.png"))
        .await;
    browser.close().await;
}
