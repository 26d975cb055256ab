//! The `blkmirror` binary: a thin shell over the library.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = blkmirror::command::cli::Cli::parse();
    blkmirror::command::cli::run(cli).into()
}
