//! A toy gateway: worker threads serve requests for a few agents, each
//! request acquiring an estimate and settling the real usage.
//!
//! `cargo run --release --example gateway`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use agent_budget::{BudgetLimit, BudgetManager, Settlement};

fn main() {
    let budgets = Arc::new(BudgetManager::new());
    let agents: Vec<_> = (0..4).map(|_| uuid::Uuid::new_v4()).collect();
    for (i, agent) in agents.iter().enumerate() {
        budgets.set_budget(BudgetLimit {
            agent_id: *agent,
            token_budget: 50_000 * (i as u64 + 1),
            calls_budget: 200,
            window_secs: 60,
        });
    }

    let (served, refused, refunded) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    thread::scope(|s| {
        for worker in 0..4u64 {
            let (budgets, agents) = (&budgets, &agents);
            let (served, refused, refunded) = (&served, &refused, &refunded);
            s.spawn(move || {
                for request in 0..300u64 {
                    let agent = &agents[((worker + request) % 4) as usize];
                    // Estimate: prompt plus max_tokens. Real usage: less.
                    let estimate = 400 + (request % 7) * 100;
                    match budgets.acquire(agent, estimate, 1) {
                        Ok(reservation) => {
                            let used = estimate * 3 / 5;
                            if let Settlement::Applied {
                                refunded_tokens, ..
                            } = reservation.settle(used)
                            {
                                refunded.fetch_add(refunded_tokens, Ordering::Relaxed);
                            }
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });

    println!(
        "served {}, refused {}, refunded {} tokens",
        served.into_inner(),
        refused.into_inner(),
        refunded.into_inner()
    );
    for info in budgets.all_full_info() {
        println!(
            "agent {}: {:>6}/{:<6} tokens, {:>3}/{:<3} calls, window ends in {}s",
            info.agent_id,
            info.tokens_used,
            info.token_limit,
            info.calls_used,
            info.calls_limit,
            info.window_remaining_secs
        );
    }
}
