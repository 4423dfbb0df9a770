//! The values a run config derives from its model section: each fact is stated once.
//!
//! | derived key                | from                                                       |
//! |----------------------------|------------------------------------------------------------|
//! | `data.augment.view_size`   | `model.img_size` (view 1, spec §1)                         |
//! | `data.augment.token_size`  | `model.img_size / 2` (the tokenizer's view 2, spec §1 §3)  |
//! | `data.mask.grid`           | `model.img_size / model.patch_size`                        |
//! | `data.mask.num_masked`     | `model.num_mask`                                           |
//! | `model.vocab_size`         | `model.tokenizer.vocab_size`                               |
//! | `model.num_mask` (unset)   | the patch count x the preset's mask ratio (75/196 for base)|
//!
//! A config file or `--set` may still name a derived key (files and checkpoints written before
//! the derivation existed do): the value must then equal the derived one, else the run fails at
//! start naming the key to set instead. The saved config leaves the derived keys out.

use super::{Preset, RunConfig};
use crate::CaeError;

/// Derived keys (dotted) and the key a user sets instead.
const DERIVED: [(&str, &str); 5] = [
    ("data.augment.view_size", "model.img_size"),
    ("data.augment.token_size", "model.img_size"),
    ("data.mask.grid", "model.img_size and model.patch_size"),
    ("data.mask.num_masked", "model.num_mask"),
    ("model.vocab_size", "model.tokenizer.vocab_size"),
];

/// The value at a dotted `path` of `table`.
fn get<'t>(table: &'t toml::Table, path: &str) -> Option<&'t toml::Value> {
    let mut parts = path.split('.');
    let mut value = table.get(parts.next()?)?;
    for p in parts {
        value = value.as_table()?.get(p)?;
    }
    Some(value)
}

/// Masked patches for a model whose sizes may differ from its preset's: the preset's ratio of
/// masked to all patches, rounded (75 of 196 for base, 6 of 16 for micro, so the presets keep
/// their own counts), kept within `1..patches`.
pub fn scaled_num_mask(preset: Preset, patches: usize) -> usize {
    let p = preset.model();
    let n = (patches as f64 * p.num_mask as f64 / p.num_patches() as f64).round() as usize;
    n.clamp(1, patches.saturating_sub(1).max(1))
}

/// Fills the derived keys of `config` from its model section. `user` is what the user wrote
/// (config file and `--set`, or a saved config): a derived key in it must agree.
pub fn derive(config: &mut RunConfig, user: &toml::Table) -> Result<(), CaeError> {
    let m = &mut config.model;
    if get(user, "model.num_mask").is_none() && m.patch_size > 0 {
        m.num_mask = scaled_num_mask(config.preset, m.num_patches());
    }
    m.vocab_size = m.tokenizer.vocab_size;
    let values =
        [m.img_size, m.target_view_size(), if m.patch_size > 0 { m.grid_size() } else { 0 }, m.num_mask, m.vocab_size];
    for ((key, instead), derived) in DERIVED.iter().zip(values) {
        if let Some(given) = get(user, key)
            && given.as_integer() != i64::try_from(derived).ok()
        {
            return Err(CaeError::Config(format!(
                "{key} = {given} disagrees with the value derived from {instead} ({derived}); remove {key} \
                 (it follows {instead})"
            )));
        }
    }
    let d = &mut config.data;
    d.augment.view_size = values[0];
    d.augment.token_size = values[1];
    d.mask.grid = values[2];
    d.mask.num_masked = values[3];
    Ok(())
}

/// Removes the derived keys from a serialised config (the saved form states each fact once).
pub fn strip(table: &mut toml::Table) {
    fn remove(t: &mut toml::Table, path: &[&str]) {
        match path {
            [last] => {
                t.remove(*last);
            }
            [first, rest @ ..] => {
                if let Some(inner) = t.get_mut(*first).and_then(toml::Value::as_table_mut) {
                    remove(inner, rest);
                }
            }
            [] => {}
        }
    }
    for (key, _) in DERIVED {
        remove(table, &key.split('.').collect::<Vec<_>>());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_keep_their_mask_counts_and_other_sizes_follow_the_ratio() {
        assert_eq!(scaled_num_mask(Preset::Base, 196), 75);
        assert_eq!(scaled_num_mask(Preset::Micro, 16), 6);
        // 96 px micro: a 6x6 grid, 36 x 6/16 = 13.5 -> 14.
        assert_eq!(scaled_num_mask(Preset::Micro, 36), 14);
        // 384 px base: 576 x 75/196 = 220.4 -> 220.
        assert_eq!(scaled_num_mask(Preset::Base, 576), 220);
    }

    #[test]
    fn img_size_alone_moves_every_derived_value() {
        let c = RunConfig::resolve(None, &["model.img_size=96".into()]).unwrap();
        assert_eq!((c.data.augment.view_size, c.data.augment.token_size), (96, 48));
        assert_eq!((c.data.mask.grid, c.data.mask.num_masked, c.model.num_mask), (6, 14, 14));
        let set = RunConfig::resolve(None, &["model.img_size=96".into(), "model.num_mask=20".into()]).unwrap();
        assert_eq!((set.model.num_mask, set.data.mask.num_masked), (20, 20), "an explicit count wins");
    }

    #[test]
    fn a_derived_key_that_disagrees_names_the_key_to_set() {
        let e = RunConfig::resolve(None, &["data.augment.view_size=96".into()]).unwrap_err().to_string();
        assert!(e.contains("data.augment.view_size") && e.contains("model.img_size"), "{e}");
        let e = RunConfig::resolve(None, &["data.mask.num_masked=5".into()]).unwrap_err().to_string();
        assert!(e.contains("model.num_mask"), "{e}");
        // Agreeing values (old files) are accepted.
        RunConfig::resolve(None, &["data.augment.view_size=64".into(), "data.mask.grid=4".into()]).unwrap();
    }

    #[test]
    fn saved_configs_leave_derived_keys_out_and_old_ones_still_load() {
        let c = RunConfig::resolve(None, &["model.img_size=96".into()]).unwrap();
        let text = c.to_toml().unwrap();
        let saved: toml::Table = toml::from_str(&text).unwrap();
        for key in DERIVED.map(|(k, _)| k) {
            assert!(get(&saved, key).is_none(), "{key} in\n{text}");
        }
        assert_eq!(get(&saved, "model.img_size").and_then(toml::Value::as_integer), Some(96));
        assert_eq!(RunConfig::from_resolved_toml(&text).unwrap(), c);
        // The form earlier runs saved: every derived key written out, agreeing.
        let mut old: toml::Table = toml::from_str(&text).unwrap();
        let data = old["data"].as_table_mut().unwrap();
        data["augment"].as_table_mut().unwrap().insert("view_size".into(), 96.into());
        data["augment"].as_table_mut().unwrap().insert("token_size".into(), 48.into());
        data["mask"].as_table_mut().unwrap().insert("grid".into(), 6.into());
        data["mask"].as_table_mut().unwrap().insert("num_masked".into(), 14.into());
        old["model"].as_table_mut().unwrap().insert("vocab_size".into(), 512.into());
        assert_eq!(RunConfig::from_resolved_toml(&toml::to_string(&old).unwrap()).unwrap(), c);
    }
}
