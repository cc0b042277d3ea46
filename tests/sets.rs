//! Admission across a set of limits (`acquire_set`), on both managers,
//! through the public API only: all or none, the limit named by a refusal,
//! a limit reached twice charged once, settling each limit with its own
//! actual in its own window, the size limit, and waiting across a set.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agent_budget::{
    AgentId, BudgetKind, BudgetLimiter, Claim, RefusalReason, Settlement, MAX_SET_LIMITS,
};
use common::{agent, limit, mocked};

fn used<M: BudgetLimiter>(m: &M, a: &AgentId) -> (u64, u64) {
    let info = m.full_info(a).expect("the agent has a budget");
    (info.tokens_used, info.calls_used)
}

fn claim(agent_id: AgentId, tokens: u64, calls: u64) -> Claim {
    Claim {
        agent_id,
        tokens,
        calls,
    }
}

fn applied(refunded_tokens: u64, charged_tokens: u64, refunded_calls: u64) -> Settlement {
    Settlement::Applied {
        refunded_tokens,
        charged_tokens,
        refunded_calls,
    }
}

for_both_managers! {
    fn a_set_is_taken_at_every_limit_or_at_none<M>() {
        let (m, time) = mocked::<M>();
        let (minute, day, spend) = (agent(), agent(), agent());
        m.set_budget(limit(minute, 1_000, 10, 60));
        m.set_budget(limit(day, 5_000, 100, 86_400));
        m.set_budget(limit(spend, 400, u64::MAX, 30 * 86_400));
        let claims = [claim(minute, 400, 1), claim(day, 400, 1), claim(spend, 250, 0)];

        let first = m.acquire_set(&claims).expect("fits everywhere");
        assert_eq!(first.claims(), &claims);
        assert_eq!(used(&m, &minute), (400, 1));
        assert_eq!(used(&m, &day), (400, 1));
        assert_eq!(used(&m, &spend), (250, 0));

        // The spend limit has 150 left: the whole set is refused there, and
        // nothing is taken at the limits that had room.
        time.advance_secs(10);
        let err = m.acquire_set(&claims).unwrap_err();
        assert_eq!((err.agent_id, err.refused_by, err.kind), (spend, spend, BudgetKind::Token));
        assert_eq!(err.retry_after, Some(Duration::from_secs(30 * 86_400 - 10)));
        assert_eq!(
            err.reason,
            RefusalReason::Exceeded { requested: 250, remaining: 150, used: 250, limit: 400 }
        );
        assert_eq!(used(&m, &minute), (400, 1));
        assert_eq!(used(&m, &day), (400, 1));

        // Each limit settles with its own claim's actual.
        let outcome = first.settle_with(|n, c| {
            assert_eq!(c, &claims[n]);
            [300, 300, 150][n]
        });
        assert_eq!(outcome, applied(100, 0, 0));
        assert_eq!(used(&m, &minute), (300, 1));
        assert_eq!(used(&m, &day), (300, 1));
        assert_eq!(used(&m, &spend), (150, 0));
        m.acquire_set(&claims).expect("the refund made room").cancel();
        assert_eq!(used(&m, &spend), (150, 0));
    }
}

for_both_managers! {
    fn a_refusal_names_the_lowest_limit_short_of_room<M>() {
        let (m, _time) = mocked::<M>();
        let (key, team, other) = (agent(), agent(), agent());
        m.set_budget(limit(key, 100, 10, 60));
        m.set_budget(limit(team, 100, 10, 120));
        m.set_budget(limit(other, 100, 10, 60));
        m.set_parent(&key, Some(&team)).unwrap();
        // Every limit is short: a claim's own agent is named before any
        // ancestor, whatever their ids.
        let err = m
            .acquire_set(&[claim(other, 10, 1), claim(key, 101, 1)])
            .unwrap_err();
        assert_eq!((err.agent_id, err.refused_by), (key, key));
        assert_eq!(err.retry_after, None, "larger than the key's limit");
        // Only the ancestor is short: it is named, for the claim that reached it.
        let taken = m.acquire_set(&[claim(team, 95, 0)]).unwrap();
        let err = m
            .acquire_set(&[claim(other, 10, 1), claim(key, 10, 1)])
            .unwrap_err();
        assert_eq!((err.agent_id, err.refused_by), (key, team));
        assert_eq!(err.retry_after, Some(Duration::from_secs(120)));
        assert!(err.to_string().ends_with(&format!(", at its ancestor {team}")), "{err}");
        assert_eq!(used(&m, &other), (0, 0));
        assert_eq!(used(&m, &key), (0, 0));
        drop(taken);
    }
}

for_both_managers! {
    fn a_limit_reached_twice_is_charged_once_with_the_largest_amounts<M>() {
        let (m, _time) = mocked::<M>();
        let (a, b, parent) = (agent(), agent(), agent());
        m.set_budget(limit(a, 1_000, 10, 60));
        m.set_budget(limit(b, 1_000, 10, 60));
        m.set_budget(limit(parent, 1_000, 10, 60));
        m.set_parent(&a, Some(&parent)).unwrap();
        m.set_parent(&b, Some(&parent)).unwrap();
        // Both claims reach the parent; a third names it directly.
        let claims = [claim(a, 100, 1), claim(b, 300, 0), claim(parent, 50, 2)];
        let r = m.acquire_set(&claims).unwrap();
        assert_eq!(used(&m, &a), (100, 1));
        assert_eq!(used(&m, &b), (300, 0));
        assert_eq!(used(&m, &parent), (300, 2), "the largest of each resource, once");
        // The parent settles with the largest actual of the three claims.
        let outcome = r.settle_with(|n, _| [80, 120, 400][n]);
        assert_eq!(used(&m, &a), (80, 1));
        assert_eq!(used(&m, &b), (120, 0));
        assert_eq!(used(&m, &parent), (400, 2));
        assert_eq!(outcome, applied(0, 100, 0), "the overuse at the parent is the worst");
        // The same agent twice in one set is one limit too.
        let r = m.acquire_set(&[claim(a, 10, 1), claim(a, 20, 1)]).unwrap();
        assert_eq!(used(&m, &a), (100, 2));
        assert_eq!(used(&m, &parent), (420, 3));
        r.cancel();
        assert_eq!(used(&m, &a), (80, 1));
        assert_eq!(used(&m, &parent), (400, 2));
    }
}

for_both_managers! {
    fn limits_without_parents_are_taken_in_ascending_order_of_agent_id<M>() {
        // Each claim on its own agent, none with a parent: the set a key's
        // minute, day and spend limits make (the lock-free manager takes
        // it without building a plan; the locked one with it).
        let (m, _time) = mocked::<M>();
        let mut ids = [agent(), agent(), agent(), agent()];
        ids.sort_unstable();
        let [a, b, c, d] = ids;
        for id in ids {
            m.set_budget(limit(id, 100, 10, 60));
        }
        // Given in another order; `b` and `d` are both short: the refusal
        // names the one taken first, the lower id, and gives back what the
        // claims before it took.
        let taken = m.acquire_set(&[claim(d, 95, 0), claim(b, 95, 0)]).unwrap();
        let err = m
            .acquire_set(&[claim(d, 10, 1), claim(c, 10, 1), claim(b, 10, 1), claim(a, 10, 1)])
            .unwrap_err();
        assert_eq!((err.agent_id, err.refused_by), (b, b));
        assert_eq!(used(&m, &a), (0, 0), "given back");
        assert_eq!(used(&m, &c), (0, 0), "never taken");
        taken.cancel();
        // The same agent twice is one limit, with the largest amounts.
        let r = m.acquire_set(&[claim(c, 30, 1), claim(a, 5, 1), claim(c, 20, 2)]).unwrap();
        assert_eq!(used(&m, &c), (30, 2));
        assert_eq!(used(&m, &a), (5, 1));
        assert_eq!(r.settle_with(|n, _| [25, 5, 40][n]), applied(0, 10, 0));
        assert_eq!(used(&m, &c), (40, 2));
        // Five claims: more than the shortcut takes, the same answers.
        let five = [claim(d, 1, 1), claim(c, 1, 1), claim(b, 1, 1), claim(a, 1, 1), claim(d, 2, 0)];
        let r = m.acquire_set(&five).unwrap();
        assert_eq!(used(&m, &d), (2, 1));
        r.cancel();
        assert_eq!(used(&m, &d), (0, 0));
    }
}

for_both_managers! {
    fn each_limit_settles_in_its_own_window<M>() {
        let (m, time) = mocked::<M>();
        let (short, long) = (agent(), agent());
        m.set_budget(limit(short, 100, 10, 10));
        m.set_budget(limit(long, 100, 10, 60));
        let r = m.acquire_set(&[claim(short, 60, 1), claim(long, 60, 1)]).unwrap();
        time.advance_secs(15);
        // The short window ended: its refund is lost, the long one's applies.
        assert_eq!(r.settle(20), Settlement::WindowEnded);
        assert_eq!(used(&m, &short), (0, 0));
        assert_eq!(used(&m, &long), (20, 1));
        // Overuse reported after the short window ended is carried over.
        let r = m.acquire_set(&[claim(short, 10, 1), claim(long, 10, 1)]).unwrap();
        time.advance_secs(10);
        assert_eq!(r.settle(15), Settlement::CarriedOver { charged_tokens: 5 });
        assert_eq!(used(&m, &short), (5, 0));
        assert_eq!(used(&m, &long), (35, 2));
    }
}

for_both_managers! {
    fn a_chain_is_a_set_of_one_claim<M>() {
        let (m, _time) = mocked::<M>();
        let (child, parent) = (agent(), agent());
        m.set_budget(limit(child, 1_000, 10, 60));
        m.set_budget(limit(parent, 150, 10, 60));
        m.set_parent(&child, Some(&parent)).unwrap();
        let r = m.acquire_set(&[claim(child, 100, 1)]).unwrap();
        assert_eq!(m.chain_info(&child).iter().map(|i| i.tokens_used).collect::<Vec<_>>(), [100, 100]);
        let single = m.acquire(&child, 100, 1).unwrap_err();
        let set = m.acquire_set(&[claim(child, 100, 1)]).unwrap_err();
        assert_eq!(single, set);
        assert_eq!(r.settle(40), applied(60, 0, 0));
        let r = m.acquire(&child, 100, 1).unwrap();
        assert_eq!(m.chain_info(&child).iter().map(|i| i.tokens_used).collect::<Vec<_>>(), [140, 140]);
        assert_eq!(r.cancel(), applied(100, 0, 1));
    }
}

for_both_managers! {
    fn unknown_agents_empty_sets_and_sets_too_large<M>() {
        let (m, _time) = mocked::<M>();
        let (known, unknown) = (agent(), agent());
        m.set_budget(limit(known, 100, 10, 60));
        let err = m.acquire_set(&[claim(known, 1, 1), claim(unknown, 1, 1)]).unwrap_err();
        assert_eq!((err.agent_id, err.reason), (unknown, RefusalReason::NoBudget));
        assert_eq!(used(&m, &known), (0, 0));

        let empty = m.acquire_set(&[]).expect("nothing to take");
        assert!(empty.claims().is_empty());
        assert_eq!(empty.settle(5), applied(0, 0, 0));

        let many: Vec<AgentId> = (0..=MAX_SET_LIMITS).map(|_| agent()).collect();
        for a in &many {
            m.set_budget(limit(*a, 100, 10, 60));
        }
        let claims: Vec<Claim> = many.iter().map(|a| claim(*a, 1, 1)).collect();
        let err = m.acquire_set(&claims).unwrap_err();
        assert_eq!(
            err.reason,
            RefusalReason::TooManyLimits { limits: MAX_SET_LIMITS + 1, max: MAX_SET_LIMITS }
        );
        assert_eq!(err.retry_after, None);
        assert!(err.to_string().contains("at most 32"), "{err}");
        assert!(many.iter().all(|a| used(&m, a) == (0, 0)));
        // The maximum itself is admitted.
        let r = m.acquire_set(&claims[..MAX_SET_LIMITS]).unwrap();
        assert!(many[..MAX_SET_LIMITS].iter().all(|a| used(&m, a) == (1, 1)));
        r.cancel();
        // Ancestors count: the same 32 claims, one of them now with a
        // parent, reach 33 limits.
        let (child, parent) = (many[0], agent());
        m.set_budget(limit(parent, 100, 10, 60));
        m.set_parent(&child, Some(&parent)).unwrap();
        let err = m.acquire_set(&claims[..MAX_SET_LIMITS]).unwrap_err();
        assert!(matches!(err.reason, RefusalReason::TooManyLimits { .. }), "{err:?}");
    }
}

for_both_managers! {
    fn owned_set_reservations_travel<M>() {
        let (m, _time) = mocked::<M>();
        let m = Arc::new(m);
        let (a, b) = (agent(), agent());
        m.set_budget(limit(a, 100, 10, 60));
        m.set_budget(limit(b, 100, 10, 60));
        let r = m.acquire_set_owned(&[claim(a, 50, 1), claim(b, 60, 1)]).unwrap();
        let outcome = std::thread::spawn(move || r.settle_with(|n, _| [10, 20][n]))
            .join()
            .unwrap();
        assert_eq!(outcome, applied(40, 0, 0));
        assert_eq!(used(&*m, &a), (10, 1));
        assert_eq!(used(&*m, &b), (20, 1));
    }
}

#[cfg(feature = "async")]
for_both_managers_async! {
    async fn waiting_for_a_set_is_woken_by_the_limit_that_binds<M>() {
        let (m, _time) = mocked::<M>();
        let m = Arc::new(m);
        let (a, b) = (agent(), agent());
        m.set_budget(limit(a, 100, 10, 60));
        m.set_budget(limit(b, 100, 10, 60));
        let hog = m.acquire_set_owned(&[claim(b, 90, 1)]).unwrap();
        let waiting = tokio::spawn(m.acquire_set_owned_wait(vec![claim(a, 50, 1), claim(b, 50, 1)]));
        tokio::task::yield_now().await;
        assert_eq!(m.waiting(), 1);
        assert_eq!(used(&*m, &a), (0, 0), "a waiter holds nothing");
        // A refund at the binding limit lets the whole set in.
        hog.settle(10);
        let r = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("woken by the refund")
            .unwrap()
            .expect("fits now");
        assert_eq!(used(&*m, &a), (50, 1));
        assert_eq!(used(&*m, &b), (60, 2));
        r.cancel();
        // What can never fit is refused at once.
        let err = m.acquire_set_owned_wait(vec![claim(a, 101, 1)]).await.unwrap_err();
        assert_eq!((err.refused_by, err.retry_after), (a, None));
        assert_eq!(m.waiting(), 0);
    }
}

for_both_managers! {
    fn a_shadowed_limit_counts_past_its_limit_and_refuses_nothing<M>() {
        let (m, time) = mocked::<M>();
        let (trial, day) = (agent(), agent());
        m.set_budget(limit(trial, 100, 2, 60));
        m.set_budget(limit(day, 10_000, 100, 86_400));
        let shadowed = |id: &AgentId| *id == trial;
        let claims = [claim(trial, 80, 1), claim(day, 80, 1)];
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(m.acquire_set_shadowed(&claims, shadowed).unwrap());
        }
        // Past its limit on both resources, and counted there.
        assert_eq!(used(&m, &trial), (240, 3));
        assert_eq!(used(&m, &day), (240, 3));
        assert!(m.acquire_set(&claims).is_err(), "enforced, it refuses");
        // Settled like any set: less than reserved comes back everywhere.
        for set in held {
            set.settle(50);
        }
        assert_eq!(used(&m, &trial), (150, 3));
        assert_eq!(used(&m, &day), (150, 3));
        time.advance_secs(60);
        assert_eq!(used(&m, &trial), (0, 0), "a new window forgets it");
        assert_eq!(used(&m, &day), (150, 3));
    }
}

for_both_managers! {
    fn an_enforced_limit_beside_a_shadowed_one_still_refuses_and_takes_nothing<M>() {
        let (m, _time) = mocked::<M>();
        let (team, key, spend) = (agent(), agent(), agent());
        m.set_budget(limit(team, 1_000, 100, 60));
        m.set_budget(limit(key, 10, 1, 60));
        m.set_budget(limit(spend, 500, u64::MAX, 60));
        m.set_parent(&key, Some(&team)).unwrap();
        let shadowed = |id: &AgentId| *id == key;
        let claims = [claim(key, 400, 1), claim(spend, 400, 0)];
        let first = m.acquire_set_shadowed(&claims, shadowed).unwrap();
        assert_eq!(used(&m, &key), (400, 1));
        // The team (an enforced ancestor) has room, the spend limit has not.
        let refused = m.acquire_set_shadowed(&claims, shadowed).unwrap_err();
        assert_eq!(refused.refused_by, spend);
        assert_eq!(used(&m, &key), (400, 1), "the shadowed take was given back");
        assert_eq!(used(&m, &team), (400, 1));
        first.cancel();
        // An enforced ancestor refuses through a shadowed child.
        let big = [claim(key, 1_001, 1)];
        let refused = m.acquire_set_shadowed(&big, shadowed).unwrap_err();
        assert_eq!(refused.refused_by, team);
        assert_eq!(used(&m, &key), (0, 0));
        assert_eq!(used(&m, &team), (0, 0));
    }
}

for_both_managers! {
    fn a_check_takes_nothing_and_answers_as_the_acquire_would<M>() {
        let (m, time) = mocked::<M>();
        let (key, team, day) = (agent(), agent(), agent());
        m.set_budget(limit(key, 200, 2, 60));
        m.set_budget(limit(team, 150, 10, 120));
        m.set_budget(limit(day, 1_000, 100, 86_400));
        m.set_parent(&key, Some(&team)).unwrap();

        assert_eq!(m.check(&key, 100, 1), Ok(()));
        assert_eq!(m.check_set(&[claim(key, 100, 1), claim(day, 1_000, 1)]), Ok(()));
        assert_eq!(used(&m, &key), (0, 0), "a check takes nothing");
        assert_eq!(used(&m, &team), (0, 0));

        // The team is short: named, with its own window's end, as the
        // acquire names it.
        let held = m.acquire(&key, 100, 1).unwrap();
        time.advance_secs(30);
        let checked = m.check(&key, 60, 1).unwrap_err();
        assert_eq!(checked, m.acquire(&key, 60, 1).unwrap_err());
        assert_eq!((checked.agent_id, checked.refused_by), (key, team));
        assert_eq!(checked.retry_after, Some(Duration::from_secs(90)));
        // In a set, any claim short of room refuses it.
        let checked = m.check_set(&[claim(day, 10, 1), claim(key, 60, 1)]).unwrap_err();
        assert_eq!((checked.agent_id, checked.refused_by), (key, team));
        assert!(m.acquire_set(&[claim(day, 10, 1), claim(key, 60, 1)]).is_err());
        assert_eq!(m.check(&key, 50, 1), Ok(()));
        assert_eq!(used(&m, &key), (100, 1));
        assert_eq!(used(&m, &day), (0, 0));
        held.cancel();
        assert_eq!(m.check(&key, 100, 1), Ok(()), "the cancel gave it back");

        let unknown = agent();
        let err = m.check(&unknown, 1, 1).unwrap_err();
        assert_eq!((err.agent_id, err.reason), (unknown, RefusalReason::NoBudget));
        assert_eq!(m.check_set(&[]), Ok(()), "nothing to take");
        let many: Vec<Claim> = (0..=MAX_SET_LIMITS).map(|_| claim(day, 1, 1)).collect();
        let err = m.check_set(&many).unwrap_err();
        assert!(matches!(err.reason, RefusalReason::TooManyLimits { .. }), "{err:?}");
    }
}

/// `acquire_set_owned_reporting` reports each limit taken, once, with the
/// first claim that reaches it and its `full_info` right after the take;
/// nothing on a refusal.
#[test]
fn a_set_admission_reports_each_limit_once_with_the_first_claim_that_reaches_it() {
    let (m, _time) = mocked::<agent_budget::BudgetManager>();
    let m = Arc::new(m);
    let (key, team, day, spend) = (agent(), agent(), agent(), agent());
    m.set_budget(limit(key, 1_000, 10, 60));
    m.set_budget(limit(team, 5_000, 100, 3_600));
    m.set_budget(limit(day, 20_000, 1_000, 86_400));
    m.set_budget(limit(spend, 900, u64::MAX, 30 * 86_400));
    m.set_parent(&key, Some(&team)).unwrap();
    m.set_parent(&day, Some(&team)).unwrap();
    let claims = [claim(key, 400, 1), claim(day, 400, 1), claim(spend, 600, 0)];

    let mut reported = Vec::new();
    let taken = m
        .acquire_set_owned_reporting(&claims, |n, info| reported.push((n, info)))
        .expect("fits everywhere");
    // The team is reached by the key's claim and the day's: reported once,
    // as the key's (the first claim), after the claims' own agents.
    let seen: Vec<_> = reported
        .iter()
        .map(|(n, info)| (*n, info.agent_id))
        .collect();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[3], (0, team));
    let mut own = seen[..3].to_vec();
    own.sort_unstable();
    assert_eq!(own, [(0, key), (1, day), (2, spend)]);
    for (_, info) in &reported {
        assert_eq!(
            Some(info.clone()),
            m.full_info(&info.agent_id),
            "as read right after"
        );
    }
    let team_info = &reported[3].1;
    assert_eq!((team_info.tokens_used, team_info.calls_used), (400, 1));

    // The spend limit has 300 left: refused, nothing reported.
    let mut after_refusal = Vec::new();
    let err = m
        .acquire_set_owned_reporting(&claims, |n, info| after_refusal.push((n, info)))
        .unwrap_err();
    assert_eq!(err.refused_by, spend);
    assert!(after_refusal.is_empty(), "{after_refusal:?}");
    taken.settle(100);
    assert_eq!(used(&*m, &team), (100, 1));
}

/// On limits without parents the report comes in the order they were
/// taken, ascending agent id, each with its claim's index.
#[test]
fn a_set_of_limits_without_parents_reports_them_in_the_order_taken() {
    let (m, _time) = mocked::<agent_budget::BudgetManager>();
    let m = Arc::new(m);
    let mut ids = [agent(), agent(), agent()];
    ids.sort_unstable();
    for id in ids {
        m.set_budget(limit(id, 1_000, 10, 60));
    }
    let claims = [
        claim(ids[2], 30, 1),
        claim(ids[0], 10, 1),
        claim(ids[1], 20, 0),
    ];
    let mut reported = Vec::new();
    let taken = m
        .acquire_set_owned_reporting(&claims, |n, info| {
            reported.push((n, info.agent_id, info.tokens_used))
        })
        .unwrap();
    assert_eq!(
        reported,
        [(1, ids[0], 10), (2, ids[1], 20), (0, ids[2], 30)]
    );
    taken.cancel();
    let mut after_refusal = Vec::new();
    m.set_budget(limit(ids[1], 10, 10, 60));
    let err = m
        .acquire_set_owned_reporting(&claims, |n, _| after_refusal.push(n))
        .unwrap_err();
    assert_eq!(err.refused_by, ids[1]);
    assert!(after_refusal.is_empty(), "{after_refusal:?}");
    assert_eq!(used(&*m, &ids[0]), (0, 0), "given back");
}
