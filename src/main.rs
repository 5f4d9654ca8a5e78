//! The `tarmac` binary: parses the command line, starts logging, calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tarmac::config::Config;

const USAGE: &str = "usage:
  tarmac run   [-c FILE]   serve (default FILE: /etc/tarmac/tarmac.toml)
  tarmac check [-c FILE] [--live]
                           validate the configuration; exit 1 on any error. --live also probes
                           each downstream (banner, STARTTLS, XCLIENT, relay) without sending mail
  tarmac demo              127.0.0.1:2525 -> built-in sink on 127.0.0.1:2526 (./demo-mail/*.eml)
  tarmac --version";

const DEFAULT_CONFIG: &str = "/etc/tarmac/tarmac.toml";

/// Exit codes: 0 success, 1 a bad configuration or a runtime failure, 2 a usage error.
fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["--version" | "-V"] => {
            println!("tarmac {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        ["--help" | "-h" | "help"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        ["run", rest @ ..] => match config_path(rest) {
            Some(path) => run(path),
            None => usage(),
        },
        ["check", rest @ ..] => {
            let live = rest.contains(&"--live");
            let rest: Vec<&str> = rest.iter().copied().filter(|a| *a != "--live").collect();
            match config_path(&rest) {
                Some(path) => check(path, live),
                None => usage(),
            }
        }
        ["demo"] => match tarmac::demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("tarmac demo: {error}");
                ExitCode::FAILURE
            }
        },
        _ => usage(),
    }
}

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}

/// `[]` → the default path; `["-c", FILE]` or `["--config", FILE]` → FILE.
fn config_path(args: &[&str]) -> Option<PathBuf> {
    match args {
        [] => Some(PathBuf::from(DEFAULT_CONFIG)),
        ["-c" | "--config", path] => Some(PathBuf::from(path)),
        _ => None,
    }
}

fn load(path: &std::path::Path) -> Option<Config> {
    match Config::load(path) {
        Ok(config) => Some(config),
        Err(errors) => {
            for error in &errors.0 {
                eprintln!("{error}");
            }
            None
        }
    }
}

fn run(path: PathBuf) -> ExitCode {
    let Some(config) = load(&path) else {
        return ExitCode::FAILURE;
    };
    for note in config.not_yet_effective() {
        log::warn!("{}: {note}", path.display());
    }
    match tarmac::server::run(Arc::new(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("tarmac: {error}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: PathBuf, live: bool) -> ExitCode {
    let Some(config) = load(&path) else {
        return ExitCode::FAILURE;
    };
    for note in config.not_yet_effective() {
        println!("{}: note: {note}", path.display());
    }
    println!(
        "{}: ok: {} listener(s), {} downstream server(s), {} DNS zone(s), {} allow and {} deny list entries, {} rule(s), STARTTLS {}",
        path.display(),
        config.server.listen.len(),
        config.downstream.servers.len(),
        config.dnsbl.len(),
        config.lists.entries.allow.len(),
        config.lists.entries.deny.len(),
        config.rules.set.len(),
        if config.tls.loaded.is_some() {
            "offered"
        } else {
            "off"
        },
    );
    println!("{}: {}", path.display(), config.content_summary());
    for line in config.transparent_summary() {
        println!("{}: {line}", path.display());
    }
    if live {
        return check_live(&config);
    }
    ExitCode::SUCCESS
}

/// `check --live`: probes each downstream and prints what it found; exit 1 when a probe
/// shows something that would fail clients at run time (`tarmac::probe`).
fn check_live(config: &Config) -> ExitCode {
    let mut failed = false;
    for (server, findings) in tarmac::probe::probe_all(config) {
        println!("downstream {server}:");
        for line in &findings.lines {
            println!("  {line}");
        }
        for warning in &findings.warnings {
            println!("  WARNING: {warning}");
        }
        for failure in &findings.failures {
            println!("  FAIL: {failure}");
        }
        if findings.failures.is_empty() {
            println!("  ok");
        }
        failed |= !findings.failures.is_empty();
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
