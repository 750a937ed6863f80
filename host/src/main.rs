//! The `lorahost` binary.
use clap::Parser;

#[global_allocator]
static ALLOC: lorahost::alloc_stats::Counting = lorahost::alloc_stats::Counting;

fn main() -> std::process::ExitCode {
    lorahost::cli::init_logging();
    // Paths are recorded in JSON and YAML (run.json, config.yaml, summaries), which hold text:
    // an argument that is not UTF-8 is named here, before anything runs or is written.
    if let Err(e) = lorahost::cli::check_utf8_args(std::env::args_os()) {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    let cli = lorahost::cli::Cli::parse();
    match lorahost::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(lorahost::train::interrupt::exit_code_of(&e))
        }
    }
}
