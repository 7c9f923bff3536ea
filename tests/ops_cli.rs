//! Operations from the command line: man pages rendered by `man -l`,
//! completion scripts a shell accepts, `--log-format json` lines a log
//! shipper can parse.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_vmcrelay");

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).stdin(Stdio::null()).output().expect("run vmcrelay")
}

/// `vmcrelay man --dir DIR` writes one page per subcommand; `man -l`
/// renders them: the top page names the subcommands, serve's page its
/// flags and the channel-spec text of `serve --help`.
#[test]
fn man_pages_render_with_man() {
    if !peers_available(&["man"]) {
        return;
    }
    let dir = TempDir::new("man");
    let out = run(&["man", "--dir", dir.0.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for page in ["vmcrelay.1", "vmcrelay-serve.1", "vmcrelay-connect.1", "vmcrelay-demo.1", "vmcrelay-man.1"] {
        assert!(dir.path(page).is_file(), "{page} written");
    }
    let render = |page: &str| {
        let out = Command::new("man")
            .args(["-l", dir.path(page).to_str().expect("utf-8")])
            .env("MANWIDTH", "100")
            .env("MAN_KEEP_FORMATTING", "0")
            .env("MANPAGER", "cat")
            .env("PAGER", "cat")
            .stdin(Stdio::null())
            .output()
            .expect("man -l");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success() && !err.contains("warning"), "man -l {page}: {err}");
        // Without a terminal man prints plain text, maybe with overstrikes.
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut plain = String::new();
        for c in text.chars() {
            if c == '\u{8}' {
                plain.pop();
            } else {
                plain.push(c);
            }
        }
        plain
    };
    let top = render("vmcrelay.1");
    for s in
        ["vmcrelay-serve(1)", "vmcrelay-connect(1)", "vmcrelay-demo(1)", "--log-format", "EXIT STATUS", "NOTIFY_SOCKET"]
    {
        assert!(top.contains(s), "vmcrelay.1 names {s}:\n{top}");
    }
    let serve = render("vmcrelay-serve.1");
    for s in ["--listen", "--channel", "--password-file", "CHANNEL SPECS", "unix-listen:PATH", "vmcrelay(1)"] {
        assert!(serve.contains(s), "vmcrelay-serve.1 names {s}:\n{serve}");
    }
    let connect = render("vmcrelay-connect.1");
    assert!(connect.contains("--list") && connect.contains("--linger-ms"), "{connect}");
    // Without --dir: the top page on stdout.
    let out = run(&["man"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with(".ie"), "roff on stdout");
    // An unwritable directory is an error that says what to do, not a panic.
    let out = run(&["man", "--dir", "/proc/vmcrelay-no-such-dir"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("choose a writable --dir") && !err.contains("panicked"), "{err}");
}

/// `completions bash` is sourced by bash without error and completes
/// `vmcrelay se` to `serve`, `vmcrelay serve --lis` to `--listen`; zsh
/// and fish scripts are produced too (checked by their shell if there).
#[test]
fn completions_work_in_bash() {
    let out = run(&["completions", "bash"]);
    assert!(out.status.success());
    let dir = TempDir::new("compl");
    let script = dir.path("vmcrelay.bash");
    std::fs::write(&script, &out.stdout).expect("write");
    let complete = |words: &str, cword: usize| {
        let sh = format!(
            "set -e; source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; \
             _vmcrelay vmcrelay \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        );
        let o = Command::new("bash").args(["--norc", "--noprofile", "-c", &sh]).output().expect("bash");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success() && err.is_empty(), "bash: {err}");
        String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect::<Vec<_>>()
    };
    assert_eq!(complete("vmcrelay se", 1), vec!["serve".to_string()]);
    assert!(complete("vmcrelay serve --lis", 2).contains(&"--listen".to_string()));
    assert!(complete("vmcrelay c", 1).contains(&"connect".to_string()));
    for (shell, check) in [("zsh", ["zsh", "-n"]), ("fish", ["fish", "-n"])] {
        let out = run(&["completions", shell]);
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("serve"), "{shell} completes serve");
        // Parsed by the shell where it is installed (scripts/install-peers
        // installs neither: bash is the one tested for completing).
        let f = dir.path(shell);
        std::fs::write(&f, &out.stdout).expect("write");
        if let Ok(o) = Command::new(check[0]).arg(check[1]).arg(&f).output() {
            assert!(o.status.success(), "{shell} -n: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    let out = run(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "an unknown shell is a usage error");
}

fn parse_lines(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// `serve --log-format json`: every stderr line is one JSON object with
/// time, level, who and message; the link and close lines of a session
/// carry their key=value pairs as fields, byte counts as numbers.
#[test]
fn serve_log_format_json_lines_parse() {
    let port = free_port();
    let args: Vec<String> = [
        "--log-format",
        "json",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--disable-ticketing",
        "--workers",
        "1",
        "--channel",
        "128=echo:",
    ]
    .map(String::from)
    .to_vec();
    let relay = Relay::start(&args);
    let s =
        vmcrelay::relay::sync_client::Session::connect(&relay.addr(), b"", Duration::from_secs(10)).expect("session");
    {
        let ch = s.open(128, 0, false).expect("open 128");
        let (mut w, mut r) = (ch.writer, ch.reader);
        let data = pattern(3, 100_000);
        w.send(&data).expect("send");
        let mut got = vec![0u8; data.len()];
        let mut have = 0;
        while have < got.len() {
            let n = r.read(&mut got[have..]).expect("read");
            assert!(n > 0, "EOF");
            have += n;
        }
        assert!(got == data, "echo");
    }
    s.close();
    relay.wait_log("\"channel\":\"128:0\"", Duration::from_secs(5));
    let close = relay.wait_log("\"event\":\"close\"", Duration::from_secs(10));
    let log = relay.log.clone();
    assert_eq!(relay.stop(), Some(0));
    let lines = log.lock().expect("log").clone();
    let objs = parse_lines(&lines);
    for o in &objs {
        for k in ["time", "level", "who", "message"] {
            assert!(o[k].is_string(), "{k} in {o}");
        }
    }
    let link = objs
        .iter()
        .find(|o| o["event"] == "link" && o["channel"] == "128:0")
        .unwrap_or_else(|| panic!("a link line for 128:0 in {lines:#?}"));
    assert_eq!(link["result"], "ok");
    assert_eq!(link["service"], "default");
    assert!(link["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{link}");
    let closed: Vec<&serde_json::Value> =
        objs.iter().filter(|o| o["event"] == "close" && o["channel"] == "128:0").collect();
    let c = closed.first().unwrap_or_else(|| panic!("a close line for 128:0 (first close: {close}) in {lines:#?}"));
    assert_eq!(c["c2e_bytes"].as_u64(), Some(100_000), "{c}");
    assert_eq!(c["e2c_bytes"].as_u64(), Some(100_000), "{c}");
    assert!(c["duration_ms"].is_u64() && c["reason"].is_string(), "{c}");
    assert!(c["message"].as_str().is_some_and(|m| m.starts_with("close peer=")), "{c}");
    assert!(objs.iter().any(|o| o["event"] == "ready" && o["workers"] == 1), "ready line");
}

/// `[relay] log-format = "json"` in the config file, and the fatal error
/// of a bad start in JSON too; a bad value names file:line.
#[test]
fn config_log_format_json_and_errors() {
    let dir = TempDir::new("logfmt");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let cfg = dir.path("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[relay]\nworkers = 1\nlog-format = \"json\"\n[[service]]\nlisten = [\"127.0.0.1:{port}\"]\n\
             disable-ticketing = true\nchannels = [\"128=echo:\"]\n"
        ),
    )
    .expect("config");
    let out = run(&["serve", "--config", cfg.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(3), "address in use");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<String> = err.lines().map(str::to_string).collect();
    let objs = parse_lines(&lines);
    let last = objs.last().expect("a line");
    assert_eq!(last["level"], "ERROR");
    assert!(last["message"].as_str().is_some_and(|m| m.contains("address in use")), "{last}");
    // --log-format text wins over the file.
    let out = run(&["serve", "--log-format", "text", "--config", cfg.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().last().is_some_and(|l| l.starts_with("vmcrelay: cannot start:")), "{err}");
    std::fs::write(&cfg, "[relay]\nworkers = 1\nlog-format = \"xml\"\n").expect("config");
    let out = run(&["serve", "--config", cfg.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("c.toml:3") && err.contains("json"), "{err}");
    drop(taken);
}
