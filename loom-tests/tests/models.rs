//! Every interleaving (up to `LOOM_MAX_PREEMPTIONS`) of small races on one
//! agent of the lock-free `BudgetManager`.
#![cfg(agent_budget_loom)]

use std::time::Duration;

use agent_budget::{BudgetManager, ClockSource, Settlement};
use loom::sync::Arc;
use loom::thread;
use loom_tests::{concurrent_admissions, explore, limit, RacyCell, AGENT};

/// A manager on a loom mock clock with [`AGENT`]'s budget set.
fn manager(tokens: u64, calls: u64, window_secs: u64) -> (Arc<BudgetManager>, ClockSource) {
    let clock = ClockSource::mock();
    let m = BudgetManager::with_clock(clock.clone());
    m.set_budget(limit(tokens, calls, window_secs));
    (Arc::new(m), clock)
}

fn spawn<T: Send + 'static>(
    m: &Arc<BudgetManager>,
    f: impl FnOnce(&BudgetManager) -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let m = m.clone();
    thread::spawn(move || f(&m))
}

fn used(m: &BudgetManager) -> (u64, u64) {
    let info = m.full_info(&AGENT).expect("agent is configured");
    (info.tokens_used, info.calls_used)
}

#[test]
fn reserves_near_the_token_limit_never_over_admit() {
    explore("reserve x3 near the token limit", || {
        let (m, _) = manager(2, 10, 60);
        let m = Arc::try_unwrap(m).ok().unwrap();
        concurrent_admissions(m, 2, 3, 1);
    });
}

#[test]
fn track_calls_near_the_call_limit_never_over_admit() {
    explore("track_call x3 near the call limit", || {
        let (m, _) = manager(100, 2, 60);
        let handles: Vec<_> = (0..3)
            .map(|_| spawn(&m, |m| u64::from(m.track_call(&AGENT).is_ok())))
            .collect();
        let admitted: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(admitted, 2);
        assert_eq!(used(&m), (0, 2));
    });
}

#[test]
fn acquires_take_tokens_and_calls_together() {
    explore("acquire vs acquire, all-or-nothing", || {
        // Either request fits alone; together they exceed both limits, and
        // the third fits only beside the first.
        let (m, _) = manager(4, 2, 60);
        let requests = [(3, 1), (2, 2), (1, 1)];
        let handles: Vec<_> = requests
            .iter()
            .map(|&(t, c)| {
                spawn(&m, move |m| match m.acquire(&AGENT, t, c) {
                    Ok(r) => {
                        drop(r); // stays charged
                        (t, c)
                    }
                    Err(_) => (0, 0),
                })
            })
            .collect();
        let (mut tokens, mut calls) = (0, 0);
        for h in handles {
            let (t, c) = h.join().unwrap();
            tokens += t;
            calls += c;
        }
        assert!(tokens <= 4 && calls <= 2, "({tokens}, {calls}) over (4, 2)");
        assert_eq!(
            used(&m),
            (tokens, calls),
            "tokens without calls or the reverse"
        );
        assert!(tokens > 0, "something always fits");
    });
}

#[test]
fn reserve_racing_release_loses_no_update() {
    explore("reserve vs release", || {
        let (m, _) = manager(10, 10, 60);
        m.reserve(&AGENT, 5).unwrap();
        let reserve = spawn(&m, |m| m.reserve(&AGENT, 3).is_ok());
        let release = spawn(&m, |m| m.release(&AGENT, 2));
        assert!(reserve.join().unwrap());
        release.join().unwrap();
        assert_eq!(used(&m).0, 6);
    });
}

#[test]
fn a_rollover_racing_reserves_admits_each_window_its_limit_only() {
    explore("clock advance vs reserve x2", || {
        let (m, clock) = manager(1, 10, 1);
        m.reserve(&AGENT, 1).unwrap();
        let advance = thread::spawn(move || clock.advance(Duration::from_secs(1)));
        let reserves: Vec<_> = (0..2)
            .map(|_| spawn(&m, |m| u64::from(m.reserve(&AGENT, 1).is_ok())))
            .collect();
        advance.join().unwrap();
        let admitted: u64 = reserves.into_iter().map(|h| h.join().unwrap()).sum();
        // The old window was full, so any admission is in the new window,
        // which holds exactly that and nothing from the old one.
        assert!(admitted <= 1);
        assert_eq!(used(&m).0, admitted);
    });
}

#[test]
fn cancel_and_settle_racing_a_rollover_never_refund_into_the_new_window() {
    for (name, settle) in [
        ("cancel vs rollover vs reserve", None),
        ("settle(0) vs rollover vs reserve", Some(0)),
        (
            "settle(3), an extra charge, vs rollover vs reserve",
            Some(3),
        ),
    ] {
        explore(name, move || {
            let (m, clock) = manager(2, 10, 1);
            let taken = m.acquire(&AGENT, 1, 1).unwrap();
            let advance = thread::spawn(move || clock.advance(Duration::from_secs(1)));
            // Fits only in a fresh window (or after a refund in the old one).
            let reserve = spawn(&m, |m| m.reserve(&AGENT, 2).is_ok());
            let outcome = match settle {
                None => taken.cancel(),
                Some(actual) => taken.settle(actual),
            };
            advance.join().unwrap();
            let admitted = reserve.join().unwrap();
            assert_ne!(outcome, Settlement::AgentRemoved);
            // The clock has moved: what is read is the new window. It holds
            // the reserve if the reserve ran there, an extra charge if the
            // settle came after the rollover (overuse is carried over), and
            // nothing else: no refund ever reaches it.
            // Whichever window the settle found, 3 used against 1 reserved
            // owes 2: charged in the old window, or carried into the new
            // one. Never forgiven.
            let carried = match (settle, outcome) {
                (
                    Some(3),
                    Settlement::Applied {
                        charged_tokens: 2, ..
                    },
                ) => 0,
                (Some(3), Settlement::CarriedOver { charged_tokens: 2 }) => 2,
                (Some(3), other) => panic!("overuse of 2 not charged: {other:?}"),
                (
                    _,
                    Settlement::Applied {
                        charged_tokens: 0, ..
                    }
                    | Settlement::WindowEnded,
                ) => 0,
                (_, other) => panic!("{other:?}"),
            };
            let tokens = used(&m).0;
            let reserved_here = tokens
                .checked_sub(carried)
                .expect("the carried charge is there");
            assert!(
                reserved_here == 0 || reserved_here == 2,
                "old usage leaked: {tokens} with {carried} carried over"
            );
            if reserved_here == 2 {
                assert!(admitted);
            }
        });
    }
}

#[test]
fn lowering_the_limit_racing_reserves_never_admits_past_the_larger() {
    explore("set_budget(4 -> 1) vs reserve(2) x2", || {
        let (m, _) = manager(4, 10, 60);
        let lower = spawn(&m, |m| m.set_budget(limit(1, 10, 60)));
        let reserves: Vec<_> = (0..2)
            .map(|_| spawn(&m, |m| if m.reserve(&AGENT, 2).is_ok() { 2 } else { 0 }))
            .collect();
        lower.join().unwrap();
        let admitted: u64 = reserves.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(admitted <= 4);
        assert_eq!(used(&m).0, admitted);
        // Once the lower limit is in, nothing more is admitted.
        assert!(m.reserve(&AGENT, 1).is_err() || admitted == 0);
    });
}

#[test]
fn concurrent_set_budgets_leave_enforcement_and_report_in_step() {
    explore("set_budget(1) vs set_budget(3)", || {
        let (m, _) = manager(2, 10, 60);
        let one = spawn(&m, |m| m.set_budget(limit(1, 10, 60)));
        let three = spawn(&m, |m| m.set_budget(limit(3, 10, 60)));
        one.join().unwrap();
        three.join().unwrap();
        // Whichever call won, the limit reported is the limit enforced.
        let reported = m.full_info(&AGENT).unwrap().token_limit;
        assert!(reported == 1 || reported == 3);
        assert!(
            m.reserve(&AGENT, reported).is_ok(),
            "reported {reported}, enforced less"
        );
        assert!(
            m.reserve(&AGENT, 1).is_err(),
            "reported {reported}, enforced more"
        );
    });
}

#[test]
fn reset_racing_reserves_reads_consistently() {
    explore("reset_window vs reserve x2", || {
        let (m, _) = manager(2, 10, 60);
        m.reserve(&AGENT, 2).unwrap();
        let reset = spawn(&m, |m| m.reset_window(&AGENT));
        let reserves: Vec<_> = (0..2)
            .map(|_| spawn(&m, |m| u64::from(m.reserve(&AGENT, 1).is_ok())))
            .collect();
        reset.join().unwrap();
        let admitted: u64 = reserves.into_iter().map(|h| h.join().unwrap()).sum();
        // Admissions before the reset were refused (the window was full);
        // those after it are all that the new window holds.
        assert_eq!(used(&m).0, admitted);
        let info = m.remaining(&AGENT);
        assert_eq!(info.tokens_remaining, 2 - admitted);
    });
}

#[test]
fn remove_racing_acquire_and_settle_never_panics_or_refunds_elsewhere() {
    explore("remove_budget vs acquire+settle vs full_info", || {
        let (m, _) = manager(2, 10, 60);
        let remove = spawn(&m, |m| m.remove_budget(&AGENT));
        let acquire = spawn(&m, |m| match m.acquire(&AGENT, 2, 1) {
            Ok(r) => Some(r.settle(1)),
            Err(_) => None,
        });
        let read = spawn(&m, |m| {
            if let Some(info) = m.full_info(&AGENT) {
                assert!(info.tokens_used <= 2 && info.calls_used <= 1, "{info:?}");
            }
        });
        remove.join().unwrap();
        read.join().unwrap();
        let settled = acquire.join().unwrap();
        assert!(m.full_info(&AGENT).is_none());
        if let Some(outcome) = settled {
            assert!(matches!(
                outcome,
                Settlement::AgentRemoved
                    | Settlement::Applied {
                        refunded_tokens: 1,
                        ..
                    }
            ));
        }
    });
}

/// The canary: the same over-reservation model on a cell that checks and
/// then stores. loom must find the interleaving where two threads both
/// pass the check; if it did not, the models above would prove nothing.
#[test]
#[should_panic(expected = "admitted 2 > limit 1")]
fn the_canary_racy_cell_is_caught() {
    explore("canary: load-check-store cell", || {
        concurrent_admissions(RacyCell::new(1), 1, 2, 1);
    });
}

#[test]
fn a_handle_admits_nothing_once_its_agent_is_removed_even_if_set_again() {
    explore("handle reserve x2 vs remove_budget + set_budget", || {
        // A std `Arc`: what `handle_owned` takes (its counts are not part
        // of the model).
        let m = std::sync::Arc::new(BudgetManager::with_clock(ClockSource::mock()));
        m.set_budget(limit(10, 10, 60));
        let handle = m.handle_owned(&AGENT).expect("configured");
        let removed = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let remover = {
            let (m, removed) = (m.clone(), removed.clone());
            thread::spawn(move || {
                m.remove_budget(&AGENT);
                removed.store(true, loom::sync::atomic::Ordering::SeqCst);
                m.set_budget(limit(10, 10, 60));
            })
        };
        let user = {
            let removed = removed.clone();
            thread::spawn(move || {
                for _ in 0..2 {
                    let after_removal = removed.load(loom::sync::atomic::Ordering::SeqCst);
                    let admitted = handle.reserve(1).is_ok();
                    assert!(
                        !(after_removal && admitted),
                        "admitted through a handle after remove_budget returned"
                    );
                }
                handle
            })
        };
        remover.join().unwrap();
        let handle = user.join().unwrap();
        // The new incarnation never saw the handle's requests, and the
        // handle is refused from now on.
        assert_eq!(used(&m), (0, 0));
        assert!(handle.reserve(1).is_err());
        assert_eq!(handle.remaining().tokens_remaining, 0);
    });
}
