//! `prefsync completions` and `prefsync man`: shell completions and man
//! pages generated from the clap definitions the flags are parsed with, so
//! neither can drift from the flags.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs, ManArgs};
use crate::exit::Exit;

pub fn completions(a: &CompletionsArgs, out: &mut impl Write) -> anyhow::Result<Exit> {
    let mut cmd = Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "prefsync", out);
    Ok(Exit::Done)
}

pub fn man(a: &ManArgs, out: &mut impl Write) -> anyhow::Result<Exit> {
    let mut cmd = Cli::command();
    // Built, so that each subcommand holds the flags it inherits.
    cmd.build();
    match &a.out {
        None => {
            clap_mangen::Man::new(cmd).render(out)?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("failed to create {}", dir.display()))?;
            let n = write_pages(&cmd, dir)?;
            writeln!(out, "wrote {n} man pages into {}", dir.display())?;
        }
    }
    Ok(Exit::Done)
}

/// One page for `cmd` and one for each subcommand below it, named after
/// the display name clap gives a built subcommand
/// (`prefsync-import-testers.1`). Returns how many.
fn write_pages(cmd: &clap::Command, dir: &Path) -> anyhow::Result<usize> {
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
    let path = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
    std::fs::write(&path, &buf).with_context(|| format!("failed to write {}", path.display()))?;
    let mut n = 1;
    for sub in cmd.get_subcommands() {
        if sub.get_name() != "help" {
            n += write_pages(sub, dir)?;
        }
    }
    Ok(n)
}
