//! Who is whose parent: the authority for linking budgets into chains.
//!
//! The hot paths never read this: each agent's parent travels with its
//! limit (in the lock-free manager, beside its cell), so a request walks
//! its chain without a lock. This registry, kept under the lock that
//! serializes configuration changes, answers what a walk cannot cheaply:
//! would a link make a cycle, and how deep would the deepest chain become.

use std::collections::{HashMap, HashSet};

use crate::error::HierarchyError;
use crate::types::AgentId;

/// The most levels a chain may have, the agent itself included.
pub const MAX_LEVELS: usize = 8;

/// A few agent ids, at most one chain's worth, held inline: what a walk up
/// a chain has seen, or which of its levels got budget back.
#[derive(Clone, Copy)]
pub(crate) struct ChainIds {
    len: usize,
    ids: [AgentId; MAX_LEVELS],
}

impl ChainIds {
    pub(crate) fn new() -> Self {
        ChainIds {
            len: 0,
            ids: [AgentId::nil(); MAX_LEVELS],
        }
    }

    /// Adds `id`; beyond [`MAX_LEVELS`] ids, does nothing (no chain is
    /// longer).
    pub(crate) fn push(&mut self, id: AgentId) {
        if self.len < MAX_LEVELS {
            self.ids[self.len] = id;
            self.len += 1;
        }
    }

    pub(crate) fn contains(&self, id: &AgentId) -> bool {
        self.ids[..self.len].contains(id)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &AgentId> {
        self.ids[..self.len].iter()
    }
}

/// Parent and children links between agents that have budgets.
#[derive(Default, Debug)]
pub(crate) struct Hierarchy {
    parent: HashMap<AgentId, AgentId>,
    children: HashMap<AgentId, HashSet<AgentId>>,
}

impl Hierarchy {
    /// Builds and checks a whole hierarchy (from a restored file): every
    /// parent must be among `agents`, with no cycle and no chain deeper than
    /// [`MAX_LEVELS`].
    pub(crate) fn from_links(
        agents: &HashSet<AgentId>,
        links: impl IntoIterator<Item = (AgentId, AgentId)>,
    ) -> Result<Self, HierarchyError> {
        let mut hierarchy = Hierarchy::default();
        let links: Vec<_> = links.into_iter().collect();
        for &(child, parent) in &links {
            for id in [child, parent] {
                if !agents.contains(&id) {
                    return Err(HierarchyError::UnknownAgent(id));
                }
            }
            hierarchy.parent.insert(child, parent);
            hierarchy.children.entry(parent).or_default().insert(child);
        }
        for &(child, parent) in &links {
            if hierarchy.loops_from(child) {
                return Err(HierarchyError::Cycle { child, parent });
            }
        }
        for &(child, parent) in &links {
            hierarchy.check_depth(child, parent)?;
        }
        Ok(hierarchy)
    }

    /// The agent, then its ancestors, as linked here.
    pub(crate) fn chain(&self, agent: AgentId) -> Vec<AgentId> {
        let mut chain = vec![agent];
        while let Some(&parent) = self.parent.get(chain.last().expect("never empty")) {
            if chain.contains(&parent) || chain.len() > MAX_LEVELS {
                break;
            }
            chain.push(parent);
        }
        chain
    }

    pub(crate) fn parent_of(&self, agent: &AgentId) -> Option<AgentId> {
        self.parent.get(agent).copied()
    }

    /// Whether following parents from `from` comes back to an agent already
    /// passed, however long the chain (every agent has one parent at most,
    /// so a walk either ends or loops within as many steps as there are
    /// links).
    fn loops_from(&self, from: AgentId) -> bool {
        let mut seen = HashSet::new();
        let mut at = from;
        while seen.insert(at) {
            match self.parent.get(&at) {
                Some(&parent) => at = parent,
                None => return false,
            }
        }
        true
    }

    /// Whether following parents from `from` reaches `to`.
    fn reaches(&self, from: AgentId, to: AgentId) -> bool {
        let mut at = from;
        for _ in 0..=MAX_LEVELS {
            if at == to {
                return true;
            }
            match self.parent.get(&at) {
                Some(&parent) => at = parent,
                None => return false,
            }
        }
        // Longer than any legal chain: treat as a loop.
        true
    }

    /// Levels below and including `agent`: 1 for a leaf.
    fn height(&self, agent: AgentId) -> usize {
        let mut height = 1;
        let mut level: Vec<AgentId> = vec![agent];
        while !level.is_empty() && height <= MAX_LEVELS {
            level = level
                .iter()
                .filter_map(|id| self.children.get(id))
                .flatten()
                .copied()
                .collect();
            if !level.is_empty() {
                height += 1;
            }
        }
        height
    }

    fn check_depth(&self, child: AgentId, parent: AgentId) -> Result<(), HierarchyError> {
        let above = self.chain(parent).len();
        let levels = above + self.height(child);
        if levels > MAX_LEVELS {
            return Err(HierarchyError::TooDeep { levels });
        }
        Ok(())
    }

    /// Checks that `child` may be put under `parent` (both known to have
    /// budgets), without changing anything.
    pub(crate) fn check_link(&self, child: AgentId, parent: AgentId) -> Result<(), HierarchyError> {
        if child == parent || self.reaches(parent, child) {
            return Err(HierarchyError::Cycle { child, parent });
        }
        // Without the child's current link: it is being replaced.
        self.check_depth(child, parent)
    }

    /// Links `child` under `parent` (after [`Hierarchy::check_link`]), or
    /// detaches it.
    pub(crate) fn set_parent(&mut self, child: AgentId, parent: Option<AgentId>) {
        if let Some(old) = self.parent.remove(&child) {
            self.unlink_child(old, child);
        }
        if let Some(parent) = parent {
            self.parent.insert(child, parent);
            self.children.entry(parent).or_default().insert(child);
        }
    }

    fn unlink_child(&mut self, parent: AgentId, child: AgentId) {
        if let Some(children) = self.children.get_mut(&parent) {
            children.remove(&child);
            if children.is_empty() {
                self.children.remove(&parent);
            }
        }
    }

    /// Forgets `agent`: its own link, and its children's, whom it returns
    /// (they are now detached).
    pub(crate) fn remove(&mut self, agent: AgentId) -> Vec<AgentId> {
        self.set_parent(agent, None);
        let children: Vec<_> = self
            .children
            .remove(&agent)
            .map(|set| set.into_iter().collect())
            .unwrap_or_default();
        for child in &children {
            self.parent.remove(child);
        }
        children
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> AgentId {
        AgentId::from_u128(n)
    }

    #[test]
    fn links_build_chains_and_refuse_cycles() {
        let mut h = Hierarchy::default();
        h.check_link(id(1), id(2)).unwrap();
        h.set_parent(id(1), Some(id(2)));
        h.set_parent(id(2), Some(id(3)));
        assert_eq!(h.chain(id(1)), [id(1), id(2), id(3)]);
        assert_eq!(
            h.check_link(id(3), id(1)),
            Err(HierarchyError::Cycle {
                child: id(3),
                parent: id(1)
            })
        );
        assert!(matches!(
            h.check_link(id(2), id(2)),
            Err(HierarchyError::Cycle { .. })
        ));
        // Moving a subtree keeps its children.
        h.set_parent(id(2), Some(id(4)));
        assert_eq!(h.chain(id(1)), [id(1), id(2), id(4)]);
        assert_eq!(h.remove(id(2)), [id(1)]);
        assert_eq!(h.chain(id(1)), [id(1)]);
        assert!(h.parent.is_empty() && h.children.is_empty());
    }

    #[test]
    fn no_chain_may_exceed_eight_levels_from_either_end() {
        let mut h = Hierarchy::default();
        // 1 <- 2 <- ... <- 7: seven levels.
        for n in 1..7 {
            h.set_parent(id(n + 1), Some(id(n)));
        }
        assert_eq!(h.chain(id(7)).len(), 7);
        h.check_link(id(8), id(7)).unwrap();
        assert_eq!(
            h.check_link(id(8), id(7)).and(Ok(())),
            Ok(()),
            "the eighth level fits"
        );
        h.set_parent(id(8), Some(id(7)));
        assert_eq!(
            h.check_link(id(9), id(8)),
            Err(HierarchyError::TooDeep { levels: 9 })
        );
        // A two-level subtree under a seven-level chain is nine levels too.
        h.set_parent(id(8), None);
        h.set_parent(id(11), Some(id(10)));
        assert_eq!(
            h.check_link(id(10), id(7)),
            Err(HierarchyError::TooDeep { levels: 9 })
        );
        h.check_link(id(10), id(6)).unwrap();
    }

    #[test]
    fn a_restored_chain_one_level_too_deep_is_too_deep_not_a_cycle() {
        let agents: HashSet<_> = (1..=9).map(id).collect();
        // Every order the links could come in: rotate them.
        let links: Vec<_> = (1..9).map(|n| (id(n), id(n + 1))).collect();
        for start in 0..links.len() {
            let rotated = links[start..].iter().chain(&links[..start]).copied();
            assert_eq!(
                Hierarchy::from_links(&agents, rotated).unwrap_err(),
                HierarchyError::TooDeep { levels: 9 }
            );
        }
    }

    #[test]
    fn a_restored_hierarchy_is_checked_whole() {
        let agents: HashSet<_> = (1..=4).map(id).collect();
        let h = Hierarchy::from_links(&agents, [(id(1), id(2)), (id(2), id(3))]).unwrap();
        assert_eq!(h.chain(id(1)), [id(1), id(2), id(3)]);
        assert_eq!(
            Hierarchy::from_links(&agents, [(id(1), id(9))]).unwrap_err(),
            HierarchyError::UnknownAgent(id(9))
        );
        assert!(matches!(
            Hierarchy::from_links(&agents, [(id(1), id(2)), (id(2), id(1))]),
            Err(HierarchyError::Cycle { .. })
        ));
    }
}
