//! `infl8 plugins`: the backends found, whether each can run on this machine
//! (and why not), and the libraries refused.
//!
//! Whether a backend can run is asked of the backend itself: it loads a
//! tiny example model with the settings' options. A backend that answers
//! "unavailable" (no runtime library, no GPU, no driver) cannot run here;
//! any other failure is an error worth a look.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use infl8_core::BackendError;
use infl8_core::config::Settings;
use infl8_core::plugin::PluginHost;
use tracing::warn;

use infl8_core::engine::new_host;

use crate::commands::settings_for;
use crate::flags::PluginsArgs;

/// Whether a backend can run here.
#[derive(Debug, PartialEq, Eq)]
pub enum Availability {
    Yes,
    /// It cannot run on this machine; the reason.
    No(String),
    /// It should run but failed to load the example model.
    Error(String),
}

impl Availability {
    fn column(&self) -> &'static str {
        match self {
            Availability::Yes => "yes",
            Availability::No(_) => "no",
            Availability::Error(_) => "ERROR",
        }
    }
}

/// Asks `backend` to load the probe `model`.
fn probe(host: &PluginHost, settings: &Settings, backend: &str, model: &Path) -> Availability {
    let loaded = host
        .backend(backend)
        .map_err(|e| BackendError::Other(e.to_string()))
        .and_then(|b| b.load(model, &settings.load_options(backend)));
    match loaded {
        Ok(_) => Availability::Yes,
        Err(BackendError::Unavailable(why)) => Availability::No(why),
        Err(e) => Availability::Error(e.to_string()),
    }
}

pub fn plugins(a: PluginsArgs) -> Result<ExitCode> {
    let settings = settings_for(&a.runtime, &serde_json::Value::Object(a.runtime.layer()))?;
    let mut host = new_host(&settings);
    let found = host.discover();
    let backends = host.backends();

    let dir = tempfile::Builder::new()
        .prefix("infl8-plugins")
        .tempdir()
        .context("cannot make a temporary folder for the probe model")?;
    let model = dir.path().join("probe.onnx");
    infl8_onnx::write_model(
        &infl8_onnx::examples::head_mask_model([16, 16, 16], 0.5, 8.0),
        &model,
    )
    .context("cannot write the probe model")?;

    println!(
        "{:<16} {:<10} {:<9} {:<44} LIBRARY",
        "BACKEND", "VERSION", "RUNS HERE", "DESCRIPTION"
    );
    let mut reasons = Vec::new();
    for b in &backends {
        let available = probe(&host, &settings, &b.name, &model);
        println!(
            "{:<16} {:<10} {:<9} {:<44} {}",
            b.name,
            b.version,
            available.column(),
            b.description,
            b.library.display()
        );
        // Backends often start their messages with their own name.
        let own = format!("{}: ", b.name);
        match &available {
            Availability::Yes => {}
            Availability::No(why) => reasons.push(format!(
                "unavailable: {own}{}",
                why.strip_prefix(&own).unwrap_or(why)
            )),
            Availability::Error(e) => reasons.push(format!("error: {own}{e}")),
        }
    }
    for r in &reasons {
        println!("{r}");
    }
    let mut refused = 0;
    for (path, r) in &found {
        if let Err(e) = r {
            refused += 1;
            println!("refused: {}: {e}", path.display());
        }
    }
    let dirs: Vec<String> = host
        .search_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    println!("searched: {}", dirs.join(", "));
    if backends.is_empty() {
        eprintln!("no backend plugins found (build them with `cargo build --release --workspace`)");
        return Ok(ExitCode::FAILURE);
    }
    if refused > 0 {
        warn!("{refused} librar(y/ies) refused");
    }
    Ok(ExitCode::SUCCESS)
}
