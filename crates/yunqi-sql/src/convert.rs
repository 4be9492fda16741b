//! Arrow record batches to JSON for the HTTP API: numbers stay numbers, booleans booleans,
//! nulls null, times RFC 3339; anything else is rendered as PostgreSQL would print it.

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type,
    UInt16Type, UInt32Type, UInt64Type,
};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use serde_json::Value;

fn cell(array: &dyn Array, row: usize, formatter: &ArrayFormatter<'_>) -> Value {
    if array.is_null(row) || array.data_type() == &DataType::Null {
        return Value::Null;
    }
    match array.data_type() {
        DataType::Boolean => Value::Bool(array.as_boolean().value(row)),
        DataType::Int8 => array.as_primitive::<Int8Type>().value(row).into(),
        DataType::Int16 => array.as_primitive::<Int16Type>().value(row).into(),
        DataType::Int32 => array.as_primitive::<Int32Type>().value(row).into(),
        DataType::Int64 => array.as_primitive::<Int64Type>().value(row).into(),
        DataType::UInt8 => array.as_primitive::<UInt8Type>().value(row).into(),
        DataType::UInt16 => array.as_primitive::<UInt16Type>().value(row).into(),
        DataType::UInt32 => array.as_primitive::<UInt32Type>().value(row).into(),
        DataType::UInt64 => array.as_primitive::<UInt64Type>().value(row).into(),
        DataType::Float32 => {
            serde_json::Number::from_f64(array.as_primitive::<Float32Type>().value(row).into())
                .map_or(Value::Null, Value::Number)
        }
        DataType::Float64 => {
            serde_json::Number::from_f64(array.as_primitive::<Float64Type>().value(row))
                .map_or(Value::Null, Value::Number)
        }
        DataType::Utf8 => Value::String(array.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Value::String(array.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => Value::String(array.as_string_view().value(row).to_string()),
        _ => Value::String(formatter.value(row).to_string()),
    }
}

/// The rows of `batches` as JSON arrays, one value per column.
pub fn rows_to_json(batches: &[RecordBatch]) -> Result<Vec<Value>, String> {
    let options = FormatOptions::default().with_null("");
    let mut rows = Vec::new();
    for batch in batches {
        let formatters: Vec<ArrayFormatter<'_>> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        for row in 0..batch.num_rows() {
            rows.push(Value::Array(
                batch
                    .columns()
                    .iter()
                    .zip(&formatters)
                    .map(|(c, f)| cell(c.as_ref(), row, f))
                    .collect(),
            ));
        }
    }
    Ok(rows)
}

fn render_error(e: datafusion::arrow::error::ArrowError) -> yunqi_types::Error {
    yunqi_types::Error::internal(format!("cannot render the result: {e}"))
}

/// A result as CSV with a header line (also when there are no rows).
pub fn to_csv(
    schema: &datafusion::arrow::datatypes::SchemaRef,
    batches: &[RecordBatch],
) -> Result<Vec<u8>, yunqi_types::Error> {
    let mut out = Vec::new();
    {
        let mut w = datafusion::arrow::csv::WriterBuilder::new()
            .with_header(true)
            .build(&mut out);
        if batches.is_empty() {
            w.write(&RecordBatch::new_empty(schema.clone()))
                .map_err(render_error)?;
        }
        for b in batches {
            w.write(b).map_err(render_error)?;
        }
    }
    Ok(out)
}

/// A result as a Parquet file (snappy).
pub fn to_parquet(
    schema: &datafusion::arrow::datatypes::SchemaRef,
    batches: &[RecordBatch],
) -> Result<Vec<u8>, yunqi_types::Error> {
    let fail = |e: datafusion::parquet::errors::ParquetError| {
        yunqi_types::Error::internal(format!("cannot write the result as Parquet: {e}"))
    };
    let props = datafusion::parquet::file::properties::WriterProperties::builder()
        .set_compression(datafusion::parquet::basic::Compression::SNAPPY)
        .build();
    let mut out = Vec::new();
    let mut w =
        datafusion::parquet::arrow::ArrowWriter::try_new(&mut out, schema.clone(), Some(props))
            .map_err(fail)?;
    for b in batches {
        w.write(b).map_err(fail)?;
    }
    w.close().map_err(fail)?;
    Ok(out)
}

/// A result as an Arrow IPC stream.
pub fn to_arrow_ipc(
    schema: &datafusion::arrow::datatypes::SchemaRef,
    batches: &[RecordBatch],
) -> Result<Vec<u8>, yunqi_types::Error> {
    let mut out = Vec::new();
    {
        let mut w = datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, schema)
            .map_err(render_error)?;
        for b in batches {
            w.write(b).map_err(render_error)?;
        }
        w.finish().map_err(render_error)?;
    }
    Ok(out)
}

#[cfg(test)]
mod format_tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn csv_and_arrow_carry_the_rows() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("plate", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![Some("浙A***45"), None])),
                Arc::new(Int64Array::from(vec![1, 2])),
            ],
        )
        .unwrap();
        let csv = super::to_csv(&schema, std::slice::from_ref(&batch)).unwrap();
        assert_eq!(String::from_utf8(csv).unwrap(), "plate,n\n浙A***45,1\n,2\n");
        let empty = super::to_csv(&schema, &[]).unwrap();
        assert_eq!(String::from_utf8(empty).unwrap(), "plate,n\n");
        let ipc = super::to_arrow_ipc(&schema, std::slice::from_ref(&batch)).unwrap();
        let reader =
            datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
                .unwrap();
        let back: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        assert_eq!(back, vec![batch]);
    }
}
