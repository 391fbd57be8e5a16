//! The configuration file `ferry.json` (being written).
