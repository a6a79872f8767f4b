//! Host side of the agent protocol (placeholder).
