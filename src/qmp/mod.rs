//! QMP: an async client of our own for the QEMU Machine Protocol.
