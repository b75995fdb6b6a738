//! Helpers shared by husk's integration tests.
