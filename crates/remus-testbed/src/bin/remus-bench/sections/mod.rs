//! The suite's sections, one module each ([`crate::suite`] runs them in
//! its order). Each has a `run` that measures, then adds its part of the
//! report, its JSON and its targets. [`disk`] and [`net`] are also the
//! `--disk` and `--net` runs.

pub(crate) mod boot;
pub(crate) mod crypto;
pub(crate) mod disk;
pub(crate) mod failover;
pub(crate) mod matrix;
pub(crate) mod migrate;
pub(crate) mod net;
pub(crate) mod ram;
pub(crate) mod ratecap;
pub(crate) mod restart;
pub(crate) mod resync;
pub(crate) mod scale;
pub(crate) mod slowdown;
pub(crate) mod wire;
