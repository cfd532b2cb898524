//! The fake [`PortRouting`] beside the trait: profiles as plain masks, registers in
//! memory, every write counted. Clones share one state, so a test can hand one to the
//! engine and look through the other.

use super::{PortRouting, PowerStep, Restored, RoutingFault, RoutingIntent};
use super::{RoutingProfiles, RoutingReading, RoutingWrite};
use crate::inventory::PciAddress;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// What the kernel writes on resume in the fake: every port on the xHCI.
pub const KERNEL_DEFAULT: u16 = 0x3fff;

#[derive(Debug, Default)]
pub struct FakeState {
    pub profiles: BTreeMap<String, u16>,
    pub toggle: Option<(String, String)>,
    pub xusb2pr: u16,
    pub intent: Option<RoutingIntent>,
    pub power_control: Option<String>,
    /// Register writes made (applies and restores).
    pub writes: u32,
    /// `read` fails with this while set.
    pub broken: Option<String>,
}

#[derive(Clone, Default)]
pub struct FakeRouting(Arc<Mutex<FakeState>>);

impl FakeRouting {
    /// Profiles `host` (all on xHCI) and `guest` (ports 1-2 on EHCI), toggled between,
    /// the register at the kernel's default and no intent.
    pub fn host_guest() -> Self {
        let fake = Self::default();
        {
            let mut s = fake.state();
            s.profiles = [("host".into(), KERNEL_DEFAULT), ("guest".into(), 0x3ffc)].into();
            s.toggle = Some(("host".into(), "guest".into()));
            s.xusb2pr = KERNEL_DEFAULT;
            s.power_control = Some("auto".into());
        }
        fake
    }

    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What Linux does on every resume of the xHCI.
    pub fn kernel_rewrite(&self) {
        self.state().xusb2pr = KERNEL_DEFAULT;
    }

    fn mask(&self, profile: &str) -> Result<u16, RoutingFault> {
        self.state()
            .profiles
            .get(profile)
            .copied()
            .ok_or_else(|| format!("No routing profile `{profile}`").into())
    }
}

impl PortRouting for FakeRouting {
    fn controller(&self) -> PciAddress {
        "0000:00:14.0".parse().expect("a PCI address")
    }

    fn profiles(&self) -> RoutingProfiles {
        let s = self.state();
        RoutingProfiles {
            names: s.profiles.keys().cloned().collect(),
            toggle: s.toggle.clone(),
        }
    }

    fn read(&self) -> Result<RoutingReading, RoutingFault> {
        let s = self.state();
        if let Some(why) = &s.broken {
            return Err(why.clone().into());
        }
        let held = s.intent.as_ref().filter(|i| i.xusb2pr == s.xusb2pr);
        let in_force = match held {
            Some(i) => Some(i.profile.clone()),
            None => s
                .profiles
                .iter()
                .find(|(_, mask)| **mask == s.xusb2pr)
                .map(|(name, _)| name.clone()),
        };
        Ok(RoutingReading {
            xusb2pr: s.xusb2pr,
            usb3_pssen: 0,
            intent: s.intent.clone(),
            power_control: s.power_control.clone(),
            in_force,
        })
    }

    fn preview(&self, profile: &str) -> Result<RoutingWrite, RoutingFault> {
        let mask = self.mask(profile)?;
        Ok(RoutingWrite {
            profile: profile.into(),
            xusb2pr: (self.state().xusb2pr, mask),
            usb3_pssen: (0, 0),
            power: PowerStep::Unchanged,
        })
    }

    fn apply(&mut self, profile: &str) -> Result<u16, RoutingFault> {
        let mask = self.mask(profile)?;
        let mut s = self.state();
        s.intent = Some(RoutingIntent {
            profile: profile.into(),
            xusb2pr: mask,
            usb3_pssen: 0,
            kernel_default: mask == KERNEL_DEFAULT,
            pinned_from: None,
        });
        s.xusb2pr = mask;
        s.writes += 1;
        Ok(mask)
    }

    fn restore(&mut self) -> Result<Option<Restored>, RoutingFault> {
        let mut s = self.state();
        let Some(intent) = s.intent.clone() else {
            return Ok(None);
        };
        if intent.xusb2pr == s.xusb2pr {
            return Ok(None);
        }
        let found = s.xusb2pr;
        s.xusb2pr = intent.xusb2pr;
        s.writes += 1;
        Ok(Some(Restored {
            profile: intent.profile,
            found,
            restored: intent.xusb2pr,
        }))
    }
}
