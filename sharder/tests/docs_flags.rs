//! Every `sharder` subcommand and flag that README.md and docs/ name exists in the real binary's
//! `--help` (the rules for what counts as a command line: `cae_tools::docs_flags`).

#[test]
fn docs_name_only_existing_subcommands_and_flags() {
    cae_tools::docs_flags::assert_docs_match("sharder", std::path::Path::new(env!("CARGO_BIN_EXE_sharder")));
}
