//! Multi-threaded CPU backend.
