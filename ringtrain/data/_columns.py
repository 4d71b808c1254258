"""Which columns can become tensors, checked twice: by Spark type on the driver, by values on executors.

The driver checks the DataFrame's schema before any job runs (:func:`check_schema`).
Nulls and arrays of different lengths only show in the values, so the executors
check those while they encode rows (:func:`normalize_batch`) and the task agents
check that every task saw the same array lengths. :class:`ColumnInfo` is what the
agents and workers know about one stored column.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import DataError

# Field metadata that marks a boolean column stored as uint8 (Arrow packs booleans into
# bits, which cannot be appended batch after batch as raw bytes).
BOOL_MARK = {b"ringtrain.dtype": b"bool"}

_NUMERIC_SPARK_TYPES = ("ByteType", "ShortType", "IntegerType", "LongType", "FloatType", "DoubleType")

_HINTS = {
    "DecimalType": "cast it to double: F.col(c).cast('double')",
    "DateType": "turn it into a number, e.g. F.unix_date(c)",
    "TimestampType": "turn it into a number, e.g. F.unix_seconds(c)",
    "TimestampNTZType": "turn it into a number, e.g. F.unix_seconds(F.col(c).cast('timestamp'))",
    "VectorUDT": "turn it into an array with pyspark.ml.functions.vector_to_array(c)",
    "MapType": "select the values you need as columns of their own",
    "StructType": "select its fields as columns of their own, e.g. F.col(c + '.field')",
    "NullType": "every value is null; drop the column",
}


@dataclass(frozen=True)
class ColumnInfo:
    """One stored column: ``kind`` is scalar, vector (fixed-length array), string or binary.

    ``dtype`` is the numpy dtype name of a scalar or of a vector's elements (``bool``
    included); ``width`` is a vector's length.
    """

    name: str
    kind: str
    dtype: str = ""
    width: int = 0

    @property
    def row_shape(self) -> tuple[int, ...]:
        return (self.width,) if self.kind == "vector" else ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ColumnInfo:
        return cls(str(data["name"]), str(data["kind"]), str(data["dtype"]), int(data["width"]))

    def describe(self) -> str:
        if self.kind == "vector":
            return f"array<{self.dtype}>[{self.width}]"
        return self.dtype or self.kind


def _type_name(data_type) -> str:
    return type(data_type).__name__


def _why_not_tensor(data_type) -> str | None:
    """None when Spark ``data_type`` can become a tensor column, else what to do instead."""
    name = _type_name(data_type)
    if name in _NUMERIC_SPARK_TYPES or name in ("BooleanType", "StringType", "BinaryType"):
        return None
    if name in ("CharType", "VarcharType"):
        return None
    if name == "ArrayType":
        element = _type_name(data_type.elementType)
        if element in _NUMERIC_SPARK_TYPES or element == "BooleanType":
            return None
        if element == "ArrayType":
            return "nested arrays are not supported; flatten them (F.flatten(c)) and reshape in the model"
        return f"arrays must hold numbers, not {data_type.elementType.simpleString()}"
    return _HINTS.get(name, "cast it to a number, string or array of numbers")


def check_schema(schema, dataset: str) -> list[str]:
    """The column names of a Spark ``schema``, after checking every column can become a tensor.

    Raises DataError naming each bad column, its type and what to do.
    """
    names = [field.name for field in schema.fields]
    if not names:
        raise DataError(f"dataset {dataset!r} has no columns")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(
                f"dataset {dataset!r} has two columns named {name!r}; rename one (e.g. after a join)"
            )
        seen.add(name)
    problems = []
    for field in schema.fields:
        why = _why_not_tensor(field.dataType)
        if why is not None:
            problems.append(
                f"column {field.name!r} has type {field.dataType.simpleString()}, "
                f"which cannot become a tensor ({why.replace('(c)', f'({field.name!r})')})"
            )
    if problems:
        raise DataError(f"dataset {dataset!r}: " + "; ".join(problems))
    return names


def normalize_batch(batch, dataset: str, source_partition: int):
    """Make an Arrow batch from Spark storable as raw columns.

    Booleans become uint8 (marked in field metadata); arrays become fixed-size lists.
    Raises DataError on nulls and on arrays of different lengths within the batch.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    fields, arrays = [], []
    where = f"dataset {dataset!r}, Spark partition {source_partition}"
    for field, array in zip(batch.schema, batch.columns, strict=True):
        if array.null_count:
            raise DataError(
                f"column {field.name!r} has null values ({where}); tensors cannot hold nulls: drop or "
                f"fill them first, e.g. df.na.drop(subset=[{field.name!r}]) or df.na.fill(0)"
            )
        metadata = None
        kind = field.type
        if pa.types.is_boolean(kind):
            array, metadata = pc.cast(array, pa.uint8()), BOOL_MARK
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            array, metadata = _fixed_length(field.name, array, where)
        elif not (
            pa.types.is_integer(kind)
            or pa.types.is_floating(kind)
            or pa.types.is_string(kind)
            or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)
        ):
            raise DataError(
                f"column {field.name!r} arrived as Arrow type {kind} ({where}), which is unsupported"
            )
        fields.append(pa.field(field.name, array.type, nullable=False, metadata=metadata))
        arrays.append(array)
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _fixed_length(name: str, array, where: str):
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths = pc.list_value_length(array)
    shortest, longest = pc.min_max(lengths).values()
    if shortest.as_py() != longest.as_py():
        raise DataError(
            f"column {name!r} holds arrays of different lengths ({shortest.as_py()} to {longest.as_py()}, "
            f"{where}); ringtrain needs one length per column: pad or cut them, e.g. F.slice(c, 1, n)"
        )
    width = shortest.as_py()
    if width == 0:
        raise DataError(f"column {name!r} holds empty arrays ({where}); drop the column")
    values = array.flatten()
    if values.null_count:
        raise DataError(f"column {name!r} has null array elements ({where}); fill them first")
    metadata = None
    if pa.types.is_boolean(values.type):
        values, metadata = pc.cast(values, pa.uint8()), BOOL_MARK
    return pa.FixedSizeListArray.from_arrays(values, width), metadata


def column_info(field) -> ColumnInfo:
    """What a worker needs to know about a normalized Arrow field."""
    import pyarrow as pa

    is_bool = (field.metadata or {}).get(b"ringtrain.dtype") == b"bool"
    kind = field.type
    if pa.types.is_fixed_size_list(kind):
        dtype = "bool" if is_bool else kind.value_type.to_pandas_dtype().__name__
        return ColumnInfo(field.name, "vector", dtype, kind.list_size)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return ColumnInfo(field.name, "string", "str")
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return ColumnInfo(field.name, "binary", "bytes")
    return ColumnInfo(field.name, "scalar", "bool" if is_bool else kind.to_pandas_dtype().__name__)
