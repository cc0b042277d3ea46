//! A state file's `restore`, on both managers: never panics; both accept
//! or refuse the same files; an accepted file restores the same agents,
//! and persisting it again and restoring that gives the same state.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use agent_budget::{BudgetManager, FullBudgetInfo, LockedBudgetManager};
use libfuzzer_sys::fuzz_target;

fn scratch(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        // Memory-backed where there is one: `persist` syncs what it writes.
        let base = Some(PathBuf::from("/dev/shm"))
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("agent-budget-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        dir
    });
    dir.join(name)
}

/// Where every manager's clock zero sits in UTC (2026-12-01T00:00:00Z,
/// near the seed files' times). With the mock clock never moving, a
/// persist and the restore after it happen at the same instant: managers
/// on the real wall clock saw it move between the two, and a fast bucket
/// refilled a token every few milliseconds of it, which failed the
/// comparison at random (a restored `tokens_used` of 7, then 5).
fn utc_origin() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(1_796_083_200, 0).expect("a UTC instant")
}

/// Each agent's limits and usage, in id order. (Not the time left in its
/// window: left out while the wall clock moved between a persist and a
/// restore, which it no longer does.)
fn sorted(infos: Vec<FullBudgetInfo>) -> Vec<(agent_budget::AgentId, [u64; 5])> {
    let mut rows: Vec<_> = infos
        .into_iter()
        .map(|i| {
            let row = [
                i.token_limit,
                i.tokens_used,
                i.calls_limit,
                i.calls_used,
                i.window_secs,
            ];
            (i.agent_id, row)
        })
        .collect();
    rows.sort_by_key(|(id, _)| *id);
    rows
}

fuzz_target!(|bytes: &[u8]| {
    let file = scratch("state.json");
    std::fs::write(&file, bytes).expect("write the case");
    let (clock, _mock) = quanta::Clock::mock();
    let lock_free = BudgetManager::with_clock_at(clock.clone(), utc_origin());
    let locked = LockedBudgetManager::with_clock_at(clock.clone(), utc_origin());
    let (a, b) = (lock_free.restore(&file), locked.restore(&file));
    assert_eq!(a.is_ok(), b.is_ok(), "{a:?} / {b:?}");
    if a.is_err() {
        assert!(
            lock_free.all_full_info().is_empty(),
            "a refused file changed nothing"
        );
        return;
    }
    let restored = sorted(lock_free.all_full_info());
    let ids =
        |rows: &[(agent_budget::AgentId, [u64; 5])]| rows.iter().map(|r| r.0).collect::<Vec<_>>();
    assert_eq!(ids(&restored), ids(&sorted(locked.all_full_info())));
    let again = scratch("again.json");
    lock_free
        .persist(&again)
        .expect("persist what was restored");
    let second = BudgetManager::with_clock_at(clock, utc_origin());
    second.restore(&again).expect("our own file restores");
    assert_eq!(sorted(second.all_full_info()), restored);
});
