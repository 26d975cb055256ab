//! The command surface: the CLI and its exit codes, configuration files, the long-running
//! daemons, status reports, the control socket with metrics, and logging.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod exit;
pub mod logging;
pub mod roles;
pub mod service;
pub mod status;
