//! What the simulated scheduler asks for: which agent, how many tokens it
//! estimates, how many it really uses, and the budgets the agents have.
//!
//! Requests are drawn before the clock starts, into a buffer each worker
//! cycles through, so that sampling the Zipf distribution is not counted as
//! the managers' time.

use agent_budget::{AgentId, BudgetLimit};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

/// Length of a budget window: short, so windows roll over during a run.
pub const WINDOW_SECS: u64 = 1;
/// Tokens per agent per window. With the estimates below, an agent runs out
/// after roughly 9,000 requests in a window: the hottest agents of a skewed
/// workload do, the long tail never does.
pub const TOKEN_BUDGET: u64 = 10_000_000;
/// Calls per agent per window: a little above what the token budget allows,
/// so both refusal reasons occur.
pub const CALLS_BUDGET: u64 = 10_000;
/// Requests buffered per worker (a power of two).
const REQUESTS_PER_WORKER: usize = 1 << 15;

/// One scheduling decision: acquire `estimate` tokens and one call for
/// agent number `agent`, then settle `actual` tokens.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    /// Index into the agent ids.
    pub agent: u32,
    /// Tokens reserved.
    pub estimate: u32,
    /// Tokens settled: 50% to 120% of the estimate.
    pub actual: u32,
}

/// The agents of a run, `agents` ids the same in every run.
pub fn agent_ids(agents: usize) -> Vec<AgentId> {
    let mut rng = SmallRng::seed_from_u64(0xa6e7);
    (0..agents)
        .map(|_| AgentId::from_u128(rng.random()))
        .collect()
}

/// The budget every agent gets.
pub fn budget(agent_id: AgentId) -> BudgetLimit {
    BudgetLimit {
        agent_id,
        token_budget: TOKEN_BUDGET,
        calls_budget: CALLS_BUDGET,
        window_secs: WINDOW_SECS,
    }
}

/// A worker's request buffer: agents ranked by a Zipf distribution with
/// exponent `skew` (agent 0 the most popular), estimates of 200 to 2,000
/// tokens. Every worker shares the ranking, so hot agents are hot for all.
pub fn requests(agents: usize, skew: f64, seed: u64) -> Vec<Request> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let zipf = Zipf::new(agents as f64, skew).expect("agents >= 1 and skew >= 0 are checked");
    (0..REQUESTS_PER_WORKER)
        .map(|_| {
            // Zipf yields ranks 1..=agents as floats.
            let rank = zipf.sample(&mut rng) as usize;
            let estimate = rng.random_range(200..=2_000u32);
            let actual = (f64::from(estimate) * rng.random_range(0.5..=1.2)) as u32;
            Request {
                agent: (rank.clamp(1, agents) - 1) as u32,
                estimate,
                actual,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_stay_in_range_and_skew_concentrates_them() {
        let uniform = requests(100, 0.0, 1);
        let skewed = requests(100, 1.5, 1);
        assert!(uniform.iter().chain(&skewed).all(|r| r.agent < 100));
        assert!(skewed.iter().all(|r| r.actual >= r.estimate / 2));
        let top = |rs: &[Request]| rs.iter().filter(|r| r.agent == 0).count();
        assert!(top(&skewed) > 5 * top(&uniform));
    }
}
