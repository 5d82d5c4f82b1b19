r"""Input feed from an image folder: everything in memory against streamed records.

``python -m benchmarks.streaming_feed --src=../shared/data/gtsrb32.npz --images=5000 --image_size=128``

Writes ``--images`` GTSRB training images (and a few test images) as PNG files into
``--folder`` (``train/<class>/*.png``, ``test/<class>/*.png``; kept and reused), then
measures each feed in its own subprocess, so each peak RSS is that feed's alone:

* ``memory``: every image decoded and resized into one uint8 array up front (as the
  in-memory loaders do), poisoned with ``poison.poison_train_set``, wrapped with
  ``feed.process_data``;
* ``stream``: ``streaming.process_data_from_config`` (labels read once, poisoning
  decisions from them), records decoded when their batch is taken.

Both then read ``--epochs`` epochs of ``pipeline.sharded_train_batches`` through
``take`` (host side only: no device, no model). Columns: seconds to be ready (load,
or label scan), images/s of ``take`` (mean over the epochs), peak RSS of the process,
and the size of the decoded training set for scale. A square trigger poisons 10%.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_TAG = "STREAMING_FEED_RESULT "


def write_folder(src: str, folder: str, images: int, test_images: int, seed: int = 0) -> None:
  """A class-folder copy of a seeded subset of an npz dataset, as PNG (skipped when present)."""
  import numpy as np
  from PIL import Image

  from backdoor_jax.data import images as image_lib

  done = os.path.join(folder, "DONE")
  if os.path.exists(done):
    return
  with np.load(src) as arrays:
    for split, n in (("train", images), ("test", test_images)):
      labels = arrays[f"{split}_labels"]
      keep = image_lib.stratified_subset(labels, n, seed)
      data = arrays[f"{split}_images"][keep]
      for i, (x, y) in zip(keep, zip(data, labels[keep])):
        d = os.path.join(folder, split, f"{int(y):05d}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(x).save(os.path.join(d, f"{int(i):06d}.png"))
  with open(done, "w") as f:
    f.write(f"{src} {images} {test_images}\n")


def measure(kind: str, folder: str, image_size: int, batch: int, epochs: int, threads: int) -> dict:
  """One feed, in this process: time to be ready, images/s of take, peak RSS."""
  import jax
  import numpy as np

  from backdoor_jax import poison, triggers
  from backdoor_jax.data import pipeline, records, streaming
  from backdoor_jax.train import feed
  from benchmarks import common

  key = jax.random.key(0)
  trig = triggers.make_patch_trigger((image_size, image_size), size=0.1)
  settings = dict(target=0, mode="all_to_one", rate=0.1)
  t0 = time.perf_counter()
  if kind == "memory":
    source = records.open_split("folder", split="train", path=folder, data_dir=None, image_size=image_size,
                                  max_examples=None, seed=0)
    images, labels = records.read_split(source, threads)
    images, labels, _ = poison.poison_train_set(key, images, labels, trig, num_classes=source.num_classes,
                                                **settings)
    data = feed.process_data(images, labels)
  else:
    data = streaming.process_data_from_config(
        "folder", path=folder, data_dir=None, image_size=image_size, seed=0, max_train=None, num_shards=1,
        trigger=trig, poison_key=key, num_threads=threads, **settings)
  ready = time.perf_counter() - t0
  rates, checksum = [], 0
  for epoch in range(epochs):
    t0, n = time.perf_counter(), 0
    for idx in pipeline.sharded_train_batches(data.num_examples, batch, 0, epoch, data.num_shards):
      x, y = data.take(idx)
      n += len(y)
      checksum += int(x[:, 0, 0, 0].sum()) + int(y.sum())
    rates.append(n / (time.perf_counter() - t0))
  return {"feed": kind, "ready_s": ready, "images_per_s": float(np.mean(rates)), "checksum": checksum,
          "peak_rss": common.max_rss_bytes(), "dataset_bytes": data.num_examples * image_size ** 2 * 3}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--src", default=os.path.join("..", "shared", "data", "gtsrb32.npz"))
  parser.add_argument("--folder", default="/tmp/gtsrb_png")
  parser.add_argument("--images", type=int, default=5000)
  parser.add_argument("--image_size", type=int, default=128)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--threads", type=int, default=0, help="decoding threads (0: images.num_io_threads())")
  parser.add_argument("--worker", choices=("memory", "stream"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  folder = os.path.join(args.folder, str(args.images))
  if args.worker:
    from backdoor_jax.data import images as image_lib
    threads = args.threads or image_lib.num_io_threads()
    result = measure(args.worker, folder, args.image_size, args.batch, args.epochs, threads)
    print(_TAG + json.dumps(result), flush=True)
    return
  from benchmarks import common
  t0 = time.perf_counter()
  write_folder(args.src, folder, args.images, max(43, args.images // 10))
  print(f"# streaming feed: {args.images} GTSRB images as PNG in {folder} (written/checked in "
        f"{time.perf_counter() - t0:.1f} s), resized to {args.image_size}px, batch {args.batch}, "
        f"{args.epochs} epochs; load average at start {common.load_average()}")
  print("| feed | ready (s) | take (images/s) | peak RSS (MiB) | decoded train set (MiB) |")
  print("| --- | --- | --- | --- | --- |")
  results = []
  for kind in ("memory", "stream"):
    cmd = [sys.executable, "-m", "benchmarks.streaming_feed", f"--worker={kind}", *sys.argv[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((l for l in out.stdout.splitlines() if l.startswith(_TAG)), None)
    if line is None:
      raise SystemExit(f"error: the {kind} worker failed: {out.stderr.strip().splitlines()[-1:]}")
    r = json.loads(line[len(_TAG):])
    results.append(r)
    print(f"| {kind} | {r['ready_s']:.1f} | {r['images_per_s']:.0f} | {r['peak_rss'] / 2**20:.0f} | "
          f"{r['dataset_bytes'] / 2**20:.0f} |", flush=True)
  if results[0]["checksum"] != results[1]["checksum"]:
    raise SystemExit("error: the two feeds gave different batches")
  print(f"# both feeds gave the same batches (checksum {results[0]['checksum']}); load average at end "
        f"{common.load_average()}")


if __name__ == "__main__":
  main()
