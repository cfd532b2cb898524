//! Selectors: the one grammar for naming devices, used by the CLI, the config file and the
//! toggle service. Parsing and matching are pure.
//!
//! Forms: `port:1-3.4.2`, `id:046d:c016` (`*` per half), `addr:3.5` / `addr:3:5` (decimal,
//! `003.005` too), `serial:ABC`, `class:03`, `iface:03:01:*`, `controller:0000:00:14.0`,
//! `hub:1-3`; bare `1-3.4.2`, `046d:c016`, `3.5`; `,` joins terms with AND.

use crate::inventory::{Device, PciAddress, PortPath};
use std::fmt;
use std::str::FromStr;

/// One byte that may be a wildcard (`*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern<T> {
    /// Matches anything.
    Any,
    /// Matches exactly this value.
    Exact(T),
}

/// One term of a selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Term {
    /// `port:1-3.4.2`: the device at this physical place.
    Port(PortPath),
    /// `id:vvvv:pppp`: vendor and product, each half may be `*`.
    Id {
        /// Vendor id pattern.
        vendor: Pattern<u16>,
        /// Product id pattern.
        product: Pattern<u16>,
    },
    /// `addr:B.D`: bus number and device address (one plug of one device).
    Addr {
        /// Bus number.
        bus: u8,
        /// Device address (devnum).
        address: u16,
    },
    /// `serial:S`: the device's serial string, exactly.
    Serial(String),
    /// `class:cc`: the device class or any interface's class.
    Class(u8),
    /// `iface:cc:ss:pp`: some interface with this class triple (`*` per part).
    Iface {
        /// Interface class.
        class: Pattern<u8>,
        /// Interface subclass.
        subclass: Pattern<u8>,
        /// Interface protocol.
        protocol: Pattern<u8>,
    },
    /// `controller:PCI`: every device on this host controller.
    Controller(PciAddress),
    /// `hub:1-3`: every device behind this hub's ports, at any depth.
    Hub(PortPath),
}

/// Terms joined with AND; never empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Selector {
    /// The terms, in the order written.
    pub terms: Vec<Term>,
}

/// Why a selector did not parse: names the part and shows the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad selector part `{part}`: {reason}\n{FORMS}")]
pub struct SelectorError {
    /// The offending part (one term of a `,` list).
    pub part: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The accepted forms, shown with every parse error.
pub const FORMS: &str = "accepted forms: port:1-3.4.2 | id:046d:c016 (id:046d:*) | addr:3.5 (addr:3:5, addr:003.005) | serial:ABC | class:03 | iface:03:01:* | controller:0000:00:14.0 | hub:1-3 | bare 1-3.4.2, 046d:c016, 3.5; join with `,` for AND";

impl Selector {
    /// Does this device match every term?
    pub fn matches(&self, device: &Device) -> bool {
        let _ = device;
        todo!("selector matching")
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let _ = s;
        todo!("selector parsing")
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let _ = f;
        todo!("selector printing")
    }
}
