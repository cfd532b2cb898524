//! QEMU backend: usb-host attach, detach and list over [`crate::qmp`].
