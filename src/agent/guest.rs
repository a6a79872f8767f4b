//! Guest side of the agent protocol (placeholder).
