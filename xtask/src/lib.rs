//! The library part of the project tasks: the `run-analysis` report (summary schema, HTML page,
//! terminal table), shared by the `xtask` binary and the integration tests.

pub mod report;
