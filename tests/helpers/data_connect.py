"""Prepare and spill over a Spark Connect session; print one JSON line of what each rank got.

Usage: data_connect.py ROOT. Starts a local Connect server (``remote("local[2]")``) in
this process, so it runs apart from the test session's classic SparkContext.
"""

import json
import sys

from data_jobs import sized_frame, spill_prepared
from pyspark.sql import SparkSession

from ringtrain.data.prepare import data_error_from, prepare

root = sys.argv[1]
spark = SparkSession.builder.remote("local[2]").getOrCreate()
try:
    assert type(spark).__module__.startswith("pyspark.sql.connect"), type(spark)
    prepared = prepare({"train": sized_frame(spark, [700, 200, 100, 0]), "val": sized_frame(spark, [5])}, 2)
    shards, _ = spill_prepared(prepared, root, barrier=True)
    train = shards["train"]
    ids = sorted(int(i) for s in train for i in s.to_numpy(["id"])["id"])
    # A null found on an executor must come back as the DataError it is, through Connect too.
    nulls = spark.range(10).selectExpr("id", "IF(id = 7, NULL, CAST(id AS DOUBLE)) AS y")
    try:
        spill_prepared(prepare(nulls, 2), root + "/nulls")
        recovered = "no error"
    except Exception as err:
        recovered = str(data_error_from(err))
    print(
        json.dumps(
            {
                "rows": [s.num_rows for s in train],
                "val_rows": [s.num_rows for s in shards["val"]],
                "ids_ok": ids == list(range(1000)),
                "steps": [s.steps_per_epoch(32) for s in train],
                "null_error": recovered,
            }
        )
    )
finally:
    spark.stop()
