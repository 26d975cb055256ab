//! The `blkmirror` binary: a thin shell over the library.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = blkmirror::cli::Cli::parse();
    blkmirror::cli::run(cli)
}
