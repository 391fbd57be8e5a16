//! Kernel feature probes for `ferry check` (being written).
