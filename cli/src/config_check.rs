//! `infl8 config check`: validate a settings file (a firmware profile).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate a settings file: unknown keys and bad values are errors naming the key.
    Check(CheckArgs),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Settings files to check.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

pub fn run(c: ConfigCommand) -> Result<ExitCode> {
    match c {
        ConfigCommand::Check(a) => bail!("config check {:?}: not written yet", a.files),
    }
}
