"""The test-set number of each finished main-stage point, read once: a copy
of the point's workdir (config and final checkpoint) is re-evaluated with
``eval_split='test'`` (`train.train_and_evaluate` resumes at the last step,
trains nothing and evaluates), so the sweep's validation results stay as
they are. Writes DIR/test_results.jsonl (one line per point: id, axes,
test accuracy), appending; points already in it are skipped.

  python experiments/dq_ablation_v2/test_eval.py OUT SWEEP_DIR... [--shard K/N]
"""

import json
import os
import shutil
import sys

import ml_collections

from aqt_ext import sweep, train


def main(argv):
  shard, n_shards = 0, 1
  if "--shard" in argv:
    i = argv.index("--shard")
    shard, n_shards = map(int, argv[i + 1].split("/"))
    argv = argv[:i] + argv[i + 2:]
  out, sweep_dirs = argv[0], argv[1:]
  os.makedirs(out, exist_ok=True)
  done_file = os.path.join(out, f"test_results.{shard}.jsonl")
  done = set()
  if os.path.exists(done_file):
    done = {json.loads(l)["id"] for l in open(done_file)}
  points = []
  for d in sweep_dirs:
    records, _ = sweep.read_results(os.path.join(d, sweep.RESULTS_FILE))
    for pid, r in sorted(sweep.latest_records(records).items()):
      if r.get("status") == "ok":
        points.append((d, pid, r))
  for k, (d, pid, r) in enumerate(points):
    if k % n_shards != shard or pid in done:
      continue
    src = os.path.join(d, sweep.POINTS_DIR, pid)
    dst = os.path.join(out, "points", pid)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(
        "result.json", "events.*", "lock", "log.txt"))
    config = ml_collections.ConfigDict(
        json.load(open(os.path.join(dst, train.CONFIG_FILE))))
    config.eval_split = "test"
    result = train.train_and_evaluate(config, dst)
    assert result["steps"] == r["steps"] and result["eval_split"] == "test"
    line = {"id": pid, "axes": r["axes"], "sweep": d,
            "validation_accuracy": r["eval_accuracy"],
            "test_accuracy": result["eval_accuracy"],
            "test_examples": result["eval_examples"]}
    with open(done_file, "a") as f:
      f.write(json.dumps(line) + "\n")
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
