//! `vmcrelay man` and `vmcrelay completions`: man pages and shell
//! completions generated from the clap definitions, so they never drift
//! from `--help`.

use std::path::Path;

/// Extra text of a page, shown verbatim after the options (what `--help`
/// prints through its template, which clap_mangen does not see).
pub(crate) type Extra<'a> = &'a [(&'a str, &'a str)];

/// The top page's ENVIRONMENT section: what `serve` reads from systemd.
const ENVIRONMENT: &str = "\
NOTIFY_SOCKET   serve sends READY=1 once its listeners are up, STOPPING=1
                when it starts draining on SIGTERM/SIGINT (Type=notify).
WATCHDOG_USEC   serve sends WATCHDOG=1 every half of it while every worker
                thread is alive (advanced its 1 s tick in the last 3 s).
LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID
                socket activation: serve accepts on the inherited sockets
                instead of binding --listen; a socket goes to the service
                its FileDescriptorName= names (a single service takes all).
See the README, \"Running under systemd\", and dist/systemd/.";

/// Roff for a paragraph of running text.
fn roff_paragraph(title: &str, text: &str) -> String {
    let mut out = format!(".SH \"{title}\"\n");
    for line in text.lines() {
        let l = line.replace('\\', "\\e");
        if l.starts_with('.') || l.starts_with('\'') {
            out.push_str("\\&");
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// Roff for preformatted text: one `.nf` block, escapes made literal.
fn roff_verbatim(title: &str, text: &str) -> String {
    let mut out = format!(".SH \"{title}\"\n.nf\n");
    for line in text.lines() {
        let l = line.replace('\\', "\\e");
        if l.starts_with('.') || l.starts_with('\'') {
            out.push_str("\\&");
        }
        out.push_str(&l);
        out.push('\n');
    }
    out.push_str(".fi\n");
    out
}

/// One page: clap_mangen's sections, then `extra` verbatim, then SEE ALSO.
fn render(
    cmd: clap::Command,
    extra: Option<&str>,
    see_also: &[String],
    w: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone());
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
    if let Some(text) = extra {
        w.write_all(roff_verbatim("DETAILS", text).as_bytes())?;
    } else if let Some(text) = cmd.get_after_long_help().or(cmd.get_after_help()) {
        if cmd.get_subcommands().next().is_some() {
            w.write_all(roff_paragraph("EXIT STATUS", &text.to_string()).as_bytes())?;
        } else {
            w.write_all(roff_verbatim("NOTES", &text.to_string()).as_bytes())?;
        }
    }
    if cmd.get_subcommands().next().is_some() {
        w.write_all(roff_verbatim("ENVIRONMENT", ENVIRONMENT).as_bytes())?;
    }
    if !see_also.is_empty() {
        let refs: Vec<String> = see_also.iter().map(|p| format!("\\fB{p}\\fR(1)")).collect();
        writeln!(w, ".SH \"SEE ALSO\"\n{}", refs.join(", "))?;
    }
    if cmd.get_version().is_some() || cmd.get_long_version().is_some() {
        man.render_version_section(w)?;
    }
    Ok(())
}

/// The page names: `vmcrelay` and `vmcrelay-SUB` for each visible subcommand.
fn page_names(cmd: &clap::Command) -> Vec<String> {
    let top = cmd.get_name().to_string();
    std::iter::once(top.clone())
        .chain(cmd.get_subcommands().filter(|s| !s.is_hide_set()).map(|s| format!("{top}-{}", s.get_name())))
        .collect()
}

/// Writes `vmcrelay.1` and one `vmcrelay-SUB.1` per subcommand into `dir`
/// (created if missing), or the top page to stdout when `dir` is None.
pub(crate) fn man(cmd: clap::Command, extra: Extra<'_>, dir: Option<&Path>) -> Result<Vec<String>, String> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let names = page_names(&cmd);
    let top = cmd.get_name().to_string();
    let Some(dir) = dir else {
        let mut out = std::io::stdout().lock();
        let others: Vec<String> = names[1..].to_vec();
        return match render(cmd, None, &others, &mut out) {
            // `vmcrelay man | head` is not a failure.
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("cannot write the man page: {e}")),
            _ => Ok(Vec::new()),
        };
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create {}: {e} (choose a writable --dir)", dir.display()))?;
    let mut written = Vec::new();
    let mut write_page = |name: &str, c: clap::Command, text: Option<&str>, see: &[String]| -> Result<(), String> {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        render(c, text, see, &mut buf).map_err(|e| format!("cannot render {name}.1: {e}"))?;
        std::fs::write(&path, buf)
            .map_err(|e| format!("cannot write {}: {e} (choose a writable --dir)", path.display()))?;
        written.push(path.display().to_string());
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("{top}-{}", sub.get_name());
        let text = extra.iter().find(|(n, _)| *n == sub.get_name()).map(|(_, t)| *t);
        write_page(&name, sub.clone(), text, std::slice::from_ref(&top))?;
    }
    write_page(&top, cmd.clone(), None, &names[1..])?;
    Ok(written)
}

/// Prints the completion script for `shell`.
pub(crate) fn completions(mut cmd: clap::Command, shell: clap_complete::Shell) -> Result<(), String> {
    use std::io::Write as _;
    let name = cmd.get_name().to_string();
    // Into memory first: clap_complete panics on a failed write.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    match std::io::stdout().lock().write_all(&script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("cannot write the script: {e}")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn verbatim_escapes_roff() {
        let r = super::roff_verbatim("X", ".dot\n'quote\nback\\slash");
        assert!(r.contains("\\&.dot\n") && r.contains("\\&'quote\n") && r.contains("back\\eslash\n"), "{r}");
    }
}
