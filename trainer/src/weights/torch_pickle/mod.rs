//! Just enough of Python's pickle machine to list the tensors a `torch.save` file declares:
//! each tensor's storage (persistent id: key, element type, element count) and the extent of
//! the storage it views (offset, shape, stride). Nothing is executed: classes are names,
//! `REDUCE` of anything but torch's tensor rebuilders gives an opaque value.
//!
//! burn-store's parser zero-fills a storage that is shorter than declared or missing, so
//! [`super::torch_file`] compares these declarations with the bytes the file holds before any
//! tensor is loaded.

mod machine;

use machine::{Machine, V};

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::rc::Rc;

/// A storage as its persistent id declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct Storage {
    pub key: String,
    /// `FloatStorage`, `HalfStorage`, ...
    pub kind: String,
    pub elem_bytes: u64,
    /// Declared element count (`None` where the id does not say).
    pub numel: Option<u64>,
}

/// A tensor: the storage it views and how many elements of it the view reaches.
#[derive(Debug, Clone)]
pub struct TensorDecl {
    /// Dotted path from the root object (`state_dict.encoder.cls_token`).
    pub name: String,
    pub storage: usize,
    /// Elements of the storage the view needs: `offset + 1 + sum((size_i - 1) * stride_i)`.
    pub extent: u64,
}

/// What one pickle declares.
#[derive(Debug, Default)]
pub struct Declared {
    pub storages: Vec<Storage>,
    pub tensors: Vec<TensorDecl>,
}

impl Declared {
    /// Names of the tensors that view storage `i` (for error messages).
    pub fn users(&self, i: usize) -> String {
        let names: Vec<&str> = self.tensors.iter().filter(|t| t.storage == i).map(|t| t.name.as_str()).collect();
        match names.len() {
            0 => "no tensor".into(),
            1..=3 => names.join(", "),
            n => format!("{} and {} more", names[..3].join(", "), n - 3),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("pickle cut short or unreadable: {0}")]
    Io(#[from] std::io::Error),
    #[error("pickle: {0}")]
    Invalid(String),
}

pub(super) type Result<T> = std::result::Result<T, PickleError>;

pub(super) fn bad<T>(what: impl Into<String>) -> Result<T> {
    Err(PickleError::Invalid(what.into()))
}

/// Reads pickles from `r` in turn, collecting storages and tensors into one [`Declared`];
/// returns the value each pickle built (as a key list where it is one, else nothing).
pub struct Reader {
    declared: Declared,
    storage_index: HashMap<String, usize>,
}

/// What a pickle built, as far as the audit needs it.
pub enum Built {
    /// An integer (the legacy protocol version).
    Int(i64),
    /// A wide integer's little-endian bytes (the legacy magic number).
    Long(Vec<u8>),
    /// A list of strings (the legacy storage keys).
    Keys(Vec<String>),
    Other,
}

impl Default for Reader {
    fn default() -> Self {
        Self::new()
    }
}

impl Reader {
    pub fn new() -> Self {
        Self { declared: Declared::default(), storage_index: HashMap::new() }
    }

    /// Runs the next pickle; tensors it holds are named by their path from its root.
    pub fn next<R: BufRead>(&mut self, r: &mut R) -> Result<Built> {
        let first_tensor = self.declared.tensors.len();
        let mut m = Machine {
            stack: Vec::new(),
            memo: HashMap::new(),
            out: &mut self.declared,
            storage_index: std::mem::take(&mut self.storage_index),
        };
        let result = m.run(r);
        self.storage_index = std::mem::take(&mut m.storage_index);
        let root = result?;
        name_tensors(&root, "", &mut self.declared.tensors, &mut HashSet::new(), 0);
        for (i, t) in self.declared.tensors.iter_mut().enumerate().skip(first_tensor) {
            if t.name.is_empty() {
                t.name = format!("tensor #{i}");
            }
        }
        Ok(match root {
            V::Int(i) => Built::Int(i),
            V::Long(b) => Built::Long(b),
            V::List(l) => {
                let keys: Option<Vec<String>> =
                    l.borrow().iter().map(|v| if let V::Str(s) = v { Some(s.clone()) } else { None }).collect();
                keys.map(Built::Keys).unwrap_or(Built::Other)
            }
            _ => Built::Other,
        })
    }

    pub fn finish(self) -> Declared {
        self.declared
    }
}

/// Containers nested deeper than this are not walked for names (no real checkpoint comes close;
/// a hostile pickle nests a tuple per opcode byte and would overflow the stack).
const MAX_NAME_DEPTH: usize = 256;

/// Gives each tensor the first path that reaches it (`a.b.0.c`); shared containers are walked once.
fn name_tensors(v: &V, path: &str, tensors: &mut [TensorDecl], seen: &mut HashSet<usize>, depth: usize) {
    if depth > MAX_NAME_DEPTH {
        return;
    }
    let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match v {
        V::Tensor(i) => {
            if let Some(t) = tensors.get_mut(*i)
                && t.name.is_empty()
            {
                t.name = if path.is_empty() { "<root>".into() } else { path.to_string() };
            }
        }
        V::Dict(d) if seen.insert(Rc::as_ptr(d) as *const u8 as usize) => {
            for (k, v) in d.borrow().iter() {
                let key = match k {
                    V::Str(s) => s.clone(),
                    V::Int(i) => i.to_string(),
                    _ => "?".into(),
                };
                name_tensors(v, &join(&key), tensors, seen, depth + 1);
            }
        }
        V::List(l) if seen.insert(Rc::as_ptr(l) as *const u8 as usize) => {
            for (i, v) in l.borrow().iter().enumerate() {
                name_tensors(v, &join(&i.to_string()), tensors, seen, depth + 1);
            }
        }
        V::Tuple(t) if seen.insert(Rc::as_ptr(t) as *const u8 as usize) => {
            for (i, v) in t.iter().enumerate() {
                name_tensors(v, &join(&i.to_string()), tensors, seen, depth + 1);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn unicode(out: &mut Vec<u8>, s: &str) {
        out.push(b'X');
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// `{'w': _rebuild_tensor_v2(storage('0', FloatStorage, 6 elements), offset 2, size (2, 3),
    /// stride (3, 1))}` as torch's protocol-2 pickler lays it out, with the storage tuple
    /// memoised and read back for a second tensor `v` (offset 0, size (6,), stride (1,)).
    pub(crate) fn state_dict() -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}'];
        unicode(&mut p, "w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.push(b'(');
        unicode(&mut p, "storage");
        p.extend(b"ctorch\nFloatStorage\n");
        unicode(&mut p, "0");
        unicode(&mut p, "cpu");
        p.extend([b'K', 6, b't', b'q', 1, b'Q']);
        p.extend([b'K', 2, b'K', 2, b'K', 3, 0x86, b'K', 3, b'K', 1, 0x86, 0x89]);
        p.extend(b"ccollections\nOrderedDict\n)R");
        p.extend(b"tR");
        p.push(b's');
        unicode(&mut p, "v");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.extend([b'h', 1, b'Q', b'K', 0, b'K', 6, 0x85, b'K', 1, 0x85, 0x89, b')', b't', b'R', b's', b'.']);
        p
    }

    #[test]
    fn storages_and_view_extents_are_read_from_the_pickle() {
        let mut r = Reader::new();
        r.next(&mut &state_dict()[..]).unwrap();
        let d = r.finish();
        assert_eq!(
            d.storages,
            vec![Storage { key: "0".into(), kind: "FloatStorage".into(), elem_bytes: 4, numel: Some(6) }]
        );
        // w: 2 + 1 + (2-1)*3 + (3-1)*1 = 8 elements; v: 0 + 1 + 5 = 6.
        let got: Vec<(&str, usize, u64)> = d.tensors.iter().map(|t| (t.name.as_str(), t.storage, t.extent)).collect();
        assert_eq!(got, vec![("w", 0, 8), ("v", 0, 6)]);
        assert_eq!(d.users(0), "w, v");
    }

    #[test]
    fn cut_or_malformed_pickles_are_errors_not_panics() {
        let p = state_dict();
        for cut in 0..p.len() {
            let mut r = Reader::new();
            assert!(r.next(&mut &p[..cut]).is_err(), "cut at {cut}");
        }
        for bad in [&[b'R'][..], b"(s.", &[b'h', 9, b'.'], &[0xff]] {
            assert!(Reader::new().next(&mut &bad[..]).is_err(), "{bad:?}");
        }
    }

    /// Regression: errors printed the offending value, and a list that contains itself (`]2a`:
    /// EMPTY_LIST, DUP, APPEND) as a storage's type never finished printing (stack overflow).
    /// Offsets past `i64::MAX` overflowed in the view check. Both are now plain errors.
    #[test]
    fn self_referential_and_overflowing_values_are_errors() {
        let mut p = vec![0x80, 2, b'('];
        unicode(&mut p, "storage");
        p.extend([b']', b'2', b'a']);
        unicode(&mut p, "0");
        unicode(&mut p, "cpu");
        p.extend([b'K', 6, b't', b'Q', b'.']);
        let Err(e) = Reader::new().next(&mut &p[..]) else { panic!("accepted") };
        let e = e.to_string();
        assert!(e.contains("storage type is a list"), "{e}");

        // storage('0', FloatStorage, 6 elements, view (key, i64::MAX, 1)): offset + size overflows.
        let mut p = vec![0x80, 2, b'('];
        unicode(&mut p, "storage");
        p.extend(b"ctorch\nFloatStorage\n");
        unicode(&mut p, "0");
        unicode(&mut p, "cpu");
        p.extend([b'K', 6, b'(']);
        unicode(&mut p, "0");
        p.push(0x8a); // LONG1: 8 bytes, i64::MAX
        p.push(8);
        p.extend(i64::MAX.to_le_bytes());
        p.extend([b'K', 1, b't', b't', b'Q', b'.']);
        let Err(e) = Reader::new().next(&mut &p[..]) else { panic!("accepted") };
        let e = e.to_string();
        assert!(e.contains("view past its end"), "{e}");
    }
}
