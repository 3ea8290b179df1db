"""``mmsec plugin new``: a complete, installable, tested plugin package in one command.

Four kinds, each a small but real method that passes its own tests as generated:

- ``attack``: a universal FGSM perturbation (Goodfellow et al., ICLR 2015, made universal
  by summing the input gradient over the training images), with a random-sign control;
- ``defense``: an input-transform defense, bit-depth reduction (feature squeezing, Xu et al.,
  NDSS 2018);
- ``dataset``: a procedural data source of striped images (four orientations, captions);
- ``metric``: a probe, the mean zero-shot margin between the top two classes.

The package has a ``pyproject.toml`` with the ``mmsec`` entry point, the module, tests
that use :mod:`mmsec.testing`, and a README.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from .errors import UsageError
from .io import write_atomic

__all__ = ["KINDS", "new_plugin"]

KINDS = ("attack", "defense", "dataset", "metric")
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def _names(name: str) -> dict[str, str]:
    module = "mmsec_" + name.replace("-", "_")
    cls = "".join(part.capitalize() for part in name.split("-"))
    return {"name": name, "module": module, "cls": cls, "dist": f"mmsec-{name}"}


def new_plugin(name: str, kind: str, directory: str | Path | None = None) -> Path:
    """Write the package of plugin ``name`` of ``kind`` to ``directory`` (default
    ``./mmsec-NAME``); returns the package folder. Refuses to overwrite anything."""
    if not _NAME.match(name):
        raise UsageError(f"plugin name {name!r}: use lower-case letters, digits and single "
                         "hyphens, starting with a letter (e.g. my-attack)")
    if kind not in KINDS:
        raise UsageError(f"unknown plugin kind {kind!r} ({', '.join(KINDS)})")
    n = _names(name)
    root = Path(directory) if directory else Path(f"mmsec-{name}")
    if root.exists() and any(root.iterdir()):
        raise UsageError(f"{root}: exists and is not empty")
    files = {
        "pyproject.toml": _PYPROJECT,
        f"{n['module']}/__init__.py": _MODULES[kind],
        "tests/conftest.py": _CONFTEST,
        f"tests/test_{n['module']}.py": _TESTS[kind],
        "README.md": _README[kind],
    }
    for rel, template in files.items():
        text = textwrap.dedent(template).lstrip("\n").format(**n)
        write_atomic(root / rel, text)
    return root


_PYPROJECT = '''
    [build-system]
    requires = ["setuptools>=68"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "{dist}"
    version = "0.1.0"
    description = "An mmsec plugin: {name}"
    requires-python = ">=3.10"
    dependencies = ["mmsec>=0.2"]

    [project.optional-dependencies]
    test = ["pytest>=8"]

    # mmsec finds the plugin through this entry point (group "mmsec")
    [project.entry-points.mmsec]
    {name} = "{module}"

    [tool.setuptools]
    packages = ["{module}"]

    [tool.pytest.ini_options]
    testpaths = ["tests"]
'''

_CONFTEST = '''
    """mmsec's test fixtures: mmsec_registry, tiny_model, tiny_data, run_context."""

    pytest_plugins = ["mmsec.testing"]
'''

_ATTACK = '''
    """{name}: a universal FGSM perturbation against CLIP's zero-shot classifier.

    Goodfellow et al., "Explaining and Harnessing Adversarial Examples" (ICLR 2015), made
    universal: ``delta = eps * sign(sum over training images of grad_x CE(zero-shot(x), y))``.
    Shapes: images ``[B, 3, H, W]`` with pixels in [0, 1] (never normalised: mmsec's model
    does that); the artifact holds ``delta`` ``[3, H, W]``. Made by ``mmsec plugin new``.
    """

    from __future__ import annotations

    import torch
    import torch.nn.functional as F

    from mmsec import Artifact, Attack, MmsecError, Options, fields, hookimpl, load_images

    __version__ = "0.1.0"
    mmsec_api_version = 2  # the mmsec plugin API this plugin is written for


    class {cls}(Attack):
        """One perturbation for every image: the sign of the summed input gradient."""

        name = "{name}"
        description = "universal FGSM perturbation (L-inf eps) on the zero-shot cross-entropy"

        class Options(Options):
            eps: float = fields.eps(8 / 255)
            train_items: int | None = fields.train_items(512)
            batch_size: int = fields.batch_size(64)

        def fit(self, model, data, run) -> Artifact:
            if not data.classnames:
                raise MmsecError(f"{{self.name}} needs a dataset with class names (zero-shot)")
            o = self.options
            n = len(data) if o.train_items is None else min(len(data), o.train_items)
            items = torch.randperm(len(data), generator=run.rng("items"))[:n]
            head = model.zero_shot_head(data.classnames, data.templates)
            total = None
            for start in run.progress(range(0, n, o.batch_size), desc=self.name):
                x, y = load_images(data, items[start:start + o.batch_size])
                x = x.to(model.device).requires_grad_(True)
                # float64: a confident softmax at CLIP's scale rounds to one-hot in fp32
                loss = F.cross_entropy(model.logits(x, head).double(), y.to(model.device),
                                       reduction="sum")
                (grad,) = torch.autograd.grad(loss, x)
                total = grad.sum(0) if total is None else total + grad.sum(0)
            delta = (o.eps * total.sign()).cpu()
            run.save_image("delta", delta / (2 * o.eps) + 0.5, scale=4, report=True)
            return self.artifact({{"delta": delta}}, meta={{"train_items": n}})

        def apply(self, artifact, images, labels=None, *, victim=None, run=None):
            delta = artifact.tensors["delta"].to(images.device, images.dtype)
            if tuple(delta.shape[-2:]) != tuple(images.shape[-2:]):
                delta = F.interpolate(delta[None], size=images.shape[-2:], mode="nearest")[0]
            return (images + delta).clamp(0, 1)

        def control(self, artifact, seed=0):
            """Random signs of the same budget: what the gradient bought is the difference."""
            delta = artifact.tensors["delta"]
            gen = torch.Generator().manual_seed(seed)
            noise = (torch.randint(0, 2, delta.shape, generator=gen).float() * 2 - 1)
            return artifact.variant({{"delta": noise * self.options.eps}}, control="random signs")


    @hookimpl
    def register_attacks(register):
        register({cls})
'''

_ATTACK_TEST = '''
    """Tests of {name}, with mmsec's testing fixtures (mmsec.testing)."""

    import torch
    from mmsec import Artifact, load_images
    from mmsec.testing import invoke

    import {module}


    def test_registers(mmsec_registry):
        registry = mmsec_registry({module})
        assert registry.failures() == []
        assert registry.attack("{name}") is {module}.{cls}


    def test_fools_far_more_than_its_control(mmsec_registry, tiny_model, tiny_data, run_context):
        attack = {module}.{cls}({{"train_items": 256}})
        artifact = attack.fit(tiny_model, tiny_data, run_context)
        x, _ = load_images(tiny_data, range(200))
        head = tiny_model.zero_shot_head(tiny_data.classnames, tiny_data.templates)

        def predictions(images):
            with torch.no_grad():
                return (tiny_model.encode_image(images) @ head.t()).argmax(1)

        clean = predictions(x)
        fooled = (predictions(attack.apply(artifact, x)) != clean).float().mean()
        control = (predictions(attack.apply(attack.control(artifact), x)) != clean).float().mean()
        assert fooled > 0.15 and fooled > 3 * control, (fooled, control)  # measured: 0.24 vs 0
        adv = attack.apply(artifact, x)
        assert (adv - x).abs().max() <= attack.options.eps + 1e-6 and adv.min() >= 0


    def test_artifact_round_trip(tiny_model, tiny_data, run_context, tmp_path):
        attack = {module}.{cls}({{"train_items": 64}})
        artifact = attack.fit(tiny_model, tiny_data, run_context)
        loaded = Artifact.load(artifact.save(tmp_path / "a.safetensors"))
        x = torch.rand(2, 3, 48, 48)
        assert torch.equal(attack.apply(loaded, x), attack.apply(artifact, x))


    def test_command(mmsec_registry, tmp_path):
        mmsec_registry({module})
        r = invoke("attack", "-p", "{name}", "-o", "train_items", "128", "--limit", "100",
                   "--knn-bank", "0", "--out", tmp_path / "run", "-q")
        assert r.exit_code == 0, r.output
        assert (tmp_path / "run" / "artifacts" / "{name}.safetensors").is_file()
'''

_DEFENSE = '''
    """{name}: bit-depth reduction of the input (feature squeezing).

    Xu et al., "Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks"
    (NDSS 2018): each colour channel is rounded to ``2**bits`` levels before the model sees
    it, which removes perturbations smaller than half a level. An input-transform defense:
    mmsec wraps the model, and the weights stay as they are. Made by ``mmsec plugin new``.
    """

    from __future__ import annotations

    import torch
    from pydantic import Field

    from mmsec import InputTransform, Options, hookimpl

    __version__ = "0.1.0"
    mmsec_api_version = 2  # the mmsec plugin API this plugin is written for


    class {cls}(InputTransform):
        """Round pixels to ``2**bits`` levels per channel."""

        name = "{name}"
        description = "bit-depth reduction of the input (feature squeezing, Xu et al. 2018)"

        class Options(Options):
            bits: int = Field(4, ge=1, le=8, description="bits kept per colour channel")

        def transform(self, artifact, images: torch.Tensor) -> torch.Tensor:
            levels = 2 ** self.options.bits - 1
            return torch.round(images.clamp(0, 1) * levels) / levels


    @hookimpl
    def register_defenses(register):
        register({cls})
'''

_DEFENSE_TEST = '''
    """Tests of {name}, with mmsec's testing fixtures (mmsec.testing)."""

    import torch
    from mmsec import load_images
    from mmsec.testing import invoke

    import {module}


    def test_registers(mmsec_registry):
        registry = mmsec_registry({module})
        assert registry.failures() == [] and registry.defense("{name}") is {module}.{cls}


    def test_squeezes_the_input_and_keeps_clean_accuracy(tiny_model, tiny_data, run_context):
        defense = {module}.{cls}({{"bits": 3}})
        wrapped = defense.run_apply(tiny_model, tiny_data, run_context)
        assert wrapped.fingerprint != tiny_model.fingerprint  # never the unwrapped cache
        x, y = load_images(tiny_data, range(200))
        squeezed = defense.transform(None, x)
        assert torch.allclose(squeezed * 7, (squeezed * 7).round(), atol=1e-5)
        head = tiny_model.zero_shot_head(tiny_data.classnames, tiny_data.templates)
        with torch.no_grad():
            before = ((tiny_model.encode_image(x) @ head.t()).argmax(1) == y).float().mean()
            after = ((wrapped.encode_image(x) @ head.t()).argmax(1) == y).float().mean()
        assert after > before - 0.1, (before, after)


    def test_command_and_the_saved_wrapper(mmsec_registry, tmp_path):
        mmsec_registry({module})
        r = invoke("defend", "-p", "{name}", "--clean-items", "16", "--limit", "100",
                   "--out", tmp_path / "run", "-q")
        assert r.exit_code == 0, r.output
        saved = tmp_path / "run" / "artifacts" / "model.safetensors"
        r = invoke("eval", "--pretrained", saved, "--limit", "100", "--knn-bank", "0",
                   "--out", tmp_path / "eval", "--json")
        assert r.exit_code == 0, r.output  # the checkpoint reloads with its wrapper
'''

_DATASET = '''
    """{name}: a procedural data source of striped images (``-d {name}``).

    Four classes of gratings (horizontal, vertical, diagonal, checkered), random colours,
    period and phase, each with captions, deterministic from the seed. Made by
    ``mmsec plugin new``; replace the generator with your own images.
    """

    from __future__ import annotations

    import math

    import torch

    from mmsec import DatasetSource, TensorDataset, UsageError, hookimpl

    __version__ = "0.1.0"
    mmsec_api_version = 2  # the mmsec plugin API this plugin is written for

    CLASSES = ["horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard"]
    SIZES = {{"train": 2000, "test": 400, "val": 400}}


    def stripes(arg=None, *, split="test", seed=0, n=None, **_):
        """``{name}[:N]``: ``N`` (or the split's size) striped images of 32x32 px."""
        if split not in SIZES:
            raise UsageError(f"dataset {name}: unknown split {{split!r}} (train, test, val)")
        n = int(arg) if arg else (n or SIZES[split])
        gen = torch.Generator().manual_seed(seed * 10 + list(SIZES).index(split))
        labels = torch.randint(0, len(CLASSES), (n,), generator=gen)
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        images = torch.empty(n, 3, 32, 32)
        for i, label in enumerate(labels.tolist()):
            period = 4 + 8 * float(torch.rand(1, generator=gen))
            phase = 2 * math.pi * float(torch.rand(1, generator=gen))
            coord = [yy, xx, (xx + yy) / math.sqrt(2), None][label]
            if coord is None:
                wave = torch.sin(2 * math.pi * xx / period) * torch.sin(2 * math.pi * yy / period)
            else:
                wave = torch.sin(2 * math.pi * coord / period + phase)
            colour = torch.rand(2, 3, 1, 1, generator=gen)
            mask = (wave > 0).float()[None]
            images[i] = mask * colour[0] + (1 - mask) * colour[1]
        captions = [[f"a picture of {{CLASSES[y]}}.", f"{{CLASSES[y]}} in two colours."]
                    for y in labels.tolist()]
        return TensorDataset((images * 255).round().to(torch.uint8), labels, name="{name}",
                             split=split, classnames=CLASSES, captions=captions)


    @hookimpl
    def register_datasets(register):
        register(DatasetSource("{name}", stripes, "{name}[:N] - striped images, 4 classes"))
'''

_DATASET_TEST = '''
    """Tests of {name}, with mmsec's testing fixtures (mmsec.testing)."""

    import json

    from mmsec.testing import invoke

    import {module}


    def test_registers_and_loads(mmsec_registry):
        registry = mmsec_registry({module})
        ds = registry.load_dataset("{name}:64", split="train")
        assert len(ds) == 64 and ds.classnames == {module}.CLASSES and ds.has_captions
        image, label = ds[0]
        assert image.shape == (3, 32, 32) and 0 <= image.min() and image.max() <= 1
        assert 0 <= label < 4 and ds.captions(0)
        again = registry.load_dataset("{name}:64", split="train")
        assert ds.key(5) == again.key(5)  # deterministic


    def test_eval_command(mmsec_registry, tmp_path):
        mmsec_registry({module})
        r = invoke("eval", "-d", "{name}:100", "--knn-bank", "0", "--out", tmp_path / "e",
                   "--json")
        assert r.exit_code == 0, r.output
        metrics = json.loads(r.stdout)["metrics"]
        assert 0 <= metrics["clean_top1"] <= 1 and "clean_i2t_r1" in metrics
'''

_METRIC = '''
    """{name}: the mean zero-shot margin, a probe every mmsec evaluation runs.

    The margin is the cosine of the best class minus that of the runner-up, averaged over
    the images of a view: an attack that pushes images towards the decision boundary
    lowers it before it flips predictions. Made by ``mmsec plugin new``.
    """

    from __future__ import annotations

    from mmsec import Metric, hookimpl

    __version__ = "0.1.0"
    mmsec_api_version = 2  # the mmsec plugin API this plugin is written for


    def margin(view):
        """``{{"margin": mean(top-1 cosine - top-2 cosine)}}`` for views with class names."""
        head = view.task.head
        if head is None or head.shape[0] < 2:
            return None
        sims = view.images @ head.t()
        top = sims.topk(2, dim=1).values
        return {{"margin": float((top[:, 0] - top[:, 1]).mean())}}


    @hookimpl
    def register_metrics(register):
        register(Metric("{name}", margin, "mean zero-shot margin between the top two classes"))
'''

_METRIC_TEST = '''
    """Tests of {name}, with mmsec's testing fixtures (mmsec.testing)."""

    import json

    from mmsec.testing import invoke

    import {module}


    def test_registers(mmsec_registry):
        registry = mmsec_registry({module})
        assert registry.failures() == [] and "{name}" in registry.metrics


    def test_an_attack_lowers_the_margin(mmsec_registry, tmp_path):
        mmsec_registry({module})
        r = invoke("attack", "-p", "pgd", "--limit", "100", "--knn-bank", "0",
                   "--out", tmp_path / "run", "--json")
        assert r.exit_code == 0, r.output
        results = json.loads(r.stdout)
        m = results["metrics"]
        assert m["adv_margin"] < m["clean_margin"]
        assert any(row["task"] == "{name}" for row in results["rows"])
'''

_MODULES = {"attack": _ATTACK, "defense": _DEFENSE, "dataset": _DATASET, "metric": _METRIC}
_TESTS = {"attack": _ATTACK_TEST, "defense": _DEFENSE_TEST, "dataset": _DATASET_TEST,
          "metric": _METRIC_TEST}

_README_COMMON = '''

    ## Install and test

    ```bash
    pip install -e ".[test]"
    pytest
    ```

    The plugin declares `mmsec_api_version = 2` (the plugin API it is written for) and the
    entry point `{name} = "{module}"` in the group `mmsec`; `mmsec plugins` lists it.
    Its tests use mmsec's fixtures (`mmsec.testing`): `mmsec_registry`, `tiny_model`,
    `tiny_data`, `run_context`. See mmsec's docs/plugins.md and docs/api.md.
'''

_README = {
    "attack": '''
    # {dist}

    An mmsec attack plugin: `{name}`, a universal FGSM perturbation.

    ```bash
    mmsec attack --plugin {name} -o eps 8/255
    ```
''' + _README_COMMON,
    "defense": '''
    # {dist}

    An mmsec defense plugin: `{name}`, bit-depth reduction of the input (an
    input-transform defense).

    ```bash
    mmsec defend --plugin {name} -o bits 4
    ```
''' + _README_COMMON,
    "dataset": '''
    # {dist}

    An mmsec data source: `{name}`, striped images in four classes.

    ```bash
    mmsec eval -d {name}
    ```
''' + _README_COMMON,
    "metric": '''
    # {dist}

    An mmsec metric plugin: `{name}`, the mean zero-shot margin between the two best
    classes, which every evaluation then reports (`clean_margin`, `adv_margin`, ...).

    ```bash
    mmsec eval
    ```
''' + _README_COMMON,
}
