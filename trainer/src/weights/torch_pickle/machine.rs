//! The pickle machine proper: opcodes, stack and memo (see the parent module).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::rc::Rc;

use super::{Declared, PickleError, Result, Storage, TensorDecl, bad};

#[derive(Debug, Clone)]
pub(super) enum V {
    None,
    Bool,
    Int(i64),
    /// An integer wider than 64 bits, as its little-endian bytes.
    Long(Vec<u8>),
    Float,
    Str(String),
    Bytes,
    Global(String, String),
    Tuple(Rc<Vec<V>>),
    List(Rc<RefCell<Vec<V>>>),
    Dict(Rc<RefCell<Vec<(V, V)>>>),
    /// A persistent id resolved to a storage index.
    Storage(usize),
    Tensor(usize),
    Opaque,
    Mark,
}

impl V {
    /// The variant's name, for error messages: never the value itself (a list can contain
    /// itself, and printing it would not end).
    fn kind(&self) -> &'static str {
        match self {
            V::None => "None",
            V::Bool => "a bool",
            V::Int(_) => "an int",
            V::Long(_) => "a long int",
            V::Float => "a float",
            V::Str(_) => "a string",
            V::Bytes => "bytes",
            V::Global(..) => "a global",
            V::Tuple(_) => "a tuple",
            V::List(_) => "a list",
            V::Dict(_) => "a dict",
            V::Storage(_) => "a storage",
            V::Tensor(_) => "a tensor",
            V::Opaque => "an object",
            V::Mark => "a mark",
        }
    }
}

fn elem_bytes(kind: &str) -> Option<u64> {
    Some(match kind {
        "DoubleStorage" | "LongStorage" | "ComplexFloatStorage" => 8,
        "FloatStorage" | "IntStorage" => 4,
        "HalfStorage" | "BFloat16Storage" | "ShortStorage" => 2,
        "CharStorage" | "ByteStorage" | "BoolStorage" | "QInt8Storage" | "QUInt8Storage" => 1,
        "ComplexDoubleStorage" => 16,
        _ => return None,
    })
}

/// The pickle machine's state while reading one pickle (storages persist across the several
/// pickles of a legacy file).
pub(super) struct Machine<'a> {
    pub(super) stack: Vec<V>,
    pub(super) memo: HashMap<u64, V>,
    pub(super) out: &'a mut Declared,
    pub(super) storage_index: HashMap<String, usize>,
}

impl Machine<'_> {
    fn pop(&mut self) -> Result<V> {
        match self.stack.pop() {
            Some(V::Mark) | None => bad("stack underflow"),
            Some(v) => Ok(v),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<V>> {
        let Some(at) = self.stack.iter().rposition(|v| matches!(v, V::Mark)) else {
            return bad("no mark on the stack");
        };
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&mut self) -> Result<&mut V> {
        match self.stack.last_mut() {
            Some(V::Mark) | None => bad("stack underflow"),
            Some(v) => Ok(v),
        }
    }

    fn storage(&mut self, pid: V) -> Result<V> {
        let V::Tuple(t) = pid else { return Ok(V::Opaque) };
        let (Some(V::Str(tag)), Some(kind), Some(key)) = (t.first(), t.get(1), t.get(2)) else {
            return Ok(V::Opaque);
        };
        if tag != "storage" {
            return Ok(V::Opaque);
        }
        let kind = match kind {
            V::Global(_, name) | V::Str(name) => name.clone(),
            other => return bad(format!("storage type is {}", other.kind())),
        };
        let key = match key {
            V::Str(s) => s.clone(),
            V::Int(i) => i.to_string(),
            other => return bad(format!("storage key is {}", other.kind())),
        };
        let Some(elem) = elem_bytes(&kind) else { return bad(format!("unknown storage type {kind}")) };
        let numel = match t.get(4) {
            Some(V::Int(n)) if *n >= 0 => Some(*n as u64),
            Some(V::Int(n)) => return bad(format!("storage {key} declares {n} elements")),
            _ => None,
        };
        let index = match self.storage_index.get(&key) {
            Some(&i) => i,
            None => {
                self.out.storages.push(Storage { key: key.clone(), kind, elem_bytes: elem, numel });
                self.storage_index.insert(key, self.out.storages.len() - 1);
                self.out.storages.len() - 1
            }
        };
        // Legacy views: (view_key, offset, size) in the sixth field.
        if let Some(V::Tuple(view)) = t.get(5)
            && let (Some(V::Int(off)), Some(V::Int(size))) = (view.get(1), view.get(2))
            && (*off < 0 || *size < 0 || numel.is_some_and(|n| off.checked_add(*size).is_none_or(|end| end as u64 > n)))
        {
            return bad(format!("storage {} has a view past its end", self.out.storages[index].key));
        }
        Ok(V::Storage(index))
    }

    /// `_rebuild_tensor(_v2)(storage, offset, size, stride, ...)`.
    fn tensor(&mut self, args: &[V]) -> Result<V> {
        let (Some(V::Storage(storage)), Some(V::Int(offset)), Some(V::Tuple(size)), Some(V::Tuple(stride))) =
            (args.first(), args.get(1), args.get(2), args.get(3))
        else {
            return bad("tensor rebuild without (storage, offset, size, stride)");
        };
        let ints = |t: &[V]| -> Result<Vec<u64>> {
            t.iter()
                .map(|v| match v {
                    V::Int(i) if *i >= 0 => Ok(*i as u64),
                    V::Int(i) => bad(format!("tensor shape/stride holds {i}")),
                    other => bad(format!("tensor shape/stride holds {}", other.kind())),
                })
                .collect()
        };
        let (size, stride) = (ints(size)?, ints(stride)?);
        if size.len() != stride.len() || *offset < 0 {
            return bad("tensor shape and stride disagree");
        }
        let extent = if size.contains(&0) {
            0
        } else {
            size.iter()
                .zip(&stride)
                .fold(*offset as u64 + 1, |acc, (n, s)| acc.saturating_add((n - 1).saturating_mul(*s)))
        };
        self.out.tensors.push(TensorDecl { name: String::new(), storage: *storage, extent });
        Ok(V::Tensor(self.out.tensors.len() - 1))
    }

    fn reduce(&mut self, callable: V, args: V) -> Result<V> {
        let V::Global(module, name) = callable else { return Ok(V::Opaque) };
        let args: Vec<V> = match args {
            V::Tuple(t) => t.as_ref().clone(),
            _ => return Ok(V::Opaque),
        };
        match (module.as_str(), name.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => self.tensor(&args),
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                Ok(args.into_iter().next().unwrap_or(V::Opaque))
            }
            ("torch._tensor", "_rebuild_from_type_v2") => match (args.first(), args.get(2)) {
                (Some(f @ V::Global(..)), Some(a)) => self.reduce(f.clone(), a.clone()),
                _ => Ok(V::Opaque),
            },
            ("collections", "OrderedDict") => Ok(V::Dict(Rc::default())),
            _ => Ok(V::Opaque),
        }
    }

    /// Runs one pickle to its STOP and returns the value it built.
    pub(super) fn run<R: BufRead>(&mut self, r: &mut R) -> Result<V> {
        self.stack.clear();
        self.memo.clear();
        loop {
            let op = read_u8(r)?;
            match op {
                0x80 => {
                    read_u8(r)?; // PROTO
                }
                0x95 => {
                    read_n::<8, _>(r)?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(V::Mark),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'N' => self.stack.push(V::None),
                0x88 | 0x89 => self.stack.push(V::Bool),
                b'J' => self.stack.push(V::Int(i32::from_le_bytes(read_n(r)?) as i64)),
                b'K' => self.stack.push(V::Int(read_u8(r)? as i64)),
                b'M' => self.stack.push(V::Int(u16::from_le_bytes(read_n(r)?) as i64)),
                0x8a => {
                    let n = read_u8(r)? as u64;
                    let bytes = read_bytes(r, n)?;
                    self.stack.push(long(&bytes));
                }
                0x8b => {
                    let n = u32::from_le_bytes(read_n(r)?) as u64;
                    let bytes = read_bytes(r, n)?;
                    self.stack.push(long(&bytes));
                }
                b'I' | b'L' => {
                    let line = read_line(r)?;
                    let t = line.trim_end_matches('L');
                    self.stack.push(match t {
                        "00" => V::Bool,
                        "01" => V::Bool,
                        _ => t.parse().map(V::Int).unwrap_or(V::Opaque),
                    });
                }
                b'G' => {
                    read_n::<8, _>(r)?;
                    self.stack.push(V::Float);
                }
                b'F' => {
                    read_line(r)?;
                    self.stack.push(V::Float);
                }
                b'X' => {
                    let n = u32::from_le_bytes(read_n(r)?) as u64;
                    self.push_str(r, n)?;
                }
                0x8c => {
                    let n = read_u8(r)? as u64;
                    self.push_str(r, n)?;
                }
                0x8d => {
                    let n = u64::from_le_bytes(read_n(r)?);
                    self.push_str(r, n)?;
                }
                b'T' => {
                    let n = u32::from_le_bytes(read_n(r)?) as u64;
                    self.push_str(r, n)?;
                }
                b'U' => {
                    let n = read_u8(r)? as u64;
                    self.push_str(r, n)?;
                }
                b'V' => {
                    let s = read_line(r)?;
                    self.stack.push(V::Str(s));
                }
                b'S' => {
                    let s = read_line(r)?;
                    self.stack.push(V::Str(s.trim_matches(|c| c == '\'' || c == '"').to_string()));
                }
                b'B' => {
                    let n = u32::from_le_bytes(read_n(r)?) as u64;
                    self.skip_bytes(r, n)?;
                }
                b'C' => {
                    let n = read_u8(r)? as u64;
                    self.skip_bytes(r, n)?;
                }
                0x8e | 0x96 => {
                    let n = u64::from_le_bytes(read_n(r)?);
                    self.skip_bytes(r, n)?;
                }
                b')' => self.stack.push(V::Tuple(Rc::default())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(V::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n || self.stack[self.stack.len() - n..].iter().any(|v| matches!(v, V::Mark)) {
                        return bad("stack underflow");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(V::Tuple(Rc::new(items)));
                }
                b']' => self.stack.push(V::List(Rc::default())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(V::List(Rc::new(RefCell::new(items))));
                }
                b'a' => {
                    let v = self.pop()?;
                    if let V::List(l) = self.top()? {
                        l.borrow_mut().push(v);
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if let V::List(l) = self.top()? {
                        l.borrow_mut().extend(items);
                    }
                }
                b'}' => self.stack.push(V::Dict(Rc::default())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = V::Dict(Rc::new(RefCell::new(pairs(items))));
                    self.stack.push(d);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    if let V::Dict(d) = self.top()? {
                        d.borrow_mut().push((k, v));
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if let V::Dict(d) = self.top()? {
                        d.borrow_mut().extend(pairs(items));
                    }
                }
                0x8f => self.stack.push(V::Opaque), // EMPTY_SET
                0x90 => {
                    self.pop_mark()?; // ADDITEMS
                }
                0x91 => {
                    self.pop_mark()?;
                    self.stack.push(V::Opaque);
                }
                b'c' => {
                    let module = read_line(r)?;
                    let name = read_line(r)?;
                    self.stack.push(V::Global(module, name));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (V::Str(m), V::Str(n)) => self.stack.push(V::Global(m, n)),
                        _ => return bad("STACK_GLOBAL without two strings"),
                    }
                }
                b'i' => {
                    read_line(r)?;
                    read_line(r)?;
                    self.pop_mark()?;
                    self.stack.push(V::Opaque);
                }
                b'o' => {
                    self.pop_mark()?;
                    self.stack.push(V::Opaque);
                }
                0x81 => {
                    self.pop()?;
                    self.pop()?;
                    self.stack.push(V::Opaque);
                }
                0x92 => {
                    self.pop()?;
                    self.pop()?;
                    self.pop()?;
                    self.stack.push(V::Opaque);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    self.pop()?; // BUILD: the state; the object stays as it is
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.storage(pid)?;
                    self.stack.push(v);
                }
                b'P' => {
                    read_line(r)?;
                    self.stack.push(V::Opaque);
                }
                b'p' => {
                    let i = read_line(r)?.parse().map_err(|_| PickleError::Invalid("PUT index".into()))?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'q' => {
                    let i = read_u8(r)? as u64;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = u32::from_le_bytes(read_n(r)?) as u64;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'g' => {
                    let i: u64 = read_line(r)?.parse().map_err(|_| PickleError::Invalid("GET index".into()))?;
                    self.get(i)?;
                }
                b'h' => {
                    let i = read_u8(r)? as u64;
                    self.get(i)?;
                }
                b'j' => {
                    let i = u32::from_le_bytes(read_n(r)?) as u64;
                    self.get(i)?;
                }
                other => return bad(format!("unsupported opcode 0x{other:02x}")),
            }
        }
    }

    fn get(&mut self, i: u64) -> Result<()> {
        match self.memo.get(&i) {
            Some(v) => {
                self.stack.push(v.clone());
                Ok(())
            }
            None => bad(format!("memo {i} read before it is written")),
        }
    }

    fn push_str<R: BufRead>(&mut self, r: &mut R, n: u64) -> Result<()> {
        let bytes = read_bytes(r, n)?;
        self.stack.push(V::Str(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(())
    }

    fn skip_bytes<R: BufRead>(&mut self, r: &mut R, n: u64) -> Result<()> {
        let copied = std::io::copy(&mut r.take(n), &mut std::io::sink())?;
        if copied < n {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        self.stack.push(V::Bytes);
        Ok(())
    }
}

pub(super) fn pairs(items: Vec<V>) -> Vec<(V, V)> {
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    out
}

/// A little-endian two's-complement integer (LONG1/LONG4).
pub(super) fn long(bytes: &[u8]) -> V {
    if bytes.len() > 8 {
        return V::Long(bytes.to_vec());
    }
    let fill = if bytes.last().is_some_and(|b| b & 0x80 != 0) { 0xff } else { 0 };
    let mut b = [fill; 8];
    b[..bytes.len()].copy_from_slice(bytes);
    V::Int(i64::from_le_bytes(b))
}

pub(super) fn read_u8<R: Read>(r: &mut R) -> Result<u8> {
    Ok(read_n::<1, _>(r)?[0])
}

pub(super) fn read_n<const N: usize, R: Read>(r: &mut R) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// Reads `n` bytes without trusting `n` for the allocation (a cut file fails, it does not allocate).
pub(super) fn read_bytes<R: Read>(r: &mut R, n: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    r.take(n).read_to_end(&mut out)?;
    if (out.len() as u64) < n {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(out)
}

pub(super) fn read_line<R: BufRead>(r: &mut R) -> Result<String> {
    let mut out = Vec::new();
    r.take(1 << 16).read_until(b'\n', &mut out)?;
    if out.pop() != Some(b'\n') {
        return if out.len() + 1 < 1 << 16 {
            Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into())
        } else {
            bad("text opcode line longer than 64 KiB")
        };
    }
    Ok(String::from_utf8_lossy(&out).trim_end_matches('\r').to_string())
}
