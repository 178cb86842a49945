//! The `meshpeer` command: parses arguments, reads the config file, sets up
//! logging, calls into `cli::*`. Errors end here with one clear message and
//! a non-zero exit.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let file = if cli::uses_config(&args.command) {
        match cli::file_options(args.config.as_deref()) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        meshpeer::config::Options::default()
    };
    let filter = cli::log_filter(cli::cli_log_level(&args.command), file.log_level.as_deref());
    // Lives as long as the process: the SIGHUP handler changes its filter.
    let log: &'static cli::Logging = Box::leak(Box::new(cli::Logging::init(&filter)));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args, log, file)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
