//! `persist` and `restore`: the seed's format, atomic writes, bad files.

mod common;

use std::path::Path;

use agent_budget::{BudgetManager, LockedBudgetManager, PersistError};
use common::{agent, limit, mocked};

fn leftovers(folder: &Path, keep: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p != keep)
        .collect()
}

for_both_managers! {
    fn a_round_trip_keeps_limits_usage_and_the_rest_of_the_window<M>() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/state.json");
        let (m, time) = mocked::<M>();
        let (a, b) = (agent(), agent());
        m.set_budget(limit(a, 1000, 10, 3600));
        m.set_budget(limit(b, 50, 5, 60));
        m.reserve(&a, 250).unwrap();
        m.track_call(&a).unwrap();
        time.advance_secs(600);
        m.persist(&path).unwrap();
        assert!(leftovers(path.parent().unwrap(), &path).is_empty(), "no temporary file left");

        let (restored, _) = mocked::<M>();
        restored.restore(&path).unwrap();
        let full = restored.full_info(&a).unwrap();
        assert_eq!((full.token_limit, full.tokens_used, full.calls_used), (1000, 250, 1));
        // Wall time passes between persist and restore; a second at most here.
        assert!((2998..=3000).contains(&full.window_remaining_secs), "{full:?}");
        assert_eq!(restored.remaining(&b).tokens_remaining, 50);
        assert_eq!(restored.all_full_info().len(), 2);
    }
}

for_both_managers! {
    fn restore_replaces_all_state<M>() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (m, _) = mocked::<M>();
        let (kept, dropped) = (agent(), agent());
        m.set_budget(limit(kept, 10, 1, 60));
        m.persist(&path).unwrap();
        m.set_budget(limit(dropped, 10, 1, 60));
        m.reserve(&kept, 10).unwrap();
        m.restore(&path).unwrap();
        assert!(m.full_info(&dropped).is_none());
        assert_eq!(m.remaining(&kept).tokens_remaining, 10);
    }
}

for_both_managers! {
    fn a_missing_file_changes_nothing<M>() {
        let dir = tempfile::tempdir().unwrap();
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 10, 1, 60));
        m.restore(&dir.path().join("absent.json")).unwrap();
        assert_eq!(m.remaining(&a).tokens_remaining, 10);
    }
}

for_both_managers! {
    fn a_bad_file_is_a_clear_error_and_changes_nothing<M>() {
        let dir = tempfile::tempdir().unwrap();
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 10, 1, 60));
        m.reserve(&a, 4).unwrap();
        let good = dir.path().join("good.json");
        m.persist(&good).unwrap();
        let text = std::fs::read_to_string(&good).unwrap();

        let id = a.to_string();
        let mismatched = text.replacen(&format!("\"agent_id\": \"{id}\""), &format!("\"agent_id\": \"{}\"", agent()), 1);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("truncated", text.as_bytes()[..text.len() / 2].to_vec()),
            ("not json", b"budgets: yes".to_vec()),
            ("not utf-8", vec![0xff, 0xfe, 0x00]),
            ("wrong shape", br#"{"budgets": [], "usage": {}}"#.to_vec()),
            ("negative", text.replace("\"tokens_used\": 4", "\"tokens_used\": -4").into_bytes()),
            ("bad time", text.replace("\"window_start\": \"", "\"window_start\": \"yesterday").into_bytes()),
            ("bad id", br#"{"budgets": {"nope": {}}, "usage": {}}"#.to_vec()),
            ("id mismatch", mismatched.into_bytes()),
        ];
        for (what, bytes) in cases {
            let path = dir.path().join(format!("{what}.json"));
            std::fs::write(&path, bytes).unwrap();
            let err = m.restore(&path).expect_err(what);
            let message = err.to_string();
            assert!(message.contains(&path.display().to_string()), "{what}: {message}");
            match (what, &err) {
                ("id mismatch", PersistError::Inconsistent { .. }) => {}
                (_, PersistError::Malformed { .. }) if what != "id mismatch" => {}
                _ => panic!("{what}: unexpected error {err:?}"),
            }
            assert_eq!(m.remaining(&a).tokens_remaining, 6, "{what} changed the state");
        }
        // A folder where a file should be cannot be read.
        let err = m.restore(dir.path()).unwrap_err();
        assert!(matches!(err, PersistError::Read { .. }), "{err:?}");
        assert_eq!(m.remaining(&a).tokens_remaining, 6);
    }
}

for_both_managers! {
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary<M>() {
        let dir = tempfile::tempdir().unwrap();
        let (m, _) = mocked::<M>();
        m.set_budget(limit(agent(), 10, 1, 60));
        // The target is a non-empty folder, so the final rename must fail.
        let target = dir.path().join("occupied");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"x").unwrap();
        let err = m.persist(&target).unwrap_err();
        assert!(matches!(err, PersistError::Write { .. }), "{err:?}");
        assert!(leftovers(dir.path(), &target).is_empty());
        assert!(target.join("keep").exists());
    }
}

for_both_managers! {
    fn the_seeds_file_format_is_read<M>() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.json");
        let (a, b) = (agent(), agent());
        // Written the way the seed's serde derive writes it: an expired
        // window for `a`, a fresh one for `b`, whose usage is missing.
        let start = (chrono::Utc::now() - chrono::Duration::seconds(30)).to_rfc3339();
        let json = format!(
            r#"{{
              "budgets": {{
                "{a}": {{"agent_id": "{a}", "token_budget": 1000, "calls_budget": 10, "window_secs": 60}},
                "{b}": {{"agent_id": "{b}", "token_budget": 5, "calls_budget": 1, "window_secs": 10}}
              }},
              "usage": {{
                "{a}": {{"tokens_used": 400, "calls_used": 2, "window_start": "{start}"}}
              }}
            }}"#
        );
        std::fs::write(&path, json).unwrap();
        let (m, _) = mocked::<M>();
        m.restore(&path).unwrap();
        let full = m.full_info(&a).unwrap();
        assert_eq!((full.tokens_used, full.calls_used), (400, 2));
        assert!((29..=30).contains(&full.window_remaining_secs), "{full:?}");
        assert_eq!(m.remaining(&b).tokens_remaining, 5);
    }
}

for_both_managers! {
    fn the_written_file_is_the_seeds_layout<M>() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 1000, 10, 60));
        m.reserve(&a, 7).unwrap();
        m.persist(&path).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let id = a.to_string();
        assert_eq!(value["budgets"][&id]["agent_id"], id.as_str());
        assert_eq!(value["budgets"][&id]["token_budget"], 1000);
        assert_eq!(value["budgets"][&id]["calls_budget"], 10);
        assert_eq!(value["budgets"][&id]["window_secs"], 60);
        assert_eq!(value["usage"][&id]["tokens_used"], 7);
        assert_eq!(value["usage"][&id]["calls_used"], 0);
        let start = value["usage"][&id]["window_start"].as_str().unwrap();
        let start = chrono::DateTime::parse_from_rfc3339(start).unwrap();
        assert_eq!(start.offset().local_minus_utc(), 0);
        assert!((chrono::Utc::now() - start.to_utc()).num_seconds().abs() < 5);
    }
}

/// Everything but the seconds left, which the wall clock's passing between
/// persist and restore may tick down by one.
fn same_state(x: &agent_budget::FullBudgetInfo, y: &agent_budget::FullBudgetInfo) {
    let strip = |i: &agent_budget::FullBudgetInfo| agent_budget::FullBudgetInfo {
        window_remaining_secs: 0,
        ..i.clone()
    };
    assert_eq!(strip(x), strip(y));
    assert!(
        x.window_remaining_secs.abs_diff(y.window_remaining_secs) <= 1,
        "{x:?} {y:?}"
    );
}

#[test]
fn state_moves_between_the_managers_in_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let (there, back) = (dir.path().join("there.json"), dir.path().join("back.json"));
    let a = agent();
    let (locked, _) = mocked::<LockedBudgetManager>();
    locked.set_budget(limit(a, 100, 4, 600));
    locked.reserve(&a, 30).unwrap();
    locked.persist(&there).unwrap();

    let (lock_free, _) = mocked::<BudgetManager>();
    lock_free.restore(&there).unwrap();
    same_state(
        &lock_free.full_info(&a).unwrap(),
        &locked.full_info(&a).unwrap(),
    );
    lock_free.track_call(&a).unwrap();
    lock_free.persist(&back).unwrap();

    let (again, _) = mocked::<LockedBudgetManager>();
    again.restore(&back).unwrap();
    same_state(
        &again.full_info(&a).unwrap(),
        &lock_free.full_info(&a).unwrap(),
    );
    assert_eq!(again.full_info(&a).unwrap().calls_used, 1);
}
