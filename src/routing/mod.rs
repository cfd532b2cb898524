//! Intel PCH USB 2.0 port routing (XUSB2PR) between xHCI and EHCI.
