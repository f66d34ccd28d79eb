//! `infl8 plugin check`: the conformance kit for backend plugins.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Check every backend of a plugin library against the ABI and the tract backend.
    Check(CheckArgs),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The plugin library (`libinfl8_NAME.so`).
    pub library: PathBuf,
}

pub fn run(c: PluginCommand) -> Result<ExitCode> {
    match c {
        PluginCommand::Check(a) => bail!("plugin check {}: not written yet", a.library.display()),
    }
}
