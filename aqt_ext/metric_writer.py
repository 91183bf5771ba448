"""Training metrics to the log and to TensorBoard, without TensorFlow.

clu's `metric_writers` and `periodic_actions` import TensorFlow (4-7 s per
process on 2 cores), which every training run, sweep worker and test
subprocess then paid for nothing: the loop only writes scalars. This writer
logs them in clu's LoggingWriter format (``[step] name=value, ...``) and,
on the writing process, appends them to a TensorBoard event file in the
workdir, written with tensorboard's protobufs and record writer (its
`EventFileWriter` would import TensorFlow for its file I/O; TensorBoard
reads the file as it read clu's). Rates (``steps_per_sec``) are measured
over each log window by the loop.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Mapping

from absl import logging


class MetricWriter:
  """Scalars of a run: absl log lines, plus TensorBoard events in `logdir`
  unless `just_logging` (the processes other than 0 of a multi-process
  run)."""

  def __init__(self, logdir: str, just_logging: bool = False):
    self._file = self._records = None
    if not just_logging:
      # pylint: disable-next=g-import-not-at-top
      from tensorboard.summary.writer.record_writer import RecordWriter
      os.makedirs(logdir, exist_ok=True)
      name = (f"events.out.tfevents.{int(time.time()):010d}."
              f"{socket.gethostname()}.{os.getpid()}.0")
      self._file = open(os.path.join(logdir, name), "ab")  # pylint: disable=consider-using-with
      self._records = RecordWriter(self._file)
      self._add(file_version="brain.Event:2")

  def _add(self, **fields) -> None:
    # pylint: disable-next=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2
    self._records.write(event_pb2.Event(wall_time=time.time(),
                                        **fields).SerializeToString())

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = {k: float(v) for k, v in scalars.items()}
    logging.info("[%d] %s", step,
                 ", ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))
    if self._records is not None:
      # pylint: disable-next=g-import-not-at-top
      from tensorboard.compat.proto import summary_pb2
      self._add(step=int(step), summary=summary_pb2.Summary(value=[
          summary_pb2.Summary.Value(tag=k, simple_value=v)
          for k, v in values.items()]))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Logged (the full config is in the workdir's config.json)."""
    logging.info("[hparams] %s", ", ".join(
        f"{k}={v!r}" for k, v in sorted(hparams.items())))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = self._records = None
