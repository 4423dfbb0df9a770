//! Fixture generation and dev tools.
//!
//! [`fixtures::generate`] writes the project's built-in sample set: a small ImageNet-style folder
//! `train/<wnid>/<wnid>_<n>.JPEG` of photo-like images made deterministically from a seed, plus the
//! odd files real ImageNet has (and worse). Tests, the README's first command and the benchmarks use
//! it; nothing is downloaded.

pub mod fixtures;
