//! The channel kinds vmcrelay knows, as one table.
//!
//! Adding a kind means adding one row to [`KINDS`]. User-defined types
//! (128..=255, the 2011 spicevmc proposal's `SPICE_CHANNEL_USER_DEFINED_START`)
//! are synthesised by [`ChannelKind::of`]: upstream SPICE never adopted them,
//! so only vmcrelay's own server and client carry them. They use exactly the
//! port channel's message set, so one code path serves every pass-through kind.

use super::consts::*;

/// `SPICE_CHANNEL_MAIN`.
pub const CH_MAIN: u8 = 1;
/// `SPICE_CHANNEL_INPUTS` (always present under QEMU; vmcrelay ignores it).
pub const CH_INPUTS: u8 = 3;
/// Display channel type.
pub const CH_DISPLAY: u8 = 2;
/// `SPICE_CHANNEL_SMARTCARD`.
pub const CH_SMARTCARD: u8 = 8;
/// `SPICE_CHANNEL_USBREDIR`.
pub const CH_USBREDIR: u8 = 9;
/// `SPICE_CHANNEL_PORT`.
pub const CH_PORT: u8 = 10;
/// `SPICE_CHANNEL_WEBDAV`.
pub const CH_WEBDAV: u8 = 11;
/// First user-defined channel type (the seed's proposal).
pub const CH_USER_DEFINED_START: u8 = 128;

/// What a channel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelClass {
    /// The session's main channel.
    Main,
    /// A byte pipe: DATA (101) both ways, maybe COMPRESSED_DATA (102),
    /// maybe PORT_INIT/PORT_EVENT.
    PassThrough,
    /// A channel vmcrelay does not carry (display, inputs, …); known only so
    /// that a client can name it in `--list`.
    Foreign,
}

/// One row of the channel table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelKind {
    /// Wire type number.
    pub channel_type: u8,
    /// Name used in configs, logs and `--list`.
    pub name: &'static str,
    /// What the channel carries.
    pub class: ChannelClass,
    /// Whether LZ4 COMPRESSED_DATA (102) may be announced and accepted.
    pub lz4: bool,
    /// Whether PORT_INIT / PORT_EVENT are part of the message set.
    pub port_messages: bool,
}

const fn row(t: u8, name: &'static str, class: ChannelClass, lz4: bool, port: bool) -> ChannelKind {
    ChannelKind { channel_type: t, name, class, lz4, port_messages: port }
}

/// Every built-in kind.
pub const KINDS: &[ChannelKind] = &[
    row(CH_MAIN, "main", ChannelClass::Main, false, false),
    row(2, "display", ChannelClass::Foreign, false, false),
    row(CH_INPUTS, "inputs", ChannelClass::Foreign, false, false),
    row(4, "cursor", ChannelClass::Foreign, false, false),
    row(5, "playback", ChannelClass::Foreign, false, false),
    row(6, "record", ChannelClass::Foreign, false, false),
    // Smartcard DATA carries VSC messages; vmcrelay passes them unchanged.
    row(CH_SMARTCARD, "smartcard", ChannelClass::PassThrough, false, false),
    row(CH_USBREDIR, "usbredir", ChannelClass::PassThrough, true, false),
    row(CH_PORT, "port", ChannelClass::PassThrough, true, true),
    row(CH_WEBDAV, "webdav", ChannelClass::PassThrough, true, true),
];

/// The user-defined kind template.
const USER_DEFINED: ChannelKind = row(CH_USER_DEFINED_START, "user", ChannelClass::PassThrough, true, true);

impl ChannelKind {
    /// Looks a wire type up; `None` for types nobody defines (12..=127).
    pub fn of(channel_type: u8) -> Option<ChannelKind> {
        if channel_type >= CH_USER_DEFINED_START {
            return Some(ChannelKind { channel_type, ..USER_DEFINED });
        }
        KINDS.iter().copied().find(|k| k.channel_type == channel_type)
    }

    /// Looks a config name up (`usbredir`, `port`, …; not user types).
    pub fn by_name(name: &str) -> Option<ChannelKind> {
        KINDS.iter().copied().find(|k| k.name == name)
    }

    /// Whether this is a user-defined type (128..=255).
    pub fn is_user_defined(&self) -> bool {
        self.channel_type >= CH_USER_DEFINED_START
    }

    /// Channel caps this side announces for the kind.
    pub fn channel_caps(&self, want_lz4: bool) -> super::caps::Caps {
        match self.class {
            ChannelClass::Main => super::caps::Caps::EMPTY,
            _ if self.lz4 && want_lz4 => super::caps::Caps::from_bits(&[SPICEVMC_CAP_DATA_COMPRESS_LZ4]),
            _ => super::caps::Caps::EMPTY,
        }
    }

    /// Whether a client → server message type is part of this kind's set.
    /// spice-server disconnects on anything else; so do we.
    pub fn client_msg_allowed(&self, msg_type: u16) -> bool {
        if (MSGC_ACK_SYNC..=MSGC_DISCONNECTING).contains(&msg_type) {
            return true;
        }
        match self.class {
            ChannelClass::Main => (101..=112).contains(&msg_type),
            ChannelClass::PassThrough => {
                msg_type == MSG_SPICEVMC_DATA
                    || (self.lz4 && msg_type == MSG_SPICEVMC_COMPRESSED_DATA)
                    || (self.port_messages && msg_type == MSGC_PORT_EVENT)
            }
            ChannelClass::Foreign => false,
        }
    }
}

impl std::fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_user_defined() { write!(f, "{}", self.channel_type) } else { f.write_str(self.name) }
    }
}

/// Which transports a channel type may link over, as QEMU's
/// `tls-channel=` / `plaintext-channel=` options: every type may use
/// either unless named (or covered by `default`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Plain TCP or TLS.
    #[default]
    Any,
    /// Only over TLS: a plain link gets `NEED_SECURED`.
    Tls,
    /// Only in plaintext: a TLS link gets `NEED_UNSECURED`.
    Plain,
}

/// The per-type transport policy of a service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChannelSecurity {
    /// For types without their own entry (`default`).
    pub default: Transport,
    /// Types with their own entry (the last one given wins).
    pub types: Vec<(u8, Transport)>,
}

impl ChannelSecurity {
    /// The transport rule of a channel type.
    pub fn of(&self, channel_type: u8) -> Transport {
        self.types.iter().rev().find(|(t, _)| *t == channel_type).map_or(self.default, |(_, r)| *r)
    }

    /// The link error for a link of `channel_type` over TLS (`secure`) or
    /// not, or `None` when it may link.
    pub fn check(&self, channel_type: u8, secure: bool) -> Option<super::link::LinkErrorCode> {
        match (self.of(channel_type), secure) {
            (Transport::Tls, false) => Some(super::link::LinkErrorCode::NeedSecured),
            (Transport::Plain, true) => Some(super::link::LinkErrorCode::NeedUnsecured),
            _ => None,
        }
    }

    /// Whether any type must use TLS.
    pub fn wants_tls(&self) -> bool {
        self.default == Transport::Tls || self.types.iter().any(|(_, r)| *r == Transport::Tls)
    }

    /// Adds `NAME` (`main`, `usbredir`, `128`, ..., or `default`) with `rule`.
    pub fn add(&mut self, name: &str, rule: Transport) -> Result<(), String> {
        if name == "default" {
            self.default = rule;
            return Ok(());
        }
        let t = match name.parse::<u8>() {
            Ok(n) if n >= CH_USER_DEFINED_START => n,
            _ => KINDS.iter().find(|k| k.name == name).map(|k| k.channel_type).ok_or_else(|| {
                let names: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
                format!(
                    "unknown channel `{name}` for a TLS policy; write one of {} default, or 128..=255",
                    names.join(" ")
                )
            })?,
        };
        self.types.push((t, rule));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lookups() {
        assert_eq!(ChannelKind::of(9).map(|k| k.name), Some("usbredir"));
        assert_eq!(ChannelKind::of(12), None);
        assert_eq!(ChannelKind::of(127), None);
        let u = ChannelKind::of(200).expect("user type");
        assert!(u.is_user_defined() && u.port_messages && u.lz4);
        assert_eq!(u.to_string(), "200");
        assert_eq!(ChannelKind::by_name("webdav").map(|k| k.channel_type), Some(11));
    }

    #[test]
    fn security_policy_like_qemu() {
        use super::super::link::LinkErrorCode;
        let mut p = ChannelSecurity::default();
        assert_eq!(p.check(CH_PORT, false), None);
        p.add("port", Transport::Tls).expect("port");
        assert_eq!(p.check(CH_PORT, false), Some(LinkErrorCode::NeedSecured));
        assert_eq!(p.check(CH_PORT, true), None);
        assert_eq!(p.check(CH_MAIN, false), None);
        // tls-channel=default,plaintext-channel=main
        let mut q = ChannelSecurity::default();
        q.add("default", Transport::Tls).expect("default");
        q.add("main", Transport::Plain).expect("main");
        assert_eq!(q.check(CH_MAIN, true), Some(LinkErrorCode::NeedUnsecured));
        assert_eq!(q.check(CH_USBREDIR, false), Some(LinkErrorCode::NeedSecured));
        assert_eq!(q.check(200, false), Some(LinkErrorCode::NeedSecured));
        q.add("200", Transport::Any).expect("200");
        assert_eq!(q.check(200, false), None);
        assert!(q.add("bogus", Transport::Tls).unwrap_err().contains("usbredir"));
        assert!(q.add("12", Transport::Tls).is_err());
    }

    #[test]
    fn message_sets() {
        let usb = ChannelKind::of(CH_USBREDIR).expect("usbredir");
        assert!(usb.client_msg_allowed(101) && usb.client_msg_allowed(102) && usb.client_msg_allowed(3));
        assert!(!usb.client_msg_allowed(201));
        let sc = ChannelKind::of(CH_SMARTCARD).expect("smartcard");
        assert!(!sc.client_msg_allowed(102));
        let port = ChannelKind::of(CH_PORT).expect("port");
        assert!(port.client_msg_allowed(201));
        assert!(ChannelKind::of(CH_MAIN).expect("main").client_msg_allowed(104));
        // no kind numbers overlap
        for (i, a) in KINDS.iter().enumerate() {
            assert!(KINDS[i + 1..].iter().all(|b| b.channel_type != a.channel_type && b.name != a.name));
        }
    }
}
