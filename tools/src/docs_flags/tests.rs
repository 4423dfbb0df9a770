use super::*;

/// clap-style help of a small `trainer`: `run` and `eval knn`.
fn fake_help(path: &[String]) -> Result<String, String> {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    Ok(match p.as_slice() {
        [] => "Pre-training\n\nUsage: trainer [COMMAND]\n\nCommands:\n  run   Pre-train (the default command)\n  \
               eval  Evaluate\n  help  Print this message\n\nOptions:\n  -h, --help     Print help\n  \
               -V, --version  Print version\n"
            .into(),
        ["run"] => "Usage: trainer run [OPTIONS]\n\nOptions:\n      --config <CONFIG>\n          Run config; \
                    see\n          --resume below\n\n      --resume [<CKPT>]\n          Resume\n\n      \
                    --set <KEY=VALUE>\n          Override\n  -h, --help\n          Print help\n"
            .into(),
        ["eval"] => "Usage: trainer eval <COMMAND>\n\nCommands:\n  knn   k-NN\n  help  Print this message\n\n\
                     Options:\n  -h, --help  Print help\n"
            .into(),
        ["eval", "knn"] => "Usage: trainer eval knn [OPTIONS]\n\nOptions:\n      --k <K>  [default: 20]\n      \
                            --json   JSON\n  -h, --help   Print help\n"
            .into(),
        _ => return Err(format!("error: unrecognized subcommand '{}'", p.join(" "))),
    })
}

fn problems(markdown: &str) -> Vec<(usize, String)> {
    let found = mentions(markdown);
    check(&found, "trainer", fake_help).into_iter().map(|(i, p)| (found[i].line, p)).collect()
}

#[test]
fn help_options_and_subcommands_are_parsed_not_mentions_in_descriptions() {
    let h = parse_help(&fake_help(&["run".into()]).unwrap());
    let flags: Vec<&str> = h.flags.iter().map(String::as_str).collect();
    assert_eq!(flags, ["--config", "--help", "--resume", "--set"]);
    assert!(h.subcommands.is_empty());
    let root = parse_help(&fake_help(&[]).unwrap());
    assert_eq!(root.subcommands.iter().map(String::as_str).collect::<Vec<_>>(), ["eval", "help", "run"]);
    assert_eq!(root.flags.iter().map(String::as_str).collect::<Vec<_>>(), ["--help", "--version"]);
}

#[test]
fn flags_are_read_out_of_brackets_and_values() {
    for (word, flag) in [
        ("--k", Some("--k")),
        ("[--resume", Some("--resume")),
        ("[--random-init]", Some("--random-init")),
        ("--set=a.b=1", Some("--set")),
        ("--", None),
        ("-h", None),
        ("--->", None),
        ("cpu|cuda", None),
    ] {
        assert_eq!(flag_of(word).as_deref(), flag, "{word}");
    }
}

#[test]
fn true_docs_pass() {
    let doc = "# Guide\n\nRun `trainer run --config x.toml` or `trainer [run] [--resume [CKPT]]`;\n\
               `cargo run --release --bin trainer -- eval knn --k 5`, `cargo test --workspace`.\n\n\
               ```sh\n# a comment naming trainer run --nothing\ntarget/release/trainer run --config c.toml \\\n    \
               --set a=1  # --nothing here either\ntrainer eval knn --json && \"$bin/trainer\" --help\ncargo build -p x && trainer run --set b=2\n```\n\n\
               ```text\ntrainer run --not-checked-in-a-text-block\n```\n";
    assert_eq!(problems(doc), Vec::<(usize, String)>::new());
    let found = mentions(doc);
    let texts: Vec<String> = found.iter().map(Mention::text).collect();
    assert_eq!(
        texts,
        [
            "trainer run --config x.toml",
            "trainer [run] [--resume [CKPT]]",
            "trainer eval knn --k 5",
            "trainer run --config c.toml --set a=1",
            "trainer eval knn --json",
            "trainer --help",
            "trainer run --set b=2",
        ]
    );
    assert_eq!(found.iter().map(|m| m.line).collect::<Vec<_>>(), [3, 3, 4, 8, 10, 10, 11]);
}

#[test]
fn a_wrong_flag_or_subcommand_is_reported_with_its_line() {
    let doc = "intro\n\n```\ntrainer run --config c \\\n  --bogus\ntrainer evl knn --k 1\n```\n\nSee `trainer eval knn \
               --k 3\n--temperature 0.1` and `sharder build --anything` (not trainer's).\n";
    let p = problems(doc);
    assert_eq!(p.len(), 3, "{p:?}");
    assert_eq!(p[0].0, 4);
    assert!(p[0].1.contains("`trainer run --help` has no --bogus"), "{}", p[0].1);
    assert_eq!(p[1].0, 6);
    assert!(p[1].1.contains("no subcommand `evl` (there are: eval, help, run)"), "{}", p[1].1);
    assert_eq!(p[2].0, 9, "a span is reported at the line it starts on");
    assert!(p[2].1.contains("`trainer eval knn --help` has no --temperature"), "{}", p[2].1);
}

#[test]
fn synopsis_lines_continue_the_command_above() {
    let doc = "```\ntrainer run [--config FILE]\n             [--resume [CKPT]] [--steps N]\n```\n";
    let p = problems(doc);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].1.contains("no --steps"), "{}", p[0].1);
}

#[test]
fn lone_flags_are_checked_against_the_heading_command() {
    let doc = "## `trainer eval knn`\n\n| flag | meaning |\n|---|---|\n| `--k N` | neighbours |\n\n\
               ### Output\n\n`--json` and `--csv`.\n\n## Other\n\n`--unchecked-without-a-command`\n";
    let p = problems(doc);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, 9, "the subsection inherits the command");
    assert!(p[0].1.contains("`trainer eval knn --help` has no --csv"), "{}", p[0].1);
}

#[test]
fn paths_and_prose_are_not_commands() {
    let doc = "`trainer/src/cli/run.rs`, `cae-trainer`, `pipeline/`, `runs/trainer-x`, the trainer --bogus.\n";
    assert!(mentions(doc).is_empty(), "{:?}", mentions(doc));
}

#[test]
fn a_failing_help_is_a_problem_not_a_pass() {
    let found = mentions("`trainer run --config x`\n");
    let p = check(&found, "trainer", |_: &[String]| Err("cannot run".to_string()));
    assert_eq!(p.len(), 1);
    assert!(p[0].1.contains("cannot run"), "{}", p[0].1);
}
