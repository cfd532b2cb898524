//! Kernel uevents from netlink, checked to come from the kernel.
