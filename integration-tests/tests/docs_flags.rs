//! The flag tables in `docs/operating.md` are the binaries' `--help`: every flag `--help` lists
//! has a row, every row names a flag `--help` lists, and a row's default is the one `--help`
//! prints. A flag added, renamed, removed or given a new default fails here until the operator's
//! manual says so too.
//!
//! The format, for each command (`proxy-server`, `proxy-agent`, `proxy-server kubeconfig`):
//!
//! ```text
//! ### proxy-server flags
//!
//! | flag | default | meaning |
//! |---|---|---|
//! | `--agent-addr` | `0.0.0.0:8091` | gRPC listener for agents |
//! ```
//!
//! A heading `### <command> flags`, then a markdown table (up to the next heading) whose first
//! column is one flag in backticks (a value placeholder may follow the name inside them:
//! `` `--server HOST:PORT` ``) and whose second column holds, when `--help` shows a
//! `[default: X]`, that `X` in backticks. `--help` and `--version` need no row. Tuning flags
//! hidden from `--help` go in a table of the same shape under `### <command> hidden flags`: each
//! must be missing from `--help` and still accepted by the binary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use integration_tests::procs::bin;

/// The document the tables live in.
fn operating_md() -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/operating.md");
    let path = path.canonicalize().unwrap_or(path);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (path, text)
}

/// `--help` of `binary` with `args` before it (a subcommand), as text.
fn help(binary: &str, args: &[&str]) -> String {
    let out = Command::new(bin(binary))
        .args(args)
        .arg("--help")
        .env("RUST_LOG", "error")
        .output()
        .unwrap_or_else(|e| panic!("running {binary} --help: {e}"));
    assert!(
        out.status.success(),
        "{binary} {args:?} --help failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// Flags `--help` lists, each with the default it prints (if any). Long help puts a flag on a
/// line of its own (`      --agent-addr <AGENT_ADDR>`, `  -o, --out <OUT>`) with its
/// `[default: X]` on a later line; short help puts both on one line.
fn help_flags(help: &str) -> BTreeMap<String, Option<String>> {
    let mut flags = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        // Options start at column 2 (`-h, --help`) or 6; descriptions are indented further.
        let indent = line.len() - trimmed.len();
        let short_then_long = trimmed.len() > 3
            && trimmed.starts_with('-')
            && trimmed.as_bytes()[1].is_ascii_alphanumeric()
            && trimmed[2..].starts_with(", --");
        let is_flag_line = indent <= 6 && (trimmed.starts_with("--") || short_then_long);
        if is_flag_line {
            let start = trimmed.find("--").expect("a long flag");
            let name: String = trimmed[start + 2..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            flags.insert(name.clone(), None);
            current = Some(name);
        }
        if let (Some(flag), Some(at)) = (&current, line.find("[default: ")) {
            let rest = &line[at + "[default: ".len()..];
            let value = rest.split(']').next().unwrap_or_default().to_owned();
            flags.insert(flag.clone(), Some(value));
        }
    }
    flags.remove("help");
    flags.remove("version");
    flags
}

/// One table row: the flag and the row's default cell.
#[derive(Debug)]
struct Row {
    flag: String,
    default_cell: String,
    line: usize,
}

/// The rows of the table under the heading `### {title}`, or `None` if there is no such
/// heading. Panics on a row that does not follow the format.
fn table(doc: &str, title: &str) -> Option<Vec<Row>> {
    let heading = format!("### {title}");
    let mut lines = doc.lines().enumerate();
    lines.find(|(_, l)| l.trim_end() == heading)?;
    let mut rows = Vec::new();
    let mut header_seen = false;
    for (n, line) in lines {
        if line.starts_with('#') {
            break;
        }
        let line = line.trim();
        if !line.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if !header_seen {
            header_seen = true;
            continue;
        }
        if cells
            .iter()
            .all(|c| c.chars().all(|ch| matches!(ch, '-' | ':')))
        {
            continue;
        }
        let first = cells[0];
        let Some(inner) = first
            .strip_prefix("`--")
            .and_then(|rest| rest.strip_suffix('`'))
        else {
            panic!(
                "docs/operating.md line {}: under `{heading}` the first column must be one flag in backticks (`--flag`), found {first:?}",
                n + 1
            );
        };
        let flag: String = inner
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        rows.push(Row {
            flag,
            default_cell: cells.get(1).copied().unwrap_or_default().to_owned(),
            line: n + 1,
        });
    }
    assert!(
        !rows.is_empty(),
        "docs/operating.md: `{heading}` is not followed by a table of flags"
    );
    Some(rows)
}

/// Checks the tables of one command against its `--help`; returns every mismatch.
fn check(doc: &str, command: &str, binary: &str, args: &[&str]) -> Vec<String> {
    let help = help(binary, args);
    let listed = help_flags(&help);
    assert!(
        !listed.is_empty(),
        "no flags found in `{command} --help`: has its format changed?\n{help}"
    );
    let mut problems = Vec::new();
    let rows = table(doc, &format!("{command} flags")).unwrap_or_else(|| {
        panic!("docs/operating.md has no `### {command} flags` heading with its flag table")
    });
    let mut documented = BTreeSet::new();
    for row in &rows {
        if !documented.insert(row.flag.clone()) {
            problems.push(format!(
                "line {}: --{} has two rows under `### {command} flags`",
                row.line, row.flag
            ));
        }
        match listed.get(&row.flag) {
            None => problems.push(format!(
                "line {}: --{} is in the `{command} flags` table but not in `{command} --help` (removed or renamed? or hidden: then move it to `### {command} hidden flags`)",
                row.line, row.flag
            )),
            Some(Some(default)) if !row.default_cell.contains(&format!("`{default}`")) => {
                problems.push(format!(
                    "line {}: --{}'s default cell {:?} does not say `{default}`, the default `{command} --help` prints",
                    row.line, row.flag, row.default_cell
                ));
            }
            Some(_) => {}
        }
    }
    for flag in listed.keys() {
        if !documented.contains(flag) {
            problems.push(format!(
                "--{flag} is in `{command} --help` but has no row under `### {command} flags`"
            ));
        }
    }
    for row in table(doc, &format!("{command} hidden flags")).unwrap_or_default() {
        if listed.contains_key(&row.flag) {
            problems.push(format!(
                "line {}: --{} is listed as hidden but `{command} --help` shows it",
                row.line, row.flag
            ));
            continue;
        }
        // Given without its value (or without the required flags), a known flag fails for that
        // reason; an unknown one fails as an unexpected argument.
        let out = Command::new(bin(binary))
            .args(args)
            .arg(format!("--{}", row.flag))
            .env("RUST_LOG", "error")
            .output()
            .expect("run binary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("unexpected argument") {
            problems.push(format!(
                "line {}: hidden flag --{} is not accepted by `{command}`: {}",
                row.line,
                row.flag,
                stderr.lines().next().unwrap_or_default()
            ));
        }
    }
    problems
}

#[test]
fn flag_tables_in_operating_md_match_help() {
    let (path, doc) = operating_md();
    let mut problems = Vec::new();
    problems.extend(check(&doc, "proxy-server", "proxy-server", &[]));
    problems.extend(check(
        &doc,
        "proxy-server kubeconfig",
        "proxy-server",
        &["kubeconfig"],
    ));
    for sub in ["create", "list", "revoke"] {
        problems.extend(check(
            &doc,
            &format!("proxy-server token {sub}"),
            "proxy-server",
            &["token", sub],
        ));
    }
    problems.extend(check(&doc, "proxy-agent", "proxy-agent", &[]));
    assert!(
        problems.is_empty(),
        "{} is out of step with --help:\n  {}",
        path.display(),
        problems.join("\n  ")
    );
}

#[test]
fn help_parsing_finds_flags_and_defaults() {
    let long = "Options:\n      --agent-addr <AGENT_ADDR>\n          gRPC listener\n          \n          [env: PROXY_SERVER_AGENT_ADDR=]\n          [default: 0.0.0.0:8091]\n\n      --log-format <LOG_FORMAT>\n          Possible values:\n          - text: Human-readable lines\n\n          [default: text]\n      --frontend-allow-unauthenticated\n          Allow it\n  -h, --help\n          Print help\n";
    let short = "Options:\n      --operator-url <OPERATOR_URL>  Operator listener [env: X=] [default: http://127.0.0.1:8096]\n  -o, --out <OUT>                    Where to write it\n  -h, --help                         Print help\n";
    let flags = help_flags(long);
    assert_eq!(flags["agent-addr"].as_deref(), Some("0.0.0.0:8091"));
    assert_eq!(flags["log-format"].as_deref(), Some("text"));
    assert_eq!(flags["frontend-allow-unauthenticated"], None);
    assert_eq!(flags.len(), 3, "{flags:?}");
    let flags = help_flags(short);
    assert_eq!(
        flags["operator-url"].as_deref(),
        Some("http://127.0.0.1:8096")
    );
    assert_eq!(flags["out"], None);
    assert_eq!(flags.len(), 2, "{flags:?}");
}
