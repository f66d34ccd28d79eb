//! `infl8`: segment NIfTI volumes with a backend plugin.

mod commands;
mod config_check;
mod flags;
mod isolate;
mod plugin_check;
mod plugins_cmd;
mod segment_cmd;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "infl8",
    version,
    about = "Edge runtime for 3D medical image segmentation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Segment a NIfTI volume (or every volume in a folder).
    Segment(Box<flags::SegmentArgs>),
    /// Print a model's inputs, outputs and manifest.
    Info(flags::InfoArgs),
    /// List the backend plugins found.
    Plugins(flags::PluginsArgs),
    /// Write the built-in example model (a head/background network).
    ExampleModel(flags::ExampleModelArgs),
    /// Plugin tools: `infl8 plugin check LIB.so` (conformance kit).
    #[command(subcommand)]
    Plugin(plugin_check::PluginCommand),
    /// Settings tools: `infl8 config check FILE` (validate a firmware profile).
    #[command(subcommand)]
    Config(config_check::ConfigCommand),
    /// Run as a service: segment NIfTI files as they arrive in an inbox.
    Watch(Box<watch::WatchArgs>),
}

fn main() -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files,
        // journald or a parent process reading our stderr.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Segment(a) => segment_cmd::segment(*a),
        Command::Info(a) => commands::info(a),
        Command::Plugins(a) => plugins_cmd::plugins(a),
        Command::ExampleModel(a) => commands::example_model(a),
        Command::Plugin(c) => plugin_check::run(c),
        Command::Config(c) => config_check::run(c),
        Command::Watch(a) => watch::run(*a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", commands::log_safe(&error_chain(&e)));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, skipping a cause whose text the message above
/// it already quotes (library errors often embed their source).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}
