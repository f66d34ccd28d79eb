//! `infl8 watch`: the scanner-side service (inbox -> outbox, journaled).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Folder new NIfTI files arrive in.
    #[arg(long, value_name = "DIR")]
    pub inbox: PathBuf,
    /// Folder results are written to.
    #[arg(long, value_name = "DIR")]
    pub outbox: PathBuf,
}

pub fn run(a: WatchArgs) -> Result<ExitCode> {
    bail!("watch {}: not written yet", a.inbox.display())
}
