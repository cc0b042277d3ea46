//! Loom models of agent-budget; see tests/.
