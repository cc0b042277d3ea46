//! A toy gateway on tokio: each request reserves an estimate (waiting up to
//! 50 ms for budget), "forwards" it, and settles the real usage from the
//! task that streams the response.
//!
//! `cargo run --release --example gateway`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_budget::{BudgetLimit, BudgetManager, Settlement};

#[derive(Default)]
struct Tally {
    served: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    refunded: AtomicU64,
}

#[tokio::main]
async fn main() {
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

    let tally = Arc::new(Tally::default());
    let requests: Vec<_> = (0..1_200u64)
        .map(|request| {
            let (budgets, tally) = (budgets.clone(), tally.clone());
            let agent = agents[(request % 4) as usize];
            tokio::spawn(async move {
                // Estimate: prompt plus max_tokens. Real usage: less.
                let estimate = 400 + (request % 7) * 100;
                let waiting = budgets.acquire_owned_wait(&agent, estimate, 1);
                let reservation =
                    match tokio::time::timeout(Duration::from_millis(50), waiting).await {
                        Ok(Ok(reservation)) => reservation,
                        Ok(Err(_)) => return tally.refused.fetch_add(1, Ordering::Relaxed),
                        Err(_) => return tally.timed_out.fetch_add(1, Ordering::Relaxed),
                    };
                // The upstream answers; the response streams for a while.
                tokio::time::sleep(Duration::from_millis(request % 5)).await;
                let used = estimate * 3 / 5;
                if let Settlement::Applied {
                    refunded_tokens, ..
                } = reservation.settle(used)
                {
                    tally.refunded.fetch_add(refunded_tokens, Ordering::Relaxed);
                }
                tally.served.fetch_add(1, Ordering::Relaxed)
            })
        })
        .collect();
    for request in requests {
        request.await.expect("no request panics");
    }

    println!(
        "served {}, refused {}, gave up waiting {}, refunded {} tokens",
        tally.served.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        tally.timed_out.load(Ordering::Relaxed),
        tally.refunded.load(Ordering::Relaxed)
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
