//! `--config FILE.toml`: a file of flags. Each key is a flag's long name (`lr`,
//! `label_smoothing` or `label-smoothing`); a value is what the flag takes (`true` for a
//! switch, `false` leaves it off; numbers and strings as written; an array is joined with
//! commas, as `randaugment = [2, 9]` for `--randaugment 2,9`). The file's flags come first
//! and the command line's after them, so a flag on the command line overrides the file.
//!
//! [`effective_config`] writes a run's parsed flags back in the same form (`config.toml`
//! in the run directory), so `--config runs/x/config.toml` repeats the run.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Flags a config file does not set: where a run writes and how it continues or stops are
/// the command line's business.
const NOT_IN_FILES: &[&str] = &[
    "config",
    "out",
    "resume",
    "overwrite",
    "stop-after",
    "max-steps",
];

/// `argv` (program name first) with the flags of its `--config FILE` (if any) inserted
/// right after the program name. `cmd` is the program's clap command: every key must be
/// one of its flags.
///
/// # Errors
/// An unreadable or invalid file, an unknown key or a value of the wrong kind, naming the
/// file and the key.
pub fn expand(argv: Vec<OsString>, cmd: &clap::Command) -> Result<Vec<OsString>> {
    let mut file = None;
    for (i, a) in argv.iter().enumerate() {
        let s = a.to_string_lossy();
        if s == "--config" {
            file = argv.get(i + 1).cloned();
            if file.is_none() {
                bail!("--config needs a FILE.toml");
            }
        } else if let Some(v) = s.strip_prefix("--config=") {
            file = Some(v.into());
        }
    }
    let Some(file) = file else {
        return Ok(argv);
    };
    let path = Path::new(&file);
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--config {}: cannot read", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("--config {}: not valid TOML", path.display()))?;
    // A built command knows how many values each flag takes.
    let mut cmd = cmd.clone();
    cmd.build();
    let mut flags: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let name = key.replace('_', "-");
        let known = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(name.as_str()));
        let Some(arg) = known else {
            bail!(
                "--config {}: unknown key {key:?} (not a flag of {})",
                path.display(),
                cmd.get_name()
            );
        };
        if NOT_IN_FILES.contains(&name.as_str()) {
            bail!(
                "--config {}: key {key:?} belongs on the command line, not in a config file",
                path.display()
            );
        }
        let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values());
        let scalar = |v: &toml::Value| -> Option<String> {
            match v {
                toml::Value::String(s) => Some(s.clone()),
                toml::Value::Integer(i) => Some(i.to_string()),
                toml::Value::Float(f) => Some(f.to_string()),
                _ => None,
            }
        };
        match value {
            toml::Value::Boolean(b) if !takes_value => {
                if *b {
                    flags.push(format!("--{name}").into());
                }
            }
            toml::Value::Array(items) if takes_value => {
                let parts: Option<Vec<String>> = items.iter().map(scalar).collect();
                let Some(parts) = parts else {
                    bail!(
                        "--config {}: key {key:?}: an array of numbers or strings is expected",
                        path.display()
                    );
                };
                flags.push(format!("--{name}").into());
                flags.push(parts.join(",").into());
            }
            v if takes_value => match scalar(v) {
                Some(s) => {
                    flags.push(format!("--{name}").into());
                    flags.push(s.into());
                }
                None => bail!(
                    "--config {}: key {key:?} takes a value, got {v}",
                    path.display()
                ),
            },
            v => bail!(
                "--config {}: key {key:?} is a switch: write {key} = true or false, got {v}",
                path.display()
            ),
        }
    }
    let mut out = Vec::with_capacity(argv.len() + flags.len());
    let mut it = argv.into_iter();
    out.extend(it.next());
    out.extend(flags);
    out.extend(it);
    Ok(out)
}

/// One JSON flag value as TOML.
fn scalar(k: &str, v: &serde_json::Value) -> Result<toml::Value> {
    Ok(match v {
        serde_json::Value::Bool(b) => toml::Value::Boolean(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => toml::Value::Integer(i),
            (None, Some(f)) => toml::Value::Float(f),
            _ => bail!("flag {k}: number {n} does not fit TOML"),
        },
        serde_json::Value::String(s) => toml::Value::String(s.clone()),
        other => toml::Value::String(other.to_string()),
    })
}

/// A run's flags (serialised as [`crate::run_flags`] stores them) as a config file:
/// unset flags, switches that are off and the command-line-only flags are left out.
///
/// # Errors
/// Flags that are not a JSON object.
pub fn effective_config(flags: &serde_json::Value) -> Result<String> {
    let Some(map) = flags.as_object() else {
        bail!("the run's flags are not a JSON object");
    };
    let mut table = toml::Table::new();
    for (k, v) in map {
        if NOT_IN_FILES.contains(&k.replace('_', "-").as_str()) {
            continue;
        }
        let value = match v {
            serde_json::Value::Null | serde_json::Value::Bool(false) => continue,
            serde_json::Value::Array(items) => {
                toml::Value::Array(items.iter().map(|x| scalar(k, x)).collect::<Result<_>>()?)
            }
            other => scalar(k, other)?,
        };
        table.insert(k.clone(), value);
    }
    Ok(format!(
        "# The effective flags of this run (`train --config` this file to repeat it; flags on\n# the command line override it).\n{}",
        toml::to_string(&table).context("writing the config")?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser, serde::Serialize)]
    #[command(name = "t", args_override_self = true)]
    struct T {
        #[arg(long)]
        #[serde(skip)]
        config: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 0.1)]
        lr: f64,
        #[arg(long)]
        label_smoothing: Option<f64>,
        #[arg(long)]
        rrc: bool,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        out: Option<String>,
        #[arg(long, value_parser = pair)]
        pair: Option<(usize, usize)>,
    }

    fn pair(s: &str) -> std::result::Result<(usize, usize), String> {
        let (a, b) = s.split_once(',').ok_or("N,M")?;
        Ok((a.parse().map_err(|_| "N")?, b.parse().map_err(|_| "M")?))
    }

    fn parse(cli: &[&str], file: &str) -> Result<T> {
        let dir = std::env::temp_dir().join(format!("resblock-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join(format!("{}.toml", file.len()));
        std::fs::write(&p, file)?;
        let mut argv: Vec<OsString> = vec!["t".into(), "--config".into(), p.clone().into()];
        argv.extend(cli.iter().map(OsString::from));
        Ok(T::try_parse_from(expand(argv, &T::command())?)?)
    }

    #[test]
    fn keys_become_flags_and_the_command_line_wins() -> Result<()> {
        let t = parse(
            &[],
            "lr = 0.5\nlabel_smoothing = 0.1\nrrc = true\nname = \"x\"",
        )?;
        assert_eq!(
            (t.lr, t.label_smoothing, t.rrc, t.name.as_deref()),
            (0.5, Some(0.1), true, Some("x"))
        );
        let t = parse(&["--lr", "0.2"], "lr = 0.5\nrrc = false\npair = [2, 9]")?;
        assert_eq!(t.pair, Some((2, 9)));
        assert_eq!((t.lr, t.rrc), (0.2, false));
        // The effective config round-trips.
        let flags = serde_json::to_value(&t)?;
        let text = effective_config(&flags)?;
        let again = parse(&[], text.as_str())?;
        assert_eq!(serde_json::to_value(&again)?, flags);
        Ok(())
    }

    #[test]
    fn bad_files_name_the_file_and_key() {
        for (file, says) in [
            ("lrr = 0.5", "unknown key \"lrr\""),
            ("rrc = 3", "is a switch"),
            ("lr = true", "takes a value"),
            ("out = \"x\"", "command line"),
            ("lr = ", "not valid TOML"),
        ] {
            let err = parse(&[], file).expect_err(file);
            let msg = format!("{err:#}");
            assert!(msg.contains(says) && msg.contains(".toml"), "{file}: {msg}");
        }
    }
}
