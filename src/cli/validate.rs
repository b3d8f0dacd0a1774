//! `acr-task validate` and the `--dry-run` plan printer.

use std::path::PathBuf;
use std::process::ExitCode;

use super::Output;

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// The task file.
    pub file: PathBuf,
    /// A YAML values file for `{{.Values.x}}`.
    #[arg(long)]
    pub values: Option<PathBuf>,
    /// Override a value: `--set key=value` (repeatable; later wins).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

pub fn validate(args: ValidateArgs) -> ExitCode {
    let _ = args;
    unimplemented!("validate: owned by the task-file work")
}
