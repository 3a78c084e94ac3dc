//! The configuration file of `pipelined serve` (`--config FILE`, or
//! `PIPELINED_CONFIG`): TOML whose keys are the long names of the serve
//! flags, e.g.
//!
//! ```toml
//! listen = "0.0.0.0:50051"
//! allow-command = ["sh", "python3"]
//! tls-cert = "/etc/pipelined/tls.crt"
//! ```
//!
//! A value from the file becomes the flag's default, so a flag on the command
//! line beats its environment variable, which beats the file, which beats
//! the built-in default. The keys come from clap's own description of the
//! flags, so every flag has its key without a list to keep up to date; a key
//! that names no flag is an error, and so is a value the flag would refuse.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, bail};
use clap::{Arg, ArgAction, CommandFactory, FromArgMatches};

use crate::cli::{Cli, Command};

/// The subcommand the file configures.
const SERVE: &str = "serve";

/// The flag naming the file; not a key of the file itself.
const CONFIG_FLAG: &str = "config";

/// Parses the process's command line like `Cli::parse`, with the values of
/// `pipelined serve --config FILE` as defaults. Exits on errors: code 2 and
/// a message naming the file and key for a bad configuration file.
pub fn parse() -> Cli {
    let args: Vec<OsString> = std::env::args_os().collect();
    match parse_from(&args) {
        Ok(cli) => cli,
        Err(Failure::Clap(error)) => error.exit(),
        Err(Failure::Config(error)) => {
            eprintln!("error: {error:#}");
            std::process::exit(2);
        }
    }
}

/// Why a command line could not be parsed.
#[derive(Debug)]
pub enum Failure {
    /// Usage errors, and `--help` or `--version` (clap prints them).
    Clap(clap::Error),
    /// The configuration file cannot be read or has a bad key or value.
    Config(anyhow::Error),
}

/// [`parse`] for the arguments `args` (the program name first).
pub fn parse_from(args: &[OsString]) -> Result<Cli, Failure> {
    // First without the file, to learn whether there is one. Every serve
    // flag has a default, so nothing the file could set is missing yet.
    let cli = <Cli as clap::Parser>::try_parse_from(args).map_err(Failure::Clap)?;
    let Command::Serve(serve) = &cli.command else {
        return Ok(cli);
    };
    let Some(path) = &serve.config else {
        return Ok(cli);
    };
    let mut command = with_file(Cli::command(), path).map_err(Failure::Config)?;
    let matches = command
        .try_get_matches_from_mut(args)
        .map_err(Failure::Clap)?;
    Cli::from_arg_matches(&matches).map_err(|e| Failure::Clap(e.format(&mut command)))
}

/// `command` with the values in the file at `path` as the defaults of the
/// serve flags they name.
pub fn with_file(command: clap::Command, path: &Path) -> anyhow::Result<clap::Command> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    with_text(command, &text, path)
}

/// [`with_file`] for the file's `text`; `path` is for messages.
pub fn with_text(command: clap::Command, text: &str, path: &Path) -> anyhow::Result<clap::Command> {
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let mut serve = command
        .find_subcommand(SERVE)
        .expect("the serve subcommand")
        .clone();
    serve.build();
    let mut defaults = Vec::new();
    for (key, value) in &table {
        let Some(arg) = serve
            .get_arguments()
            .find(|arg| arg.get_long() == Some(key.as_str()) && is_key(arg))
        else {
            bail!(
                "unknown key '{key}' in {}; the keys are the long flags of `pipelined serve`: {}",
                path.display(),
                keys(&serve).join(", ")
            );
        };
        let values = values(arg, value, &serve)
            .with_context(|| format!("bad value of '{key}' in {}", path.display()))?;
        defaults.push((arg.get_id().to_string(), values));
    }
    Ok(command.mut_subcommand(SERVE, |mut serve| {
        for (id, values) in defaults {
            serve = serve.mut_arg(id, |arg| arg.default_values(values));
        }
        serve
    }))
}

/// Whether the file may set `arg`.
fn is_key(arg: &Arg) -> bool {
    arg.get_long() != Some(CONFIG_FLAG)
        && matches!(
            arg.get_action(),
            ArgAction::Set | ArgAction::Append | ArgAction::SetTrue | ArgAction::SetFalse
        )
}

/// Every key the file may have.
pub fn keys(serve: &clap::Command) -> Vec<String> {
    serve
        .get_arguments()
        .filter(|arg| is_key(arg))
        .filter_map(|arg| arg.get_long().map(str::to_string))
        .collect()
}

/// The value or values of `arg` in `value`, checked by the flag's own parser.
fn values(arg: &Arg, value: &toml::Value, serve: &clap::Command) -> anyhow::Result<Vec<String>> {
    let values = match (arg.get_action(), value) {
        (ArgAction::SetTrue | ArgAction::SetFalse, toml::Value::Boolean(b)) => vec![b.to_string()],
        (ArgAction::SetTrue | ArgAction::SetFalse, _) => bail!("expected true or false"),
        (ArgAction::Append, toml::Value::Array(items)) => items
            .iter()
            .map(scalar)
            .collect::<anyhow::Result<Vec<_>>>()?,
        (_, toml::Value::Array(_)) => bail!("expected one value, not a list"),
        (_, value) => vec![scalar(value)?],
    };
    // Parsed as clap will, for a message that names the file: a command
    // line with nothing but this default.
    let trial = serve.clone().mut_arg(arg.get_id(), |arg| {
        arg.env(None).default_values(values.clone())
    });
    if let Err(error) = trial.try_get_matches_from([SERVE]) {
        bail!("{}", clap_message(&error));
    }
    Ok(values)
}

fn scalar(value: &toml::Value) -> anyhow::Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(_) | toml::Value::Table(_) => {
            bail!("expected a string, number or boolean")
        }
    })
}

/// clap's message without its `error: ` prefix and usage lines.
fn clap_message(error: &clap::Error) -> String {
    let text = error.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.trim_start_matches("error: ").to_string()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::cli::ServeArgs;

    /// The command line without environment variables, so that the
    /// environment of the test run cannot change what is being tested.
    fn command() -> clap::Command {
        Cli::command().mut_subcommand(SERVE, |serve| serve.mut_args(|arg| arg.env(None)))
    }

    fn serve_args(file: &str, args: &[&str]) -> anyhow::Result<ServeArgs> {
        let mut command = with_text(command(), file, Path::new("pipelined.toml"))?;
        let mut argv = vec!["pipelined", "serve"];
        argv.extend_from_slice(args);
        let matches = command.try_get_matches_from_mut(argv)?;
        match Cli::from_arg_matches(&matches)?.command {
            Command::Serve(args) => Ok(*args),
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn values_in_the_file_are_used_and_flags_override_them() {
        let file = r#"
            listen = "0.0.0.0:6000"
            allow-command = ["sh", "python3"]
            max-parallel-steps = 4
            heartbeat = "2s"
            insecure-plaintext = true
            tls-cert = "/etc/pipelined/tls.crt"
        "#;
        let args = serve_args(file, &[]).unwrap();
        assert_eq!(args.listen.to_string(), "0.0.0.0:6000");
        assert_eq!(args.allow_commands, ["sh", "python3"]);
        assert_eq!(args.max_parallel_steps, 4);
        assert_eq!(args.heartbeat, Duration::from_secs(2));
        assert!(args.insecure_plaintext);
        assert_eq!(args.tls_cert, Some(PathBuf::from("/etc/pipelined/tls.crt")));
        // Untouched flags keep their defaults.
        assert_eq!(args.lease, Duration::from_secs(15));

        let args = serve_args(
            file,
            &["--listen", "127.0.0.1:7000", "--allow-command", "bash"],
        )
        .unwrap();
        assert_eq!(args.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(args.allow_commands, ["bash"]);
        assert_eq!(args.max_parallel_steps, 4);
    }

    #[test]
    fn a_zero_heartbeat_is_refused_from_the_file_and_the_command_line() {
        let error = format!("{:#}", serve_args("heartbeat = \"0s\"\n", &[]).unwrap_err());
        assert!(error.contains("bad value of 'heartbeat'"), "{error}");
        assert!(error.contains("must be greater than zero"), "{error}");
        let error = serve_args("", &["--heartbeat", "0ms"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("must be greater than zero"), "{error}");
        let args = serve_args("", &["--heartbeat", "250ms"]).unwrap();
        assert_eq!(args.heartbeat, Duration::from_millis(250));
    }

    #[test]
    fn a_comma_separated_string_is_a_list_too() {
        let args = serve_args(r#"allow-command = "sh,python3""#, &[]).unwrap();
        assert_eq!(args.allow_commands, ["sh", "python3"]);
    }

    #[test]
    fn unknown_keys_are_refused_naming_the_key_and_the_file() {
        let error = serve_args("listen = \"127.0.0.1:1\"\nlisten-on = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown key 'listen-on'"), "{error}");
        assert!(error.contains("pipelined.toml"), "{error}");
        assert!(error.contains("tls-cert"), "lists the keys: {error}");
        let error = serve_args("config = \"other.toml\"", &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown key 'config'"), "{error}");
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        for (file, expected) in [
            (
                "listen = \"nowhere\"",
                "bad value of 'listen' in pipelined.toml",
            ),
            ("listen = [\"127.0.0.1:1\"]", "not a list"),
            ("insecure-plaintext = \"yes\"", "true or false"),
            ("heartbeat = \"soon\"", "bad value of 'heartbeat'"),
            ("allow-command = [[\"sh\"]]", "expected a string"),
            ("listen = ", "not valid TOML"),
        ] {
            let error = format!("{:#}", serve_args(file, &[]).unwrap_err());
            assert!(error.contains(expected), "{file}: {error}");
        }
    }

    #[test]
    fn every_serve_flag_but_config_is_a_key() {
        let mut serve = Cli::command().find_subcommand(SERVE).unwrap().clone();
        serve.build();
        let keys = keys(&serve);
        for key in [
            "listen",
            "allow-command",
            "log",
            "tls-cert",
            "insecure-plaintext",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
        }
        assert!(!keys.iter().any(|k| k == "config" || k == "help"));
    }
}
