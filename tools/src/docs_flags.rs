//! Do the docs name only subcommands and flags the binaries have? Finds the command lines of
//! `README.md` and `docs/**/*.md` and checks each against the `--help` output of the real binary
//! (each binary's crate runs [`check_docs`] from an end-to-end test, with
//! `env!("CARGO_BIN_EXE_<name>")`).
//!
//! Rules (simple on purpose; write docs so they apply):
//! - Scanned: inline code spans (also across a line break inside a paragraph) and fenced code
//!   blocks without a language or tagged `sh`, `bash`, `shell` or `console`. Other fenced
//!   blocks (`text`, `toml`, `rust`, ...) and indented code blocks are not scanned.
//! - In a scanned block, `#` at the start of a word starts a comment; a line ending in `\`
//!   continues on the next; an indented line starting with `[` or `-` continues the previous
//!   line (help-style synopses). `&&`, `||` and `;` separate commands.
//! - A command starts at a word naming a binary ([`BINARIES`]), alone or as the last part of a
//!   path (`target/release/trainer`, `"$bin/sharder"`). A command starting with `cargo` is
//!   cargo's: only `cargo ... --bin NAME ... -- ARGS` is checked, as `NAME ARGS`.
//! - The words after the binary that are lower-case names (`[run]`'s brackets stripped) are its
//!   subcommand path while the command reached so far has subcommands: each must be one of them.
//!   Then every word starting with `--` and a letter (brackets and values stripped:
//!   `[--resume [CKPT]]`, `--set=x`) must be an option of that (sub)command's `--help`. Other
//!   words (values, placeholders, positional arguments, `-h`) are not checked.
//! - A span holding only flags (`` `--steps N` ``) is checked against the command of the
//!   nearest heading above it that names one in inline code (`` ## `trainer eval knn` ``;
//!   subsections inherit it); without such a heading it is not checked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The binaries of the workspace whose command lines the docs may show.
pub const BINARIES: [&str; 4] = ["trainer", "pipeline", "sharder", "make-fixtures"];

/// A command line found in a document: `binary args...`, at a 1-based line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mention {
    pub line: usize,
    pub binary: String,
    pub args: Vec<String>,
}

impl Mention {
    fn text(&self) -> String {
        std::iter::once(self.binary.as_str()).chain(self.args.iter().map(String::as_str)).collect::<Vec<_>>().join(" ")
    }
}

/// What a (sub)command's `--help` offers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Help {
    pub subcommands: BTreeSet<String>,
    pub flags: BTreeSet<String>,
}

/// Parses clap's help text: the names under `Commands:`, and the long option (`--name`) that
/// begins each option line (a line whose first non-blank characters are `-x` or `--x`).
pub fn parse_help(text: &str) -> Help {
    let mut help = Help::default();
    let mut in_commands = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if line.starts_with(|c: char| !c.is_whitespace()) {
            in_commands = line.trim_end() == "Commands:";
            continue;
        }
        if in_commands {
            if let Some(name) = trimmed.split_whitespace().next() {
                help.subcommands.insert(name.to_string());
            }
        } else if is_option_line(trimmed)
            && let Some(flag) = trimmed.split([' ', ',']).find_map(flag_of)
        {
            help.flags.insert(flag);
        }
    }
    help
}

fn is_option_line(trimmed: &str) -> bool {
    let rest = trimmed.strip_prefix("--").or_else(|| trimmed.strip_prefix('-'));
    rest.and_then(|r| r.chars().next()).is_some_and(|c| c.is_ascii_alphanumeric())
}

/// The flag a word names: `--name` from `[--name`, `--name=value`, `--name]`; `None` for
/// anything else (`--`, `-h`, values).
pub fn flag_of(word: &str) -> Option<String> {
    let w = word.trim_start_matches(['[', '(', '{', '"', '\'']);
    let rest = w.strip_prefix("--")?;
    let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    let name = name.trim_end_matches('-');
    name.starts_with(|c: char| c.is_ascii_alphabetic()).then(|| format!("--{name}"))
}

/// A subcommand candidate: a lower-case name, with `[run]`'s brackets stripped.
fn name_of(word: &str) -> Option<&str> {
    let w = word.trim_start_matches('[').trim_end_matches(']');
    let ok = w.starts_with(|c: char| c.is_ascii_lowercase())
        && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    ok.then_some(w)
}

/// The binary a word names: `trainer`, `target/release/trainer`, `"$bin/trainer"`.
fn binary_of(word: &str) -> Option<&'static str> {
    let w = word.trim_matches(['"', '\'']);
    BINARIES.into_iter().find(|b| w == *b || w.strip_suffix(b).is_some_and(|p| p.ends_with('/')))
}

/// The commands of one logical line (a code-block line or an inline span).
fn commands_in(line: usize, text: &str) -> Vec<Mention> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let command = |seg: &[&str]| -> Option<Mention> {
        if seg.first() == Some(&"cargo") {
            let bin = seg.windows(2).find(|w| w[0] == "--bin").and_then(|w| binary_of(w[1]))?;
            let dashes = seg.iter().position(|w| *w == "--")?;
            return Some(mention(line, bin, &seg[dashes + 1..]));
        }
        let i = seg.iter().position(|w| binary_of(w).is_some())?;
        Some(mention(line, binary_of(seg[i])?, &seg[i + 1..]))
    };
    words.split(|w| matches!(*w, "&&" | "||" | ";")).filter_map(command).collect()
}

fn mention(line: usize, binary: &str, args: &[&str]) -> Mention {
    Mention { line, binary: binary.to_string(), args: args.iter().map(|s| s.to_string()).collect() }
}

/// The code spans of a paragraph (its lines joined with `\n`, first line `first_line`), with
/// the line each starts on; a span's line breaks become spaces.
fn code_spans(text: &str, first_line: usize) -> Vec<(usize, String)> {
    let b = text.as_bytes();
    let run_at = |i: usize| b[i..].iter().take_while(|&&c| c == b'`').count();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'`' {
            i += 1;
            continue;
        }
        let n = run_at(i);
        let start = i + n;
        let mut j = start;
        let mut close = None;
        while j < b.len() {
            if b[j] == b'`' {
                let m = run_at(j);
                if m == n {
                    close = Some(j);
                    break;
                }
                j += m;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                let line = first_line + text[..i].matches('\n').count();
                out.push((line, text[start..end].replace('\n', " ")));
                i = end + n;
            }
            None => i = start,
        }
    }
    out
}

/// The heading context: per heading level, the command its heading names (if any).
#[derive(Default)]
struct Context(Vec<(usize, Option<Mention>)>);

impl Context {
    fn enter(&mut self, level: usize, command: Option<Mention>) {
        self.0.retain(|(l, _)| *l < level);
        self.0.push((level, command));
    }

    /// `binary subcommand...` of the nearest heading naming a command.
    fn command(&self) -> Option<&Mention> {
        self.0.iter().rev().find_map(|(_, c)| c.as_ref())
    }
}

/// The mentions of a paragraph or heading's spans; lone-flag spans take the context's command.
fn span_mentions(spans: &[(usize, String)], ctx: Option<&Mention>, out: &mut Vec<Mention>) {
    for (line, span) in spans {
        let found = commands_in(*line, span);
        if !found.is_empty() {
            out.extend(found);
            continue;
        }
        let first = span.split_whitespace().next().unwrap_or("");
        if let (Some(_), Some(c)) = (flag_of(first), ctx) {
            let mut args: Vec<String> = c.args.iter().take_while(|a| name_of(a).is_some()).cloned().collect();
            args.extend(span.split_whitespace().filter_map(flag_of));
            out.push(Mention { line: *line, binary: c.binary.clone(), args });
        }
    }
}

/// Whether a fenced block with this info string holds shell commands.
fn is_shell_fence(info: &str) -> bool {
    matches!(info.split_whitespace().next().unwrap_or(""), "" | "sh" | "bash" | "shell" | "console")
}

/// The logical lines of a shell block: comments dropped, continuations joined.
fn shell_lines(lines: &[(usize, &str)]) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut joining = false;
    for &(n, raw) in lines {
        let code = match raw.find(" #") {
            _ if raw.trim_start().starts_with('#') => "",
            Some(i) => &raw[..i],
            None => raw,
        };
        let trimmed = code.trim();
        let synopsis = raw.starts_with(char::is_whitespace) && trimmed.starts_with(['[', '-']);
        let (body, next_joins) = match trimmed.strip_suffix('\\') {
            Some(b) => (b.trim(), true),
            None => (trimmed, false),
        };
        match out.last_mut() {
            Some(last) if joining || synopsis => {
                last.1.push(' ');
                last.1.push_str(body);
            }
            _ => out.push((n, body.to_string())),
        }
        joining = next_joins;
    }
    out
}

/// An ATX heading: `#` to `######`, then a space.
fn is_heading(line: &str) -> bool {
    let hashes = line.chars().take_while(|c| *c == '#').count();
    (1..=6).contains(&hashes) && line[hashes..].starts_with(' ')
}

/// An open fenced code block: its fence (three or more backticks or tildes), whether it holds
/// shell commands, and its lines so far.
struct Fence<'a> {
    marker: &'a str,
    shell: bool,
    body: Vec<(usize, &'a str)>,
}

impl<'a> Fence<'a> {
    /// The block a line (leading blanks trimmed) opens, if it opens one.
    fn open(trimmed: &'a str) -> Option<Self> {
        let ch = ['`', '~'].into_iter().find(|c| trimmed.starts_with(*c))?;
        let len = trimmed.chars().take_while(|c| *c == ch).count();
        let shell = is_shell_fence(&trimmed[len..]);
        (len >= 3).then(|| Fence { marker: &trimmed[..len], shell, body: Vec::new() })
    }

    /// The commands of the closed block.
    fn mentions(&self) -> Vec<Mention> {
        if !self.shell {
            return Vec::new();
        }
        shell_lines(&self.body).iter().flat_map(|(l, text)| commands_in(*l, text)).collect()
    }
}

/// The mentions of a paragraph's code spans; empties the paragraph.
fn flush(para: &mut Vec<(usize, &str)>, ctx: &Context, out: &mut Vec<Mention>) {
    if let Some(&(first, _)) = para.first() {
        let text = para.iter().map(|(_, l)| *l).collect::<Vec<_>>().join("\n");
        span_mentions(&code_spans(&text, first), ctx.command(), out);
    }
    para.clear();
}

/// Every command mention of a Markdown document (see the module rules).
pub fn mentions(markdown: &str) -> Vec<Mention> {
    let mut out = Vec::new();
    let mut ctx = Context::default();
    let mut para: Vec<(usize, &str)> = Vec::new();
    let mut fence: Option<Fence> = None;
    for (i, line) in markdown.lines().enumerate() {
        let n = i + 1;
        let trimmed = line.trim_start();
        if let Some(f) = &mut fence {
            if trimmed.trim_end() == f.marker {
                out.extend(f.mentions());
                fence = None;
            } else {
                f.body.push((n, line));
            }
        } else if let Some(f) = Fence::open(trimmed) {
            flush(&mut para, &ctx, &mut out);
            fence = Some(f);
        } else if is_heading(line) {
            flush(&mut para, &ctx, &mut out);
            let level = line.chars().take_while(|c| *c == '#').count();
            let spans = code_spans(line, n);
            let named = spans.iter().find_map(|(l, s)| commands_in(*l, s).into_iter().next());
            span_mentions(&spans, ctx.command(), &mut out);
            ctx.enter(level, named);
        } else if trimmed.is_empty() {
            flush(&mut para, &ctx, &mut out);
        } else {
            para.push((n, line));
        }
    }
    flush(&mut para, &ctx, &mut out);
    out
}

/// Checks the mentions of `binary` against the help texts `help(subcommand path)` returns
/// (memoised); returns `(index into mentions, problem)` for each wrong subcommand or flag. A
/// mention with a wrong subcommand is not checked further (its flags would be judged against
/// the wrong command).
pub fn check(
    mentions: &[Mention],
    binary: &str,
    mut help: impl FnMut(&[String]) -> Result<String, String>,
) -> Vec<(usize, String)> {
    let mut cache: BTreeMap<Vec<String>, Result<Help, String>> = BTreeMap::new();
    let mut get = |path: &[String]| -> Result<Help, String> {
        cache.entry(path.to_vec()).or_insert_with(|| help(path).map(|t| parse_help(&t))).clone()
    };
    let mut problems = Vec::new();
    for (i, m) in mentions.iter().enumerate().filter(|(_, m)| m.binary == binary) {
        let fail = |what: String| (i, format!("`{}`: {what}", m.text()));
        match resolve(binary, &m.args, &mut get) {
            Ok((command, node, rest)) => {
                for flag in rest.iter().filter_map(|w| flag_of(w)) {
                    if !node.flags.contains(&flag) {
                        problems.push(fail(format!("`{command} --help` has no {flag}")));
                    }
                }
            }
            Err(e) => problems.push(fail(e)),
        }
    }
    problems
}

/// Walks the subcommand words at the start of `args`: the command reached (`binary sub...`), its
/// help, and the words after it.
fn resolve<'a>(
    binary: &str,
    args: &'a [String],
    get: &mut impl FnMut(&[String]) -> Result<Help, String>,
) -> Result<(String, Help, &'a [String]), String> {
    let mut path: Vec<String> = Vec::new();
    let command = |path: &[String]| format!("{binary} {}", path.join(" ")).trim_end().to_string();
    let mut node = get(&path).map_err(|e| format!("`{binary} --help` failed: {e}"))?;
    let mut rest = args;
    while let (Some(word), false) = (rest.first(), node.subcommands.is_empty()) {
        let Some(name) = name_of(word) else { break };
        if !node.subcommands.contains(name) {
            let known: Vec<&str> = node.subcommands.iter().map(String::as_str).collect();
            return Err(format!("no subcommand `{name}` (there are: {})", known.join(", ")));
        }
        path.push(name.to_string());
        rest = &rest[1..];
        node = get(&path).map_err(|e| format!("`{} --help` failed: {e}", command(&path)))?;
    }
    Ok((command(&path), node, rest))
}

/// `README.md` and every `.md` file under `docs/` of the repository at `root`, sorted.
pub fn doc_files(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = vec![root.join("README.md")];
    walk(&root.join("docs"), &mut out)?;
    out.sort();
    Ok(out)
}

/// What [`check_docs`] found: how many command lines of the binary it checked, and the problems
/// (`file:line: ...`).
#[derive(Debug)]
pub struct DocsReport {
    pub checked: usize,
    pub problems: Vec<String>,
}

/// Checks every command line of `binary` in the docs of the repository at `root` against the
/// `--help` output of the executable `exe`.
pub fn check_docs(root: &Path, binary: &str, exe: &Path) -> std::io::Result<DocsReport> {
    let help = |path: &[String]| -> Result<String, String> {
        let out = std::process::Command::new(exe).args(path).arg("--help").output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("no output").to_string())
        }
    };
    let mut files = Vec::new();
    let mut found: Vec<Mention> = Vec::new();
    for file in doc_files(root)? {
        let text = std::fs::read_to_string(&file)?;
        let name = file.strip_prefix(root).unwrap_or(&file).display().to_string();
        for m in mentions(&text) {
            files.push(name.clone());
            found.push(m);
        }
    }
    // One call for all files: each (sub)command's --help runs once.
    let problems = check(&found, binary, help);
    let report = DocsReport {
        checked: found.iter().filter(|m| m.binary == binary).count(),
        problems: problems.into_iter().map(|(i, p)| format!("{}:{}: {p}", files[i], found[i].line)).collect(),
    };
    Ok(report)
}

/// The body of each binary crate's `docs_flags` test: checks the docs of this repository against
/// `exe` and panics listing every problem, or when the docs show no command of `binary` at all
/// (then the parser, not the docs, would be broken, and the check would pass vacuously).
pub fn assert_docs_match(binary: &str, exe: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let report = match check_docs(&root, binary, exe) {
        Ok(r) => r,
        Err(e) => panic!("reading the docs under {}: {e}", root.display()),
    };
    assert!(report.checked > 0, "no `{binary}` command line found in README.md or docs/");
    assert!(
        report.problems.is_empty(),
        "{} of {} `{binary}` command lines in the docs do not match `{binary} --help`:\n{}",
        report.problems.len(),
        report.checked,
        report.problems.join("\n")
    );
}

#[cfg(test)]
mod tests;
