//! `<outbox>/.infl8/status.json` and `infl8 watch --status`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Written atomically to `<outbox>/.infl8/status.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Status {
    pub state: String,
    pub pid: u32,
    pub started_at: String,
    pub updated_at: String,
    pub inbox: PathBuf,
    pub outbox: PathBuf,
    pub model: PathBuf,
    pub model_sha256: String,
    /// Files in the inbox not processed yet (arriving ones included).
    pub queue: usize,
    pub done: usize,
    pub failed: usize,
    pub current: Option<String>,
    pub last_input: Option<String>,
    pub last_latency_s: Option<f64>,
}

pub(crate) fn print_status(outbox: &Path) -> Result<ExitCode> {
    let path = outbox.join(".infl8/status.json");
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "no status at {} (has infl8 watch run on this outbox?)",
            path.display()
        )
    })?;
    let status: Status =
        serde_json::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))?;
    let alive = Path::new(&format!("/proc/{}", status.pid)).exists();
    let state = if status.state == "running" && !alive {
        "not running (the service died; a restart resumes it)".to_string()
    } else {
        status.state.clone()
    };
    println!("state:        {state}");
    println!("pid:          {}", status.pid);
    println!("started:      {}", status.started_at);
    println!("updated:      {}", status.updated_at);
    println!("inbox:        {}", status.inbox.display());
    println!(
        "model:        {} (sha256 {})",
        status.model.display(),
        status.model_sha256
    );
    println!("queue:        {}", status.queue);
    println!("done:         {}", status.done);
    println!("failed:       {}", status.failed);
    println!("current:      {}", status.current.as_deref().unwrap_or("-"));
    println!(
        "last input:   {}",
        status.last_input.as_deref().unwrap_or("-")
    );
    match status.last_latency_s {
        Some(l) => println!("last latency: {l:.2} s (last volume segmented)"),
        None => println!("last latency: -"),
    }
    Ok(ExitCode::SUCCESS)
}
