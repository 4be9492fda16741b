//! Parquet imports. Columns are matched by name (or by the header a column was named from);
//! each is cast to the dataset's type, and a value that cannot be read as that type rejects
//! its row (line = row number in the file, from 1), as for CSV.

use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, new_null_array,
};
use datafusion::arrow::compute::{
    CastOptions, cast_with_options, concat_batches, filter_record_batch,
};
use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::arrow::util::display::array_value_to_string;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use yunqi_types::{ColumnClass, Error};

use crate::csv_import::{Parsed, Reject, SAMPLE_ROWS};
use crate::schema::{Column, ColumnType, column_name};

/// Whether `bytes` are a Parquet file (magic at both ends).
pub fn looks_like_parquet(bytes: &[u8]) -> bool {
    bytes.len() >= 12 && bytes.starts_with(b"PAR1") && bytes.ends_with(b"PAR1")
}

fn invalid_file(e: impl std::fmt::Display) -> Error {
    Error::invalid("the file is not a readable Parquet file")
        .detail(e.to_string())
        .hint("check the file is complete; a truncated upload loses the footer Parquet needs")
}

fn builder(bytes: &[u8]) -> Result<ParquetRecordBatchReaderBuilder<Bytes>, Error> {
    ParquetRecordBatchReaderBuilder::try_new(Bytes::copy_from_slice(bytes)).map_err(invalid_file)
}

fn column_type(t: &DataType) -> ColumnType {
    match t {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => ColumnType::Int,
        DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Decimal128(..) => {
            ColumnType::Float
        }
        DataType::Boolean => ColumnType::Bool,
        DataType::Date32 | DataType::Date64 => ColumnType::Date,
        DataType::Timestamp(..) => ColumnType::Timestamp,
        _ => ColumnType::Text,
    }
}

/// The columns of a Parquet file, as a dataset's schema.
pub fn infer_columns(bytes: &[u8]) -> Result<Vec<Column>, Error> {
    let b = builder(bytes)?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, f) in b.schema().fields().iter().enumerate() {
        let (name, label) = column_name(f.name(), i);
        if !seen.insert(name.clone()) {
            return Err(
                Error::invalid(format!("column \"{name}\" appears twice in the file"))
                    .hint("give every column a different name"),
            );
        }
        out.push(Column {
            name,
            label,
            column_type: column_type(f.data_type()),
            class: ColumnClass::Internal,
            class_declared: false,
            detected: None,
        });
    }
    Ok(out)
}

/// Reads a Parquet file into rows of `columns`, rejecting rows with values that do not fit.
pub fn parse(bytes: &[u8], columns: &[Column]) -> Result<Parsed, Error> {
    let b = builder(bytes)?;
    let file_schema = b.schema().clone();
    // For each dataset column, the file column it comes from.
    let mut source: Vec<Option<usize>> = vec![None; columns.len()];
    for (i, f) in file_schema.fields().iter().enumerate() {
        let (made, _) = column_name(f.name(), i);
        let target = columns.iter().position(|c| {
            c.name == *f.name() || c.label.as_deref() == Some(f.name().as_str()) || c.name == made
        });
        match target {
            Some(t) => source[t] = Some(i),
            None => {
                return Err(Error::invalid(format!(
                    "the file has column \"{}\", which the dataset does not",
                    f.name()
                ))
                .hint("add it first with `yunqi dataset add-column DEPT.DATASET NAME:TYPE`, or drop it from the file"));
            }
        }
    }
    let target_schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|c| datafusion::arrow::datatypes::Field::new(&c.name, c.column_type.arrow(), true))
            .collect::<Vec<_>>(),
    ));
    let reader = b.build().map_err(invalid_file)?;
    let safe = CastOptions {
        safe: true,
        ..Default::default()
    };
    let mut good = Vec::new();
    let mut rejects = Vec::new();
    let mut samples: Vec<Vec<String>> = vec![Vec::new(); columns.len()];
    let mut offset = 0u64;
    let mut lines = Vec::new();
    for batch in reader {
        let batch = batch.map_err(invalid_file)?;
        let n = batch.num_rows();
        let mut ok = vec![true; n];
        let mut out: Vec<ArrayRef> = Vec::with_capacity(columns.len());
        for (t, c) in columns.iter().enumerate() {
            let Some(i) = source[t] else {
                out.push(new_null_array(&c.column_type.arrow(), n));
                continue;
            };
            let input = batch.column(i);
            let cast = cast_with_options(input, &c.column_type.arrow(), &safe).map_err(|e| {
                Error::invalid(format!(
                    "column \"{}\" cannot be read as {:?}: {e}",
                    c.name, c.column_type
                ))
            })?;
            for (row, row_ok) in ok.iter_mut().enumerate() {
                if *row_ok && input.is_valid(row) && cast.is_null(row) {
                    *row_ok = false;
                    rejects.push(Reject {
                        line: offset + row as u64 + 1,
                        column: Some(c.name.clone()),
                        reason: format!(
                            "\"{}\" is not a valid {}",
                            array_value_to_string(input, row).unwrap_or_default(),
                            serde_json::to_value(c.column_type)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_string))
                                .unwrap_or_default()
                        ),
                        raw: (0..batch.num_columns())
                            .map(|k| {
                                array_value_to_string(batch.column(k), row).unwrap_or_default()
                            })
                            .collect::<Vec<_>>()
                            .join(","),
                    });
                }
            }
            if samples[t].len() < SAMPLE_ROWS
                && let Ok(text) = datafusion::arrow::compute::cast(input, &DataType::Utf8)
            {
                for v in text.as_string::<i32>().iter().flatten() {
                    if samples[t].len() >= SAMPLE_ROWS {
                        break;
                    }
                    if !v.trim().is_empty() {
                        samples[t].push(v.to_string());
                    }
                }
            }
            out.push(cast);
        }
        let typed = RecordBatch::try_new(target_schema.clone(), out)
            .map_err(|e| Error::internal(format!("parquet import: {e}")))?;
        lines.extend(
            ok.iter()
                .enumerate()
                .filter(|(_, k)| **k)
                .map(|(row, _)| offset + row as u64 + 1),
        );
        let kept = if ok.iter().all(|&k| k) {
            typed
        } else {
            filter_record_batch(&typed, &BooleanArray::from(ok))
                .map_err(|e| Error::internal(format!("parquet import: {e}")))?
        };
        good.push(kept);
        offset += n as u64;
    }
    rejects.sort_by_key(|r| r.line);
    let batch = concat_batches(&target_schema, &good)
        .map_err(|e| Error::internal(format!("parquet import: {e}")))?;
    Ok(Parsed {
        batch,
        pieces: Vec::new(),
        lines,
        rejects,
        samples,
        header: true,
        delimiter: b',',
    })
}
