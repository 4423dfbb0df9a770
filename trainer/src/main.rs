//! `trainer`: CAE pre-training. See `cae_trainer::cli` for the commands.

use std::process::ExitCode;

fn main() -> ExitCode {
    match cae_trainer::cli::main_from(std::env::args_os()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
