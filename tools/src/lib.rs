//! Fixture generation and dev tools.
//!
//! [`fixtures::generate`] writes the project's built-in sample set: a small ImageNet-style folder
//! `train/<wnid>/<wnid>_<n>.JPEG` of photo-like images made deterministically from a seed, plus the
//! odd files real ImageNet has (and worse). Tests, the README's first command and the benchmarks use
//! it; nothing is downloaded. [`fixtures::generate_structured`] writes the same layout with the
//! classes of [`shapes`] (shape, layout and texture at random colours), the default built-in set
//! of `trainer run`: random features do not separate it, learned ones must.
//! [`scenes::generate_scenes`] writes the object-centric scenes set (1-3 small copies of a class's
//! shape per image, at random places, sizes, rotations and colours, with clutter; train and val).
//! [`docs_flags`] checks that the command lines of the README and `docs/` name only flags and
//! subcommands the binaries have (run by each binary's crate in a `docs_flags` test).

pub mod docs_flags;
pub mod fixtures;
pub mod scenes;
pub mod shapes;
