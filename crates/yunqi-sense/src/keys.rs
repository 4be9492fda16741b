//! Group keys to dense group numbers: each key column's values are interned to small ids
//! (0 is NULL), and a combination of ids to a group number, so that the aggregation loops
//! index plain vectors instead of hashing rows.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, DictionaryArray, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int32Type, Int64Type};
use yunqi_types::Error;

/// A fast, non-cryptographic hasher for in-memory keys (not exposed to untrusted collision
/// attacks in a way that matters: key cardinality is bounded by the view's grouping columns).
#[derive(Default, Clone, Copy)]
pub struct Fx(u64);

const K: u64 = 0xf135_7aea_2e62_a9c5;

impl Hasher for Fx {
    #[inline]
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.write_u64(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.write_u64(u64::from_le_bytes(buf) ^ ((rest.len() as u64) << 59));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.write_u64(i as u64);
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.write_u64(i as u64);
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.wrapping_add(i)).wrapping_mul(K);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

/// A hash map with [`Fx`].
pub type FxMap<KEY, V> = HashMap<KEY, V, BuildHasherDefault<Fx>>;

/// Integers in `0..DENSE_MAX` are interned through a vector instead of a hash map.
const DENSE_MAX: i64 = 1 << 20;

/// The distinct values of one key column.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum KeyDict {
    /// Integer-like values (int, bool, date, timestamp as their integer form).
    Int {
        /// Values by id; `values[0]` is NULL.
        values: Vec<Option<i64>>,
        /// Ids of values in `0..DENSE_MAX`, by value (0: not seen).
        #[serde(skip)]
        dense: Vec<u32>,
        /// Ids of other values.
        #[serde(skip)]
        map: FxMap<i64, u32>,
    },
    /// Text values.
    Str {
        /// Values by id; `values[0]` is NULL.
        values: Vec<Option<Box<str>>>,
        /// Ids by value.
        #[serde(skip)]
        map: FxMap<Box<str>, u32>,
    },
}

impl KeyDict {
    /// An empty dictionary for text (`text`) or integer-like values.
    pub fn new(text: bool) -> KeyDict {
        if text {
            KeyDict::Str {
                values: vec![None],
                map: FxMap::default(),
            }
        } else {
            KeyDict::Int {
                values: vec![None],
                dense: Vec::new(),
                map: FxMap::default(),
            }
        }
    }

    /// Rebuilds the lookup structures after deserialising.
    pub fn reindex(&mut self) {
        match self {
            KeyDict::Int { values, dense, map } => {
                dense.clear();
                map.clear();
                for (id, v) in values.iter().enumerate().skip(1) {
                    let v = v.expect("only id 0 is NULL");
                    if (0..DENSE_MAX).contains(&v) {
                        if dense.len() <= v as usize {
                            dense.resize(v as usize + 1, 0);
                        }
                        dense[v as usize] = id as u32;
                    } else {
                        map.insert(v, id as u32);
                    }
                }
            }
            KeyDict::Str { values, map } => {
                map.clear();
                for (id, v) in values.iter().enumerate().skip(1) {
                    map.insert(v.clone().expect("only id 0 is NULL"), id as u32);
                }
            }
        }
    }

    /// Number of ids handed out (NULL included).
    pub fn len(&self) -> usize {
        match self {
            KeyDict::Int { values, .. } => values.len(),
            KeyDict::Str { values, .. } => values.len(),
        }
    }

    /// Whether only NULL is known.
    pub fn is_empty(&self) -> bool {
        self.len() <= 1
    }

    #[inline]
    fn int_id(
        values: &mut Vec<Option<i64>>,
        dense: &mut Vec<u32>,
        map: &mut FxMap<i64, u32>,
        v: i64,
    ) -> u32 {
        if (0..DENSE_MAX).contains(&v) {
            let slot = v as usize;
            if let Some(&id) = dense.get(slot)
                && id != 0
            {
                return id;
            }
            if dense.len() <= slot {
                dense.resize(slot + 1, 0);
            }
            let id = values.len() as u32;
            values.push(Some(v));
            dense[slot] = id;
            id
        } else {
            *map.entry(v).or_insert_with(|| {
                values.push(Some(v));
                (values.len() - 1) as u32
            })
        }
    }

    #[inline]
    fn str_id(values: &mut Vec<Option<Box<str>>>, map: &mut FxMap<Box<str>, u32>, s: &str) -> u32 {
        if let Some(&id) = map.get(s) {
            return id;
        }
        let id = values.len() as u32;
        values.push(Some(s.into()));
        map.insert(s.into(), id);
        id
    }

    /// The ids of a column's values, written to `out` (one per row).
    pub fn intern(&mut self, column: &ArrayRef, out: &mut Vec<u32>) -> Result<(), Error> {
        out.clear();
        let n = column.len();
        match self {
            KeyDict::Int { values, dense, map } => {
                let ints = int_values(column)?;
                let a = ints.as_primitive::<Int64Type>();
                let raw = a.values();
                if a.null_count() == 0 {
                    out.extend(raw.iter().map(|&v| Self::int_id(values, dense, map, v)));
                } else {
                    for i in 0..n {
                        out.push(if a.is_valid(i) {
                            Self::int_id(values, dense, map, raw[i])
                        } else {
                            0
                        });
                    }
                }
            }
            KeyDict::Str { values, map } => match column.data_type() {
                DataType::Dictionary(_, _) => {
                    let d = dictionary(column)?;
                    let dict_values: &StringArray = d.values().as_string::<i32>();
                    let ids: Vec<u32> = (0..dict_values.len())
                        .map(|i| {
                            if dict_values.is_valid(i) {
                                Self::str_id(values, map, dict_values.value(i))
                            } else {
                                0
                            }
                        })
                        .collect();
                    let keys = d.keys();
                    if keys.null_count() == 0 {
                        out.extend(keys.values().iter().map(|&k| ids[k as usize]));
                    } else {
                        for i in 0..n {
                            out.push(if keys.is_valid(i) {
                                ids[keys.value(i) as usize]
                            } else {
                                0
                            });
                        }
                    }
                }
                _ => {
                    let owned;
                    let s: &StringArray = match column.data_type() {
                        DataType::Utf8 => column.as_string::<i32>(),
                        _ => {
                            owned = cast(column, &DataType::Utf8)
                                .map_err(|e| Error::internal(format!("key column: {e}")))?;
                            owned.as_string::<i32>()
                        }
                    };
                    if s.null_count() == 0 {
                        for i in 0..n {
                            out.push(Self::str_id(values, map, s.value(i)));
                        }
                    } else {
                        for i in 0..n {
                            out.push(if s.is_valid(i) {
                                Self::str_id(values, map, s.value(i))
                            } else {
                                0
                            });
                        }
                    }
                }
            },
        }
        Ok(())
    }
}

/// A column of integer-like values as Int64 (timestamps as microseconds, dates as days,
/// booleans as 0/1).
pub fn int_values(column: &ArrayRef) -> Result<ArrayRef, Error> {
    match column.data_type() {
        DataType::Int64 => Ok(column.clone()),
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 => {
            let plain = cast(column, &DataType::Int64);
            plain.map_err(|e| Error::internal(format!("integer column: {e}")))
        }
        _ => cast(column, &DataType::Int64)
            .map_err(|e| Error::internal(format!("integer column: {e}"))),
    }
}

/// A text column as a dictionary with Int32 keys (cast if needed).
pub fn dictionary(column: &ArrayRef) -> Result<DictionaryArray<Int32Type>, Error> {
    let target = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    let c = if column.data_type() == &target {
        column.clone()
    } else {
        cast(column, &target).map_err(|e| Error::internal(format!("text column: {e}")))?
    };
    Ok(c.as_dictionary::<Int32Type>().clone())
}

/// Combinations of key ids to group numbers.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Groups {
    /// Key columns.
    pub width: usize,
    /// Each group's key ids, `width` per group.
    pub ids: Vec<u32>,
    /// Number of groups.
    pub count: usize,
    #[serde(skip)]
    pair: FxMap<u64, u32>,
    #[serde(skip)]
    wide: FxMap<Box<[u32]>, u32>,
}

impl Groups {
    /// No groups yet, over `width` key columns.
    pub fn new(width: usize) -> Groups {
        let mut g = Groups {
            width,
            ..Groups::default()
        };
        if width == 0 {
            g.count = 1;
        }
        g
    }

    /// Rebuilds the lookup after deserialising.
    pub fn reindex(&mut self) {
        self.pair.clear();
        self.wide.clear();
        if self.width >= 2 {
            for g in 0..self.count {
                let k = &self.ids[g * self.width..(g + 1) * self.width];
                if self.width == 2 {
                    self.pair
                        .insert(((k[0] as u64) << 32) | k[1] as u64, g as u32);
                } else {
                    self.wide.insert(k.into(), g as u32);
                }
            }
        }
    }

    /// The key ids of group `g`.
    pub fn key(&self, g: usize) -> &[u32] {
        &self.ids[g * self.width..(g + 1) * self.width]
    }

    /// Group numbers of rows, from each key column's ids (`cols[k][row]`).
    pub fn assign(&mut self, cols: &[Vec<u32>], rows: usize, out: &mut Vec<u32>) {
        out.clear();
        match self.width {
            0 => out.resize(rows, 0),
            1 => {
                // One key: the key id is the group number; groups are the ids seen so far.
                out.extend_from_slice(&cols[0]);
                let max = cols[0].iter().copied().max().map_or(0, |m| m as usize + 1);
                if max > self.count {
                    self.ids.extend((self.count as u32)..(max as u32));
                    self.count = max;
                }
            }
            2 => {
                let (a, b) = (&cols[0], &cols[1]);
                for i in 0..rows {
                    let k = ((a[i] as u64) << 32) | b[i] as u64;
                    let next = self.count as u32;
                    let g = *self.pair.entry(k).or_insert(next);
                    if g == next {
                        self.ids.push(a[i]);
                        self.ids.push(b[i]);
                        self.count += 1;
                    }
                    out.push(g);
                }
            }
            w => {
                let mut key = vec![0u32; w];
                for i in 0..rows {
                    for (k, c) in cols.iter().enumerate() {
                        key[k] = c[i];
                    }
                    let g = match self.wide.get(key.as_slice()) {
                        Some(&g) => g,
                        None => {
                            let g = self.count as u32;
                            self.wide.insert(key.clone().into_boxed_slice(), g);
                            self.ids.extend_from_slice(&key);
                            self.count += 1;
                            g
                        }
                    };
                    out.push(g);
                }
            }
        }
    }
}
