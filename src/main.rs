//! darwin-vz-nix: parse the command line, run one command, map the result to an exit code
//! (0 success, 1 runtime failure, 2 bad usage or bad input).

mod commands;

use std::process::ExitCode;

use clap::Parser;

use dvn::cli::Cli;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // clap prints help/version on stdout (exit 0) and usage errors on stderr (exit 2).
            let _ = err.print();
            return ExitCode::from(err.exit_code() as u8);
        }
    };
    // Logging starts inside `run`: a `start` opens its --log-file only once its input is known to be good.
    match commands::run(cli, init_logging) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("darwin-vz-nix: error: {err:#}");
            if commands::is_bad_input(&err) { ExitCode::from(2) } else { ExitCode::from(1) }
        }
    }
}

fn init_logging(log_file: Option<&std::path::Path>) -> std::io::Result<()> {
    use std::io::IsTerminal;
    let filter = || tracing_subscriber::EnvFilter::try_from_env("DVN_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if let Some(path) = log_file {
        let writer = dvn::logfile::ReopeningFile::open(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("opening the log file {}: {e}", path.display())))?;
        tracing_subscriber::fmt().with_env_filter(filter()).with_writer(writer).with_target(false).with_ansi(false).init();
        return Ok(());
    }
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter()).with_writer(std::io::stderr).with_target(false).with_ansi(terminal);
    if terminal {
        builder.without_time().init();
    } else {
        builder.init();
    }
    Ok(())
}
