//! The manual made from the command's own definitions: every command's `--help` (found
//! by walking the `Commands:` lists, so a new command is covered without being named
//! here) shows an example of itself and says ferry needs root; `ferry manpages` writes
//! a page for each, with EXAMPLES and EXIT STATUS; `ferry completions` gives a script
//! for bash, zsh and fish.

use std::collections::BTreeSet;

use ferry_tests::{ferry, stderr, stdout};

/// The commands listed under `Commands:` in a help text.
fn listed_commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// Every visible command's path (`""` for ferry itself, `"plugins list"`) with its help.
fn every_command() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut pending = vec![String::new()];
    while let Some(path) = pending.pop() {
        let mut args: Vec<&str> = path.split_whitespace().collect();
        args.push("--help");
        let o = ferry(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let help = stdout(&o);
        for sub in listed_commands(&help) {
            pending.push(if path.is_empty() { sub } else { format!("{path} {sub}") });
        }
        found.push((path, help));
    }
    found
}

#[test]
fn every_commands_help_shows_an_example_of_it_and_says_ferry_needs_root() {
    let commands = every_command();
    let paths: BTreeSet<&str> = commands.iter().map(|(p, _)| p.as_str()).collect();
    for expected in ["", "checkpoint", "restore", "migrate", "daemon", "plugins list", "config show", "completions"] {
        assert!(paths.contains(expected), "{expected:?} not found among {paths:?}");
    }
    for (path, help) in &commands {
        assert!(help.contains("Usage: ferry"), "{path:?}: {help}");
        let examples = help.split_once("\nExamples:\n").map(|(_, e)| e).unwrap_or_else(|| panic!("{path:?} has no examples: {help}"));
        let prefix = format!("  ferry {path}").trim_end().to_string();
        let ours = if path.is_empty() { "  ferry " } else { prefix.as_str() };
        assert!(examples.lines().any(|l| l.starts_with(ours)), "{path:?}: no example of itself: {examples}");
        assert!(help.contains("ferry needs root"), "{path:?}: {help}");
    }
}

#[test]
fn a_man_page_with_examples_and_exit_status_for_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let o = ferry(&["manpages", dir.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let expected: BTreeSet<String> = every_command()
        .into_iter()
        .map(|(p, _)| if p.is_empty() { "ferry.1".to_string() } else { format!("ferry-{}.1", p.replace(' ', "-")) })
        .collect();
    let written: BTreeSet<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(written, expected, "one page per command, no more");
    // scripts/setup installs groff; elsewhere this says so (or, with FERRY_ALLOW_SKIP=1,
    // skips the rendering loudly).
    let groff = ferry_tests::needs(std::path::Path::new("/usr/bin/groff").exists(), "groff renders the man pages (apt-get install groff-base)");
    for page in &written {
        let path = dir.path().join(page);
        let text = std::fs::read_to_string(&path).unwrap();
        for section in [".SH NAME", ".SH SYNOPSIS", ".SH EXAMPLES", ".SH \"EXIT STATUS\"", ".SH \"SEE ALSO\""] {
            assert!(text.contains(section), "{page} lacks {section}:\n{text}");
        }
        // The page renders without a complaint from the formatter.
        if groff {
            let o = std::process::Command::new("groff").args(["-man", "-Tutf8", "-ww", "-z"]).arg(&path).output().unwrap();
            assert!(o.status.success() && o.stderr.is_empty(), "{page}: {}", stderr(&o));
        }
    }
    let checkpoint = std::fs::read_to_string(dir.path().join("ferry-checkpoint.1")).unwrap();
    assert!(checkpoint.contains("ferry checkpoint 1234 \\-\\-dir"), "{checkpoint}");
}

#[test]
fn completion_scripts_for_bash_zsh_and_fish() {
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef ferry"), ("fish", "complete -c ferry")] {
        let o = ferry(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let script = stdout(&o);
        assert!(script.contains(marker), "{shell}: {script}");
        for command in ["checkpoint", "restore", "migrate", "daemon", "plugins"] {
            assert!(script.contains(command), "{shell} script lacks {command}");
        }
        assert!(!script.contains("janitor"), "{shell}: an internal command is offered");
    }
    // bash's script parses.
    let script = stdout(&ferry(&["completions", "bash"]));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ferry.bash");
    std::fs::write(&file, script).unwrap();
    let o = std::process::Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(o.status.success(), "bash -n: {}", stderr(&o));
    assert_eq!(ferry(&["completions", "tcsh"]).status.code(), Some(2), "an unknown shell is a usage error");
}
