"""Train on the user's Spark DataFrame: ``ringtrain.run(fn, data=df)`` and, inside ``fn``,
``ringtrain.data.shard()``.

How the rows travel, layer by layer:

- driver, :mod:`.prepare`: checks ``data`` and builds the training stage's input, one
  partition per barrier task, with the DataFrame API only (classic and Spark Connect);
- task agent, :mod:`.spill`: writes its partition to local disk as Arrow IPC files,
  then every task shares its row counts and each rank gets its rows (:func:`.spill.build_layout`);
- worker, :mod:`.reader`: memory-maps its rows and feeds numpy or ``tf.data``, with the
  same number of steps per epoch on every rank (:mod:`._steps`).
"""

from .reader import Shard, shard

__all__ = ["Shard", "shard"]
