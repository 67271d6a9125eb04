"""The ingestion as an Apache Beam pipeline: the same steps as the local run, spread by a runner.

  python -m data_pipeline.preprocess --runner DirectRunner --input-dir IN --output-dir OUT ...
  python -m data_pipeline.preprocess --runner FlinkRunner --flink_master=HOST:PORT ...

  pending inputs --Reshuffle--> judge each (ingest.process_input; convert/all also write its clip
  file) --> collect the records --> merge with OUT's manifest --> plan the shards -->
  --Reshuffle--> write each shard --> rewrite the manifest, drop unclaimed clip files, stats

Every step calls the functions the local run calls, on the same plan, so the shards are the
same bytes. IN and OUT are paths or fsspec URLs (`storage`): on a cluster, either a file system
that every worker mounts (NFS) or a bucket (gs://, s3://) that every worker can reach, e.g.
  python -m data_pipeline.preprocess --runner DataflowRunner --input-dir gs://b/videos \
      --output-dir gs://b/out --project P --region R --temp_location gs://b/tmp \
      --setup_file ./setup.py --requirements_file REQS  (REQS: gcsfs, for avgen[gcs])
(imageio-ffmpeg brings the ffmpeg binary to the workers.)
Workers copy each input to a local temporary file for ffmpeg and upload what they write.
A memory:// URL (tests) is visible only inside one process: it works with the in-process
DirectRunner (the default `direct_running_mode`), not with multi_processing workers.

The manifest is assembled in one step on one worker, which holds every new record in memory.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from data_pipeline import ingest
from data_pipeline import manifest
from data_pipeline import preprocess
from data_pipeline import sharding
from data_pipeline import storage
from data_pipeline.preprocess_config import PreprocessConfig


def run(input_dir: str, output_dir: str, config: PreprocessConfig, *, mode: str = "all",
        samples_per_shard: int = 1000, runner: str = "DirectRunner",
        beam_args: Sequence[str] = ()) -> dict[str, Any]:
  """Runs the pipeline to completion; returns the stats (also in OUT/stats.json)."""
  # pylint: disable=g-import-not-at-top  (Beam is needed only for this runner)
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions

  input_dir, output_dir = storage.normalize(input_dir), storage.normalize(output_dir)
  if not storage.is_url(output_dir):
    output_dir = os.path.abspath(output_dir)
  inputs, _, pending = preprocess.prepare(input_dir, output_dir, config, mode, samples_per_shard)
  rel_paths = [rel for _, rel in inputs]
  keep_clips = output_dir if mode in ("convert", "all") else None
  options = PipelineOptions(list(beam_args), runner=runner)
  with beam.Pipeline(options=options) as p:
    if mode == "shard" or not pending:
      new = p | "NoInputs" >> beam.Create([[]])
    else:
      new = (p
             | "Inputs" >> beam.Create(pending)
             | "Spread" >> beam.Reshuffle()
             | "Judge" >> beam.Map(_judge, config, keep_clips)
             | "Collect" >> beam.combiners.ToList())
    records = new | "Merge" >> beam.Map(_merge, output_dir, rel_paths)
    if mode in ("shard", "all"):
      written = (records
                 | "Plan" >> beam.FlatMap(_plan, output_dir, samples_per_shard)
                 | "SpreadShards" >> beam.Reshuffle()
                 | "WriteShard" >> beam.Map(_write_shard, output_dir)
                 | "CollectShards" >> beam.combiners.ToList())
      shards = beam.pvalue.AsSingleton(written)
    else:
      shards = None
    _ = records | "Finish" >> beam.Map(_finish, output_dir, config, samples_per_shard, mode,
                                        shards)
  return manifest.read_stats(output_dir)


def _judge(task: tuple[str, str], config: PreprocessConfig, keep_clips: str | None
           ) -> dict[str, Any]:
  path, rel = task
  return ingest.process_input(path, rel, config, keep_clips)


def _merge(new: list[dict[str, Any]], output_dir: str, rel_paths: list[str]
           ) -> list[dict[str, Any]]:
  """The record of every current input: this run's, else the one in OUT's manifest."""
  records = manifest.read_manifest(output_dir)
  records.update({r["path"]: r for r in new})
  return [records[rel] for rel in rel_paths]


def _plan(records: list[dict[str, Any]], output_dir: str, samples_per_shard: int
          ) -> list[dict[str, Any]]:
  return sharding.start(output_dir, sharding.plan_shards(records, samples_per_shard))


def _write_shard(shard: dict[str, Any], output_dir: str) -> str:
  return storage.basename(sharding.write_shard(output_dir, shard))


def _finish(records: list[dict[str, Any]], output_dir: str, config: PreprocessConfig,
            samples_per_shard: int, mode: str, written: list[str] | None) -> None:
  shards = None
  if mode in ("shard", "all"):
    plan = sharding.plan_shards(records, samples_per_shard)
    shards = sharding.finish(output_dir, plan, samples_per_shard)
  preprocess.finish(output_dir, config, records, shards)
