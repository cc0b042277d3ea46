//! The gateway's TOML configuration: never panics; an error names the file
//! and a line and column inside the text; a configuration that parses has
//! unique keys and ids, none empty.
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use budget_gateway::config::{parse, ConfigError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match parse(Path::new("fuzz.toml"), text) {
        Err(ConfigError::Invalid { line, column, .. }) => {
            let lines = text.split('\n').count().max(1);
            assert!(line >= 1 && line <= lines, "line {line} of {lines}");
            assert!(column >= 1);
        }
        Err(other) => panic!("parse reads no file: {other}"),
        Ok(config) => {
            assert!(!config.admin_key.trim().is_empty());
            let mut ids = HashSet::new();
            let mut keys = HashSet::new();
            for agent in &config.agents {
                assert!(ids.insert(agent.agent_id));
                assert!(!agent.limits.specs().is_empty());
                if let Some(key) = &agent.api_key {
                    assert!(!key.trim().is_empty());
                    assert!(keys.insert(key.clone()));
                }
            }
        }
    }
});
