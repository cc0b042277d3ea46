//! The admin API's bodies, read and checked as its handlers do:
//! `POST /v1/agents` and `PUT /v1/agents/{agent_id}` (an agent's limits,
//! parent, label and mode) and `POST /v1/agents/{agent_id}/keys` (a key's
//! name). Never panics; a refused body is a `400` or a `422`; an accepted
//! agent, applied to a core budget, shown as the API shows it, and sent
//! back as the `PUT` of what the view shows, reads to the same settings;
//! an accepted key name is shown as given and taken again as it is.
#![no_main]

use agent_budget::{AgentId, BudgetManager};
use budget_gateway::admin::{read_agent_body, read_key_body, AgentView, ApiError};
use budget_gateway::catalog::{AgentEntry, Source};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

/// The agent in a `PUT`'s path.
const PATH_ID: AgentId = AgentId::from_u128(0x7f9c_24e8_3b1a_4c5d_9e2f_1a2b_3c4d_5e6f);

fn refused_as_a_client_error(e: &ApiError) {
    let status = e.status().as_u16();
    assert!(status == 400 || status == 422, "{status}: {e:?}");
}

/// What a client that reads an agent and writes it back sends: the view's
/// limits as configured, its parent, label and mode.
fn put_of_view(view: &Value) -> Vec<u8> {
    let view = view.as_object().expect("a view is an object");
    let limits: Vec<Value> = view["limits"]
        .as_array()
        .expect("a view lists its limits")
        .iter()
        .map(|state| state["limit"].clone())
        .collect();
    let mut put = Map::new();
    put.insert("limits".to_owned(), Value::Array(limits));
    for field in ["agent_id", "parent", "metrics_label", "enforce"] {
        if let Some(value) = view.get(field) {
            put.insert(field.to_owned(), value.clone());
        }
    }
    serde_json::to_vec(&put).expect("JSON")
}

fn agent(body: &[u8], path_id: Option<AgentId>) {
    let (agent_id, settings) = match read_agent_body(body, path_id) {
        Ok(read) => read,
        Err(e) => return refused_as_a_client_error(&e),
    };
    if path_id.is_some() {
        assert_eq!(agent_id, path_id, "a PUT is for the path's agent");
    }
    let agent_id = agent_id.unwrap_or(PATH_ID);
    let (clock, _mock) = quanta::Clock::mock();
    let budgets = BudgetManager::with_clock(clock);
    settings.limits.apply(agent_id, &budgets);
    let entry = AgentEntry {
        agent_id,
        source: Source::Api,
        settings: settings.clone(),
        created_at: Some(0),
        updated_at: Some(0),
    };
    let view = AgentView::new(entry, |cell| budgets.full_info(cell));
    assert_eq!(view.limits.len(), settings.limits.specs().len());
    for (state, spec) in view.limits.iter().zip(settings.limits.specs()) {
        assert_eq!(&state.limit, spec, "a view shows each limit as configured");
        // Nothing is used yet: only a limit of zero is exhausted.
        assert_eq!(state.used.requests, spec.requests.map(|_| 0));
        assert_eq!(state.used.tokens, spec.tokens.map(|_| 0));
        assert_eq!(state.used.spend_usd, spec.spend_usd.map(|_| 0.0));
        let left = &state.remaining;
        let none_left = left.requests == Some(0)
            || left.tokens == Some(0)
            || left.spend_usd.is_some_and(|usd| usd == 0.0);
        assert_eq!(state.exhausted, none_left, "{state:?}");
    }
    let shown = serde_json::to_value(&view).expect("a view serializes");
    let put = put_of_view(&shown);
    match read_agent_body(&put, Some(agent_id)) {
        Ok((again_id, again)) => {
            assert_eq!(again_id, Some(agent_id));
            assert_eq!(again, settings, "{}", String::from_utf8_lossy(&put));
        }
        Err(e) => panic!(
            "what a GET shows, a PUT refuses ({e:?}): {}",
            String::from_utf8_lossy(&put)
        ),
    }
}

fn key(body: &[u8]) {
    let name = match read_key_body(body) {
        Ok(name) => name,
        Err(e) => return refused_as_a_client_error(&e),
    };
    if let Some(name) = &name {
        assert!(!name.trim().is_empty());
        assert!(name.chars().count() <= 128);
        assert!(!name.chars().any(char::is_control));
    }
    let again = serde_json::to_vec(&json!({ "name": name })).expect("JSON");
    assert_eq!(read_key_body(&again).expect("a name taken once"), name);
}

fuzz_target!(|body: &[u8]| {
    agent(body, None);
    agent(body, Some(PATH_ID));
    key(body);
});
