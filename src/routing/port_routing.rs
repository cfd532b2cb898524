//! The engine's [`PortRouting`] over a [`ProfileRouter`]: the registers, the record and
//! the profiles as the plain data the routing reconciler decides on, and its three
//! writes (apply a profile, put the intent back) through the crash-safe [`Router`].
//!
//! [`Router`]: super::router::Router

use super::config_space::ConfigSpace;
use super::control::ProfileRouter;
use super::router::PowerChange;
use crate::engine::routing::{
    PortRouting, PowerStep, Restored, RoutingFault, RoutingIntent, RoutingProfiles, RoutingReading,
    RoutingWrite,
};
use crate::inventory::PciAddress;

impl<C: ConfigSpace> PortRouting for ProfileRouter<C> {
    fn controller(&self) -> PciAddress {
        self.router().detected().xhci
    }

    fn profiles(&self) -> RoutingProfiles {
        RoutingProfiles {
            names: self.config().profile.keys().cloned().collect(),
            toggle: self.toggle_pair(None).ok(),
        }
    }

    fn read(&self) -> Result<RoutingReading, RoutingFault> {
        let router = self.router();
        let chipset = router.detected().chipset;
        let lanes = chipset.superspeed_bits();
        let regs = router.registers()?;
        let intent = router.active()?.map(|a| RoutingIntent {
            kernel_default: super::detect::Registers {
                xusb2pr: a.xusb2pr,
                usb3_pssen: a.usb3_pssen,
                ..regs
            }
            .is_kernel_default(chipset),
            profile: a.profile,
            xusb2pr: a.xusb2pr,
            usb3_pssen: a.usb3_pssen & lanes,
            pinned_from: a.power_control_before,
        });
        Ok(RoutingReading {
            xusb2pr: regs.xusb2pr,
            usb3_pssen: regs.usb3_pssen & lanes,
            intent,
            power_control: router.power_control()?,
            in_force: self.active_profile()?,
        })
    }

    fn preview(&self, profile: &str) -> Result<RoutingWrite, RoutingFault> {
        // The service never adds force: only a profile's own `force = true` does.
        let (_, would) = ProfileRouter::preview(self, profile, false)?;
        let power = match would.power {
            PowerChange::Unchanged => PowerStep::Unchanged,
            PowerChange::PinnedOn => PowerStep::Pin,
            // Given back only to what an earlier switch recorded.
            PowerChange::Restored => PowerStep::Unpin {
                to: self
                    .router()
                    .active()?
                    .and_then(|a| a.power_control_before)
                    .unwrap_or_else(|| "auto".into()),
            },
        };
        Ok(RoutingWrite {
            profile: profile.to_string(),
            xusb2pr: (would.before.xusb2pr, would.after.xusb2pr),
            usb3_pssen: (would.before.usb3_pssen, would.after.usb3_pssen),
            power,
        })
    }

    fn apply(&mut self, profile: &str) -> Result<u16, RoutingFault> {
        let (_, applied) = ProfileRouter::apply(self, profile, false)?;
        Ok(applied.after.xusb2pr)
    }

    fn restore(&mut self) -> Result<Option<Restored>, RoutingFault> {
        Ok(self.reconcile()?.map(|r| Restored {
            profile: r.profile,
            found: r.found,
            restored: r.restored,
        }))
    }
}
