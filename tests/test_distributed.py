"""torchrun: 2 CPU processes on gloo give what one process gives, and only rank 0 writes.

Each case runs once in this process (the CLI, one process) and once under
``python -m torch.distributed.run --nproc_per_node 2`` with the same global batch and seed,
then compares the artifact tensors (UAP: max abs difference <= 1e-5, only the float
reduction order differs, measured 3e-7; FARE: <= 1% of how far the weights moved, measured
0.15%) and every metric (<= 2/64 absolute, relative for metrics above 1: two items of the
64 that a last-digit difference could flip across a decision boundary; measured 0 for the
counts).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mmsec import distributed
from mmsec.cli import main
from mmsec.model import load_model

ITEMS = 64
TENSOR_TOL = 1e-5
METRIC_TOL = max(1e-4, 2 / ITEMS)

UAP = ["attack", "-p", "uap", "-o", "loss", "ce", "-o", "steps", "6", "-o", "train_items",
       str(ITEMS), "-o", "batch_size", "16", "--limit", str(ITEMS), "--knn-bank", "0", "-q"]
# SGD: Adam turns the float noise of near-zero gradients into +-lr steps, which would
# measure the optimiser, not the data parallelism
FARE = ["defend", "-p", "fare", "-o", "steps", "3", "-o", "batch_size", "16", "-o", "optimizer",
        "sgd", "-o", "lr", "1e-6", "-o", "warmup_steps", "0", "--clean-items", str(ITEMS),
        "--limit", str(ITEMS), "-q"]
# AdvCLIP: a GAN (two optimisers), batch norms in D, in-batch InfoNCE and topology sums
ADVCLIP = ["attack", "-p", "advclip", "-o", "train_items", str(ITEMS), "-o", "batch_size", "16",
           "-o", "epochs", "1", "-o", "min_steps", "0", "--limit", str(ITEMS), "--knn-bank", "0",
           "-q"]

# C-PGC: the batch mean inside the log, sums over the batch, per-item noise in the views
CPGC = ["attack", "-p", "cpgc", "-o", "train_items", str(ITEMS), "-o", "batch_size", "16",
        "-o", "epochs", "1", "--limit", str(ITEMS), "--knn-bank", "0", "-q"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one(args: list[str], out: Path) -> None:
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output


def _two(args: list[str], out: Path, tmp: Path, cache: Path | None = None) -> str:
    """The same command under torchrun (2 gloo processes); returns its stdout."""
    tmp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MMSEC_PROGRESS": "0", "TMPDIR": str(tmp)}
    if cache is not None:
        env["MMSEC_CACHE_DIR"] = str(cache)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         "-m", "mmsec", *args, "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # rank 1 wrote nothing: its private run folder is gone, and it printed nothing
    assert not [p for p in tmp.iterdir() if p.name.startswith("mmsec-rank")], \
        list(tmp.iterdir())
    assert proc.stdout.count("report:") == 1, proc.stdout
    return proc.stdout


def _compare(one: Path, two: Path) -> dict[str, float]:
    """Max abs difference of every artifact tensor and of every metric."""
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file()
                   and "checkpoints" not in p.parts)
    others = sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file()
                    and "checkpoints" not in p.parts)
    assert files == others  # the same files, written once
    diffs = {}
    for path in (one / "artifacts").glob("*.safetensors"):
        a, b = load_file(path), load_file(two / "artifacts" / path.name)
        assert a.keys() == b.keys()
        diffs[path.name] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    m1 = json.loads((one / "results.json").read_text())["metrics"]
    m2 = json.loads((two / "results.json").read_text())["metrics"]
    assert m1.keys() == m2.keys()
    assert all((m1[k] is None) == (m2[k] is None) for k in m1)
    # relative to the metric's size for large ones (FARE's loss is ~500)
    diffs["metrics"] = max((abs(m1[k] - m2[k]) / max(1.0, abs(m1[k])) for k in m1
                            if m1[k] is not None), default=0.0)
    return diffs


@pytest.fixture(scope="module")
def uap_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-uap")
    _one(UAP, root / "one")
    _two(UAP, root / "two", root / "tmp")
    return root


def test_uap_under_two_processes_equals_one_process(uap_runs):
    diffs = _compare(uap_runs / "one", uap_runs / "two")
    assert diffs["uap.safetensors"] <= TENSOR_TOL, diffs
    assert diffs["metrics"] <= METRIC_TOL, diffs
    steps = [json.loads(line) for line in (uap_runs / "two" / "scalars.jsonl").open()]
    assert len([s for s in steps if s["scope"] == "step"]) == 6  # same global batches


def test_fare_under_two_processes_equals_one_process(tmp_path):
    _one(FARE, tmp_path / "one")
    _two(FARE, tmp_path / "two", tmp_path / "tmp")
    diffs = _compare(tmp_path / "one", tmp_path / "two")
    # the inner PGD's sign steps flip where a pixel's gradient is float noise, so the
    # weights agree to a small fraction of how far training moved them (measured 0.15%)
    tuned = load_file(tmp_path / "one" / "artifacts" / "model.safetensors")
    original = load_model(device="cpu").clip.state_dict()
    moved = max(float((tuned[k].float() - v.float()).abs().max())
                for k, v in original.items() if k in tuned)
    assert moved > 1e-4
    assert diffs["model.safetensors"] <= 0.01 * moved, (diffs, moved)
    assert diffs["metrics"] <= METRIC_TOL, diffs


def test_advclip_under_two_processes_equals_one_process(tmp_path):
    """The patch and every metric agree to float reduction order (measured 1.8e-7 and
    5e-8; 2.8e-3 and 7e-4 before the topology terms took the global batch). The generator's
    weights drift further (1.3e-3): Adam turns float noise in near-zero gradients into
    +-lr steps, and the patch it emits is what the attack is."""
    _one(ADVCLIP, tmp_path / "one")
    _two(ADVCLIP, tmp_path / "two", tmp_path / "tmp")
    diffs = _compare(tmp_path / "one", tmp_path / "two")
    assert diffs["advclip.safetensors"] <= TENSOR_TOL, diffs
    assert diffs["metrics"] <= METRIC_TOL, diffs


def test_cpgc_under_two_processes_equals_one_process(tmp_path):
    """The first step's losses agree to float order (the global batch mean inside the log,
    the SSE summed over the global batch, the views' noise drawn for the global batch);
    Adam then carries last-bit differences: the word embedding agreed to 1.9e-5 of its
    0.095 (before: the text loss 2.6 apart), the perturbation to 6e-6."""
    _one(CPGC, tmp_path / "one")
    _two(CPGC, tmp_path / "two", tmp_path / "tmp")
    diffs = _compare(tmp_path / "one", tmp_path / "two")
    art = load_file(tmp_path / "one" / "artifacts" / "cpgc.safetensors")
    scale = max(float(t.float().abs().max()) for t in art.values())
    assert diffs["cpgc.safetensors"] <= 1e-3 * scale, (diffs, scale)
    assert diffs["metrics"] <= METRIC_TOL, diffs
    first = [json.loads(next((tmp_path / d / "scalars.jsonl").open()))["values"]
             for d in ("one", "two")]
    assert all(abs(first[0][k] - first[1][k]) <= 1e-5 * max(1.0, abs(first[0][k]))
               for k in first[0]), first


def test_eval_under_two_processes_equals_one_process(uap_runs, tmp_path, monkeypatch):
    args = ["eval", "--limit", "48", "--knn-bank", "40", "-q", "--attack-artifact",
            str(uap_runs / "one" / "artifacts" / "uap.safetensors")]
    # a cache of its own (the session's may hold these items from earlier tests): two
    # processes first, so the kNN bank is not cached yet and they encode it in shards
    # (rank 0 stores it) and attack the items in shards; then one process, from the cache
    cache = tmp_path / "cache"
    monkeypatch.setenv("MMSEC_CACHE_DIR", str(cache))
    _two(args, tmp_path / "two", tmp_path / "tmp", cache=cache)
    _one(args, tmp_path / "one")
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["images_encoded"] >= 40 and one["images_encoded"] == 0  # rank 0 stored them
    diffs = _compare(tmp_path / "one", tmp_path / "two")
    assert diffs["metrics"] <= 1e-6, diffs  # encoding is per item: the same numbers


# ------------------------------------------------------------------ one process: no-ops


def test_the_helpers_are_no_ops_in_one_process():
    assert not distributed.launched() and distributed.world_size() == 1
    assert distributed.rank() == 0 and distributed.is_main()
    x = torch.arange(6.0).view(3, 2)
    assert distributed.gather(x) is x and distributed.gather_rows(x) is x
    assert distributed.all_reduce(x.clone()).equal(x)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.on_global_batch(lambda a: (a * 2, ["t"] * 3), x)[0].equal(x * 2)
    distributed.barrier()


def test_shards_split_a_global_batch_into_contiguous_blocks():
    assert [distributed.shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    batch = (torch.arange(10), torch.zeros(10, 2), ["c"] * 10, 3.0)
    part = distributed.slice_batch(batch, 4, 7, 10)
    assert part[0].tolist() == [4, 5, 6] and part[1].shape == (3, 2)
    assert len(part[2]) == 3 and part[3] == 3.0
    gen = torch.Generator().manual_seed(0)
    whole = torch.rand(10, 2, generator=torch.Generator().manual_seed(0))
    with distributed.sharding(distributed.Shard(4, 7, 10)):
        assert distributed.global_rand((3, 2), generator=gen).equal(whole[4:7])


def test_the_synced_batch_norm_computes_what_batch_norm_computes():
    """Its statistics are all-reduced (identity in one process): output, gradient and
    running statistics must be batch norm's."""
    torch.manual_seed(0)
    ref, bn = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    bn.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    forward = distributed._synced_batch_norm(bn, bn.forward)
    with distributed.sharding(distributed.Shard(0, 4, 4)):
        y = forward(x2)
    want = ref(x)
    assert torch.allclose(y, want, atol=1e-5)
    (y * torch.arange(y.numel()).view_as(y)).sum().backward()
    (want * torch.arange(want.numel()).view_as(want)).sum().backward()
    assert torch.allclose(x2.grad, x.grad, atol=1e-4)
    assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, ref.running_var, atol=1e-5)
    assert int(bn.num_batches_tracked) == 1


def test_eval_of_an_image_folder_under_two_processes_equals_one_process(tmp_path, monkeypatch):
    """Each rank streams its block of files (the loader path), rank 0 stores them all."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(24):
        cls = tmp_path / "imgs" / ("red" if i % 2 else "blue")
        cls.mkdir(parents=True, exist_ok=True)
        rgb = (200, 40, 40) if i % 2 else (40, 40, 200)
        img = np.clip(rng.normal(rgb, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(cls / f"{i}.{'png' if i % 4 < 2 else 'jpg'}")
    args = ["eval", "-d", f"imagefolder:{tmp_path / 'imgs'}", "--split", "train",
            "--knn-bank", "0", "-q"]
    cache = tmp_path / "cache"
    monkeypatch.setenv("MMSEC_CACHE_DIR", str(cache))
    _two(args, tmp_path / "two", tmp_path / "tmp", cache=cache)
    _one(args, tmp_path / "one")
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["images_encoded"] >= 12 and one["images_encoded"] == 0
    assert _compare(tmp_path / "one", tmp_path / "two")["metrics"] <= 1e-6
