"""Horovod's API on ringtrain, so a Horovod script needs only its import changed.

==============================================  =============================================
Horovod                                          ringtrain
==============================================  =============================================
``import horovod.tensorflow as hvd``             ``import ringtrain.horovod.tensorflow as hvd``
``import horovod.tensorflow.keras as hvd``       ``import ringtrain.horovod.tensorflow.keras as hvd``
``import horovod.keras as hvd``                  ``import ringtrain.horovod.keras as hvd``
``horovod.spark.run(fn, ...)``                   ``ringtrain.horovod.spark.run(fn, ...)``
==============================================  =============================================

Collectives run over ringtrain's MPI world: start scripts with ``ringtrain launch -np N``
(backend mpi; ``auto`` picks it on CPU hosts), ``mpiexec -n N python script.py``, or
:func:`ringtrain.horovod.spark.run`. docs/horovod.md lists every name and what differs.
Importing this package imports nothing heavy; its submodules import TensorFlow.
"""
