//! The manual of the `ferry` command, made from its argument definitions so that it
//! cannot drift from them: examples and a word on root in every command's `--help`,
//! man pages (`ferry(1)` and one per command, with EXAMPLES and EXIT STATUS), and shell
//! completions. The binary hands its clap [`Command`] in; the package build runs the
//! hidden `ferry manpages DIR`.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
};

use clap::Command;
use roff::{bold, roman, Roff};

/// Why ferry needs root, said by every command's `--help`.
pub const ROOT_NOTE: &str = "ferry needs root: it traces other processes (ptrace), maps memory into them \
     and makes processes with chosen pids (clone3 with set_tid, PR_SET_MM_MAP).";

/// Commands that work without root, and say so beside [`ROOT_NOTE`].
const WITHOUT_ROOT: &[&str] = &["completions", "config example", "manpages"];

/// Examples of the command at `path` (`""` for ferry itself, `"plugins list"`): the
/// command line and what it does.
pub fn examples(path: &str) -> &'static [(&'static str, &'static str)] {
    match path {
        "" => &[
            ("ferry check", "see which kernel features this machine offers ferry"),
            ("ferry checkpoint 1234 --dir /var/lib/ferry/img", "freeze process 1234 into an image and end it"),
            ("ferry restore --dir /var/lib/ferry/img", "bring it back; prints its pid"),
            ("ferry migrate 1234 --to 192.0.2.7:7711 --strategy pre-copy --auth-key /etc/ferry/key", "move it to the daemon on another machine"),
        ],
        "checkpoint" => &[
            ("ferry checkpoint 1234 --dir /var/lib/ferry/img", "freeze process 1234 into a new image directory, then end it"),
            ("ferry checkpoint 1234 --dir img --leave-running --json", "take an image and let the process carry on; print the statistics as JSON"),
            ("ferry checkpoint 1234 --dir img --shell-job", "a process on the terminal of the shell that started it"),
        ],
        "restore" => &[
            ("ferry restore --dir /var/lib/ferry/img", "rebuild the image's process and print its pid"),
            ("ferry restore --dir img --json", "the same, with the old and new pids and timings as JSON"),
            ("ferry restore --dir img --inherit-fd 'fd[3]:/dev/pts/4' 3<>/dev/pts/7", "a shell job's terminal /dev/pts/4 of the image onto /dev/pts/7"),
        ],
        "show" => &[
            ("ferry show /var/lib/ferry/img", "the inventory and every plugin's records, as text"),
            ("ferry show img mems", "every process's memory areas, as /proc/PID/maps shows them (also ps, fds, sigs)"),
            ("ferry show img --json | jq '.inventory.plugins[].name'", "the whole image as JSON, for scripts"),
        ],
        "plugins" => &[
            ("ferry plugins list", "every plugin, registered or refused with the reason"),
            ("ferry plugins load /usr/lib/ferry/plugins/libmy_plugin.so", "register a plugin in the running daemon"),
        ],
        "plugins list" => &[
            ("ferry plugins list", "the running daemon's registry, or without a daemon every plugin of the plugin directory"),
            ("ferry plugins list --plugin-dir ./target/release --json", "the plugins of one directory, as JSON"),
        ],
        "plugins load" => &[
            ("ferry plugins load memory", "check the plugin named memory in the plugin directory and register it in the daemon"),
            ("ferry plugins load /opt/ferry/libferry_subsystem_extra.so", "the same for a file given by path"),
        ],
        "plugins unload" => &[
            ("ferry plugins unload extra", "unregister it once no event uses it (waits up to 5 s)"),
            ("ferry plugins unload extra --wait-ms 60000", "wait up to a minute for the events using it"),
        ],
        "check" => &[
            ("ferry check", "a table of kernel features, and the fallback for each missing one"),
            ("ferry check --json", "the same as a JSON array"),
        ],
        "config" => &[
            ("ferry config show", "the effective configuration"),
            ("ferry config example > /etc/ferry/ferry.json", "start a configuration file from the documented defaults"),
        ],
        "config show" => &[
            ("ferry config show", "defaults, overridden by /etc/ferry/ferry.json"),
            ("ferry --config my.json config show --strategy post-copy", "what a request with that file and option would use"),
        ],
        "config example" => &[
            ("ferry config example", "print the example configuration, every key at its default"),
            ("ferry config example --explain > /etc/ferry/ferry.json", "the same with what each key does written above it"),
        ],
        "daemon" => &[
            ("ferry daemon", "hold the plugin registry and its control socket, no network port"),
            ("ferry daemon --listen 0.0.0.0:7711 --auth-key /etc/ferry/key --stats /var/log/ferry", "accept authenticated migrations, one statistics file per event"),
        ],
        "migrate" => &[
            ("ferry migrate 1234 --to 192.0.2.7:7711 --auth-key /etc/ferry/key", "stop-copy: freeze, send, resume on the destination"),
            ("ferry migrate 1234 --to 127.0.0.1:7711 --strategy post-copy --json", "resume there at once, memory following on demand; statistics as JSON"),
        ],
        "completions" => &[
            ("ferry completions bash > /etc/bash_completion.d/ferry", "completions for bash"),
            ("ferry completions zsh > /usr/local/share/zsh/site-functions/_ferry", "for zsh"),
            ("ferry completions fish > ~/.config/fish/completions/ferry.fish", "for fish"),
        ],
        "manpages" => &[("ferry manpages target/man", "write ferry.1 and one page per command into target/man")],
        "janitor" => &[("ferry janitor", "started by `ferry checkpoint` itself, never by hand")],
        _ => &[],
    }
}

/// What the exit status of the command at `path` means.
pub fn exit_status(path: &str) -> Vec<(&'static str, &'static str)> {
    let failure = match path.split(' ').next().unwrap_or("") {
        "checkpoint" => "failure or refusal: one line on standard error names the process and what stopped ferry; the process runs on as it was and no partial image is left",
        "restore" => "failure or refusal: one line on standard error says why; a half-built process is removed, the image is untouched",
        "migrate" => "failure or refusal: one line on standard error names the process and what stopped ferry; the process runs on the source as it was",
        _ => "failure: one line on standard error says what and why",
    };
    vec![("0", "success"), ("1", failure), ("2", "usage: an unknown option, a missing or malformed argument")]
}

fn note(path: &str) -> String {
    if WITHOUT_ROOT.contains(&path) {
        format!("{ROOT_NOTE} (This command itself does not.)")
    } else {
        ROOT_NOTE.to_string()
    }
}

/// `cmd` with the examples and the note on root in the `--help` of it and of every
/// command below it.
pub fn annotate(cmd: Command) -> Command {
    fn walk(mut cmd: Command, path: String) -> Command {
        let mut text = String::from("Examples:\n");
        for (line, what) in examples(&path) {
            text.push_str(&format!("  {line}\n      {what}\n"));
        }
        text.push('\n');
        text.push_str(&note(&path));
        cmd = cmd.after_help(text);
        let names: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
        for name in names {
            let sub = if path.is_empty() { name.clone() } else { format!("{path} {name}") };
            cmd = cmd.mut_subcommand(name, |c| walk(c, sub));
        }
        cmd
    }
    walk(cmd, String::new())
}

/// Every command below `cmd` (itself first) with its path, `help` and hidden ones left out.
fn commands(cmd: &Command) -> Vec<(String, Command)> {
    fn walk(cmd: &Command, path: String, out: &mut Vec<(String, Command)>) {
        out.push((path.clone(), cmd.clone()));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            let p = if path.is_empty() { sub.get_name().to_string() } else { format!("{path} {}", sub.get_name()) };
            walk(sub, p, out);
        }
    }
    let mut out = Vec::new();
    walk(cmd, String::new(), &mut out);
    out
}

/// The man page of the command at `path`.
fn render(cmd: Command, path: &str, all: &[String], w: &mut dyn Write) -> io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone()).manual("ferry manual").source(format!("ferry {}", env!("CARGO_PKG_VERSION")));
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(w)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(w)?;
    }
    let mut roff = Roff::new();
    roff.control("SH", ["EXAMPLES"]);
    for (line, what) in examples(path) {
        roff.control("TP", []).text([bold(*line)]).text([roman(*what)]);
    }
    roff.control("SH", ["EXIT STATUS"]);
    for (code, what) in exit_status(path) {
        roff.control("TP", []).text([bold(code)]).text([roman(what)]);
    }
    roff.control("SH", ["NOTES"]).text([roman(note(path))]);
    roff.control("PP", []).text([roman(
        "The architecture, the plugin interface and the image format: docs/ARCHITECTURE.md in the \
         source, /usr/share/doc/ferry/ARCHITECTURE.md where the package is installed.",
    )]);
    roff.control("SH", ["SEE ALSO"]);
    let pages: Vec<String> = all
        .iter()
        .filter(|p| p.as_str() != path)
        .map(|p| if p.is_empty() { "ferry(1)".to_string() } else { format!("ferry-{}(1)", p.replace(' ', "-")) })
        .collect();
    roff.text([roman(pages.join(", "))]);
    roff.to_writer(w)
}

/// The file name of the page of the command at `path`.
pub fn page_name(path: &str) -> String {
    if path.is_empty() {
        "ferry.1".into()
    } else {
        format!("ferry-{}.1", path.replace(' ', "-"))
    }
}

/// Writes `ferry.1` and one page per command into `dir` (made if missing); answers the
/// files written.
pub fn write_man_pages(cmd: Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let all = commands(&cmd);
    let paths: Vec<String> = all.iter().map(|(p, _)| p.clone()).collect();
    let mut written = Vec::new();
    for (path, sub) in all {
        let file = dir.join(page_name(&path));
        let mut out = io::BufWriter::new(std::fs::File::create(&file)?);
        render(sub, &path, &paths, &mut out)?;
        out.flush()?;
        written.push(file);
    }
    Ok(written)
}

/// The completion script of `shell` for `cmd` (the `ferry` command), hidden commands
/// left out (the generators offer them otherwise, and `ferry janitor` is not for people).
pub fn completions(cmd: Command, shell: clap_complete::Shell, out: &mut dyn Write) {
    let visible: Vec<Command> = cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned().collect();
    let mut shown = Command::new("ferry")
        .version(env!("CARGO_PKG_VERSION"))
        .args(cmd.get_arguments().cloned())
        .subcommands(visible);
    clap_complete::generate(shell, &mut shown, "ferry", out);
}
