//! SIGHUP reload, the pure part: what a freshly read configuration changes
//! in the running one, as the configuration to publish and one log line per
//! change. `serve` binds what it needs and publishes; the workers follow.
//!
//! Indexes stay stable: services are matched by name and keep their index;
//! one no longer in the file stays as a tombstone (`removed`); a new one is
//! appended. Channels of a service likewise, matched by their label
//! (`usbredir:0`, `port:NAME`, `128:0`). A tombstone named again comes back
//! at its index.
//!
//! Settings that size what exists from the start (worker threads, rings,
//! buffers, the metrics listener, the key thread's reuse) or would change a
//! linked connection under its feet (data path) need a restart: the running
//! value is kept and the line says so.

use super::config::{ChannelConf, Limits, ServeConfig, Service};

/// What a reload does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The configuration to publish: the running one with the file's
    /// changes, tombstones and appended entries.
    pub merged: ServeConfig,
    /// One log line per change (`reload: service vm1 ...`).
    pub changes: Vec<String>,
    /// One line per setting the file changes that needs a restart (kept).
    pub restart: Vec<String>,
}

/// What the plan needs to know of the running relay.
pub struct Running<'a> {
    /// Whether service `i` listens on sockets from systemd socket activation.
    pub activated: &'a dyn Fn(usize) -> bool,
    /// Linked sessions of service `i`.
    pub sessions: &'a dyn Fn(usize) -> usize,
    /// Linked connections of channel `(service, channel index)`.
    pub links: &'a dyn Fn(usize, usize) -> usize,
}

impl std::fmt::Debug for Running<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").finish_non_exhaustive()
    }
}

fn addrs(a: &[std::net::SocketAddr]) -> String {
    if a.is_empty() { "-".into() } else { a.iter().map(ToString::to_string).collect::<Vec<_>>().join(",") }
}

fn channels_text(c: &[ChannelConf]) -> String {
    c.iter().filter(|c| !c.removed).map(|c| format!("{}={}", c.label(), c.endpoint)).collect::<Vec<_>>().join(" ")
}

/// Merges `file` into `running`.
pub fn plan(running: &ServeConfig, file: ServeConfig, now: &Running<'_>) -> Plan {
    let mut merged = running.clone();
    let mut changes = Vec::new();
    let mut restart = Vec::new();
    let mut named = vec![false; running.services.len()];
    for fs in file.services {
        let Some(i) = merged.services.iter().position(|s| s.name == fs.name) else {
            changes.push(format!(
                "reload: service {} added listen={} tls-listen={} channels=[{}]",
                fs.name,
                addrs(&fs.listen),
                addrs(&fs.tls_listen),
                channels_text(&fs.channels)
            ));
            merged.services.push(fs);
            continue;
        };
        if let Some(n) = named.get_mut(i) {
            *n = true;
        }
        let old = &mut merged.services[i];
        if old.removed {
            changes.push(format!(
                "reload: service {} added (again) listen={} tls-listen={} channels=[{}]",
                fs.name,
                addrs(&fs.listen),
                addrs(&fs.tls_listen),
                channels_text(&fs.channels)
            ));
            let channels = merge_channels(&old.name, &old.channels, fs.channels, &mut Vec::new(), &|_| 0);
            *old = Service { channels, ..fs };
            continue;
        }
        merge_service(i, old, fs, now, &mut changes, &mut restart);
    }
    for (i, s) in merged.services.iter_mut().enumerate() {
        if s.removed || named.get(i).copied().unwrap_or(true) {
            continue;
        }
        if (now.activated)(i) {
            restart.push(format!(
                "reload: service {} is not in the file but listens on sockets from systemd socket activation: it \
                 keeps serving until a restart",
                s.name
            ));
            continue;
        }
        s.removed = true;
        changes.push(format!("reload: service {} removed (draining {} sessions)", s.name, (now.sessions)(i)));
    }
    merge_limits(&mut merged.limits, &file.limits, &mut changes, &mut restart);
    Plan { merged, changes, restart }
}

fn merge_service(
    i: usize,
    old: &mut Service,
    new: Service,
    now: &Running<'_>,
    changes: &mut Vec<String>,
    restart: &mut Vec<String>,
) {
    let name = old.name.clone();
    if old.listen != new.listen {
        if (now.activated)(i) {
            restart.push(format!(
                "reload: service {name} listen {} -> {}: its sockets come from systemd socket activation (change \
                 the .socket unit and restart); kept",
                addrs(&old.listen),
                addrs(&new.listen)
            ));
        } else {
            changes.push(format!("reload: service {name} listen {} -> {}", addrs(&old.listen), addrs(&new.listen)));
            old.listen = new.listen;
        }
    }
    if old.tls_listen != new.tls_listen {
        changes.push(format!(
            "reload: service {name} tls-listen {} -> {}",
            addrs(&old.tls_listen),
            addrs(&new.tls_listen)
        ));
        old.tls_listen = new.tls_listen;
    }
    if old.tls != new.tls {
        let show =
            |t: &Option<crate::tls::ServerTlsFiles>| t.as_ref().map_or("-".into(), |f| f.cert.display().to_string());
        changes.push(format!("reload: service {name} tls-cert {} -> {}", show(&old.tls), show(&new.tls)));
        old.tls = new.tls;
    }
    if old.security != new.security {
        changes.push(format!("reload: service {name} tls-channel/plaintext-channel changed (next links)"));
        old.security = new.security;
    }
    if old.password != new.password {
        let t = |p: &Option<Vec<u8>>| if p.is_some() { "on" } else { "off" };
        let what = if old.password.is_some() && new.password.is_some() {
            "password changed".to_string()
        } else {
            format!("ticketing {} -> {}", t(&old.password), t(&new.password))
        };
        changes.push(format!("reload: service {name} {what} (next links)"));
        old.password = new.password;
    }
    if old.upstream != new.upstream {
        let u = |u: &Option<super::config::ServerAddr>| u.as_ref().map_or("-".into(), ToString::to_string);
        changes.push(format!(
            "reload: service {name} upstream {} -> {} (next links)",
            u(&old.upstream),
            u(&new.upstream)
        ));
        old.upstream = new.upstream;
    }
    if old.upstream_tls != new.upstream_tls {
        changes.push(format!("reload: service {name} upstream TLS options changed (next links)"));
        old.upstream_tls = new.upstream_tls;
    }
    if old.busy != new.busy {
        let b = |b: Option<super::config::BusyPolicy>| b.map_or("-".into(), |b| format!("{b:?}").to_lowercase());
        changes.push(format!("reload: service {name} busy {} -> {}", b(old.busy), b(new.busy)));
        old.busy = new.busy;
    }
    old.channels = merge_channels(&name, &old.channels, new.channels, changes, &|ci| (now.links)(i, ci));
}

fn merge_channels(
    service: &str,
    old: &[ChannelConf],
    new: Vec<ChannelConf>,
    changes: &mut Vec<String>,
    links: &dyn Fn(usize) -> usize,
) -> Vec<ChannelConf> {
    let mut out = old.to_vec();
    let mut named = vec![false; old.len()];
    for c in new {
        let label = c.label();
        match out.iter().position(|o| o.label() == label) {
            None => {
                changes.push(format!("reload: service {service} channel {label} added endpoint={}", c.endpoint));
                out.push(c);
            }
            Some(j) => {
                if let Some(n) = named.get_mut(j) {
                    *n = true;
                }
                let o = &mut out[j];
                if o.removed {
                    changes.push(format!("reload: service {service} channel {label} added endpoint={}", c.endpoint));
                } else {
                    if o.endpoint != c.endpoint {
                        changes.push(format!(
                            "reload: service {service} channel {label} endpoint {} -> {} (next link)",
                            o.endpoint, c.endpoint
                        ));
                    }
                    if o.id != c.id {
                        changes.push(format!("reload: service {service} channel {label} id {} -> {}", o.id, c.id));
                    }
                }
                *o = c;
            }
        }
    }
    for (j, o) in out.iter_mut().enumerate() {
        if !o.removed && !named.get(j).copied().unwrap_or(true) {
            o.removed = true;
            changes.push(format!(
                "reload: service {service} channel {} removed (draining {} links)",
                o.label(),
                links(j)
            ));
        }
    }
    out
}

/// `[relay]` settings: those read at each use apply; the others need a
/// restart and keep their running value.
fn merge_limits(run: &mut Limits, file: &Limits, changes: &mut Vec<String>, restart: &mut Vec<String>) {
    macro_rules! knob {
        ($name:literal, $field:ident, applies) => {
            if run.$field != file.$field {
                changes.push(format!("reload: relay {} {:?} -> {:?}", $name, run.$field, file.$field));
                run.$field = file.$field.clone();
            }
        };
        ($name:literal, $field:ident, restart) => {
            if run.$field != file.$field {
                restart.push(format!(
                    "reload: relay {} {:?} -> {:?} needs a restart; running with {:?}",
                    $name, run.$field, file.$field, run.$field
                ));
            }
        };
    }
    knob!("workers", workers, restart);
    knob!("max-conns-per-worker", max_conns_per_worker, restart);
    knob!("buffer-kib", buffer_bytes, restart);
    knob!("buffers-per-worker", buffers_per_worker, restart);
    knob!("max-payload-kib", max_payload_bytes, restart);
    knob!("max-control-bytes", max_control_bytes, restart);
    knob!("max-lz4-bytes", max_lz4_bytes, restart);
    knob!("key-pool-per-worker", key_pool_per_worker, restart);
    knob!("key-threads", key_threads, restart);
    knob!("key-reuse", key_reuse, restart);
    knob!("data-path", data_path, restart);
    knob!("log-format", log_format, restart);
    knob!("metrics", metrics, restart);
    knob!("link-timeout-secs", link_timeout_secs, applies);
    knob!("max-link-stage", max_link_stage, applies);
    knob!("max-link-stage-per-addr", max_link_stage_per_addr, applies);
    knob!("drain-secs", drain_secs, applies);
    knob!("auth-fail-limit", auth_fail_limit, applies);
    knob!("auth-fail-window-secs", auth_fail_window_secs, applies);
    knob!("auth-fail-max-delay-secs", auth_fail_max_delay_secs, applies);
    knob!("busy", busy, applies);
    knob!("keep-listen-endpoint", keep_listen_endpoint, applies);
    knob!("lz4-to-client", lz4_to_client, applies);
    knob!("ack-window", ack_window, applies);
    knob!("stats-secs", stats_secs, applies);
    knob!("idle-buffer-secs", idle_buffer_secs, applies);
    knob!("socket-mode/owner/group (sockets bound from now on)", socket, applies);
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Running<'static> = Running { activated: &|_| false, sessions: &|_| 3, links: &|_, _| 1 };

    fn cfg(text: &str) -> ServeConfig {
        ServeConfig::from_toml(text, "t.toml").expect("config")
    }

    fn svc(name: &str, port: u16, channels: &str) -> String {
        format!(
            "[[service]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:{port}\"]\ndisable-ticketing = true\nchannels = \
             [{channels}]\n"
        )
    }

    #[test]
    fn indexes_stay_and_tombstones_come_back() {
        let run =
            cfg(&format!("{}{}", svc("vm1", 5930, "\"128=echo:\", \"129=sink:\""), svc("vm2", 5931, "\"128=echo:\"")));
        let file =
            cfg(&format!("{}{}", svc("vm3", 5932, "\"128=echo:\""), svc("vm1", 5930, "\"129=echo:\", \"130=sink:\"")));
        let p = plan(&run, file, &NONE);
        let names: Vec<_> = p.merged.services.iter().map(|s| (s.name.as_str(), s.removed)).collect();
        assert_eq!(names, [("vm1", false), ("vm2", true), ("vm3", false)]);
        let vm1: Vec<_> = p.merged.services[0].channels.iter().map(|c| (c.label(), c.removed)).collect();
        assert_eq!(vm1, [("128:0".into(), true), ("129:0".into(), false), ("130:0".into(), false)]);
        assert_eq!(p.merged.services[0].channels[1].endpoint, super::super::config::EndpointSpec::Echo);
        assert!(p.restart.is_empty(), "{:?}", p.restart);
        let want = [
            "reload: service vm3 added listen=127.0.0.1:5932 tls-listen=- channels=[128:0=echo:]",
            "reload: service vm1 channel 129:0 endpoint sink: -> echo: (next link)",
            "reload: service vm1 channel 130:0 added endpoint=sink:",
            "reload: service vm1 channel 128:0 removed (draining 1 links)",
            "reload: service vm2 removed (draining 3 sessions)",
        ];
        assert_eq!(p.changes, want);
        // vm2 comes back at index 1; the same file again changes nothing.
        let again =
            cfg(&format!("{}{}", svc("vm2", 5931, "\"128=sink:\""), svc("vm1", 5930, "\"129=echo:\", \"130=sink:\"")));
        let q = plan(&p.merged, again, &NONE);
        assert!(!q.merged.services[1].removed);
        assert_eq!(q.merged.services[1].channels[0].endpoint, super::super::config::EndpointSpec::Sink);
        assert!(q.merged.services[2].removed, "vm3 went");
        assert!(q.changes[0].starts_with("reload: service vm2 added (again)"), "{:?}", q.changes);
        let same = q.merged.clone();
        let file =
            cfg(&format!("{}{}", svc("vm2", 5931, "\"128=sink:\""), svc("vm1", 5930, "\"129=echo:\", \"130=sink:\"")));
        let r = plan(&same, file, &NONE);
        assert!(r.changes.is_empty() && r.restart.is_empty(), "{:?} {:?}", r.changes, r.restart);
        assert_eq!(r.merged, same);
        assert!(r.merged.validate().is_ok());
    }

    #[test]
    fn restart_settings_are_kept() {
        let run = cfg(&format!("[relay]\nworkers = 2\nlink-timeout-secs = 10\n{}", svc("vm1", 5930, "\"128=echo:\"")));
        let file = cfg(&format!("[relay]\nworkers = 4\nlink-timeout-secs = 3\n{}", svc("vm1", 5940, "\"128=echo:\"")));
        let p = plan(&run, file.clone(), &NONE);
        assert_eq!(p.merged.limits.workers, 2);
        assert_eq!(p.merged.limits.link_timeout_secs, 3);
        assert_eq!(p.restart.len(), 1, "{:?}", p.restart);
        assert!(p.restart[0].contains("workers 2 -> 4 needs a restart"), "{:?}", p.restart);
        assert!(p.changes.contains(&"reload: service vm1 listen 127.0.0.1:5930 -> 127.0.0.1:5940".to_string()));
        // Socket activation: the listen addresses and the service stay.
        let act = Running { activated: &|_| true, sessions: &|_| 0, links: &|_, _| 0 };
        let p = plan(&run, file, &act);
        assert_eq!(p.merged.services[0].listen, run.services[0].listen);
        assert!(p.restart.iter().any(|l| l.contains("systemd socket activation")), "{:?}", p.restart);
        let other = cfg(&svc("vm9", 5950, "\"128=echo:\""));
        let p = plan(&run, other, &act);
        assert!(!p.merged.services[0].removed, "an activated service cannot be removed by reload");
    }
}
