//! `prefsync preset list|show`: the compiled-in mappings, printed so a user
//! can read them, copy one, change it and pass it with `--map`.

use std::io::Write;

use crate::cli::PresetWhat;
use crate::exit::{Exit, usage};
use crate::import::presets;

pub fn run(what: &PresetWhat) -> anyhow::Result<Exit> {
    let mut out = std::io::stdout().lock();
    match what {
        PresetWhat::List => {
            for p in presets::PRESETS {
                writeln!(out, "{:<14}  {}", p.name, p.summary)?;
            }
            writeln!(
                out,
                "{:<14}  recognise the source from the header row",
                "auto"
            )?;
        }
        PresetWhat::Show { name } => {
            let p = presets::find(name).ok_or_else(|| {
                usage(format!(
                    "no preset {name:?}; the presets are {}",
                    presets::names().join(", ")
                ))
            })?;
            out.write_all(p.toml.as_bytes())?;
        }
    }
    Ok(Exit::Done)
}
