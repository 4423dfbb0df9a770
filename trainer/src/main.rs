//! `trainer`: CAE pre-training. See `cae_trainer::cli` for the commands.

use std::process::ExitCode;

fn main() -> ExitCode {
    match cae_trainer::cli::main_from(std::env::args_os()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = cae_trainer::cli::exit_code(&e);
            if code >= 128 {
                eprintln!("{e:#}")
            } else {
                eprintln!("error: {e:#}")
            }
            ExitCode::from(code)
        }
    }
}
