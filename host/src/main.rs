//! The `lorahost` binary.
use clap::Parser;

#[global_allocator]
static ALLOC: lorahost::alloc_stats::Counting = lorahost::alloc_stats::Counting;

fn main() -> std::process::ExitCode {
    lorahost::cli::init_logging();
    let cli = lorahost::cli::Cli::parse();
    match lorahost::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(lorahost::train::interrupt::exit_code_of(&e))
        }
    }
}
