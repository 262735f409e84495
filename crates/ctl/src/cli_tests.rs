//! The command tree with deferred subcommands: every enum of subcommands is
//! `#[command(defer = true)]` so a call builds only the arguments of the path
//! it takes (issue 13: the CLI's own start-up is most of a snapshot's time).
//! These tests build the whole tree, as `--help` of every path would.

use clap::{CommandFactory, Parser};

use super::Cli;

/// Walks the tree one level at a time the way `--help` does (a command is
/// built when its own help is rendered), checking that building a command
/// leaves the about its parent listed unchanged; returns the commands seen.
fn check_abouts(cmd: &mut clap::Command, path: &str) -> usize {
    // Builds this level only: its deferred arguments and subcommands.
    let _ = cmd.render_help();
    let mut seen = 0;
    for sub in cmd.get_subcommands_mut() {
        let p = format!("{path} {}", sub.get_name());
        let listed = sub.get_about().map(|a| a.to_string());
        let _ = sub.render_help();
        let built = sub.get_about().map(|a| a.to_string());
        assert_eq!(
            built, listed,
            "`{p} --help` shows another about than `{path} --help` lists"
        );
        seen += 1 + check_abouts(sub, &p);
    }
    seen
}

#[test]
fn the_whole_tree_passes_clap_checks_once_built() {
    // `debug_assert` builds every deferred subcommand first, so conflicts,
    // `requires` and globals of paths no other test parses are checked too.
    Cli::command().debug_assert();
}

#[test]
fn building_a_deferred_subcommand_keeps_the_about_its_parent_lists() {
    // A doc comment on an `Args` struct is applied when its subcommand is
    // built, after the variant's, and would replace the variant's about.
    let seen = check_abouts(&mut Cli::command(), "emberctl");
    // Walked to the leaves: 12 top-level commands and their subcommands
    // (including the generated `help` ones).
    assert!(seen > 60, "only {seen} commands walked");
}

#[test]
fn a_global_flag_after_a_deferred_subcommand_still_parses() {
    let cli = Cli::try_parse_from([
        "emberctl", "snapshot", "create", "v", "s", "--json", "--api", "unix:/x",
    ])
    .expect("globals propagate into deferred subcommands");
    assert!(cli.json);
    assert_eq!(cli.api, "unix:/x");
}
